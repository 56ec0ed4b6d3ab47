"""The tcp transport's raw data stream: zero-copy where the layout allows,
staged where it does not, and safe against whatever reaches the data port."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import torch

from test_transport import TID, drive, make_cache, pair  # noqa: F401 - pair is a fixture
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache
from vllm_ascend_pd.transport import TransferError, TransportOptions, create_transport
from vllm_ascend_pd.transport import stream

NB = 64


def _pull(pair, blocks, local, rid="req-d", tid=TID):
    src, dst, leases, server, puller, ep, _ = pair
    leases.register("req-p-" + tid, tid, blocks)
    puller.submit(RecvSpec(rid, "127.0.0.1", ep, tid, "req-p-" + tid, blocks, local, 32 * len(blocks)))
    return drive(server, puller)


def _listener(server):
    return server.transport._listener  # noqa: SLF001 - the producer's data port


def test_contiguous_blocks_move_without_gather_or_scatter(pair, monkeypatch):
    src, dst, *_ = pair

    def forbidden(*a, **k):
        raise AssertionError("a contiguous layout must not be staged")

    monkeypatch.setattr(PagedKVCache, "gather", forbidden)
    monkeypatch.setattr(PagedKVCache, "scatter", forbidden)
    blocks, local = [7, 8, 9, 2, 40], [20, 21, 30, 5, 6]
    assert _pull(pair, blocks, local) == ({"req-d"}, set())
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[local], s[blocks])


def _strided_cache(fill: float) -> PagedKVCache:
    # Blocks on dim 1: a block's bytes are strided, so both sides stage.
    caches = {
        f"l{i}": (torch.arange(2 * NB * 16 * 4, dtype=torch.float32).view(2, NB, 16, 4) * fill + i)
        for i in range(2)
    }
    return PagedKVCache.from_vllm(caches, NB, 16, lambda n, i, t: CacheAxes(block=1))


def _padded_cache(fill: float) -> PagedKVCache:
    # Rows with padding between blocks: contiguous blocks, but no runs.
    base = torch.arange(NB * 128, dtype=torch.float32).view(NB, 128) * fill
    caches = {"l0": base[:, :96], "l1": (base[:, 32:] + 1)}
    return PagedKVCache.from_vllm(caches, NB, 16, lambda n, i, t: CacheAxes(block=0))


@pytest.mark.parametrize("build", [_strided_cache, _padded_cache])
def test_other_layouts_arrive_exactly(build):
    from vllm_ascend_pd.connector.kv_server import KVServer
    from vllm_ascend_pd.connector.puller import Puller
    from vllm_ascend_pd.connector.stats import TransferStats
    from vllm_ascend_pd.connector.transfers import LeaseTable
    from vllm_ascend_pd.testing.servers import free_port

    src, dst = build(1.0), build(0.0)
    opt = TransportOptions(chunk_bytes=512, pool_bytes=1024, idle_timeout_s=2)
    leases, port = LeaseTable(60), free_port()
    server = KVServer(bind_host="127.0.0.1", port=port, engine_id="P", tp_rank=0, layout=src.describe(),
                      leases=leases, transport=create_transport("tcp", src, opt), stats=TransferStats(),
                      secret="", registration_grace_s=0.5)
    puller = Puller(engine_id="D", tp_rank=0, layout=dst.describe(), transport=create_transport("tcp", dst, opt),
                    stats=TransferStats(), secret="", connect_timeout_s=2)
    try:
        blocks, local = [5, 6, 7, 60, 1], [9, 10, 11, 3, 40]
        leases.register("req-p", TID, blocks)
        puller.submit(RecvSpec("d", "127.0.0.1", port, TID, "req-p", blocks, local, 80))
        assert drive(server, puller) == ({"d"}, set())
        untouched = [b for b in range(NB) if b not in local]
        for s, d, f in zip(src.tensors, dst.tensors, build(0.0).tensors):
            assert torch.equal(d[local], s[blocks])
            assert torch.equal(d[untouched], f[untouched])
    finally:
        server.close()
        puller.close()
        server.transport.close()
        puller.transport.close()


def test_stream_is_reused_and_replaced_after_a_failure(pair, monkeypatch):
    src, dst, leases, server, puller, ep, _ = pair
    monkeypatch.setattr(stream, "REAP_EVERY_S", 0.0)
    assert _pull(pair, [1, 2], [3, 4], "a", "a" * 24) == ({"a"}, set())
    assert _pull(pair, [5], [6], "b", "b" * 24) == ({"b"}, set())
    assert len(_listener(server)._pairs) == 1  # noqa: SLF001
    first = next(iter(_listener(server)._pairs))  # noqa: SLF001
    # A refused pull drops the consumer's link, and with it the stream.
    puller.submit(RecvSpec("c", "127.0.0.1", ep, "c" * 24, "nobody", [1], [1], 32))
    assert drive(server, puller) == ({"c"}, {"c"})
    assert _pull(pair, [9], [10], "e", "e" * 24) == ({"e"}, set())
    _service_for(server, 0.05)  # the producer notices the old stream closed
    pairs = _listener(server)._pairs  # noqa: SLF001
    assert first not in pairs and len(pairs) == 1
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[[3, 4, 6, 10]], s[[1, 2, 5, 9]])


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    return s


def _service_for(server, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        server.pump(0.001)
        time.sleep(0.001)


def test_hostile_data_connections_are_closed_and_serving_goes_on(pair, monkeypatch):
    src, dst, leases, server, puller, ep, _ = pair
    monkeypatch.setattr(stream, "PREAMBLE_TIMEOUT_S", 0.3)
    port = server.transport.data_port
    garbage = _connect(port)
    garbage.sendall(struct.pack("!I", 12) + b"\xff" * 12)
    huge = _connect(port)
    huge.sendall(struct.pack("!I", 1 << 30))
    short_id = _connect(port)
    short_id.sendall(stream.framed(wire.DataHello(b"x")))
    wrong_kind = _connect(port)
    wrong_kind.sendall(stream.framed(wire.DataHeader(TID, 10)))
    silent = _connect(port)
    _service_for(server, 0.6)
    for s in (garbage, huge, short_id, wrong_kind, silent):
        s.settimeout(2)
        assert s.recv(1) == b"", "the producer must close a connection that is not a consumer's"
        s.close()
    listener = _listener(server)
    assert listener.refused == 5 and not listener._pending and not listener._pairs  # noqa: SLF001
    assert server.stats.take()["rejected"] == {"data_malformed": 4, "data_timeout": 1}
    blocks, local = [11, 12], [13, 14]
    assert _pull(pair, blocks, local) == ({"req-d"}, set())
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[local], s[blocks])


def test_unnamed_connections_are_bounded(pair, monkeypatch):
    _, _, _, server, *_ = pair
    monkeypatch.setattr(stream, "MAX_PENDING", 4)
    socks = [_connect(server.transport.data_port) for _ in range(10)]
    try:
        _service_for(server, 0.2)
        listener = _listener(server)
        assert len(listener._pending) == 4 and listener.refused == 6  # noqa: SLF001
        # The oldest were closed, the newest kept.
        for s in socks[:6]:
            s.settimeout(2)
            assert s.recv(1) == b""
    finally:
        for s in socks:
            s.close()


def test_silent_connections_do_not_shut_out_a_consumer(pair):
    """64 connections that never say who they are filled every unnamed
    place, and the producer refused each new connection: the next consumer's
    data stream was closed and its pull failed (peer_lost; D recomputed),
    with or without a secret, for as long as they stayed. Now the oldest
    unnamed connection makes room, and the pull is exact."""
    src, dst, _, server, *_ = pair
    socks = [_connect(server.transport.data_port) for _ in range(stream.MAX_PENDING)]
    try:
        _service_for(server, 0.2)
        assert len(_listener(server)._pending) == stream.MAX_PENDING  # noqa: SLF001
        blocks, local = [5, 6], [7, 8]
        assert _pull(pair, blocks, local) == ({"req-d"}, set())
        for s, d in zip(src.tensors, dst.tensors):
            assert torch.equal(d[local], s[blocks])
    finally:
        for s in socks:
            s.close()


def test_a_departed_consumer_stream_is_reaped(pair, monkeypatch):
    _, _, _, server, puller, *_ = pair
    monkeypatch.setattr(stream, "REAP_EVERY_S", 0.0)
    assert _pull(pair, [1], [2]) == ({"req-d"}, set())
    assert len(_listener(server)._pairs) == 1  # noqa: SLF001
    puller.transport.close()  # the consumer's stream goes away
    deadline = time.monotonic() + 5
    while _listener(server)._pairs and time.monotonic() < deadline:  # noqa: SLF001
        _service_for(server, 0.01)
    assert not _listener(server)._pairs  # noqa: SLF001


class _FakeLink:
    """The consumer's side of a control link, for a hand-made producer."""

    def __init__(self, port: int, inbox=None):
        self.pair_id = b"c" + b"p" * 15
        self.endpoint = "tcp://127.0.0.1:1"
        self.data_port = port
        self.inbox = list(inbox or [])

    def try_recv(self):
        return [self.inbox.pop(0)] if self.inbox else None

    def send(self, frames, **kw):
        raise AssertionError("the consumer sends nothing mid-transfer")


