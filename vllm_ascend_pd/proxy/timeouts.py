"""A gap watchdog: a few attribute writes and clock reads per event.

``asyncio.timeout().reschedule()`` per SSE event creates and cancels a timer
handle for every event; this watchdog arms one timer per *gap period* and, when
it fires early, re-arms itself for the remaining time.  On expiry it cancels
the watched task; the caller turns that cancellation into a timeout with
:meth:`GapWatchdog.claim`.

Two silences are timed: the backend's between events (``gap``) and, while
the relay writes to the client (:meth:`pause` .. :meth:`resume`), how long
one write waits for the client to read (``write``).  The client's pace must
not count as backend silence, and a client that stops reading must not hold
the request for ever.  The timer fires at least every ``min(gap, write)``, so
a stalled write is seen between ``write`` and twice that after it starts.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from vllm_ascend_pd.proxy import aio


class GapWatchdog:
    __slots__ = ("_loop", "_gap", "_write", "_period", "_task", "last", "paused", "paused_at",
                 "expired", "client_stalled", "_handle")

    def __init__(self, gap: float, write: float = float("inf")):
        self._loop = asyncio.get_running_loop()
        self._gap = gap
        self._write = write
        self._period = min(gap, write)
        self._task = asyncio.current_task()
        self.last = self._loop.time()
        self.paused = False
        self.paused_at = 0.0
        self.expired = False
        self.client_stalled = False  # expired while writing to the client
        self._handle: Optional[asyncio.TimerHandle] = self._loop.call_at(
            self.last + self._period, self._check)

    def progress(self) -> None:
        """Something arrived: restart the gap."""
        self.last = self._loop.time()

    def pause(self) -> None:
        """A write to the client starts."""
        self.paused = True
        self.paused_at = self._loop.time()

    def resume(self) -> None:
        """The write is done; the backend's gap restarts now."""
        self.paused = False
        self.last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        if self.paused:
            deadline = self.paused_at + self._write
        else:
            deadline = self.last + self._gap
        if now < deadline:
            self._handle = self._loop.call_at(min(deadline, now + self._period), self._check)
            return
        self.client_stalled = self.paused
        self._handle = None
        self.expired = True
        self._task.cancel()

    def claim(self) -> bool:
        """In an ``except CancelledError``: True if the cancellation was only ours."""
        return self.expired and aio.uncancel(self._task) == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
