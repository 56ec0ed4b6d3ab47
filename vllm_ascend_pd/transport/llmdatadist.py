"""``llmdatadist``: the consumer pulls exactly the blocks it needs straight out
of the producer's paged KV cache with CANN's LLMDataDist (HCCS inside a
server, RoCE across servers). No staging buffers, no copies.

At start-up both sides register their paged cache with LLMDataDist's cache
manager as blocks caches (one registration per group of same-shaped tensors,
``BlocksCacheKey(cluster_id, model_id=group)``); the producer also listens on
its NPU's device IP. One transfer is two small messages on the connector's
ZMQ link around one pull:

    producer -> consumer  DataDistOffer (cluster id, device IP/port, block ids)
    consumer              link_clusters on first use, then pull_blocks
    consumer -> producer  TransferDone (ok or why not)

Linking uses ``link_clusters`` (the consumer links, the producer only listens)
rather than the two-sided ``link`` with a generated rank table: no rank table,
no call needed on the producer, and it uses the device IPs and
``llmdatadist_comm_port`` that users of the original connector already set.

The producer keeps the lease (its blocks cannot be reused) until that
TransferDone arrives or ``hold_s`` (sent in the offer) passed; the consumer
starts no pull that could still run after that.

llm_datadist's link and pull calls block, so they run on one helper thread
bound to this rank's NPU; the transfer generators only poll their futures and
the engine thread never blocks. Teardown runs on that thread too, behind any
call in flight: LLMDataDist's finalize must not run concurrently with other
calls. ``llm_datadist`` (and torch_npu) are imported when the transport is
created, never at module load.

API reference: CANN's llm_datadist Python package (hicann/hixl,
src/python/llm_datadist and docs/zh/api/python), and vllm-ascend's
LLMDataDistCMgrConnector (vllm_ascend/distributed/llmdatadist_c_mgr_connector.py,
v0.9.1 to v0.11.0), which used the same cache-manager calls.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import ipaddress
import os
import time
from collections.abc import Callable, Generator
from typing import Any

import torch

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.config import ConfigError
from vllm_ascend_pd.kv_layout import PagedKVCache
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.transport.base import (
    Link,
    Step,
    TransferError,
    Transport,
    TransportOptions,
    WouldBlock,
    wait_recv,
    wait_send,
)

logger = get_logger(__name__)

# Documented limits of the cache manager (CANN 8.x): addresses registered per
# process and device memory registered per process.
MAX_REGISTERED_ADDRS = 240
MAX_REGISTERED_BYTES = 50 * 1024**3
# Over HCCS, registered memory not from aclrtMalloc must be page (2 MB) aligned.
_ALIGN = 2 * 1024 * 1024
_DTYPES = {
    torch.float16: "DT_FLOAT16",
    torch.bfloat16: "DT_BF16",
    torch.float32: "DT_FLOAT",
    torch.int8: "DT_INT8",
}
_ROLES = {"producer": "PROMPT", "consumer": "DECODER", "both": "MIX"}
# LLMDataDist takes its timeouts as int32 milliseconds.
_MAX_MS = 2**31 - 1
# Longest time close() waits for the helper thread's teardown.
_CLOSE_WAIT_S = 1.0


def _ms(seconds: float, floor: int = 1) -> int:
    return min(_MAX_MS, max(floor, int(seconds * 1000)))


def cluster_id_for(device_ip: str) -> int:
    """A deployment-unique LLMDataDist cluster id: the NPU's device IP as an int."""
    return int(ipaddress.IPv4Address(device_ip))


