"""``gloo`` / ``hccl``: blocks move over a 2-rank torch.distributed group per
producer-rank/consumer-rank pair. One implementation; gloo moves host
tensors (any machine), HCCL moves NPU tensors device to device.

Groups are stateless: they are built directly from a store, never registered
with torch.distributed's default world, so vLLM's own groups are untouched.
Each producer rank hosts a TCPStore on its group port (``kv_port + 64 +
rank``, see config.py). Every consumer connection (one ZMQ DEALER socket,
named on both ends by its routing id, ``Link.pair_id``) forms its own group
under its own key prefix on that store, lazily on its first transfer, in a
helper thread (forming a group blocks until both sides join). The group is
cached until a transfer on it fails, the transport closes, or more than
``_MAX_PAIRS`` groups exist (the least recently used idle one is closed).

Per transfer, group rank 0 (producer) broadcasts a header (magic, block
count, byte count, transfer id fingerprint) and then each chunk of the same
chunk plan the tcp transport uses (a KV-head slice of each block when the
two sides' TP sizes differ, see connector/tp_map.py); rank 1 (consumer) receives into a bounded
pool of staging buffers and scatters. Broadcast rather than send/recv: in a
2-rank group it is the same copy, but gloo's send/recv ``Work`` never reports
``is_completed()`` until ``wait()`` is called (torch 2.13), which would block
the engine thread, while a broadcast's ``Work`` can be polled on gloo and
HCCL alike. The producer ends every transfer with ``TransferDone`` on the
ZMQ link (an error there fails the consumer at once); a dead or silent peer
fails the transfer after ``idle_timeout_s`` at most, and its group is shut
down.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Generator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.kv_layout import Chunk, HeadRange, PagedKVCache, plan_chunks
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

_MAGIC = 0x5047_4B56  # "PGKV"
# Groups kept per transport; each holds sockets and backend threads.
_MAX_PAIRS = 32
# Extra time a group build gets beyond the store/backend timeouts it runs under.
_SETUP_SLACK_S = 5.0
# Longest time close() waits for groups to shut down.
_CLOSE_WAIT_S = 1.0


class PgTransport(Transport):
    name: ClassVar[str] = "pg"
    backend: ClassVar[str] = ""
    # Broadcasts land in staging buffers (forfeited on failure); only the
    # generator scatters them into the cache.
    cancellable: ClassVar[bool] = True
    head_slices: ClassVar[bool] = True

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        super().__init__(cache, options)
        device = cache.tensors[0].device
        if self.backend == "hccl":
            _check_hccl(device)
            self._buf_device = device
        else:
            self._buf_device = torch.device("cpu")
        largest_block = max(cache.block_bytes(i) for i in range(len(cache.tensors)))
        self.chunk_bytes = max(options.chunk_bytes, largest_block)
        self.depth = max(2, options.pool_bytes // self.chunk_bytes)
        self._bufs = _Buffers(self.depth, self.chunk_bytes, self._buf_device)
        self._timeout_s = options.idle_timeout_s
        self._pairs: collections.OrderedDict[bytes, _Pair] = collections.OrderedDict()
        self._closed = False
        self._teardowns: list[Future] = []  # appended from helper threads
        self._store = None
        self._store_host = ""
        if options.role != "consumer":  # producers (and kv_both) host the rendezvous
            self._store, self._store_host = _serve_store(options, self._timeout_s)

    # ------------------------------------------------------------ producer
    def send_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        if self._store is None:
            raise TransferError("this instance hosts no group store (not a producer)", "protocol")
        pair_id = link.pair_id
        where = f"consumer {pair_id.hex()[:12]}"
        end = _EndWatch(link, transfer_id, "consumer")
        try:
            pair = yield from self._pair(pair_id, 0, self._store_host, self.options.group_port, where, end.poll)
            total = yield from self._on_pair(pair, self._send(pair, transfer_id, block_ids, heads, end))
        except Exception as e:
            _tell_failed(link, transfer_id, e)
            raise
        yield from wait_send(
            link, [wire.encode(wire.TransferDone(transfer_id, True))], self._timeout_s
        )
        return total

    def _send(
        self, pair: "_Pair", transfer_id: str, block_ids: list[int], heads: HeadRange | None,
        end: "_EndWatch",
    ) -> Step:
        cache = self.cache
        idx_all = torch.tensor(block_ids, dtype=torch.long, device=cache.tensors[0].device)
        plan = plan_chunks(cache, len(block_ids), self.chunk_bytes, heads)
        total = sum(self._chunk_nbytes(ch, heads) for ch in plan)
        header = self._header(transfer_id, len(block_ids), total)
        yield from self._wait(pair, pair.post(header), end.poll)

        def fill(ch: Chunk, buf: torch.Tensor) -> None:
            # gloo from NPU caches stages through host memory (gather copies).
            idx = idx_all[ch.start : ch.stop]
            cache.gather(ch.tensor, idx, heads, out=buf[: self._chunk_nbytes(ch, heads)])

        yield from self._stream(pair, plan, heads, before=fill, after=None, poll=end.poll)
        return total

    # ------------------------------------------------------------ consumer
    def recv_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        host, port = _group_addr(getattr(link, "endpoint", ""))
        end = _EndWatch(link, transfer_id, "producer")
        try:
            pair = yield from self._pair(link.pair_id, 1, host, port, f"producer {host}:{port}", end.poll)
            total = yield from self._on_pair(pair, self._recv(pair, transfer_id, block_ids, heads, end))
        except TransferError as e:
            if e.cause != "producer_error":  # let the producer stop now, not at its timeout
                _tell_failed(link, transfer_id, e)
            raise
        if not end.seen:
            frames = yield from wait_recv(link, self._timeout_s, "end of transfer")
            end.check(frames)
        return total

    def _recv(
        self, pair: "_Pair", transfer_id: str, block_ids: list[int], heads: HeadRange | None,
        end: "_EndWatch",
    ) -> Step:
        cache = self.cache
        device = cache.tensors[0].device
        idx_all = torch.tensor(block_ids, dtype=torch.long, device=device)
        plan = plan_chunks(cache, len(block_ids), self.chunk_bytes, heads)
        total = sum(self._chunk_nbytes(ch, heads) for ch in plan)
        expected = self._header(transfer_id, len(block_ids), total)
        got = torch.zeros_like(expected)
        yield from self._wait(pair, pair.post(got), end.poll)
        if not torch.equal(got.cpu(), expected.cpu()):
            raise TransferError(
                f"transfer {transfer_id}: the producer announced {got.tolist()[1:3]} "
                f"(blocks, bytes), this side expects {expected.tolist()[1:3]}",
                cause="protocol",
            )

        def scatter(ch: Chunk, buf: torch.Tensor) -> None:
            idx = idx_all[ch.start : ch.stop]
            cache.scatter(ch.tensor, idx, buf[: self._chunk_nbytes(ch, heads)], heads)

        yield from self._stream(pair, plan, heads, before=None, after=scatter, poll=end.poll)
        return total

    # ------------------------------------------------------------ shared
    def _chunk_nbytes(self, ch: Chunk, heads: HeadRange | None = None) -> int:
        return (ch.stop - ch.start) * self.cache.block_bytes(ch.tensor, heads)

    def _header(self, transfer_id: str, num_blocks: int, nbytes: int) -> torch.Tensor:
        fp = int.from_bytes(hashlib.blake2b(transfer_id.encode(), digest_size=7).digest(), "little")
        return torch.tensor([_MAGIC, num_blocks, nbytes, fp], dtype=torch.int64, device=self._buf_device)

    def _stream(
        self,
        pair: "_Pair",
        plan: list[Chunk],
        heads: HeadRange | None,
        before: Callable[[Chunk, torch.Tensor], None] | None,
        after: Callable[[Chunk, torch.Tensor], None] | None,
        poll: Callable[[], None] | None,
    ) -> Generator[bool, None, None]:
        """Keep up to ``depth`` chunk broadcasts in flight, retired in order.
        Buffers still attached to a broadcast when this fails are forfeited to
        the group being torn down, never reused."""
        inflight: collections.deque = collections.deque()
        nxt = 0
        deadline = time.monotonic() + self._timeout_s
        try:
            while nxt < len(plan) or inflight:
                progressed = False
                while nxt < len(plan) and len(inflight) < self.depth:
                    buf = self._bufs.try_acquire()
                    if buf is None:
                        break
                    ch = plan[nxt]
                    view = buf[: self._chunk_nbytes(ch, heads)]
                    try:
                        if before is not None:
                            before(ch, buf)
                        work = pair.post(view)
                    except BaseException:
                        self._bufs.release(buf)
                        raise
                    inflight.append((ch, buf, work))
                    nxt += 1
                    progressed = True
                if inflight and inflight[0][2].is_completed():
                    ch, buf, work = inflight[0]
                    _finish(pair, work)
                    inflight.popleft()
                    try:
                        if after is not None:
                            after(ch, buf)
                    finally:
                        self._bufs.release(buf)
                    progressed = True
                if progressed:
                    deadline = time.monotonic() + self._timeout_s
                    yield True
                    continue
                if poll is not None:
                    poll()
                if time.monotonic() >= deadline:
                    raise _stalled(pair, self._timeout_s)
                yield False
        finally:
            if inflight:
                self._bufs.forfeit(len(inflight))

    def _wait(self, pair: "_Pair", work: Any, poll: Callable[[], None] | None = None) -> Generator[bool, None, None]:
        deadline = time.monotonic() + self._timeout_s
        while not work.is_completed():
            if poll is not None:
                poll()
            if time.monotonic() >= deadline:
                raise _stalled(pair, self._timeout_s)
            yield False
        _finish(pair, work)

    def _on_pair(self, pair: "_Pair", body: Step) -> Step:
        """Run one transfer on ``pair``: one at a time per pair (a second pull on
        the same connection waits), and a failure ends the pair's group."""
        deadline = time.monotonic() + self._timeout_s
        while pair.busy:
            if pair.dropped or time.monotonic() >= deadline:
                raise TransferError(
                    f"the {self.backend} group with {pair.where} is busy or failed", "peer_stalled"
                )
            yield False
        if pair.dropped:
            raise TransferError(f"the {self.backend} group with {pair.where} failed", "peer_lost")
        pair.busy = True
        ok = False
        try:
            result = yield from body
            ok = True
            return result
        finally:
            pair.busy = False
            pair.last_used = time.monotonic()
            if not ok:
                self._drop(pair)

    def _pair(
        self,
        pair_id: bytes,
        rank: int,
        host: str,
        port: int,
        where: str,
        poll: Callable[[], None] | None = None,
    ) -> Generator[bool, None, "_Pair"]:
        if self._closed:
            raise TransferError("the transport is closed", "closed")
        pair = self._pairs.get(pair_id)
        if pair is None:
            self._evict()
            prefix = f"ascend_pd/{pair_id.hex()}/"
            setup = _spawn(self._form_group, host, port, prefix, rank)
            pair = _Pair(pair_id, where, self.backend, setup)
            self._pairs[pair_id] = pair
        else:
            self._pairs.move_to_end(pair_id)
        # The build runs under the store's and the backend's timeouts; this
        # only guards against a build that never returns.
        limit = 2 * self._timeout_s + _SETUP_SLACK_S
        deadline = time.monotonic() + limit
        try:
            while not pair.setup.done():
                if poll is not None:
                    poll()
                if time.monotonic() >= deadline:
                    raise TransferError(
                        f"no {self.backend} group with {where} (rendezvous {host}:{port}) "
                        f"after {limit:.0f}s",
                        cause="timeout",
                    )
                yield False
            if pair.box is None:
                try:
                    pair.box = pair.setup.result()
                except Exception as e:  # noqa: BLE001 - reported with its cause
                    raise TransferError(
                        f"could not form a {self.backend} group with {where} (rendezvous "
                        f"{host}:{port}; is the producer's group port reachable?): {e}",
                        cause="group_setup",
                    ) from None
        except BaseException:
            self._drop(pair)
            raise
        return pair

    def _form_group(self, host: str, port: int, prefix: str, rank: int):
        """Runs in a helper thread: connect to the store, build the group, and
        move one byte so both sides are fully connected (HCCL creates its
        communicator on the first operation)."""
        from torch.distributed import PrefixStore, TCPStore

        if self._buf_device.type == "npu":
            torch.npu.set_device(self._buf_device)  # threads default to device 0
        timeout = timedelta(seconds=self._timeout_s)
        store = TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        pg = _build_group(
            self.backend, PrefixStore(prefix, store), rank, self.options.host, timeout
        )
        try:
            probe = torch.zeros(1, dtype=torch.uint8, device=self._buf_device)
            pg.broadcast([probe], _root0()).wait()
        except BaseException:
            _shutdown(pg)
            raise
        return [pg]  # see _Pair.box

    def _drop(self, pair: "_Pair") -> None:
        if pair.dropped:
            return
        pair.dropped = True
        if self._pairs.get(pair.pair_id) is pair:
            del self._pairs[pair.pair_id]
        # Tear down off the engine thread, once the build (if any) has ended.
        self._teardowns = [f for f in self._teardowns if not f.done()]
        pair.setup.add_done_callback(lambda f: self._teardowns.append(_spawn(_teardown, f)))

    def _evict(self) -> None:
        while len(self._pairs) >= _MAX_PAIRS:
            idle = [p for p in self._pairs.values() if not p.busy and p.setup.done()]
            if not idle:
                return
            logger.info("%s transport: closing the idle group with %s", self.backend, idle[0].where)
            self._drop(idle[0])

    def close(self) -> None:
        self._closed = True
        for pair in list(self._pairs.values()):
            self._drop(pair)
        # Give teardowns a moment, so groups are not destroyed while the
        # interpreter exits; a group with a stuck operation is left behind.
        futures.wait(list(self._teardowns), timeout=_CLOSE_WAIT_S)
        self._store = None  # the store's server stops with its last reference


