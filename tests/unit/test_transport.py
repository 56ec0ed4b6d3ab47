"""The tcp transport and the control plane, in one process over loopback."""

from __future__ import annotations

import time

import pytest
import torch

# Re-exported: test_tcp_stream.py imports these from this module.
from kv_loopback import NB, TID, drive, make_cache, pair, pump_for, tcp_puller  # noqa: F401 - pair is a fixture
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.testing.servers import free_port, ipv6_loopback


def test_pull_copies_exact_blocks_and_frees_lease(pair):
    src, dst, leases, server, puller, ep, stats = pair
    blocks = [3, 9, 4, 40, 41]
    local = [10, 11, 12, 13, 14]
    leases.register("req-p", TID, blocks)
    puller.submit(RecvSpec("req-d", "127.0.0.1", ep, TID, "req-p", blocks, local, 150))
    done, failed = drive(server, puller)
    assert (done, failed) == ({"req-d"}, set())
    fresh = make_cache(0.0)
    untouched = [b for b in range(NB) if b not in local]
    for s, d, f in zip(src.tensors, dst.tensors, fresh.tensors):
        assert torch.equal(d[local], s[blocks])
        assert torch.equal(d[untouched], f[untouched])
    assert leases.take_finished() == {"req-p"}
    data = stats.take()
    assert data["loaded_tokens"] == 150 and data["recv_blocks"] == 5


def test_replayed_transfer_is_refused(pair):
    src, dst, leases, server, puller, ep, _ = pair
    leases.register("req-p", TID, [1, 2])
    puller.submit(RecvSpec("a", "127.0.0.1", ep, TID, "req-p", [1, 2], [5, 6], 64))
    assert drive(server, puller) == ({"a"}, set())
    puller.submit(RecvSpec("b", "127.0.0.1", ep, TID, "req-p", [1, 2], [7, 8], 64))
    assert drive(server, puller) == ({"b"}, {"b"})
    assert torch.count_nonzero(dst.tensors[0][[7, 8]]) == 0


def test_wrong_request_or_foreign_blocks_get_no_data(pair):
    src, dst, leases, server, puller, ep, _ = pair
    leases.register("req-p", TID, [1, 2], prompt_hash="a" * 32)
    puller.submit(RecvSpec("a", "127.0.0.1", ep, TID, "other-request", [1, 2], [5, 6], 64, prompt_hash="a" * 32))
    assert drive(server, puller) == ({"a"}, {"a"})
    puller.submit(RecvSpec("b", "127.0.0.1", ep, TID, "req-p", [1, 33], [5, 6], 64, prompt_hash="b" * 32))
    assert drive(server, puller) == ({"b"}, {"b"})
    pump_for(server, 0.3, puller)  # the releases that follow the refusals are refused too
    assert torch.count_nonzero(dst.tensors[0][[5, 6]]) == 0
    assert leases.pending() == 1  # still leased for the legitimate pull


def test_a_pull_for_another_prompt_gets_no_data(pair):
    """The consumer caches pulled blocks under its own prompt's block hashes,
    so blocks leased for one prompt must never be served to a pull naming
    another (kv_transfer_params are client data: a client holding a
    transfer id could rebind it to any prompt)."""
    src, dst, leases, server, puller, ep, stats = pair
    leases.register("req-p", TID, [1, 2], prompt_hash="a" * 32)
    for rid, ph in [("a", "b" * 32), ("b", "")]:
        puller.submit(RecvSpec(rid, "127.0.0.1", ep, TID, "req-p", [1, 2], [5, 6], 64, prompt_hash=ph))
        assert drive(server, puller) == ({rid}, {rid})
    pump_for(server, 0.3, puller)  # their releases name another prompt: refused too
    assert torch.count_nonzero(dst.tensors[0][[5, 6]]) == 0
    assert stats.take()["failures"] == {"refused": 2}
    assert leases.pending() == 1  # still leased for the legitimate pull
    puller.submit(RecvSpec("c", "127.0.0.1", ep, TID, "req-p", [1, 2], [5, 6], 64, prompt_hash="a" * 32))
    assert drive(server, puller) == ({"c"}, set())
    assert torch.equal(dst.tensors[0][[5, 6]], src.tensors[0][[1, 2]])
    assert leases.pending() == 0


