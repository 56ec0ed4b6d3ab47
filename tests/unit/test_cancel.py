"""A request aborted on the consumer while its KV is loading: the pull stops
at once, the request is reported finished exactly once (vLLM then frees its
blocks), nothing lands in those blocks afterwards, and the producer frees
its lease."""

from __future__ import annotations

import time

import pytest
import torch

from kv_loopback import TID, drive, make_cache, tcp_puller, tcp_server
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kv_layout import PagedKVCache
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions

# One 1 KiB block row per call: a 40-block pull takes many pump rounds.
SLOW = TransportOptions(chunk_bytes=1024, pool_bytes=4096, idle_timeout_s=2)
BLOCKS = list(range(40))
LOCAL = list(range(20, 60))


@pytest.fixture
def slow_pair():
    src, dst = make_cache(1.0), make_cache(0.0)
    leases = LeaseTable(60)
    port = free_port()
    server_stats, stats = TransferStats(), TransferStats()
    server = tcp_server(src, port, leases, opt=SLOW, stats=server_stats)
    puller = tcp_puller(dst, opt=SLOW, stats=stats)
    yield src, dst, leases, server, puller, port, stats, server_stats
    server.close()
    puller.close()


def _submit(puller, port, leases, rid="req-d", tid=TID, blocks=BLOCKS, local=LOCAL):
    leases.register("req-p-" + rid, tid, blocks)
    puller.submit(RecvSpec(rid, "127.0.0.1", port, tid, "req-p-" + rid, blocks, local, 32 * len(blocks)))


def _pump(server, puller, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        puller.pump(0.0002)
        server.pump(0.0002)


def _changed(dst: PagedKVCache, fresh: PagedKVCache, blocks) -> int:
    return sum(int((d[blocks] != f[blocks]).flatten(1).any(1).sum()) for d, f in zip(dst.tensors, fresh.tensors))


def test_abort_mid_transfer_stops_the_pull_and_frees_both_sides(slow_pair):
    src, dst, leases, server, puller, port, stats, server_stats = slow_pair
    _submit(puller, port, leases)
    fresh = make_cache(0.0)
    deadline = time.monotonic() + 10
    while _changed(dst, fresh, LOCAL) == 0 and time.monotonic() < deadline:
        puller.pump(0.0002)
        server.pump(0.0002)
    landed = _changed(dst, fresh, LOCAL)
    assert 0 < landed < len(LOCAL) * len(dst.tensors), "cancel must come mid-transfer"
    assert leases.pending() == 1

    puller.cancel("req-d")
    # Reported at once, as finished (not failed): vLLM frees the blocks now.
    assert puller.take_results() == ({"req-d"}, set())
    snapshot = [t.clone() for t in dst.tensors]
    _pump(server, puller, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, dst.tensors)), "no byte may land after the cancel"
    assert puller.take_results() == (set(), set()), "reported exactly once"
    assert leases.pending() == 0 and leases.take_finished() == {"req-p-req-d"}
    data = stats.take()
    assert data["cancelled_pulls"] == 1 and data["recv_transfers"] == 0 and data["failures"] == {}
    assert not puller.busy()

    # The next pull on the same producer is exact.
    again = list(range(50, 54))
    _submit(puller, port, leases, "req-2", "u" * 24, [1, 2, 3, 4], again)
    assert drive(server, puller) == ({"req-2"}, set())
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[again], s[[1, 2, 3, 4]])


def test_abort_before_the_pull_started_releases_the_lease(slow_pair):
    src, dst, leases, server, puller, port, stats, server_stats = slow_pair
    _submit(puller, port, leases, "first", "a" * 24)
    _submit(puller, port, leases, "queued", "b" * 24, [41, 42], [61, 62])  # waits behind "first"
    puller.cancel("queued")
    assert puller.take_results() == ({"queued"}, set())
    done: set = set()
    deadline = time.monotonic() + 10
    while "first" not in done and time.monotonic() < deadline:
        puller.pump(0.01)
        server.pump(0.01)
        done |= puller.take_results()[0]
    assert "first" in done
    deadline = time.monotonic() + 5
    while leases.pending() and time.monotonic() < deadline:
        _pump(server, puller, 0.01)
    assert leases.pending() == 0
    assert leases.take_finished() == {"req-p-first", "req-p-queued"}
    assert server_stats.take()["releases"] == 1  # freed by the release, not by expiry
    assert torch.equal(dst.tensors[0][[61, 62]], make_cache(0.0).tensors[0][[61, 62]])


def test_cancel_after_the_pull_ended_changes_nothing(slow_pair):
    src, dst, leases, server, puller, port, stats, server_stats = slow_pair
    _submit(puller, port, leases, blocks=[1, 2], local=[3, 4])
    assert drive(server, puller) == ({"req-d"}, set())
    puller.cancel("req-d")
    puller.cancel("never-seen")
    assert puller.take_results() == (set(), set())
    assert stats.take()["cancelled_pulls"] == 0
    assert not puller.busy()


def test_transports_that_cannot_stop_a_write_are_not_cancelled(slow_pair, monkeypatch):
    src, dst, leases, server, puller, port, stats, server_stats = slow_pair
    monkeypatch.setattr(type(puller.transport), "cancellable", False)
    _submit(puller, port, leases, blocks=[1, 2], local=[3, 4])
    puller.pump(0.001)
    puller.cancel("req-d")
    assert drive(server, puller) == ({"req-d"}, set())  # ran to its end instead
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[[3, 4]], s[[1, 2]])
    assert stats.take()["cancelled_pulls"] == 0