class GlooTransport(PgTransport):
    name = "gloo"
    backend = "gloo"


class HcclTransport(PgTransport):
    name = "hccl"
    backend = "hccl"


@dataclass(eq=False)
class _Pair:
    pair_id: bytes
    where: str
    backend: str
    setup: Future
    # [group], emptied by the teardown thread. Destroying a gloo group with an
    # operation still pending blocks until that operation times out, so the
    # engine thread never holds the last reference: the teardown thread does.
    box: list | None = None
    busy: bool = False
    dropped: bool = False
    last_used: float = 0.0

    def post(self, tensor: torch.Tensor):
        if not self.box:
            raise TransferError(f"the {self.backend} group with {self.where} was closed", "closed")
        return self.box[0].broadcast([tensor], _root0())


class _Buffers:
    """At most ``count`` chunk buffers are live. A buffer left attached to a
    failed broadcast is forfeited and replaced, never handed out again."""

    def __init__(self, count: int, nbytes: int, device: torch.device):
        self.count = count
        self.nbytes = nbytes
        self.device = device
        self.live = 0
        self._free: list[torch.Tensor] = []

    def try_acquire(self) -> torch.Tensor | None:
        if self._free:
            return self._free.pop()
        if self.live < self.count:
            self.live += 1
            return torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return None

    def release(self, buf: torch.Tensor) -> None:
        self._free.append(buf)

    def forfeit(self, n: int) -> None:
        self.live -= n


