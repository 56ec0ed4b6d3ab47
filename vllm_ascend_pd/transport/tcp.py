"""``tcp``: KV blocks over a raw TCP stream per consumer connection.

Blocks whose bytes are contiguous in the cache (every CPU layout vLLM and
vllm-ascend use, head slices of ``[B, H, N, C]`` included) go from the
producer's cache to the consumer's with no copy in user space: ``sendmsg``
reads them where they lie and ``recvmsg_into`` writes them where they
belong. Anything else (caches on a device, layouts whose blocks are
strided) is staged through a fixed pool: gathered into a buffer, sent, and
scattered on arrival. Both sides stream the same bytes in the same order,
whichever way each side reads or writes them.

The data stream itself is in ``stream.py``; ZMQ carries only the control
plane, plus ``TransferDone`` when a producer has to give up mid-transfer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator
from vllm_ascend_pd.kv_layout import HeadRange, PagedKVCache, block_runs, plan_chunks, scatter_runs
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.transport import stream
from vllm_ascend_pd.transport.base import (
    Link, Step, TransferError, Transport, TransportOptions, WouldBlock, poll_until,
)

__all__ = ["TcpTransport", "block_runs", "scatter_runs"]  # the helpers live in kv_layout

logger = get_logger(__name__)


class TcpTransport(Transport):
    name = "tcp"
    head_slices = True
    cancellable = True  # bytes land only inside recv calls on the engine thread

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        super().__init__(cache, options)
        largest_block = max(cache.block_bytes(i) for i in range(len(cache.tensors)))
        self.chunk_bytes = max(options.chunk_bytes, largest_block)
        # Staging buffers, one per transfer in flight that needs one; at most
        # pool_bytes in all.
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._max_buffers = max(1, options.pool_bytes // self.chunk_bytes)
        self._rows: dict[tuple[int, Any], np.ndarray | None] = {}
        self._auth = Authenticator(options.secret)
        self._on_refused = None
        self._listener: stream.DataListener | None = None
        if options.role in ("producer", "both"):
            self._listener = stream.DataListener(
                options.bind_host or options.host, options.group_port, self._auth, self._refused
            )
        # Consumer: this rank's data stream to each producer pair.
        self._streams: dict[bytes, Any] = {}
        # Streams with a transfer in flight, and what they wait for.
        self._active: dict[bytes, tuple[Any, int]] = {}
        self._borrowing = 0  # sends waiting for their consumer's stream
        direct = sum(self._block_rows(i, None) is not None for i in range(len(cache.tensors)))
        logger.info(
            "tcp transport: %d of %d cache tensors move without staging%s",
            direct, len(cache.tensors),
            f"; data port {self._listener.port}" if self._listener is not None else "",
        )

    @property
    def data_port(self) -> int:
        return 0 if self._listener is None else self._listener.port

    def service(self, on_refused=None) -> None:
        if on_refused is not None:
            self._on_refused = on_refused
        if self._listener is not None:
            self._listener.poll()

    def _refused(self, reason: str, detail: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason, detail)

    def poll_items(self) -> list[tuple[Any, int]]:
        items = list(self._active.values())
        if self._borrowing and self._listener is not None:
            items += self._listener.poll_items()
        return items

    def drop_pair(self, pair_id: bytes) -> None:
        sock = self._streams.pop(pair_id, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- layout ------------------------------------------------------------
    def _block_rows(self, i: int, heads: HeadRange | None) -> np.ndarray | None:
        """Tensor ``i`` (head slice) as a byte matrix, one row per block,
        sharing the cache's memory; None if a block is not contiguous."""
        key = (i, None if heads is None else (heads.start, heads.stop))
        if key not in self._rows:
            t = self.cache.part(i, heads)
            rows = None
            if t.device.type == "cpu" and t.shape[0] and t[0].numel() and t[0].is_contiguous():
                flat = t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1))
                rows = flat.view(torch.uint8).numpy()
            self._rows[key] = rows
        return self._rows[key]

    def _staged(self, heads: HeadRange | None) -> bool:
        return any(self._block_rows(i, heads) is None for i in range(len(self.cache.tensors)))

    def _acquire(self) -> Step:
        deadline = time.monotonic() + self.options.idle_timeout_s
        while not self._free and self._allocated >= self._max_buffers:
            if time.monotonic() >= deadline:
                raise TransferError(
                    "no staging buffer came free in time: raise buffer_pool_mb", "timeout"
                )
            yield False
        if self._free:
            return self._free.pop()
        self._allocated += 1
        pin = self.cache.tensors[0].device.type != "cpu"
        return torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=pin)

    def _plan_bytes(self, n: int, heads: HeadRange | None) -> int:
        return n * self.cache.total_block_bytes(heads)

    def _views(
        self, block_ids: list[int], heads: HeadRange | None, receive: bool,
        buf: torch.Tensor | None,
    ) -> Iterator[Any]:
        """The transfer's bytes as views, in wire order (``stream.FLUSH``
        marks where a staging buffer is about to be reused)."""
        cache = self.cache
        runs = block_runs(block_ids)
        for i in range(len(cache.tensors)):
            rows = self._block_rows(i, heads)
            if rows is not None:
                tight = rows.strides[0] == rows.shape[1]
                for _, block, n in runs:
                    if tight:
                        yield memoryview(rows[block : block + n].reshape(-1))
                    else:
                        for b in range(block, block + n):
                            yield memoryview(rows[b])
                continue
            assert buf is not None
            idx_all = torch.tensor(block_ids, dtype=torch.long, device=cache.tensors[i].device)
            for ch in plan_chunks(cache, len(block_ids), self.chunk_bytes, heads):
                if ch.tensor != i:
                    continue
                n = (ch.stop - ch.start) * cache.block_bytes(i, heads)
                idx = idx_all[ch.start : ch.stop]
                if not receive:
                    cache.gather(i, idx, heads, out=buf[:n])
                yield memoryview(buf[:n].numpy())
                yield stream.FLUSH
                if receive:
                    cache.scatter(i, idx, buf[:n], heads)

    # -- producer ----------------------------------------------------------
    def send_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        listener = self._listener
        if listener is None:
            raise TransferError("this instance does not serve KV (not a producer)", "protocol")
        timeout = self.options.idle_timeout_s
        pair = link.pair_id
        self._borrowing += 1
        try:
            sock = yield from _borrow(listener, pair, timeout)
        finally:
            self._borrowing -= 1
        nbytes = self._plan_bytes(len(block_ids), heads)
        ok = False
        buf = None
        key = b"s" + pair  # a kv_both instance may send and receive on one pair id
        self._active[key] = (sock, zmq.POLLOUT)
        try:
            if self._staged(heads):
                buf = yield from self._acquire()
            header = memoryview(stream.framed(wire.DataHeader(transfer_id, nbytes)))
            views = self._views(block_ids, heads, False, buf)
            sent = yield from stream.send_views(sock, _chain(header, views), timeout, self.chunk_bytes)
            ok = True
        except BaseException as e:
            _tell_failed(link, transfer_id, e)
            raise
        finally:
            self._active.pop(key, None)
            if buf is not None:
                self._free.append(buf)
            if ok:
                listener.give_back(pair, sock)
            else:
                sock.close()  # the stream is mid-transfer: nobody may read on
        return sent - len(header)

    # -- consumer ----------------------------------------------------------
    def recv_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        timeout = self.options.idle_timeout_s
        pair = link.pair_id
        sock = self._streams.get(pair)
        if sock is None:
            port = getattr(link, "data_port", 0)
            if not port:
                raise TransferError(
                    "the producer announced no tcp data port: install the same "
                    "vllm-ascend-pd version on both instances",
                    "incompatible",
                )
            key = b"r" + pair

            def waiting(s) -> None:
                self._active[key] = (s, zmq.POLLOUT)

            try:
                token = self._auth.sign("data_hello", pair)
                sock = yield from stream.connect(_host_of(link), port, pair, timeout, waiting, token)
            finally:
                self._active.pop(key, None)
            self._streams[pair] = sock
        ok = False
        buf = None
        watch = _EndWatch(link, transfer_id)
        key = b"r" + pair
        self._active[key] = (sock, zmq.POLLIN)
        try:
            if self._staged(heads):
                buf = yield from self._acquire()
            header = yield from _read_header(sock, timeout, watch.poll)
            nbytes = self._plan_bytes(len(block_ids), heads)
            if header.transfer_id != transfer_id or header.nbytes != nbytes:
                raise TransferError(
                    f"data stream announced transfer {header.transfer_id} of {header.nbytes} "
                    f"bytes, expected {transfer_id} of {nbytes}",
                    "protocol",
                )
            got = yield from stream.recv_views(
                sock, self._views(block_ids, heads, True, buf), timeout, self.chunk_bytes, watch.poll
            )
            ok = True
        finally:
            self._active.pop(key, None)
            if buf is not None:
                self._free.append(buf)
            if not ok:
                self.drop_pair(pair)  # unknown stream position: never reuse it
        return got


