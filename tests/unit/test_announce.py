"""The instance side of proxy registration (announce.py) on its own."""

from __future__ import annotations

import pytest
import zmq

from vllm_ascend_pd.announce import Announcement, Announcer, decode_announcement


def _ipv6_router() -> tuple[zmq.Context, zmq.Socket, int]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    try:
        port = sock.bind_to_random_port("tcp://[::1]")
    except zmq.ZMQError:
        sock.close()
        ctx.term()
        pytest.skip("no IPv6 loopback here")
    return ctx, sock, port


def test_an_ipv6_proxy_ip_is_reached():
    # The connector announces to f"{proxy_ip}:{proxy_port}"; with proxy_ip
    # "::1" that was connected as tcp://::1:port, which never reaches the
    # proxy, while the log only said "not reachable yet; will keep trying".
    ctx, router, port = _ipv6_router()
    ann = Announcer(f"::1:{port}", Announcement(role="decode", http_address="[::1]:8000"), interval=0.05)
    ann.start()
    try:
        assert router.poll(30_000), "no announcement arrived"  # the first beat waits for vLLM's logger import
        got = decode_announcement(router.recv_multipart()[-1])
        assert (got.role, got.http_address) == ("decode", "[::1]:8000")
    finally:
        ann.stop()
        router.close()
        ctx.term()


def test_an_ipv6_kv_ip_is_announced_as_an_address_the_proxy_accepts():
    # The connector announced f"{kv_ip}:{port}": with kv_ip "::1" that is
    # "::1:8000", which the proxy refuses ("expected host:port") on every
    # heartbeat, so an IPv6 instance never registered.
    from types import SimpleNamespace

    from vllm_ascend_pd.announce import encode_announcement
    from vllm_ascend_pd.config import parse_extra_config
    from vllm_ascend_pd.connector.connector import announcement_for
    from vllm_ascend_pd.proxy.registration import RegistrationListener
    from vllm_ascend_pd.proxy.registry import Registry

    cfg = parse_extra_config({"kv_ip": "::1", "proxy_ip": "::1", "proxy_port": 5000, "http_port": 8000})
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(served_model_name=["tiny"]),
                                  kv_transfer_config=SimpleNamespace(kv_port=21000))
    ann = announcement_for(cfg, vllm_config, engine_id="e", is_producer=False, is_consumer=True)
    assert (ann.role, ann.http_address, ann.kv_address, ann.model) == ("decode", "[::1]:8000", "[::1]:21000", "tiny")

    added = []
    listener = RegistrationListener(Registry(health_checks=False), host="::1", port=5000, ttl=None,
                                    on_added=added.append, on_removed=lambda inst: None)
    listener.handle(encode_announcement(ann))
    assert listener.rejected == 0
    assert [(i.role, i.address) for i in added] == [("decode", "[::1]:8000")]


@pytest.mark.parametrize("address,answers,target", [
    ("10.0.0.7:5000", None, ("tcp://10.0.0.7:5000", False)),
    ("::1:5000", None, ("tcp://[::1]:5000", True)),
    ("[::1]:5000", None, ("tcp://[::1]:5000", True)),
    ("tcp://[::1]:5000", None, ("tcp://[::1]:5000", True)),
    # A name stays in the endpoint (ZMQ resolves it again on reconnect);
    # IPV6 is set when the resolver lists IPv6 first, as ZMQ then prefers it.
    ("proxy.test:5000", ["::1"], ("tcp://proxy.test:5000", True)),
    ("proxy.test:5000", ["::1", "127.0.0.1"], ("tcp://proxy.test:5000", True)),
    ("proxy.test:5000", ["127.0.0.1", "::1"], ("tcp://proxy.test:5000", False)),
    ("proxy.test:5000", ["127.0.0.1"], ("tcp://proxy.test:5000", False)),
])
def test_the_proxy_endpoint_and_its_ipv6_option(monkeypatch, address, answers, target):
    from fake_dns import fake_resolver
    from vllm_ascend_pd.announce import _zmq_target

    asked = fake_resolver(monkeypatch, {"proxy.test": answers or []})
    assert _zmq_target(address) == target
    assert asked == (["proxy.test"] if answers else [])


def test_a_proxy_name_that_stopped_resolving_is_tried_over_ipv4():
    from vllm_ascend_pd.announce import _zmq_target

    assert _zmq_target("no-such-host.invalid:5000") == ("tcp://no-such-host.invalid:5000", False)