class _EndWatch:
    """Watches the ZMQ link for the peer's ``TransferDone``, so a failure on
    the other side ends the transfer at once instead of by timeout."""

    def __init__(self, link: Link, transfer_id: str, peer: str):
        self.link = link
        self.transfer_id = transfer_id
        self.peer = peer
        self.seen = False

    def poll(self) -> None:
        if self.seen:
            return
        frames = self.link.try_recv()
        if frames is not None:
            self.check(frames)

    def check(self, frames: list[Any]) -> None:
        try:
            msg = wire.decode(_buffer(frames[0]))
        except wire.ProtocolError as e:
            raise TransferError(f"bad message during transfer {self.transfer_id}: {e}", "protocol") from None
        if not isinstance(msg, wire.TransferDone) or msg.transfer_id != self.transfer_id:
            raise TransferError(
                f"unexpected {type(msg).__name__} during transfer {self.transfer_id}", "protocol"
            )
        if not msg.ok:
            raise TransferError(
                f"{self.peer} ended transfer {self.transfer_id}: {msg.error or 'no reason given'}",
                cause=f"{self.peer}_error",
            )
        self.seen = True


def _root0():
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    return opts


def _finish(pair: _Pair, work: Any) -> None:
    """Surface a completed operation's error (and, on HCCL, order the current
    stream after it)."""
    try:
        work.wait()
    except RuntimeError as e:
        text = str(e)
        cause = "timeout" if "timed out" in text.lower() else "peer_lost"
        raise TransferError(f"{pair.backend} transfer with {pair.where} failed: {text}", cause) from None