def _run(gen, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
        time.sleep(0.0005)
    raise AssertionError("the transfer did not end")


@pytest.fixture
def fake_producer():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    yield lst
    lst.close()


def _accept(gen, lst: socket.socket) -> tuple[socket.socket, bytes]:
    """Step the consumer until it connected and named its pair."""
    lst.settimeout(0.01)
    peer = None
    hello = b""
    deadline = time.monotonic() + 5
    while len(hello) < 4 or len(hello) < 4 + struct.unpack("!I", hello[:4])[0]:
        assert time.monotonic() < deadline, "the consumer never connected"
        next(gen)
        if peer is None:
            try:
                peer, _ = lst.accept()
                peer.settimeout(0.01)
            except TimeoutError:
                continue
        try:
            hello += peer.recv(4096)
        except TimeoutError:
            pass
    peer.settimeout(2)
    return peer, hello


def _consumer():
    dst = make_cache(0.0)
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, role="consumer")
    return dst, create_transport("tcp", dst, opt)


def test_a_stream_announcing_another_transfer_writes_nothing(fake_producer):
    dst, tcp = _consumer()
    link = _FakeLink(fake_producer.getsockname()[1])
    gen = tcp.recv_blocks(link, TID, [1, 2])
    peer, hello = _accept(gen, fake_producer)
    assert wire.decode(hello[4:]) == wire.DataHello(link.pair_id)
    nbytes = 2 * dst.total_block_bytes()
    peer.sendall(stream.framed(wire.DataHeader("x" * 24, nbytes)) + b"\x01" * nbytes)
    with pytest.raises(TransferError, match="announced transfer x+ of") as e:
        _run(gen)
    assert e.value.cause == "protocol"
    assert all(torch.equal(t, f) for t, f in zip(dst.tensors, make_cache(0.0).tensors))
    assert link.pair_id not in tcp._streams  # noqa: SLF001 - never read again
    peer.close()


