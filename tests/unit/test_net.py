"""vllm_ascend_pd.net: the one host:port joiner every component uses."""

from __future__ import annotations

import pytest

from vllm_ascend_pd.net import host_port

JOINED = [
    ("10.0.0.7", "10.0.0.7:8000"),
    ("node-1.example", "node-1.example:8000"),
    ("::1", "[::1]:8000"),
    ("[::1]", "[::1]:8000"),  # already bracketed: kept, never [[::1]]
    ("fe80::1%eth0", "[fe80::1%eth0]:8000"),  # a zone id stays inside the brackets
]


@pytest.mark.parametrize("host,joined", JOINED)
def test_host_port(host, joined):
    assert host_port(host, 8000) == joined
    assert host_port(host, "8000") == joined


@pytest.mark.parametrize("host,joined", JOINED)
def test_the_proxy_joins_addresses_the_same_way(host, joined):
    """The proxy's registry keys and its registration endpoint come from the
    same joiner (proxy/config.py once had a twin that bracketed [::1] again)."""
    from vllm_ascend_pd.proxy.config import normalize_address
    from vllm_ascend_pd.proxy.registration import RegistrationListener
    from vllm_ascend_pd.proxy.registry import Registry

    assert normalize_address(joined) == joined
    listener = RegistrationListener(Registry(health_checks=False), host=host, port=8000,
                                    ttl=None, on_added=print, on_removed=print)
    assert listener.endpoint == f"tcp://{joined}"
