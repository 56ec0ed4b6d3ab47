"""``gloo`` / ``hccl``: blocks move over a 2-rank torch.distributed group per
producer-rank/consumer-rank pair. One implementation; gloo moves host
tensors (any machine), HCCL moves NPU tensors device to device.

This module is the data path. Groups are stateless: built straight from a
store and registered nowhere (pg_backend.py), one per consumer connection,
formed lazily in a helper thread and cached (pg_group.py). Each producer rank
hosts the TCPStore on its group port (``kv_port + 64 + rank``, see
config.py); each pair's group lives under its own key prefix there.

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
import time
from collections.abc import Callable, Generator
from typing import Any, ClassVar

import torch

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.kv_layout import Chunk, HeadRange, PagedKVCache, plan_chunks
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
from vllm_ascend_pd.transport.pg_backend import check_hccl, serve_store
from vllm_ascend_pd.transport.pg_group import Pair, PairGroups

_MAGIC = 0x5047_4B56  # "PGKV"


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
            check_hccl(device)
            self._buf_device = device
        else:
            self._buf_device = torch.device("cpu")
        largest_block = max(cache.block_bytes(i) for i in range(len(cache.tensors)))
        self.chunk_bytes = max(options.chunk_bytes, largest_block)
        self.depth = max(2, options.pool_bytes // self.chunk_bytes)
        self._bufs = _Buffers(self.depth, self.chunk_bytes, self._buf_device)
        self._timeout_s = options.idle_timeout_s
        self._groups = PairGroups(self.backend, self._buf_device, options.host, self._timeout_s)
        self._store = None
        self._store_host = ""
        if options.role != "consumer":  # producers (and kv_both) host the rendezvous
            self._store, self._store_host = serve_store(options, self._timeout_s)

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
            pair = yield from self._groups.get(pair_id, 0, self._store_host, self.options.group_port, where, end.poll)
            total = yield from self._groups.run(pair, self._send(pair, transfer_id, block_ids, heads, end))
        except Exception as e:
            _tell_failed(link, transfer_id, e)
            raise
        yield from wait_send(
            link, [wire.encode(wire.TransferDone(transfer_id, True))], self._timeout_s
        )
        return total

    def _send(
        self, pair: Pair, transfer_id: str, block_ids: list[int], heads: HeadRange | None,
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
            pair = yield from self._groups.get(link.pair_id, 1, host, port, f"producer {host}:{port}", end.poll)
            total = yield from self._groups.run(pair, self._recv(pair, transfer_id, block_ids, heads, end))
        except TransferError as e:
            if e.cause != "producer_error":  # let the producer stop now, not at its timeout
                _tell_failed(link, transfer_id, e)
            raise
        if not end.seen:
            frames = yield from wait_recv(link, self._timeout_s, "end of transfer")
            end.check(frames)
        return total

    def _recv(
        self, pair: Pair, transfer_id: str, block_ids: list[int], heads: HeadRange | None,
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
        pair: Pair,
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

    def _wait(self, pair: Pair, work: Any, poll: Callable[[], None] | None = None) -> Generator[bool, None, None]:
        deadline = time.monotonic() + self._timeout_s
        while not work.is_completed():
            if poll is not None:
                poll()
            if time.monotonic() >= deadline:
                raise _stalled(pair, self._timeout_s)
            yield False
        _finish(pair, work)

    def close(self) -> None:
        self._groups.close()
        self._store = None  # the store's server stops with its last reference


class GlooTransport(PgTransport):
    name = "gloo"
    backend = "gloo"


class HcclTransport(PgTransport):
    name = "hccl"
    backend = "hccl"


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


def _finish(pair: Pair, work: Any) -> None:
    """Surface a completed operation's error (and, on HCCL, order the current
    stream after it)."""
    try:
        work.wait()
    except RuntimeError as e:
        text = str(e)
        cause = "timeout" if "timed out" in text.lower() else "peer_lost"
        raise TransferError(f"{pair.backend} transfer with {pair.where} failed: {text}", cause) from None


def _stalled(pair: Pair, timeout_s: float) -> TransferError:
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


def _buffer(frame) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame
