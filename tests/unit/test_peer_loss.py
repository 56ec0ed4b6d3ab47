"""A producer that goes away mid-transfer fails the pull at once (the
connection closing is seen), not after the idle timeout; a later pull on
the same consumer, from a producer back at that address, is unaffected."""

from __future__ import annotations

import time

from kv_loopback import TID, assert_copied, make_cache, tcp_puller, tcp_server
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions

# Small chunks: a 40-block transfer is 120 chunks, so it is still running
# when the producer is closed.
OPT = TransportOptions(chunk_bytes=1024, pool_bytes=2048, idle_timeout_s=20)


def _wait(puller, server=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        puller.pump(0.005)
        if server is not None:
            server.pump(0.005)
        done, failed = puller.take_results()
        if done:
            return done, failed
        time.sleep(0.001)
    raise AssertionError("no result")


def test_producer_closed_mid_transfer_fails_the_pull_at_once():
    src, dst = make_cache(1.0), make_cache(0.0)
    port = free_port()
    leases = LeaseTable(60)
    server = tcp_server(src, port, leases, opt=OPT)
    stats = TransferStats()
    puller = tcp_puller(dst, opt=OPT, stats=stats, connect_timeout_s=20)
    try:
        blocks = list(range(40))
        leases.register("req-p", TID, blocks)
        puller.submit(RecvSpec("a", "127.0.0.1", port, TID, "req-p", blocks, list(range(10, 50)), 40 * 32))
        # Run until the data is flowing, then the producer "dies".
        sent = 0
        while sent < 20:
            puller.pump(0.0001)
            server.pump(0.0001)
            sent = sum(1 for t in server._sends.tasks)  # noqa: SLF001 - progress probe
            if sent:
                for _ in range(10):
                    server.pump(0.0001)
                    puller.pump(0.0001)
                break
        assert leases.pending() == 1, "the transfer ended before the producer was closed"
        server.close()
        start = time.monotonic()
        assert _wait(puller) == ({"a"}, {"a"})
        assert time.monotonic() - start < 3  # far below the 20 s idle timeout
        assert stats.take()["failures"] == {"peer_lost": 1}

        # A producer back at the same address serves the next pull exactly.
        leases2 = LeaseTable(60)
        server = tcp_server(src, port, leases2, opt=OPT)
        leases2.register("req-q", "q" * 24, [1, 2])
        puller.submit(RecvSpec("b", "127.0.0.1", port, "q" * 24, "req-q", [1, 2], [60, 61], 64))
        assert _wait(puller, server) == ({"b"}, set())
        assert_copied(src, dst, [1, 2], [60, 61])
    finally:
        server.close()
        puller.close()


def test_the_first_pull_after_a_producer_restart_succeeds():
    """A producer restarted on the same address between two pulls knows
    neither the consumer's link nor its data stream. The first pull after
    the restart failed (and the request was recomputed): ZMQ reconnects
    silently and the disconnect was ignored. It now redoes the handshake."""
    src, dst = make_cache(1.0), make_cache(0.0)
    port = free_port()
    leases = LeaseTable(60)
    server = tcp_server(src, port, leases, opt=OPT)
    stats = TransferStats()
    puller = tcp_puller(dst, opt=OPT, stats=stats)
    try:
        leases.register("req-p", TID, [1, 2])
        puller.submit(RecvSpec("a", "127.0.0.1", port, TID, "req-p", [1, 2], [10, 11], 64))
        assert _wait(puller, server) == ({"a"}, set())
        server.close()  # the producer restarts: a new process on the same ports
        server.transport.close()
        time.sleep(0.2)
        src2 = make_cache(3.0)
        leases2 = LeaseTable(60)
        server = tcp_server(src2, port, leases2, opt=OPT)
        for n, rid in enumerate(["b", "c"]):  # the first pull, and the one after
            tid = rid * 24
            leases2.register("req-" + rid, tid, [3 + n, 5 + n])
            puller.submit(RecvSpec(rid, "127.0.0.1", port, tid, "req-" + rid, [3 + n, 5 + n], [20 + n, 30 + n], 64))
            assert _wait(puller, server) == ({rid}, set())
            assert_copied(src2, dst, [3 + n, 5 + n], [20 + n, 30 + n])
        assert stats.take()["failures"] == {}
    finally:
        server.close()
        puller.close()
