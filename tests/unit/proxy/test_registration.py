"""Dynamic registration over ZMQ, heartbeats and eviction; the Announcer."""

from __future__ import annotations

import asyncio
import time

import msgspec

from conftest import free_port, registration_dealer, state_of, wait_for
from vllm_ascend_pd.announce import Announcement, Announcer, encode_announcement


def _addresses(client, role):
    return sorted(i.address for i in state_of(client).registry.instances(role))


async def test_announced_instances_serve_and_leave(backend, proxy):
    p, d = await backend("p"), await backend("d")
    port = free_port()
    client = await proxy(register_port=port)
    ann_p = Announcer(f"127.0.0.1:{port}", Announcement(
        role="prefill", http_address=p.address, engine_id="ep", kv_address="127.0.0.1:7"),
        interval=0.05)
    ann_d = Announcer(f"127.0.0.1:{port}", Announcement(
        role="decode", http_address=d.address, engine_id="ed"), interval=0.05)
    ann_p.start()
    ann_d.start()
    try:
        await wait_for(lambda: _addresses(client, "prefill") == [p.address]
                       and _addresses(client, "decode") == [d.address])
        resp = await client.post("/v1/completions", json={"prompt": "x"})
        assert resp.status == 200
        assert len(p.requests) == 1 and len(d.requests) == 1
        status = await (await client.get("/status")).json()
        [pi] = status["instances"]["prefill"]
        assert pi["source"] == "registered"
        assert pi["meta"] == {"engine_id": "ep", "kv_address": "127.0.0.1:7"}
        assert status["registration"] == f"tcp://127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(ann_d.stop)
    # A clean stop says goodbye: removed at once, not after the TTL.
    await wait_for(lambda: _addresses(client, "decode") == [], timeout=1.0)
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503
    await asyncio.to_thread(ann_p.stop)


async def test_silent_instance_is_evicted_after_ttl(backend, proxy):
    d = await backend("d")
    port = free_port()
    client = await proxy(register_port=port, heartbeat_ttl=0.3)
    with registration_dealer(port) as sock:
        sock.send(encode_announcement(Announcement(role="both", http_address=d.address)))
        await wait_for(lambda: _addresses(client, "decode") == [d.address]
                       and _addresses(client, "prefill") == [d.address])
        t0 = time.monotonic()
        # Heartbeats keep it alive past the TTL ...
        for _ in range(5):
            await asyncio.sleep(0.1)
            sock.send(encode_announcement(Announcement(role="both",
                                                       http_address=d.address)))
        assert _addresses(client, "decode") == [d.address]
        # ... silence evicts it.
        t0 = time.monotonic()
        await wait_for(lambda: _addresses(client, "decode") == [], timeout=4)
        assert 0.2 < time.monotonic() - t0 < 3
        assert _addresses(client, "prefill") == []


async def test_registered_instance_waits_for_health_probe(backend, proxy):
    d = await backend("d")
    d.healthy = False
    port = free_port()
    client = await proxy(register_port=port, health_interval=0.05)
    ann = Announcer(f"127.0.0.1:{port}", Announcement(role="decode", http_address=d.address),
                    interval=0.05)
    ann.start()
    try:
        await wait_for(lambda: _addresses(client, "decode") == [d.address])
        await wait_for(lambda: d.health_probes >= 2)
        assert state_of(client).registry.candidates("decode") == []
        d.healthy = True
        await wait_for(lambda: len(state_of(client).registry.candidates("decode")) == 1)
    finally:
        await asyncio.to_thread(ann.stop)


async def test_bad_announcements_are_ignored(proxy):
    port = free_port()
    client = await proxy(register_port=port)
    listener = state_of(client).registration
    with registration_dealer(port) as sock:
        sock.send(b"garbage")
        sock.send(msgspec.msgpack.encode({"role": "router", "http_address": "a:1"}))
        sock.send(encode_announcement(Announcement(role="decode", http_address="nope")))
        sock.send(encode_announcement(Announcement(role="decode",
                                                   http_address="127.0.0.1:9", version=99)))
        await wait_for(lambda: listener.rejected == 4)
        assert listener.received == 0
        assert state_of(client).registry.instances() == []


def test_announcer_never_raises():
    bad = Announcer("not an address", Announcement(role="decode", http_address="h:1"),
                    interval=0.05)
    bad.stop()  # before start
    bad.start()
    bad.start()  # idempotent
    time.sleep(0.1)
    bad.stop()
    assert not bad.running
    # Proxy down: heartbeats are dropped, not queued, and stop() is prompt.
    ann = Announcer(f"127.0.0.1:{free_port()}",
                    Announcement(role="decode", http_address="h:1"), interval=0.05)
    ann.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    ann.stop()
    assert time.monotonic() - t0 < 1.5 and not ann.running
    assert ann.sent == 0


