"""Hostile bytes on a KV port: 10,000 random and mutated messages, then a
legitimate transfer must still be served exactly."""

from __future__ import annotations

import random

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
