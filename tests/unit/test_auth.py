"""Shared-secret authentication: the token scheme alone, then producer and
consumer workers (KVServer, Puller, kvclient) over loopback."""

from __future__ import annotations

import time

import pytest
import torch

from kv_loopback import (
    TID, assert_copied, drive, make_cache, pump_for, pumped, release_params, tcp_puller, tcp_server,
)
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import MAX_SKEW_S, Authenticator, AuthError
from vllm_ascend_pd.config import ConfigError, parse_extra_config, resolve_secret
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kvclient import release_transfer_sync
from vllm_ascend_pd.testing.servers import free_port

SECRET = "correct horse battery staple"


# -- the token scheme ----------------------------------------------------------
def test_signed_request_verifies_once():
    a = Authenticator(SECRET)
    tok = a.sign("pull", TID, "req", [1, 2])
    Authenticator(SECRET).verify("pull", tok, TID, "req", [1, 2])
    a.verify("pull", tok, TID, "req", [1, 2])
    with pytest.raises(AuthError, match="already used"):
        a.verify("pull", tok, TID, "req", [1, 2])


@pytest.mark.parametrize("kind,fields", [
    ("pull", (TID, "req", [1, 3])),   # other blocks
    ("pull", (TID, "other", [1, 2])),  # other request
    ("release", (TID, "req", [1, 2])),  # other message kind
])
def test_token_is_bound_to_kind_and_fields(kind, fields):
    tok = Authenticator(SECRET).sign("pull", TID, "req", [1, 2])
    with pytest.raises(AuthError, match="wrong shared secret"):
        Authenticator(SECRET).verify(kind, tok, *fields)


def test_wrong_or_missing_secret_is_refused():
    server = Authenticator(SECRET)
    with pytest.raises(AuthError, match="wrong shared secret"):
        server.verify("hello", Authenticator("another secret of length").sign("hello", 1), 1)
    with pytest.raises(AuthError, match="no authentication token"):
        server.verify("hello", Authenticator("").sign("hello", 1), 1)


@pytest.mark.parametrize("token", [
    "x", "a1.", "a1...", "a1." + "0" * 32 + ".12.", "b1." + "0" * 32 + ".1.ff",
    "a1." + "0" * 32 + "." + "9" * 5000 + ".ff", "a1." + "0" * 31 + ".1.ff", "a1.é.1.ff",
    "a1." + "0" * 32 + ".\u00b2\u0663.ff",  # isdigit() but not int()-able: was ValueError
])
def test_malformed_tokens_raise_auth_error_only(token):
    with pytest.raises(AuthError):
        Authenticator(SECRET).verify("hello", token, 1)


def test_stale_or_future_timestamps_are_refused():
    now = [1_000_000.0]
    signer = Authenticator(SECRET, clock=lambda: now[0])
    checker = Authenticator(SECRET, clock=lambda: now[0] + MAX_SKEW_S + 1)
    with pytest.raises(AuthError, match="clock"):
        checker.verify("hello", signer.sign("hello", 1), 1)
    checker = Authenticator(SECRET, clock=lambda: now[0] - MAX_SKEW_S - 1)
    with pytest.raises(AuthError, match="clock"):
        checker.verify("hello", signer.sign("hello", 1), 1)


def test_reply_is_bound_to_its_request():
    client, server = Authenticator(SECRET), Authenticator(SECRET)
    req1, req2 = client.sign("hello", 1), client.sign("hello", 1)
    reply = server.sign_reply("hello_reply", req1, True, "P")
    client.verify_reply("hello_reply", reply, req1, True, "P")
    with pytest.raises(AuthError, match="another request"):
        client.verify_reply("hello_reply", reply, req2, True, "P")
    with pytest.raises(AuthError):
        client.verify_reply("hello_reply", reply, req1, False, "P")
    with pytest.raises(AuthError, match="no authentication token"):
        client.verify_reply("hello_reply", "", req1, True, "P")


