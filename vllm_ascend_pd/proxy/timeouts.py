"""A gap watchdog: a few attribute writes and a clock read per event.

``asyncio.timeout().reschedule()`` per SSE event creates and cancels a timer
handle for every event; this watchdog arms one timer per *gap period* and, when
it fires early, re-arms itself for the remaining time.  On expiry it cancels
the watched task; the caller turns that cancellation into a timeout with
:meth:`GapWatchdog.claim`.
"""

from __future__ import annotations

import asyncio
from typing import Optional


class GapWatchdog:
    __slots__ = ("_loop", "_gap", "_task", "last", "paused", "expired", "_handle")

    def __init__(self, gap: float):
        self._loop = asyncio.get_running_loop()
        self._gap = gap
        self._task = asyncio.current_task()
        self.last = self._loop.time()
        self.paused = False
        self.expired = False
        self._handle: Optional[asyncio.TimerHandle] = self._loop.call_at(
            self.last + gap, self._check)

    def progress(self) -> None:
        """Something arrived: restart the gap."""
        self.last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        if self.paused:
            self._handle = self._loop.call_at(now + self._gap, self._check)
            return
        deadline = self.last + self._gap
        if now < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        self._handle = None
        self.expired = True
        self._task.cancel()

    def claim(self) -> bool:
        """In an ``except CancelledError``: True if the cancellation was only ours."""
        return self.expired and self._task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