def test_announcement_roundtrip_carries_interval():
    ann = Announcer("127.0.0.1:1", Announcement(role="prefill", http_address="h:1"),
                    interval=2.5)
    from vllm_ascend_pd.announce import decode_announcement
    decoded = decode_announcement(encode_announcement(ann.announcement))
    assert decoded == Announcement(role="prefill", http_address="h:1", interval=2.5)
    assert decoded.version == 1 and decoded.leaving is False


# ---------------------------------------------------------------- signed registration
SECRET = "0123456789abcdef0123456789abcdef"


def _signed(ann: Announcement, secret: str = SECRET) -> bytes:
    return Announcer("127.0.0.1:1", ann, secret=secret)._encode(ann)


async def test_with_the_secret_only_signed_announcements_count(backend, proxy, monkeypatch):
    monkeypatch.setenv("TEST_PD_SECRET", SECRET)
    good, rogue, pre = await backend("good"), await backend("rogue"), await backend("p")
    port = free_port()
    client = await proxy(prefill=[pre], register_port=port, kv_secret_env="TEST_PD_SECRET")
    reg = state_of(client).registration
    ann = Announcer(f"127.0.0.1:{port}", Announcement(role="decode", http_address=good.address),
                    interval=0.05, secret=SECRET)
    ann.start()
    try:
        with registration_dealer(port) as peer:
            await _refuse_strangers(client, peer, reg, good, rogue)
    finally:
        await asyncio.to_thread(ann.stop)
    # The real instance's signed goodbye is honoured.
    await wait_for(lambda: _addresses(client, "decode") == [], timeout=1.0)


async def _refuse_strangers(client, peer, reg, good, rogue) -> None:
    await wait_for(lambda: _addresses(client, "decode") == [good.address])
    rejected = reg.rejected
    rogue_ann = Announcement(role="decode", http_address=rogue.address)
    peer.send(encode_announcement(rogue_ann))             # unsigned
    peer.send(_signed(rogue_ann, secret="f" * 32))        # another secret
    forged = msgspec.msgpack.decode(_signed(rogue_ann))
    forged["http_address"] = "127.0.0.1:9"                # token of other fields
    peer.send(msgspec.msgpack.encode(forged))
    # Nor can a stranger take the real instance out of rotation.
    peer.send(encode_announcement(Announcement(role="decode", http_address=good.address,
                                               leaving=True)))
    await wait_for(lambda: reg.rejected == rejected + 4)
    # A captured beat replayed is refused too.
    beat = _signed(Announcement(role="decode", http_address=rogue.address, interval=9))
    peer.send(beat)
    await wait_for(lambda: rogue.address in _addresses(client, "decode"))
    state_of(client).registry.remove("decode", rogue.address)
    peer.send(beat)
    await wait_for(lambda: reg.rejected == rejected + 5)
    assert _addresses(client, "decode") == [good.address]
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200 and len(good.requests) == 1 and not rogue.requests