def test_disabled_authenticator_accepts_everything():
    off = Authenticator("")
    assert off.sign("hello", 1) == ""
    off.verify("hello", "", 1)
    off.verify("hello", "garbage", 1)


# -- configuration -----------------------------------------------------------------
def test_secret_from_environment(monkeypatch):
    monkeypatch.setenv("PD_TEST_SECRET", SECRET)
    assert resolve_secret(parse_extra_config({"shared_secret_env": "PD_TEST_SECRET"})) == SECRET
    monkeypatch.delenv("PD_TEST_SECRET")
    with pytest.raises(ConfigError, match="PD_TEST_SECRET.*unset or empty"):
        parse_extra_config({"shared_secret_env": "PD_TEST_SECRET"})
    with pytest.raises(ConfigError, match="not both"):
        parse_extra_config({"shared_secret_env": "X", "shared_secret": SECRET})
    with pytest.raises(ConfigError, match="at least 16"):
        parse_extra_config({"shared_secret": "short"})
    assert resolve_secret(parse_extra_config({})) == ""


# -- producer and consumer workers ---------------------------------------------------
@pytest.fixture
def secured():
    src, dst = make_cache(1.0), make_cache(0.0)
    leases, stats, port = LeaseTable(60), TransferStats(), free_port()
    server = tcp_server(src, port, leases, stats=stats, secret=SECRET, grace_s=0.2)
    pullers = []

    def puller(secret, stats=None):
        p = tcp_puller(dst, stats=stats, secret=secret)
        pullers.append(p)
        return p

    yield src, dst, leases, stats, server, port, puller
    server.close()
    for p in pullers:
        p.close()


@pytest.mark.parametrize("wrong", ["", "not the secret, but long"])
def test_consumer_without_the_secret_gets_no_data_and_server_keeps_serving(secured, wrong):
    src, dst, leases, stats, server, port, puller = secured
    leases.register("req-p", TID, [3, 4])
    bad_stats = TransferStats()
    bad = puller(wrong, bad_stats)
    bad.submit(RecvSpec("a", "127.0.0.1", port, TID, "req-p", [3, 4], [5, 6], 64))
    assert drive(server, bad) == ({"a"}, {"a"})
    assert torch.count_nonzero(dst.tensors[0][[5, 6]]) == 0
    assert bad_stats.take()["failures"] == {"auth": 1}
    assert stats.take()["rejected"] == {"auth": 1}
    assert leases.pending() == 1  # the lease waits for the legitimate consumer

    good = puller(SECRET)
    good.submit(RecvSpec("b", "127.0.0.1", port, TID, "req-p", [3, 4], [7, 8], 64))
    assert drive(server, good) == ({"b"}, set())
    assert_copied(src, dst, [3, 4], [7, 8])
    assert leases.pending() == 0


def test_consumer_refuses_a_producer_without_the_secret():
    src, dst = make_cache(1.0), make_cache(0.0)
    leases, port = LeaseTable(60), free_port()
    server = tcp_server(src, port, leases, grace_s=0.2)
    stats = TransferStats()
    puller = tcp_puller(dst, stats=stats, secret=SECRET)
    try:
        leases.register("req-p", TID, [3])
        puller.submit(RecvSpec("a", "127.0.0.1", port, TID, "req-p", [3], [5], 32))
        assert drive(server, puller) == ({"a"}, {"a"})
        assert stats.take()["failures"] == {"auth": 1}
        assert torch.count_nonzero(dst.tensors[0][[5]]) == 0
    finally:
        server.close()
        puller.close()


def _raw(port: int, msg) -> object:
    import zmq

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(wire.encode(msg))
        assert sock.poll(5000), "no reply"
        return wire.decode(sock.recv())
    finally:
        ctx.destroy(linger=0)