def _stalled(pair: _Pair, timeout_s: float) -> TransferError:
    return TransferError(
        f"{pair.backend} transfer with {pair.where} made no progress for {timeout_s:.1f}s "
        "(peer dead or stalled)",
        cause="timeout",
    )


def _tell_failed(link: Link, transfer_id: str, e: BaseException) -> None:
    msg = wire.TransferDone(transfer_id, False, str(e)[:500])
    try:
        link.send([wire.encode(msg)])
    except (WouldBlock, TransferError, OSError, RuntimeError):
        pass  # the consumer is gone or stuck; it times out on its own


def _group_addr(endpoint: str) -> tuple[str, int]:
    """The producer's group store address, from the control endpoint
    ``tcp://host:control_port`` (group port = control port + offset)."""
    rest = endpoint.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise TransferError(f"cannot derive a group address from {endpoint!r}", "protocol")
    return host.strip("[]"), int(port) + GROUP_PORT_OFFSET


def _serve_store(options: TransportOptions, timeout_s: float):
    """Producer: host the rendezvous store for every pair on group_port,
    bound before vLLM finishes starting, so a taken port fails start-up."""
    from torch.distributed import TCPStore

    bind = options.bind_host or options.host
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, options.group_port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"AscendSimpleConnector cannot listen on {bind}:{options.group_port} for the "
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