def test_unknown_transfer_fails_after_grace(pair):
    _, _, _, server, puller, ep, stats = pair
    puller.submit(RecvSpec("a", "127.0.0.1", ep, "u" * 24, "req", [1], [1], 32))
    assert drive(server, puller) == ({"a"}, {"a"})
    assert stats.take()["failures"] == {"refused": 1}


def test_release_frees_lease(pair):
    _, _, leases, server, puller, ep, _ = pair
    leases.register("req-p", TID, [1, 2])
    puller.submit(ReleaseSpec("d", "127.0.0.1", ep, TID, "req-p"))
    deadline = time.monotonic() + 10
    while leases.pending() and time.monotonic() < deadline:
        puller.pump(0.01)
        server.pump(0.01)
    assert leases.take_finished() == {"req-p"}


def test_dead_producer_times_out(pair):
    _, _, _, server, puller, _, stats = pair
    dead = free_port()
    puller.connect_timeout_s = 0.3
    puller.submit(RecvSpec("a", "127.0.0.1", dead, TID, "req", [1], [1], 32))
    start = time.monotonic()
    assert drive(server, puller) == ({"a"}, {"a"})
    assert time.monotonic() - start < 3
    assert stats.take()["failures"] == {"timeout": 1}


def test_incompatible_layout_is_refused_at_handshake(pair):
    src, _, leases, server, _, ep, _ = pair
    other = make_cache(0.0, torch.float16)
    puller = tcp_puller(other, engine_id="D2")
    try:
        leases.register("req-p", TID, [1], prompt_hash="a" * 32)
        puller.submit(RecvSpec("a", "127.0.0.1", ep, TID, "req-p", [1], [1], 32, prompt_hash="a" * 32))
        assert drive(server, puller) == ({"a"}, {"a"})
        # The consumer cannot use these blocks: it releases them at once, on
        # a link of its own (the producer refuses its handshake).
        deadline = time.monotonic() + 5
        while leases.pending() and time.monotonic() < deadline:
            pump_for(server, 0.01, puller)
        assert leases.pending() == 0 and leases.take_finished() == {"req-p"}
    finally:
        puller.close()


def test_lease_expiry_reports_finished():
    now = [0.0]
    leases = LeaseTable(5.0, clock=lambda: now[0])
    leases.register("r", TID, [1])
    assert leases.expire() == 0
    now[0] = 6.0
    assert leases.expire() == 1
    assert leases.take_finished() == {"r"}
    assert "expired" in leases.begin_send(TID, "r", [1])


def test_protocol_rejects_garbage():
    with pytest.raises(wire.ProtocolError):
        wire.decode(b"\xff\x00garbage")
    with pytest.raises(wire.ProtocolError):
        wire.decode(b"x" * (wire.MAX_CONTROL_BYTES + 1))


@pytest.mark.parametrize("kv_ip", ["::1", "kv6.test"])
def test_a_pull_over_ipv6_is_exact(monkeypatch, kv_ip):
    """kv_ip ::1, or a name whose only address is ::1: ZMQ refuses IPv6
    endpoints unless ZMQ_IPV6 is set, and resolves a name for IPv4 only, so
    the producer resolves kv_ip once (the name reaches no socket) and binds
    and advertises the address, here over IPv6 only."""
    from fake_dns import fake_resolver
    from kv_loopback import ipv6_only_pull

    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    fake_resolver(monkeypatch, {"kv6.test": ["::1"]})
    ipv6_only_pull(kv_ip)
