"""Stateless 2-rank process groups for the ``gloo`` / ``hccl`` transport:
the producer's rendezvous store and building a group on either backend.

Nothing here registers with torch.distributed's default world, so vLLM's own
groups are untouched. NPU packages are imported only when HCCL is selected.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch

from vllm_ascend_pd import net
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.transport.base import TransportOptions

logger = get_logger(__name__)


def serve_store(options: TransportOptions, timeout_s: float):
    """Producer: host the rendezvous store for every pair on group_port,
    bound before vLLM finishes starting, so a taken port fails start-up."""
    from torch.distributed import TCPStore

    bind = options.bind_host or options.host
    sock = socket.socket(net.family_of(bind), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, options.group_port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"AscendSimpleConnector cannot listen on {net.host_port(bind, options.group_port)} for the "
            f"process-group transport's rendezvous: {e}. This port "
            f"is kv_port + {GROUP_PORT_OFFSET} + rank; give every instance on a host its own "
            "kv_port, at least 128 apart, or free the port."
        ) from None
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
    fd = sock.detach()
    try:
        store = TCPStore(
            connect, options.group_port, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s), master_listen_fd=fd, use_libuv=False,
        )
    except BaseException:
        os.close(fd)
        raise
    return store, connect


def build_group(backend: str, store, rank: int, local_host: str, timeout: timedelta):
    """A 2-rank group on ``store``, registered nowhere. (vLLM's
    init_gloo_process_group redirects the process's stdout while it runs,
    which is unsafe from a helper thread, so gloo is built here.)"""
    from torch.distributed import ProcessGroup

    if backend == "hccl":
        return _build_hccl(store, rank, timeout)
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        gloo = ProcessGroupGloo(store, rank, 2, timeout=timeout)
    else:
        # Bind gloo's sockets on this instance's KV address, not whatever
        # the host name resolves to.
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=local_host)]
        gloo = ProcessGroupGloo(store, rank, 2, opts)
    return _wrap(store, rank, gloo, "cpu", ProcessGroup.BackendType.GLOO)


def _build_hccl(store, rank: int, timeout: timedelta):
    """HCCL through torch_npu, the way vllm-ascend builds its stateless
    groups. The platform hook is used when the installed vllm-ascend
    implements it (older releases did; current ones raise NotImplementedError)."""
    from vllm.platforms import current_platform

    try:
        return current_platform.stateless_init_device_torch_dist_pg(
            backend="hccl", prefix_store=store, group_rank=rank, group_size=2, timeout=timeout
        )
    except NotImplementedError:
        pass
    from torch.distributed import ProcessGroup
    from torch_npu._C._distributed_c10d import ProcessGroupHCCL

    opts = ProcessGroupHCCL.Options()
    opts._timeout = timeout
    hccl = ProcessGroupHCCL(store, rank, 2, opts)
    return _wrap(store, rank, hccl, "npu", ProcessGroup.BackendType.CUSTOM)


def _wrap(store, rank: int, backend: Any, device: str, kind: Any):
    """A ProcessGroup whose only backend is ``backend`` (what
    init_process_group would assemble, minus the registration)."""
    from torch.distributed import ProcessGroup

    pg = ProcessGroup(store, rank, 2)
    pg._set_default_backend(kind)
    backend._set_sequence_number_for_group()
    pg._register_backend(torch.device(device), kind, backend)
    return pg


def check_hccl(device: torch.device) -> None:
    import importlib.util

    if device.type != "npu" or importlib.util.find_spec("torch_npu") is None:
        raise ValueError(
            f"transport 'hccl' needs the KV cache on Ascend NPUs (torch_npu); this "
            f"instance's cache is on {device.type!r}. Set "
            "kv_connector_extra_config.transport to 'gloo' or 'tcp' (or 'auto')."
        )


def root0():
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    return opts


def shutdown(pg: Any) -> None:
    try:
        pg.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort; the group is abandoned either way
        logger.debug("process-group shutdown failed: %s", e)
