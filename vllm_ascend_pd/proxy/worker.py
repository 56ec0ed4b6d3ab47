"""One serving process of a multi-worker proxy (``--workers N``).

Started by the supervisor (multiprocessing *spawn*) with the listening
sockets the supervisor bound (one per address of ``--host``); runs the same application as the
single-process proxy, with three differences (see proxy/supervisor.py):
membership comes from the supervisor (proxy/link.py), metrics go to the
shared multiprocess directory, and admission admits this worker's share of
``--max-inflight``.
"""

from __future__ import annotations

import socket
import sys
from typing import Optional

import msgspec

from vllm_ascend_pd.proxy.config import ProxyConfig


class WorkerContext(msgspec.Struct, frozen=True):
    """What the supervisor tells a worker, beside the config and sockets."""
    index: int
    count: int
    parent_pid: int
    control: str      # ipc:// endpoint of the supervisor's ROUTER
    updates: str      # ipc:// endpoint of its membership broadcasts
    metrics_dir: str  # PROMETHEUS_MULTIPROC_DIR
    registration: Optional[str] = None  # the supervisor's --register-port endpoint
    load_path: str = ""  # every worker's load counters (proxy/shared_load.py)


def run_worker(cfg: ProxyConfig, socks: list[socket.socket], ctx: WorkerContext) -> None:
    """Process entry point (must stay importable at module top level).

    ``socks`` arrive as duplicated descriptors: multiprocessing pickles each
    socket of the list for the spawned child."""
    from vllm_ascend_pd.proxy import aio
    from vllm_ascend_pd.proxy.config import ConfigError
    from vllm_ascend_pd.proxy.log import init_logger
    from vllm_ascend_pd.proxy.run import configure_logging, loop_factory, serve

    configure_logging(cfg.log_level, f"worker {ctx.index} ")
    logger = init_logger(__name__)
    with aio.Runner(loop_factory=loop_factory(cfg.uvloop)) as runner:
        try:
            runner.run(serve(cfg, socks=socks, worker=ctx))
        except (ConfigError, OSError, RuntimeError) as exc:
            logger.error("worker %d cannot serve: %s", ctx.index, exc)
            sys.exit(1)