def test_replayed_signed_pull_is_refused(secured):
    src, dst, leases, stats, server, port, _ = secured
    leases.register("req-p", TID, [3])
    tok = Authenticator(SECRET).sign("pull", TID, "req-p", [3], "D", 0, 1, None, "")
    pull = wire.PullRequest(TID, "req-p", [3], "D", 0, tok)
    with pumped(server):
        assert _raw(port, pull).ok  # the legitimate pull (its data is not read here)
        deadline = time.monotonic() + 10
        while leases.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        # The same message captured and sent again is refused by the token
        # check ("authentication failed"), before the lease table would say
        # "transfer already ended".
        reply = _raw(port, pull)
        assert not reply.ok and reply.error == "authentication failed"
        assert stats.take()["rejected"] == {"auth": 1}


def test_release_needs_the_secret(secured):
    _, _, leases, stats, server, port, _ = secured
    leases.register("req-p", TID, [3, 4])
    params = release_params(port)
    with pumped(server):
        assert release_transfer_sync(params, timeout=5) is False
        assert release_transfer_sync(params, timeout=5, secret="wrong but long enough") is False
        assert leases.pending() == 1
        assert release_transfer_sync(params, timeout=5, secret=SECRET) is True
        assert leases.pending() == 0
    assert stats.take()["rejected"] == {"auth": 2}


def test_refusals_are_logged_rate_limited(secured, caplog):
    import logging

    src, dst, leases, stats, server, port, puller = secured
    caplog.set_level(logging.WARNING)
    logging.getLogger("vllm").propagate = True
    for i in range(3):
        bad = puller("")
        bad.submit(RecvSpec(f"a{i}", "127.0.0.1", port, TID, "req-p", [3], [5], 32))
        drive(server, bad)
    lines = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert len(lines) == 1 and "shared_secret" in lines[0]
    assert stats.take()["rejected"] == {"auth": 3}


def test_mutated_tokens_never_pass_and_the_server_keeps_serving(secured):
    """2,000 pulls and releases carrying mutated valid tokens: all refused,
    the lease untouched, then the legitimate consumer pulls exactly."""
    import random

    import zmq

    src, dst, leases, stats, server, port, puller = secured
    rnd = random.Random(99)
    leases.register("req-p", TID, [3, 4])
    signer = Authenticator(SECRET)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        for i in range(2000):
            if i % 2:
                tok = signer.sign("pull", TID, "req-p", [3, 4], "D", 0, 1, None, "")
                msg_of = lambda t: wire.PullRequest(TID, "req-p", [3, 4], "D", 0, t)  # noqa: E731
            else:
                tok = signer.sign("release", TID, "req-p")
                msg_of = lambda t: wire.Release(TID, "req-p", t)  # noqa: E731
            b = bytearray(tok.encode())
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(len(b))] = rnd.choice(b"0123456789abcdef.")
            if bytes(b) == tok.encode():
                continue
            sock.send(wire.encode(msg_of(b.decode())))
            if i % 100 == 0:
                server.pump(0.01)
        pump_for(server, 3)
    finally:
        ctx.destroy(linger=0)
    assert leases.pending() == 1
    assert stats.take()["rejected"]["auth"] > 1900
    good = puller(SECRET)
    good.submit(RecvSpec("b", "127.0.0.1", port, TID, "req-p", [3, 4], [7, 8], 64))
    assert drive(server, good) == ({"b"}, set())
    assert_copied(src, dst, [3, 4], [7, 8])


def test_log_throttle_lets_one_line_through_per_interval_and_counts_the_rest():
    from vllm_ascend_pd.log_throttle import LogThrottle

    now = [100.0]
    t = LogThrottle(10.0, clock=lambda: now[0])
    assert t.hit("a") == 1           # the first one logs at once
    assert [t.hit("a") for _ in range(3)] == [0, 0, 0]
    assert t.hit("b") == 1           # keys are throttled apart
    now[0] += 10.0
    assert t.hit("a") == 4           # three held back plus this one
    assert t.hit("a") == 0