async def test_without_the_secret_signed_announcements_register_with_one_warning(
        backend, proxy, caplog):
    d = await backend("d")
    port = free_port()
    client = await proxy(register_port=port)
    ann = Announcer(f"127.0.0.1:{port}", Announcement(role="decode", http_address=d.address),
                    interval=0.02, secret=SECRET)
    with caplog.at_level("WARNING"):
        ann.start()
        try:
            await wait_for(lambda: _addresses(client, "decode") == [d.address])
            await wait_for(lambda: state_of(client).registration.received >= 5)
        finally:
            await asyncio.to_thread(ann.stop)
    warnings = [r for r in caplog.records if "--kv-secret-env" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


async def test_a_flood_of_bad_announcements_is_logged_once(proxy, caplog):
    port = free_port()
    client = await proxy(register_port=port)
    reg = state_of(client).registration
    with registration_dealer(port) as peer, caplog.at_level("WARNING"):
        for i in range(200):
            peer.send(b"\x93not an announcement %d" % i)
        await wait_for(lambda: reg.rejected == 200)
    logged = [r for r in caplog.records if "malformed announcement" in r.getMessage()]
    assert len(logged) == 1, len(logged)
    assert _addresses(client, "decode") == []


async def test_hostile_frames_do_not_stop_the_listener(backend, proxy, monkeypatch):
    # Each of these used to raise out of handle() (RecursionError from
    # msgspec skipping an unknown field nested deeper than it recurses;
    # ValueError from int() of a token timestamp of non-ASCII digits, which
    # str.isdigit() accepts) and end the receive task: registration stopped
    # for good, and every registered instance was evicted when its TTL ran out.
    monkeypatch.setenv("TEST_PD_SECRET", SECRET)
    d = await backend("d")
    port = free_port()
    client = await proxy(register_port=port, kv_secret_env="TEST_PD_SECRET")
    reg = state_of(client).registration
    nested = (b"\x82" + msgspec.msgpack.encode("role") + msgspec.msgpack.encode("decode")
              + msgspec.msgpack.encode("extra") + b"\x91" * 5000 + b"\x90")
    odd_digits = msgspec.msgpack.encode({
        "role": "decode", "http_address": d.address,
        "token": "a1." + "0" * 32 + ".\u00b2\u00b3." + "f" * 64})
    with registration_dealer(port) as peer:
        for frame in (nested, odd_digits):
            peer.send(frame)
        await wait_for(lambda: reg.rejected == 2)
        peer.send(_signed(Announcement(role="decode", http_address=d.address)))
        await wait_for(lambda: _addresses(client, "decode") == [d.address])
    assert reg.received == 1


async def test_oversized_frames_are_dropped_unread(backend, proxy):
    # Without a size limit the listener buffered (and decoded) frames of any
    # size from anyone who reaches the port, before any authentication.
    d = await backend("d")
    port = free_port()
    client = await proxy(register_port=port)
    reg = state_of(client).registration
    with registration_dealer(port) as big, registration_dealer(port) as peer:
        big.send(b"\x00" * (4 << 20))
        await asyncio.sleep(0.3)
        peer.send(encode_announcement(Announcement(role="decode", http_address=d.address)))
        await wait_for(lambda: _addresses(client, "decode") == [d.address])
    assert reg.rejected == 0 and reg.received == 1


async def test_an_infinite_interval_still_expires(backend, proxy):
    # ttl = 3 x interval: an announced interval of inf made an instance that
    # never expired once its heartbeats stopped.
    d = await backend("d")
    port = free_port()
    client = await proxy(register_port=port)
    reg = state_of(client).registration
    for interval in (float("inf"), float("nan"), -1.0):
        assert reg.ttl_for(Announcement(role="decode", http_address=d.address,
                                        interval=interval)) == 9.0
    assert reg.ttl_for(Announcement(role="decode", http_address=d.address,
                                    interval=0.5)) == 1.5


async def test_registration_over_ipv6(backend, proxy):
    """--register-host ::1: an instance whose proxy_ip is ::1 registers."""
    import socket

    import pytest

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    d = await backend("d")
    client = await proxy(register_port=port, register_host="::1")
    ann = Announcer(f"::1:{port}", Announcement(role="decode", http_address=d.address), interval=0.05)
    ann.start()
    try:
        await wait_for(lambda: _addresses(client, "decode") == [d.address], timeout=30)
        status = await (await client.get("/status")).json()
        assert status["registration"] == f"tcp://[::1]:{port}"
    finally:
        await asyncio.to_thread(ann.stop)


async def test_a_register_host_name_binds_its_address(monkeypatch):
    """ZMQ would resolve a name for IPv4 only: the listener binds the address
    the name resolves to (here ::1 alone), and a name that does not resolve
    stops start-up naming the flag."""
    import socket

    import pytest

    from fake_dns import fake_resolver
    from vllm_ascend_pd.proxy.config import ConfigError
    from vllm_ascend_pd.proxy.registration import RegistrationListener
    from vllm_ascend_pd.proxy.registry import Registry
    from vllm_ascend_pd.testing.servers import ipv6_loopback

    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    fake_resolver(monkeypatch, {"reg6.test": ["::1"]})
    port = free_port()

    def listener(host):
        return RegistrationListener(Registry(health_checks=False), host=host, port=port,
                                    ttl=None, on_added=print, on_removed=print)

    reg = listener("reg6.test")
    reg.start()
    try:
        assert reg.endpoint == f"tcp://[::1]:{port}"
        socket.create_connection(("::1", port), timeout=2).close()
    finally:
        await reg.stop()
    with pytest.raises(ConfigError, match=r"^--register-host 'no-such-host.invalid' does not "
                                          r"resolve to an address \("):
        listener("no-such-host.invalid").start()