def _chain(first: memoryview, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _borrow(listener: stream.DataListener, pair: bytes, timeout_s: float):
    def arrived():
        listener.poll()
        return listener.take(pair)

    return (yield from poll_until(
        arrived, timeout_s,
        lambda: f"the consumer did not open its tcp data connection within {timeout_s:.1f}s "
        "(is the producer's data port, kv_port + 64 + rank, reachable from it?)",
    ))


def _read_header(sock, timeout_s: float, on_idle):
    reader = stream.FrameReader()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            msg = reader.poll(sock)
        except TransferError:
            on_idle()  # a producer that failed says why on the control link
            raise
        if isinstance(msg, wire.DataHeader):
            return msg
        if msg is not None:
            raise TransferError(f"unexpected {type(msg).__name__} on the data stream", "protocol")
        on_idle()
        if time.monotonic() >= deadline:
            raise TransferError(
                f"no KV data from the producer for {timeout_s:.1f}s (dead, overloaded or "
                "firewalled data port?)",
                "timeout",
            )
        yield False


class _EndWatch:
    """Consumer: a producer that gives up mid-transfer says why on the
    control link; turn that into the transfer's error."""

    def __init__(self, link: Link, transfer_id: str):
        self.link = link
        self.transfer_id = transfer_id

    def poll(self) -> None:
        frames = self.link.try_recv()
        if frames is None:
            return
        try:
            msg = wire.decode(_buffer(frames[0]))
        except wire.ProtocolError as e:
            raise TransferError(f"bad control message mid-transfer: {e}", "protocol") from None
        if isinstance(msg, wire.TransferDone) and msg.transfer_id == self.transfer_id and not msg.ok:
            raise TransferError(
                f"producer ended transfer {self.transfer_id}: {msg.error or 'no reason given'}",
                "producer_error",
            )
        raise TransferError(f"unexpected {type(msg).__name__} mid-transfer", "protocol")


def _tell_failed(link: Link, transfer_id: str, e: BaseException) -> None:
    if isinstance(e, GeneratorExit):
        return
    try:
        link.send([wire.encode(wire.TransferDone(transfer_id, False, str(e)[:500]))])
    except (WouldBlock, TransferError, OSError, RuntimeError):
        pass  # the consumer is gone or stuck; it fails on its own


def _host_of(link: Link) -> str:
    rest = link.endpoint.removeprefix("tcp://")  # type: ignore[attr-defined]
    return rest.rpartition(":")[0].strip("[]")


def _buffer(frame) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame
