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