def test_a_producer_that_gives_up_mid_stream_says_why(fake_producer):
    dst, tcp = _consumer()
    done = wire.encode(wire.TransferDone(TID, False, "lease expired"))
    link = _FakeLink(fake_producer.getsockname()[1])
    gen = tcp.recv_blocks(link, TID, [1, 2])
    peer, _ = _accept(gen, fake_producer)
    nbytes = 2 * dst.total_block_bytes()
    peer.sendall(stream.framed(wire.DataHeader(TID, nbytes)) + b"\x01" * 100)
    link.inbox.append(done)
    with pytest.raises(TransferError, match="lease expired") as e:
        _run(gen)
    assert e.value.cause == "producer_error"
    peer.close()


def test_a_producer_that_vanishes_mid_stream_fails_at_once(fake_producer):
    dst, tcp = _consumer()
    link = _FakeLink(fake_producer.getsockname()[1])
    gen = tcp.recv_blocks(link, TID, [1, 2])
    peer, _ = _accept(gen, fake_producer)
    peer.sendall(stream.framed(wire.DataHeader(TID, 2 * dst.total_block_bytes())) + b"\x01" * 100)
    peer.close()
    start = time.monotonic()
    with pytest.raises(TransferError) as e:
        _run(gen)
    assert e.value.cause == "peer_lost" and time.monotonic() - start < 1.0