def tensor_groups(cache: PagedKVCache) -> list[list[int]]:
    """Indices of cache tensors grouped by (shape, dtype), first-seen order.

    A registration needs one shape for all its tensors: plain attention is
    one group, MLA (k_nope, k_pe) two."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(cache.tensors):
        groups.setdefault((tuple(t.shape), t.dtype), []).append(i)
    return list(groups.values())


def physical_device(device: torch.device, options: TransportOptions) -> int:
    """The physical NPU id of a logical device: hccn_tool numbers physical ones."""
    logical = device.index if device.index is not None else options.local_rank
    for var in ("ASCEND_RT_VISIBLE_DEVICES", "ASCEND_VISIBLE_DEVICES"):
        visible = [v for v in os.environ.get(var, "").split(",") if v.strip()]
        if visible:
            return int(visible[logical])
    return logical


def discover_device_ip(device: torch.device, options: TransportOptions) -> str:
    from vllm_ascend_pd import hccn

    key = "prefill_device_ips" if options.role != "consumer" else "decode_device_ips"
    try:
        phys = physical_device(device, options)
        ip = hccn.device_ip(phys)
        ipaddress.IPv4Address(ip)  # LLMDataDist links over IPv4 only
    except (hccn.HccnError, ValueError, IndexError) as e:
        raise ConfigError(
            f"transport llmdatadist needs this rank's NPU device IP and could not read it "
            f"({e}); set {key} in kv_connector_extra_config, one IP per tensor-parallel rank"
        ) from None
    logger.info("llmdatadist rank %d: NPU %d has device IP %s (hccn_tool)", options.local_rank, phys, ip)
    return ip


def _bind_device(device: torch.device) -> None:
    # A thread that touches the NPU without set_device creates a context on
    # device 0 (vllm-ascend #12126).
    if device.type == "npu":
        importlib.import_module("torch_npu")
        torch.npu.set_device(device)  # type: ignore[attr-defined]


class LlmDataDistTransport(Transport):
    name = "llmdatadist"

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        super().__init__(cache, options)
        device = cache.tensors[0].device
        self.device_ip = options.device_ip or discover_device_ip(device, options)
        try:
            self._dd = importlib.import_module("llm_datadist")
        except ImportError as e:
            raise ConfigError(
                f"transport llmdatadist needs CANN's llm_datadist package ({e}): source "
                "CANN's set_env.sh (CANN >= 8.0) in the environment that starts vLLM, or "
                "choose transport hccl or tcp"
            ) from None
        self.cluster_id = cluster_id_for(self.device_ip)
        self.groups = tensor_groups(cache)
        self._check_registrable()
        self._device_id = device.index if device.index is not None else options.local_rank
        # Blocking llm_datadist calls (link, pull) wait out their timeouts
        # here, not on the engine thread.
        self._pull_timeout_s = options.idle_timeout_s
        self._link_timeout_s = options.idle_timeout_s
        # LLMDataDist reports failures as LLMException (a RuntimeError): make
        # them ConfigErrors, which name the fix and let `auto` fall back.
        try:
            self._datadist = self._init_datadist()
        except self._dd.LLMException as e:
            raise self._start_error("init", e) from None
        self._caches: list[Any] = []
        try:
            self._register()
        except BaseException as e:
            self._datadist.finalize()
            if isinstance(e, self._dd.LLMException):
                raise self._start_error("register_blocks_cache", e) from None
            raise
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"ascend-pd-llmdd-{options.local_rank}",
            initializer=_bind_device, initargs=(device,),
        )
        # remote cluster id -> future of the link (result: its LLMClusterInfo)
        self._links: dict[int, concurrent.futures.Future] = {}
        # link and pull calls queued or running on the helper thread
        self._queued: set[concurrent.futures.Future] = set()
        self._closed = False

    # ---------------- set-up ----------------
    def _start_error(self, what: str, e: Exception) -> ConfigError:
        opt = self.options
        status = getattr(getattr(e, "status_code", None), "name", "")
        hint = (
            f"check that {self.device_ip}:{opt.comm_port} is this NPU's device IP and that "
            "the port is free (llmdatadist_comm_port + rank; another instance on this NPU's "
            "IP may hold it)"
            if opt.role != "consumer" else
            f"check that {self.device_ip} is this NPU's device IP"
        )
        return ConfigError(
            f"LLMDataDist {what} failed on device {self._device_id} ({status or 'error'}: {e}): "
            f"{hint}, and that no other LLMDataDist runs in this process; or choose "
            "transport hccl or tcp"
        )

    def _check_registrable(self) -> None:
        total = 0
        unaligned = []
        for i, t in enumerate(self.cache.tensors):
            name = self.cache.names[i]
            if t.dtype not in _DTYPES:
                raise ConfigError(
                    f"llmdatadist cannot move KV dtype {t.dtype} ({name}); use "
                    f"{sorted(str(d) for d in _DTYPES)} or transport hccl/tcp"
                )
            if not t.is_contiguous():
                raise ConfigError(
                    f"llmdatadist addresses blocks by offset, but cache tensor {name} "
                    f"(shape {tuple(t.shape)}, stride {t.stride()}) is not block-major "
                    "contiguous; use transport hccl or tcp with this attention backend"
                )
            if t.data_ptr() % _ALIGN:
                unaligned.append(name)
            total += t.numel() * t.element_size()
        if unaligned:
            logger.warning(
                "llmdatadist: %d cache tensors (first %s) are not 2 MB aligned; linking "
                "over HCCS may fail", len(unaligned), unaligned[0],
            )
        if len(self.cache.tensors) > MAX_REGISTERED_ADDRS:
            raise ConfigError(
                f"llmdatadist can register at most {MAX_REGISTERED_ADDRS} cache tensors per "
                f"process, this rank has {len(self.cache.tensors)}: raise tensor parallelism "
                "or use transport hccl"
            )
        if total > MAX_REGISTERED_BYTES:
            raise ConfigError(
                f"llmdatadist can register at most 50 GB of device memory, this rank's KV "
                f"cache is {total / 1024**3:.1f} GB: lower --gpu-memory-utilization or "
                "--num-gpu-blocks-override"
            )

    def _init_datadist(self):
        dd, opt = self._dd, self.options
        role = getattr(dd.LLMRole, _ROLES.get(opt.role, "MIX"))
        datadist = dd.LLMDataDist(role, self.cluster_id)
        conf = dd.LLMConfig()
        conf.device_id = self._device_id
        conf.enable_cache_manager = True
        # Pull timeout in ms; our own waits are longer (see _await).
        conf.sync_kv_timeout = _ms(self._pull_timeout_s)
        # Pull straight from the producer's registered cache (as vllm-ascend's
        # connector did); without it A3 moves KV over RDMA only, not HCCS.
        # Safe here: caches are registered once, before any link.
        conf.enable_remote_cache_accessible = True
        if opt.role != "consumer":
            conf.listen_ip_info = f"{self.device_ip}:{opt.comm_port}"
        datadist.init(conf.generate_options())
        logger.info(
            "llmdatadist rank %d: cluster %d on device %s (%s)%s", opt.local_rank,
            self.cluster_id, self._device_id, self.device_ip,
            f", listening on port {opt.comm_port}" if opt.role != "consumer" else "",
        )
        return datadist

    def _register(self) -> None:
        dd = self._dd
        manager = self._datadist.cache_manager
        for model_id, group in enumerate(self.groups):
            first = self.cache.tensors[group[0]]
            desc = dd.CacheDesc(
                len(group), list(first.shape), getattr(dd.DataType, _DTYPES[first.dtype])
            )
            key = dd.BlocksCacheKey(self.cluster_id, model_id)
            addrs = [self.cache.tensors[i].data_ptr() for i in group]
            self._caches.append(manager.register_blocks_cache(desc, addrs, key))

    # ---------------- producer ----------------
    def send_blocks(self, link: Link, transfer_id: str, block_ids: list[int]) -> Step:
        opt = self.options
        self._check_open()
        if opt.role == "consumer":
            raise TransferError("this instance is a consumer and serves no pulls", "protocol")
        # Room for the consumer to link first and pull once.
        hold_s = self._link_timeout_s + 2 * self._pull_timeout_s + 10.0
        offer = wire.DataDistOffer(
            transfer_id, self.cluster_id, self.device_ip, opt.comm_port, list(block_ids),
            len(self._caches), hold_s,
        )
        yield from wait_send(link, [wire.encode(offer)], opt.idle_timeout_s)
        frames = yield from wait_recv(link, hold_s, "end of the consumer's pull")
        done = _decode(frames)
        if not isinstance(done, wire.TransferDone) or done.transfer_id != transfer_id:
            raise TransferError(f"unexpected reply in transfer {transfer_id}", "protocol")
        if not done.ok:
            raise TransferError(
                f"consumer could not pull transfer {transfer_id}: {done.error}", "consumer_error"
            )
        return len(block_ids) * self.cache.total_block_bytes()

    # ---------------- consumer ----------------
    def recv_blocks(self, link: Link, transfer_id: str, block_ids: list[int]) -> Step:
        self._check_open()
        frames = yield from wait_recv(link, self.options.idle_timeout_s, "LLMDataDist offer")
        offer = _decode(frames)
        if isinstance(offer, wire.TransferDone):
            raise TransferError(
                f"producer ended transfer {transfer_id}: {offer.error or 'no reason given'}",
                "producer_error",
            )
        try:
            self._check_offer(offer, transfer_id, block_ids)
            # A pull must end (sync_kv_timeout) before the producer stops
            # holding the blocks; start none later than that, with a margin.
            start_by = time.monotonic() + offer.hold_s - self._pull_timeout_s - 3.0
            yield from self._ensure_link(offer)
            fut = self._submit(
                self._pull, offer.cluster_id, list(offer.block_ids), list(block_ids), start_by
            )
            yield from self._await(fut, "pull_blocks", self._pull_timeout_s)
        except TransferError as e:
            if e.cause == "pull_failed":
                # The link may be broken: the next transfer links again.
                self._drop_link(offer.cluster_id)
            _tell(link, wire.TransferDone(transfer_id, False, f"{e.cause}: {e}"))
            raise
        yield from wait_send(
            link, [wire.encode(wire.TransferDone(transfer_id, True))], self.options.idle_timeout_s
        )
        return len(block_ids) * self.cache.total_block_bytes()

    def _check_offer(self, offer: Any, transfer_id: str, block_ids: list[int]) -> None:
        if not isinstance(offer, wire.DataDistOffer) or offer.transfer_id != transfer_id:
            raise TransferError(f"expected an LLMDataDist offer for {transfer_id}", "protocol")
        if len(offer.block_ids) != len(block_ids) or min(offer.block_ids, default=0) < 0:
            raise TransferError(
                f"offer for {transfer_id} has {len(offer.block_ids)} blocks, expected "
                f"{len(block_ids)}", "protocol",
            )
        if offer.num_caches != len(self._caches):
            raise TransferError(
                f"producer registered {offer.num_caches} caches, this instance "
                f"{len(self._caches)}: serve the same model on both", "incompatible",
            )
        try:
            ipaddress.IPv4Address(offer.device_ip)
        except ValueError:
            raise TransferError(f"offer names a bad device IP {offer.device_ip!r}", "protocol") from None
        if not 0 < offer.port < 65536 or offer.cluster_id != cluster_id_for(offer.device_ip):
            raise TransferError("offer names a bad LLMDataDist endpoint", "protocol")
        if not 0 < offer.hold_s < 24 * 3600:
            raise TransferError(f"offer has a bad hold time {offer.hold_s!r}", "protocol")

    def _ensure_link(self, offer: wire.DataDistOffer) -> Generator[bool, None, None]:
        fut = self._links.get(offer.cluster_id)
        if fut is None:
            fut = self._submit(self._link, offer.cluster_id, offer.device_ip, offer.port)
            self._links[offer.cluster_id] = fut
        try:
            yield from self._await(fut, "link_clusters", self._link_timeout_s)
        except TransferError:
            # A failed link is retried by the next transfer.
            if self._links.get(offer.cluster_id) is fut:
                del self._links[offer.cluster_id]
            raise

    def _link(self, cluster_id: int, ip: str, port: int):
        dd = self._dd
        info = dd.LLMClusterInfo()
        info.remote_cluster_id = cluster_id
        info.append_local_ip_info(self.device_ip, 0)
        info.append_remote_ip_info(ip, port)
        where = f"{self.device_ip} -> {ip}:{port}"
        try:
            # LLMDataDist advises at least 200 ms (2 s with TLS).
            ret, rets = self._datadist.link_clusters([info], _ms(self._link_timeout_s, 200))
        except dd.LLMException as e:
            raise _link_error(where, getattr(e, "status_code", e)) from None
        ok = (dd.LLMStatusCode.LLM_SUCCESS, dd.LLMStatusCode.LLM_ALREADY_LINK)
        bad = [r for r in (*rets, ret) if r not in ok]  # the per-peer code says more
        if bad:
            raise _link_error(where, bad[0])
        logger.info("llmdatadist: linked %s (cluster %d)", where, cluster_id)
        return info

    def _pull(self, cluster_id: int, src: list[int], dst: list[int], start_by: float) -> None:
        if time.monotonic() > start_by:
            raise TransferError(
                "the pull could not start before the producer stops holding the blocks "
                "(link or earlier pulls took too long)", "timeout",
            )
        dd = self._dd
        manager = self._datadist.cache_manager
        try:
            for model_id, cache in enumerate(self._caches):
                manager.pull_blocks(dd.BlocksCacheKey(cluster_id, model_id), cache, src, dst)
        except dd.LLMException as e:
            raise TransferError(
                f"pull_blocks from cluster {cluster_id} failed ({getattr(e, 'status_code', e)}); "
                "if it timed out raise transfer_timeout_s (LLMDataDist's sync_kv_timeout), "
                "otherwise check the RoCE/HCCS path between the two NPUs", "pull_failed",
            ) from None

    def _drop_link(self, cluster_id: int) -> None:
        """Forget a link (engine thread); unlink it on the helper thread."""
        info = _linked(self._links.pop(cluster_id, None))
        if info is not None and not self._closed:
            self._executor.submit(self._unlink, info)

    def _unlink(self, info: Any) -> None:
        """Helper thread. A normal unlink is sent by the client (this side) and
        also ends the producer's side of the link; a forced one ends only
        ours, so it is the fallback when the producer cannot be told."""
        dd, timeout = self._dd, _ms(self._link_timeout_s, 200)
        for force in (False, True):
            try:
                ret, rets = self._datadist.unlink_clusters([info], timeout, force=force)
            except dd.LLMException as e:
                ret, rets = getattr(e, "status_code", e), []
            bad = [r for r in (*rets, ret) if r != dd.LLMStatusCode.LLM_SUCCESS]
            if not bad:
                return
            logger.warning(
                "llmdatadist: %sunlinking cluster %d failed (%s)%s", "force-" if force else "",
                info.remote_cluster_id, getattr(bad[0], "name", bad[0]),
                "" if force else "; unlinking this side only",
            )

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the transport is closed", "shutdown")

    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        self._check_open()
        fut = self._executor.submit(fn, *args)
        self._queued.add(fut)
        fut.add_done_callback(self._queued.discard)
        return fut

    def _await(self, fut: concurrent.futures.Future, what: str, timeout_s: float):
        # llm_datadist enforces its own timeout; ours only catches a call
        # that never returns, so it is deliberately longer.
        deadline = time.monotonic() + 2 * timeout_s + 5.0
        while not fut.done():
            if time.monotonic() >= deadline:
                raise TransferError(
                    f"LLMDataDist {what} did not return within {2 * timeout_s + 5.0:.0f}s",
                    "timeout",
                )
            yield False
        if fut.cancelled():
            raise TransferError("the transport is closed", "shutdown")
        exc = fut.exception()
        if isinstance(exc, TransferError):
            raise exc
        if exc is not None:
            raise TransferError(f"LLMDataDist {what} failed: {exc!r}", "transport") from exc
        return fut.result()

    # ---------------- teardown ----------------
    def close(self) -> None:
        """Unlink every peer, unregister the caches, finalize: on the helper
        thread, after the call in flight (finalize must not run beside it).
        Waits for that at most _CLOSE_WAIT_S; a pull still running ends
        within sync_kv_timeout and the teardown follows it."""
        if self._closed:
            return
        self._closed = True
        for fut in list(self._queued):
            fut.cancel()  # queued links and pulls never start
        links, self._links = self._links, {}
        teardown = self._executor.submit(self._teardown, links)
        self._executor.shutdown(wait=False)
        done, _ = concurrent.futures.wait([teardown], timeout=_CLOSE_WAIT_S)
        if not done:
            logger.info("llmdatadist: a call in flight delays the teardown; it follows that call")

    def _teardown(self, links: dict[int, concurrent.futures.Future]) -> None:
        for fut in links.values():
            info = _linked(fut)
            if info is not None:
                self._unlink(info)
        dd = self._dd
        manager = self._datadist.cache_manager
        for cache in self._caches:
            try:
                manager.unregister_cache(cache.cache_id)
            except dd.LLMException as e:
                logger.warning("llmdatadist: unregistering cache %s failed: %s", cache.cache_id, e)
        self._caches.clear()
        try:
            self._datadist.finalize()
        except dd.LLMException as e:
            logger.warning("llmdatadist: finalize failed: %s", e)


def _linked(fut: concurrent.futures.Future | None) -> Any:
    """The LLMClusterInfo of a link that succeeded, else None."""
    if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result()


def _link_error(where: str, status: Any) -> TransferError:
    return TransferError(
        f"LLMDataDist could not link {where} ({getattr(status, 'name', status)}): check both "
        "device IPs (`hccn_tool -i <device> -ip -g`; prefill_device_ips / decode_device_ips), "
        "that they reach each other (`hccn_tool -i <device> -ping -g address <ip>`), that "
        "llmdatadist_comm_port is free on the producer, and HCCL_CONNECT_TIMEOUT",
        "link_failed",
    )


def _decode(frames: list) -> Any:
    try:
        return wire.decode(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    except wire.ProtocolError as e:
        raise TransferError(f"bad message from the peer: {e}", "protocol") from None


def _tell(link: Link, msg: wire.TransferDone) -> None:
    """Best effort: a producer that misses this frees the blocks at its timeout."""
    try:
        link.send([wire.encode(msg)])
    except (WouldBlock, TransferError) as e:
        logger.debug("llmdatadist: could not tell the producer about %s: %r", msg.transfer_id, e)
