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


# ---------------------------------------------------------------- take()
ERROR_EVENT = b'data: {"error":{"message":"boom","type":"InternalServerError","code":500}}\n\n'
STREAM = EVENTS[:2] + [ERROR_EVENT] + EVENTS[2:]  # usage, error mid-stream, [DONE]


def _boundaries(events):
    out, pos = {0}, 0
    for e in events:
        pos += len(e)
        out.add(pos)
    return out


def _take_all(chunks, buf=None):
    buf = buf or SSEBuffer()
    pieces = []
    for c in chunks:
        got = buf.take(c)
        if got:
            pieces.append(got)
        # Nothing complete is ever held back.
        assert b"\n\n" not in bytes(buf._buf) or buf._crlf
    return pieces, buf


def _check_cuts(pieces, events):
    """Every piece ends exactly on an event boundary; together they are the stream."""
    data = b"".join(events)
    assert b"".join(pieces) == data
    bounds, pos = _boundaries(events), 0
    for p in pieces:
        pos += len(p)
        assert pos in bounds, (pos, p)


def test_take_every_two_way_split():
    data = b"".join(STREAM)
    for i in range(len(data) + 1):
        pieces, buf = _take_all([data[:i], data[i:]])
        _check_cuts(pieces, STREAM)
        assert buf.pending == 0 and buf.flush() is None


@pytest.mark.parametrize("seed", range(20))
def test_take_random_chunking_batches_complete_events(seed):
    rng = random.Random(seed)
    events = STREAM * 5
    data = b"".join(events)
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, 300)  # often several events and a half per chunk
        chunks.append(data[i:i + n])
        i += n
    pieces, buf = _take_all(chunks)
    _check_cuts(pieces, events)
    assert buf.pending == 0
    # One piece per chunk that completed something: events are batched.
    assert len(pieces) <= len(chunks)


def test_take_one_byte_chunks_emits_each_event_when_complete():
    data = b"".join(STREAM)
    buf = SSEBuffer()
    sent = b""
    ends = sorted(_boundaries(STREAM))
    for i in range(len(data)):
        sent += buf.take(data[i:i + 1])
        # Exactly the events completed so far: none late, none torn.
        assert len(sent) == max(b for b in ends if b <= i + 1)
    assert sent == data


def test_take_whole_event_chunk_is_forwarded_without_copy():
    buf = SSEBuffer()
    chunk = b"".join(EVENTS[:3])
    assert buf.take(chunk) is chunk
    assert buf.take(b"data: partial") == b""
    assert buf.take(b" more\n\n") == b"data: partial more\n\n"


def test_take_extra_blank_lines_never_tear_an_event():
    # "\n\n\n": the third newline is an empty event; wherever it is cut, the
    # output only ever ends right after a blank line.
    data = b"data: 1\n\n\ndata: 2\n\n"
    for i in range(len(data) + 1):
        pieces, buf = _take_all([data[:i], data[i:]])
        assert b"".join(pieces) == data
        for p in pieces:
            assert p.endswith(b"\n\n")


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_take_crlf_matches_feed(eol):
    events = [e.replace(b"\n", eol) for e in (b"data: 1\n\n", b"data: 2\nid: 7\n\n")]
    data = b"".join(events)
    for i in range(len(data) + 1):
        a, b = SSEBuffer(), SSEBuffer()
        got = a.take(data[:i]) + a.take(data[i:])
        want = b"".join(b.feed(data[:i]) + b.feed(data[i:]))
        assert got == want, (eol, i)
        assert a.flush() == b.flush()


def test_take_flush_returns_unterminated_tail():
    buf = SSEBuffer()
    assert buf.take(b"data: 1\n\ndata: 2") == b"data: 1\n\n"
    assert buf.flush() == b"data: 2"
    assert buf.flush() is None
