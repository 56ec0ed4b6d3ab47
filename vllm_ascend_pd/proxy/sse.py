"""Buffered Server-Sent-Events splitter.

Network chunks do not respect event boundaries: one chunk may carry half an
event, or several events and a half.  :class:`SSEBuffer` accumulates bytes and
hands back only complete events (each including its terminating blank line),
byte-for-byte as received, so they can be relayed intact.

An event ends at the first blank line, i.e. ``\\n\\n``, ``\\r\\n\\r\\n`` or
``\\r\\r`` (any mix of the three line endings the SSE spec allows).

The relay uses :meth:`SSEBuffer.take`: it needs only the boundary after the
*last* complete event of what has arrived, so a read that ends on an event
boundary (the usual case: servers write whole events) is forwarded as is,
without splitting or copying.
"""

from __future__ import annotations

import re
from typing import Optional

# A line ending followed by another line ending = end of event.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class SSEBuffer:
    __slots__ = ("_buf", "_crlf")

    def __init__(self) -> None:
        self._buf = b""
        self._crlf = False  # saw a '\r': use the slow, spec-complete splitter

    def feed(self, data: bytes) -> list[bytes]:
        """Add a network chunk; return the complete events it finished."""
        if not data:
            return []
        buf = self._buf + data if self._buf else data
        if not self._crlf and b"\r" in data:
            self._crlf = True
        if self._crlf:
            return self._split_general(buf)
        events = []
        start = 0
        find = buf.find
        while True:
            end = find(b"\n\n", start)
            if end < 0:
                break
            events.append(buf[start:end + 2])
            start = end + 2
        self._buf = buf[start:] if start < len(buf) else b""
        return events

    def _split_general(self, buf: bytes) -> list[bytes]:
        events = []
        start = 0
        while True:
            m = _EVENT_END.search(buf, start)
            if m is None:
                break
            # "\r" at the very end may be the first half of "\r\n": wait.
            if m.end() == len(buf) and buf.endswith(b"\r"):
                break
            events.append(buf[start:m.end()])
            start = m.end()
        self._buf = buf[start:]
        return events

    def take(self, data: bytes) -> bytes:
        """Add a network chunk; return every complete event now buffered, as
        one ``bytes`` that ends on an event boundary (empty if none).  The
        incomplete tail stays buffered and holds no complete event.  In a
        ``\\n``-only stream any ``\\n\\n`` ends a blank line, so cutting after
        the last one never tears an event; extra blank lines (empty events)
        may go out one read earlier than :meth:`feed` would return them."""
        if not self._crlf:
            if b"\r" not in data:
                if not self._buf:
                    if data[-2:] == b"\n\n":
                        return data  # whole events only: no copy
                    buf = data
                else:
                    buf = self._buf + data
                end = buf.rfind(b"\n\n")
                if end < 0:
                    self._buf = buf
                    return b""
                end += 2
                self._buf = buf[end:]
                return buf[:end]
            self._crlf = True
        events = self._split_general(self._buf + data if self._buf else data)
        return events[0] if len(events) == 1 else b"".join(events)

    @property
    def pending(self) -> int:
        return len(self._buf)

    def flush(self) -> Optional[bytes]:
        """Return an unterminated trailing event (stream ended without a blank line)."""
        rest, self._buf = self._buf, b""
        return rest or None


def is_done_event(event: bytes) -> bool:
    return event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]")
