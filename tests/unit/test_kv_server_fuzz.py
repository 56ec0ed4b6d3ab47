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
    """Unsigned pulls of the largest size the control port took (4 MiB, 4M
    block ids) for transfers nobody leased: each took ~0.1-0.3 s to decode,
    and ZMQ queued up to 1000 of them per connection (4 GiB) while the pump
    worked through them. Now a frame larger than any message a consumer has
    cause to send (this cache has 64 blocks) drops the connection before it
    is buffered, a pull naming more blocks than the cache has is refused at
    once, and parked messages are bounded by the memory they hold."""
    from vllm_ascend_pd.connector import kv_server

    src, dst, leases, server, puller, port, stats = pair
    ctx = zmq.Context()
    s = _dealer(ctx, port)
    try:
        huge = wire.encode(wire.PullRequest("z" * 24, "req-p", [1] * (wire.MAX_CONTROL_BYTES - 200)))
        for _ in range(12):
            s.send(huge)
        time.sleep(1.0)  # all sent
        t0 = time.perf_counter()
        server.pump(0.01)
        assert time.perf_counter() - t0 < 0.5
        assert not s.poll(300), "an oversized frame was read"
        assert not server.has_parked()

        s.send(wire.encode(wire.PullRequest("z" * 24, "req-p", [1] * 65)))
        replies = []
        deadline = time.monotonic() + 10
        while not replies and time.monotonic() < deadline:
            server.pump(0.01)
            while s.poll(10):
                replies.append(wire.decode(s.recv()))
        assert len(replies) == 1 and "more than this instance's 64" in replies[0].error

        # Pulls within the cache's size, and releases, park up to a memory
        # bound (a long id counts too).
        monkeypatch.setattr(kv_server, "_MAX_WAITING_BYTES", 1000)
        s.send(wire.encode(wire.Release("r" * 24, "x" * 60_000)))
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


def _sent_before_blocking(sock: zmq.Socket, frame: bytes, stall_s: float = 1.0) -> int:
    """Frames ``sock`` (SNDHWM 1) sends before the receiver stops taking them."""
    sent, last = 0, time.monotonic()
    while time.monotonic() - last < stall_s:
        try:
            sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.01)
            continue
        sent, last = sent + 1, time.monotonic()
    return sent


def _kernel_socket_buffer_max() -> int:
    def top(path: str) -> int:
        with open(path) as f:
            return int(f.read().split()[-1])

    return top("/proc/sys/net/ipv4/tcp_rmem") + top("/proc/sys/net/ipv4/tcp_wmem")


def test_one_peer_cannot_make_the_producer_queue_much(pair):  # noqa: F811
    """While the engine is busy (nothing pumps), ZMQ queued up to 1000
    messages per connection; at the old 4 MiB cap that is 4 GiB per peer.
    Now a peer gets PRODUCER_RCVHWM messages in, the rest waits in the
    kernel's socket buffers and then in the sender."""
    from vllm_ascend_pd.connector.kv_server import max_inbound_bytes
    from vllm_ascend_pd.connector.zmq_links import PRODUCER_RCVHWM

    src, dst, leases, server, puller, port, stats = pair
    cap = max_inbound_bytes(src.describe(), src.num_blocks)
    frame = wire.encode(wire.Release("r" * 24, "x" * (cap - 100)))
    assert len(frame) <= cap
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 1)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        sent = _sent_before_blocking(s, frame)
    finally:
        s.close(0)
        ctx.term()
    in_kernel = _kernel_socket_buffer_max() // len(frame) + 2
    assert sent <= PRODUCER_RCVHWM + in_kernel + 8, (sent, in_kernel)
    assert sent < 1000  # ZMQ's default alone let this many in


def test_a_hostile_producer_cannot_send_the_consumer_a_huge_frame():
    """The consumer connects wherever kv_transfer_params point: a 'producer'
    there answering with a frame over the control cap is cut off before the
    frame is buffered (it was delivered whole, whatever its size)."""
    from vllm_ascend_pd.connector.zmq_links import dealer_socket

    ctx = zmq.Context()
    evil = ctx.socket(zmq.ROUTER)
    evil.setsockopt(zmq.LINGER, 0)
    port = evil.bind_to_random_port("tcp://127.0.0.1")
    d = dealer_socket(ctx, f"tcp://127.0.0.1:{port}")
    try:
        d.send(b"hello")
        ident, _ = evil.recv_multipart()
        evil.send_multipart([ident, b"x" * (wire.MAX_CONTROL_BYTES + 1)])
        assert not d.poll(1000), "a frame over the control cap was delivered"
    finally:
        d.close(0)
        evil.close(0)
        ctx.term()


def test_the_longest_request_id_a_producer_hands_off_is_pulled_and_released(pair):  # noqa: F811
    """The producer's frame cap leaves room for request ids up to
    MAX_REQUEST_ID_BYTES, with every block of the cache in the pull and a
    secret's tokens. A longer id (which vLLM accepts from clients) failed
    the pull as "producer closed the connection" and kept the lease; the
    scheduler now hands such a request off to nobody (test_scheduler.py)."""
    from vllm_ascend_pd.auth import Authenticator
    from vllm_ascend_pd.connector.kv_server import max_inbound_bytes
    from vllm_ascend_pd.protocol import MAX_REQUEST_ID_BYTES

    src, dst, leases, server, puller, port, stats = pair
    rid = "é" * (MAX_REQUEST_ID_BYTES // 2)
    all_blocks = list(range(src.num_blocks))
    auth = Authenticator("s" * 32)
    token = auth.sign("pull", TID, rid, all_blocks, "e" * 36, 0, 1, None, "h" * 32)
    for msg in (
        wire.PullRequest(TID, rid, all_blocks, "e" * 36, 0, token, prompt_hash="h" * 32),
        wire.Release(TID, rid, token, "h" * 32),
    ):
        assert len(wire.encode(msg)) <= max_inbound_bytes(src.describe(), src.num_blocks)
    leases.register(rid, TID, [3, 4])
    puller.submit(RecvSpec("d", "127.0.0.1", port, TID, rid, [3, 4], [20, 21], 64))
    assert drive(server, puller) == ({"d"}, set())
    assert_copied(src, dst, [3, 4], [20, 21])
    assert leases.pending() == 0
