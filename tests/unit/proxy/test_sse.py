"""The buffered SSE splitter: events survive any chunking."""

from __future__ import annotations

import random

import pytest

from vllm_ascend_pd.proxy.sse import SSEBuffer, is_done_event

EVENTS = [
    b'data: {"choices":[{"text":"a"}]}\n\n',
    b'event: message\ndata: {"choices":[{"text":"b\\n\\n"}]}\n\n',
    b": keep-alive comment\n\n",
    b'data: {"usage":{"prompt_tokens":3}}\n\n',
    b"data: [DONE]\n\n",
]


def _run(chunks, buf=None):
    buf = buf or SSEBuffer()
    out = []
    for c in chunks:
        out.extend(buf.feed(c))
    return out, buf


def test_every_two_way_split():
    data = b"".join(EVENTS)
    for i in range(len(data) + 1):
        out, buf = _run([data[:i], data[i:]])
        assert out == EVENTS, i
        assert buf.pending == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking(seed):
    rng = random.Random(seed)
    data = b"".join(EVENTS * 5)
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, 40)
        chunks.append(data[i:i + n])
        i += n
    out, _ = _run(chunks)
    assert out == EVENTS * 5


def test_one_byte_chunks_and_events_only_when_complete():
    data = b"".join(EVENTS)
    buf = SSEBuffer()
    seen = []
    for i in range(len(data)):
        got = buf.feed(data[i:i + 1])
        seen.extend(got)
        # Nothing is emitted before its terminating blank line has arrived.
        assert b"".join(seen) == data[:len(b"".join(seen))]
        assert all(e.endswith(b"\n\n") for e in got)
    assert seen == EVENTS


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_endings(eol):
    events = [e.replace(b"\n", eol) for e in (b"data: 1\n\n", b"data: 2\nid: 7\n\n")]
    data = b"".join(events)
    for i in range(len(data) + 1):
        out, buf = _run([data[:i], data[i:]])
        # A final lone "\r" might still become "\r\n": held until EOF (flush).
        tail = buf.flush()
        assert out + ([tail] if tail else []) == events, (eol, i)
        assert eol == b"\r" or tail is None


def test_flush_returns_unterminated_tail():
    out, buf = _run([b"data: 1\n\ndata: 2"])
    assert out == [b"data: 1\n\n"]
    assert buf.flush() == b"data: 2"
    assert buf.flush() is None


def test_done_detection():
    assert is_done_event(b"data: [DONE]\n\n")
    assert not is_done_event(b'data: {"x": "[DONE]"}\n\n')