def _build_group(backend: str, store, rank: int, local_host: str, timeout: timedelta):
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
    pg = ProcessGroup(store, rank, 2)
    kind = ProcessGroup.BackendType.GLOO
    pg._set_default_backend(kind)
    gloo._set_sequence_number_for_group()
    pg._register_backend(torch.device("cpu"), kind, gloo)
    return pg


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
    pg = ProcessGroup(store, rank, 2)
    kind = ProcessGroup.BackendType.CUSTOM
    pg._set_default_backend(kind)
    hccl._set_sequence_number_for_group()
    pg._register_backend(torch.device("npu"), kind, hccl)
    return pg


def _check_hccl(device: torch.device) -> None:
    import importlib.util

    if device.type != "npu" or importlib.util.find_spec("torch_npu") is None:
        raise ValueError(
            f"transport 'hccl' needs the KV cache on Ascend NPUs (torch_npu); this "
            f"instance's cache is on {device.type!r}. Set "
            "kv_connector_extra_config.transport to 'gloo' or 'tcp' (or 'auto')."
        )


def _shutdown(pg: Any) -> None:
    try:
        pg.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort; the group is abandoned either way
        logger.debug("process-group shutdown failed: %s", e)


def _teardown(setup: Future) -> None:
    """Runs in a helper thread; drops the last reference to the group here,
    where its destructor may wait out pending operations."""
    if setup.exception() is not None:
        return
    box = setup.result()
    pg = box.pop() if box else None
    if pg is not None:
        _shutdown(pg)
        del pg


def _spawn(fn: Callable[..., Any], *args: Any) -> Future:
    """Run a blocking call in a daemon thread (never delays interpreter exit);
    the caller polls the future from the engine thread."""
    fut: Future = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the poller
            fut.set_exception(e)

    threading.Thread(target=run, name="ascend-pd-pg", daemon=True).start()
    return fut


def _buffer(frame) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame
