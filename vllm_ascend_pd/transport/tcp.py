"""``tcp``: host-staged transfer over the ZMQ link, zero-copy on both ends.

Producer: gather each chunk of blocks into a pooled staging buffer and hand
it to ZMQ without copying. Consumer: view each received frame as a tensor and
scatter it straight into the paged cache.
"""

from __future__ import annotations

import warnings

import torch

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.kv_layout import HeadRange, PagedKVCache, block_runs, plan_chunks, scatter_runs
from vllm_ascend_pd.transport.base import (
    Link,
    Step,
    TransferError,
    Transport,
    TransportOptions,
    wait_recv,
    wait_send,
)
from vllm_ascend_pd.transport.buffer_pool import BufferPool

__all__ = ["TcpTransport", "block_runs", "scatter_runs"]  # the helpers live in kv_layout

# Received frames are read-only memory we only read from.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class TcpTransport(Transport):
    name = "tcp"
    head_slices = True

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        super().__init__(cache, options)
        largest_block = max(cache.block_bytes(i) for i in range(len(cache.tensors)))
        self.chunk_bytes = max(options.chunk_bytes, largest_block)
        self._pool: BufferPool | None = None
        self._on_device = cache.tensors[0].device.type != "cpu"

    @property
    def pool(self) -> BufferPool:
        # Only producers need staging buffers.
        if self._pool is None:
            count = max(2, self.options.pool_bytes // self.chunk_bytes)
            self._pool = BufferPool(count, self.chunk_bytes, pin_memory=self._on_device)
        return self._pool

    def send_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        cache = self.cache
        timeout = self.options.idle_timeout_s
        idx_all = torch.tensor(block_ids, dtype=torch.long, device=cache.tensors[0].device)
        total = 0
        for seq, ch in enumerate(plan_chunks(cache, len(block_ids), self.chunk_bytes, heads)):
            n = (ch.stop - ch.start) * cache.block_bytes(ch.tensor, heads)
            buf = yield from self.pool.acquire(timeout)
            try:
                cache.gather(ch.tensor, idx_all[ch.start : ch.stop], heads, out=buf[:n])
                header = wire.encode(wire.ChunkHeader(transfer_id, seq, n))
                tracker = yield from wait_send(
                    link, [header, buf[:n].numpy()], timeout, copy=False, track=True
                )
            except BaseException:
                self.pool.release(buf)
                raise
            self.pool.release(buf, tracker)
            total += n
            yield True
        yield from wait_send(link, [wire.encode(wire.TransferDone(transfer_id, True))], timeout)
        return total

    def recv_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        cache = self.cache
        timeout = self.options.idle_timeout_s
        device = cache.tensors[0].device
        idx_all = torch.tensor(block_ids, dtype=torch.long, device=device)
        total = 0
        plan = plan_chunks(cache, len(block_ids), self.chunk_bytes, heads)
        for seq, ch in enumerate(plan):
            frames = yield from wait_recv(link, timeout, "KV data")
            msg = wire.decode(_buffer(frames[0]))
            if isinstance(msg, wire.TransferDone):
                raise TransferError(
                    f"producer ended transfer {transfer_id} after {seq}/{len(plan)} "
                    f"chunks: {msg.error or 'no reason given'}",
                    cause="producer_error",
                )
            n = (ch.stop - ch.start) * cache.block_bytes(ch.tensor, heads)
            if (
                not isinstance(msg, wire.ChunkHeader)
                or msg.transfer_id != transfer_id
                or msg.seq != seq
                or msg.nbytes != n
                or len(frames) != 2
                or len(_buffer(frames[1])) != n
            ):
                raise TransferError(
                    f"unexpected frame in transfer {transfer_id} at chunk {seq}",
                    cause="protocol",
                )
            src = torch.frombuffer(_buffer(frames[1]), dtype=torch.uint8)
            cache.scatter(ch.tensor, idx_all[ch.start : ch.stop], src, heads)
            total += n
            yield True
        frames = yield from wait_recv(link, timeout, "end of transfer")
        done = wire.decode(_buffer(frames[0]))
        if not isinstance(done, wire.TransferDone) or not done.ok:
            raise TransferError(f"transfer {transfer_id} did not end cleanly", cause="protocol")
        return total


def _buffer(frame) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame
