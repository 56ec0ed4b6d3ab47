"""At most one log line per interval for a warning a peer can repeat at will
(refused messages, malformed announcements), with the count of the rest."""

from __future__ import annotations

import time
from typing import Callable


class LogThrottle:
    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self._clock = clock
        self._state: dict[str, tuple[float, int]] = {}  # key -> (last line, count since)

    def hit(self, key: str = "") -> int:
        """Count one occurrence of ``key``. If a line is due now, return the
        occurrences since the previous line, this one included; else 0."""
        now = self._clock()
        last, count = self._state.get(key, (float("-inf"), 0))
        count += 1
        if now - last < self.every_s:
            self._state[key] = (last, count)
            return 0
        self._state[key] = (now, 0)
        return count
