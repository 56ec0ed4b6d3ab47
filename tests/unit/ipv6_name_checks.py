"""Run by test_ipv6_names.py in a private mount namespace whose /etc/hosts
names ``sys.argv[1]`` with ::1 alone, so every library resolves it through
the real system (libzmq too). Exits non-zero at the first failed check.

Usage: python ipv6_name_checks.py NAME
"""

from __future__ import annotations

import asyncio
import socket
import sys

import zmq

from kv_loopback import ipv6_only_pull, only_on_ipv6
from vllm_ascend_pd.announce import Announcement, Announcer, decode_announcement
from vllm_ascend_pd.config import check_proxy_ip, parse_extra_config
from vllm_ascend_pd.proxy.registration import RegistrationListener
from vllm_ascend_pd.proxy.registry import Registry
from vllm_ascend_pd.testing.servers import PortPicker

NAME = sys.argv[1]
ports = PortPicker()


def announce() -> None:
    """proxy_ip NAME: heartbeats reach a proxy listening on ::1 only."""
    port = ports.http()
    check_proxy_ip(parse_extra_config({"proxy_ip": NAME, "proxy_port": port, "http_port": 8000}))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.IPV6, 1)
    router.bind(f"tcp://[::1]:{port}")
    announcer = Announcer(f"{NAME}:{port}", Announcement(role="decode", http_address="[::1]:8000"),
                          interval=0.1)
    announcer.start()
    try:
        assert router.poll(10_000), "no heartbeat reached the proxy on ::1"
        assert decode_announcement(router.recv_multipart()[-1]).http_address == "[::1]:8000"
    finally:
        announcer.stop()
        router.close(0)
        ctx.term()


async def register_host() -> None:
    """The proxy's --register-host NAME binds ::1."""
    port = ports.http()
    listener = RegistrationListener(Registry(health_checks=False), host=NAME, port=port,
                                    ttl=None, on_added=print, on_removed=print)
    listener.start()
    try:
        assert listener.endpoint == f"tcp://[::1]:{port}", listener.endpoint
        only_on_ipv6(port)
    finally:
        await listener.stop()


if __name__ == "__main__":
    answers = {info[4][0] for info in socket.getaddrinfo(NAME, None)}
    assert answers == {"::1"}, f"{NAME} resolves to {answers} here, not ::1 alone"
    ipv6_only_pull(NAME)  # kv_ip NAME
    announce()
    asyncio.run(register_host())
    print("all checks passed")