def test_a_taken_data_port_fails_start_up_with_the_fix():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2,
                           group_port=busy.getsockname()[1], role="producer")
    try:
        with pytest.raises(RuntimeError, match="kv_port \\+ 64 \\+ rank"):
            create_transport("tcp", make_cache(0.0), opt)
    finally:
        busy.close()


SECRET = "a deployment secret, long enough"


@pytest.fixture
def secured(pair):
    """``pair`` with both sides' transports holding the shared secret."""
    src, dst, leases, server, puller, ep, stats = pair
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, secret=SECRET)
    for side, cache in ((server, src), (puller, dst)):
        side.transport.close()
        side.transport = create_transport("tcp", cache, opt)
    server.auth = puller.auth = type(server.auth)(SECRET)
    return pair


def test_with_a_secret_only_signed_fresh_preambles_name_a_stream(secured, monkeypatch, caplog):
    src, dst, leases, server, puller, ep, _ = secured
    assert "secret" not in repr(server.transport.options)  # never in a log line
    sent = []
    real_framed = stream.framed
    monkeypatch.setattr(stream, "framed", lambda m: sent.append(real_framed(m)) or sent[-1])
    assert _pull(secured, [1, 2], [3, 4], "a", "a" * 24) == ({"a"}, set())
    hello = next(f for f in sent if isinstance(wire.decode(f[4:]), wire.DataHello))
    listener = _listener(server)
    (pair_id, legit), = listener._pairs.items()  # noqa: SLF001
    assert pair_id == wire.decode(hello[4:]).pair_id
    token = wire.decode(hello[4:]).auth
    forged = {
        "unsigned": wire.DataHello(pair_id),
        "replayed": None,  # the consumer's own preamble, captured and sent again
        "wrong secret": wire.DataHello(pair_id, type(server.auth)("another secret, long too").sign("data_hello", pair_id)),
        "token for another pair": wire.DataHello(b"z" * 16, token),
    }
    socks = []
    for msg in forged.values():
        socks.append(_connect(server.transport.data_port))
        socks[-1].sendall(hello if msg is None else stream.framed(msg))
    with caplog.at_level("WARNING"):
        _service_for(server, 0.3)
    for s in socks:
        s.settimeout(2)
        assert s.recv(1) == b"", "an unauthenticated preamble must close the connection"
        s.close()
    assert listener._pairs == {pair_id: legit}  # noqa: SLF001 - the real stream kept its name
    assert server.stats.take()["rejected"] == {"data_auth": 4}
    warned = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert len(warned) == 1 and "data stream preamble" in warned[0] and "shared_secret" in warned[0]
    # The consumer's stream is untouched: the next pull reuses it, exactly.
    consumer_sock = puller.transport._streams[pair_id]  # noqa: SLF001
    assert _pull(secured, [9, 10], [11, 12], "b", "b" * 24) == ({"b"}, set())
    assert puller.transport._streams[pair_id] is consumer_sock  # noqa: SLF001
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[[3, 4, 11, 12]], s[[1, 2, 9, 10]])
