"""Every worker's load counters in one shared mapping (``--workers N``).

Without it each worker balanced only its own requests: two workers could
both send their next request to the instance the other had just loaded.
A file in the supervisor's private temp dir is mapped by every worker;
it holds int64 ``[worker][slot][requests, tokens]``. A worker adds only to
its own row, so no locks are needed (aligned 8-byte stores), and a reader
sums one slot over the rows. The supervisor gives each member a slot
(:class:`SlotTable`) and sends it with the membership (``Member.slot``).
"""

from __future__ import annotations

import collections
import mmap
import os
from typing import Hashable

# Members that can have a slot at once; more are balanced per worker.
SLOTS = 1024
_FIELDS = 2  # requests, tokens


class SharedLoad:
    """One process's view of the mapping; ``row``: the worker writing through
    it (-1: a reader only)."""

    def __init__(self, path: str, workers: int, row: int = -1):
        self.workers, self.row = workers, row
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, workers * SLOTS * _FIELDS * 8)
        finally:
            os.close(fd)
        self._cells = memoryview(self._mm).cast("q")
        self._stride = SLOTS * _FIELDS

    @staticmethod
    def create(path: str, workers: int) -> None:
        with open(path, "wb") as f:
            f.truncate(workers * SLOTS * _FIELDS * 8)

    def reset_row(self) -> None:
        """A (re)started worker: what its predecessor counted died with it."""
        base = self.row * self._stride
        for i in range(base, base + self._stride):
            self._cells[i] = 0

    def add(self, slot: int, requests: int, tokens: int) -> None:
        i = self.row * self._stride + slot * _FIELDS
        self._cells[i] += requests
        self._cells[i + 1] += tokens

    def requests(self, slot: int) -> int:
        return self._sum(slot * _FIELDS)

    def tokens(self, slot: int) -> int:
        return self._sum(slot * _FIELDS + 1)

    def _sum(self, offset: int) -> int:
        cells, stride = self._cells, self._stride
        return sum(cells[w * stride + offset] for w in range(self.workers))

    def close(self) -> None:
        self._cells.release()
        self._mm.close()


class SlotTable:
    """The supervisor's slot assignment. A freed slot is reused last, so
    the requests still finishing on a removed member rarely count for a
    new one (and then only until they finish)."""

    def __init__(self, slots: int = SLOTS):
        self._free = collections.deque(range(slots))
        self._slots: dict[Hashable, int] = {}

    def slot_of(self, key: Hashable) -> int:
        """The member's slot, -1 if none is free."""
        slot = self._slots.get(key)
        if slot is None:
            if not self._free:
                return -1
            slot = self._slots[key] = self._free.popleft()
        return slot

    def keep_only(self, keys: set) -> None:
        for key in [k for k in self._slots if k not in keys]:
            self._free.append(self._slots.pop(key))
