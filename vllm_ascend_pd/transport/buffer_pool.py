"""A fixed pool of staging buffers, the host-side equivalent of LLMDataDist's
registered buffers: allocated once, reused for every chunk, never grown.

A buffer handed to ZMQ zero-copy stays busy until its ``MessageTracker``
reports that libzmq released it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator

import torch

from vllm_ascend_pd.transport.base import TransferError


class BufferPool:
    def __init__(self, count: int, nbytes: int, pin_memory: bool = False):
        if count < 2:
            raise ValueError("a buffer pool needs at least two buffers")
        self.nbytes = nbytes
        self.count = count
        self._free: collections.deque = collections.deque(
            (torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory), None)
            for _ in range(count)
        )

    def acquire(self, timeout_s: float) -> Generator[bool, None, torch.Tensor]:
        deadline = time.monotonic() + timeout_s
        while True:
            buf, tracker = self._free[0]
            if tracker is None or tracker.done:
                self._free.popleft()
                return buf
            if time.monotonic() >= deadline:
                raise TransferError(
                    "the consumer stopped reading: no staging buffer was released "
                    f"within {timeout_s:.1f}s",
                    cause="peer_stalled",
                )
            yield False

    def release(self, buf: torch.Tensor, tracker=None) -> None:
        self._free.append((buf, tracker))
