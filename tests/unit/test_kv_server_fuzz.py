"""Hostile bytes on a KV port: 10,000 random and mutated messages, then a
legitimate transfer must still be served exactly."""

from __future__ import annotations

import random
import time

import msgspec
import zmq

from kv_loopback import TID, assert_copied, drive, pair, pump_for  # noqa: F401 - pair is a fixture
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.metadata import RecvSpec


def _valid_messages(layout) -> list[bytes]:
    return [
        wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "x", 0, layout)),
        wire.encode(wire.PullRequest(TID, "req-p", [1, 2, 3])),
        wire.encode(wire.Release(TID, "someone-else")),
        wire.encode(wire.PullRequest("z" * 24, "req-p", list(range(10_000)))),
    ]


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.random()
        if op < 0.4 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op < 0.7 and b:
            del b[rnd.randrange(len(b)) :]
        else:
            b[rnd.randrange(len(b) + 1) : 0] = rnd.randbytes(rnd.randint(1, 32))
    return bytes(b)


def test_fuzzed_kv_port_survives_and_serves(pair):  # noqa: F811
    src, dst, leases, server, puller, port, stats = pair
    rnd = random.Random(1234)
    seeds = _valid_messages(src.describe())
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
    try:
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
        for i in range(10_000):
            r = rnd.random()
            if r < 0.3:
                frames = [rnd.randbytes(rnd.randint(0, 256))]
            elif r < 0.9:
                frames = [_mutate(rnd, rnd.choice(seeds))]
            else:  # wrong frame counts, empty frames, msgpack of the wrong type
                frames = rnd.choice([[b"", b""], [b"a", b"b", b"c"], [msgspec.msgpack.encode({"type": "pull"})]])
            socks[i % len(socks)].send_multipart(frames)
            if i % 200 == 0:
                server.pump(0.01)
        pump_for(server, 3)
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    rejected = server.stats.take()["rejected"]
    assert sum(rejected.values()) > 1000
    # Nothing the fuzzer sent released or pulled the real lease.
    leases.register("req-p", TID, [3, 4])
    assert leases.pending() == 1
    puller.submit(RecvSpec("d", "127.0.0.1", port, TID, "req-p", [3, 4], [20, 21], 64))
    assert drive(server, puller) == ({"d"}, set())
    assert_copied(src, dst, [3, 4], [20, 21])


def _dealer(ctx, port: int) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def test_a_flood_of_maximal_pulls_neither_stalls_nor_fills_the_producer(pair, monkeypatch):  # noqa: F811
    """Unsigned pulls of the largest size the control port takes (4 MiB, 4M
    block ids) for transfers nobody leased: each took ~0.1-0.3 s to decode,
    256 were read per pump (a minute of the engine thread), and each was
    parked for registration_grace_s holding a ~35 MB list (1024 of them:
    35 GB). Now a pump stops reading when its budget is spent, a pull naming
    more blocks than the cache has is refused at once, and parked messages
    are bounded by the memory they hold."""
    from vllm_ascend_pd.connector import kv_server

    src, dst, leases, server, puller, port, stats = pair
    ctx = zmq.Context()
    s = _dealer(ctx, port)
    try:
        huge = wire.encode(wire.PullRequest("z" * 24, "req-p", [1] * (wire.MAX_CONTROL_BYTES - 200)))
        for _ in range(12):
            s.send(huge)
        time.sleep(1.0)  # all queued at the producer
        server.pump(0.01)  # one message alone outlasts this budget
        replies = []
        while s.poll(200):
            replies.append(wire.decode(s.recv()))
        assert len(replies) == 1
        deadline = time.monotonic() + 60
        while len(replies) < 12 and time.monotonic() < deadline:
            server.pump(0.01)
            while s.poll(10):
                replies.append(wire.decode(s.recv()))
        assert not server.has_parked()
        assert len(replies) == 12 and all("more than this instance's 64" in r.error for r in replies)

        # Pulls within the cache's size, and releases, park up to a memory
        # bound (a 1 MB id counts too).
        monkeypatch.setattr(kv_server, "_MAX_WAITING_BYTES", 1000)
        s.send(wire.encode(wire.Release("r" * 24, "x" * 1_000_000)))
        for i in range(3):
            s.send(wire.encode(wire.PullRequest(f"{i}" * 24, "req-p", list(range(40)))))
        time.sleep(0.3)
        pump_for(server, 0.2)
        assert [type(w.req).__name__ for w in server._waiting] == ["PullRequest"] * 2
    finally:
        s.close(0)
        ctx.term()
    # A legitimate pull is still served exactly.
    leases.register("req-p", TID, [3, 4])
    puller.submit(RecvSpec("d", "127.0.0.1", port, TID, "req-p", [3, 4], [20, 21], 64))
    assert drive(server, puller) == ({"d"}, set())
    assert_copied(src, dst, [3, 4], [20, 21])


def test_a_deeply_nested_frame_is_a_protocol_error():
    # msgspec raises RecursionError (no DecodeError) skipping a deeply nested
    # unknown field: the KV server logged a full traceback for every such
    # frame, outside the throttled "bad message" path.
    deep = b"\x82\xa4type\xa7release\xa4junk" + b"\x91" * 100_000 + b"\xc0"
    try:
        wire.decode(deep)
    except wire.ProtocolError as e:
        assert "nested too deeply" in str(e)
    else:
        raise AssertionError("a deeply nested frame decoded")
