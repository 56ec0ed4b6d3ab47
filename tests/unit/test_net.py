"""vllm_ascend_pd.net: the one host:port joiner every component uses, and how
a configured host name becomes the one address sockets get."""

from __future__ import annotations

import socket

import pytest

from fake_dns import fake_resolver
from vllm_ascend_pd.net import HostError, family_of, host_port, resolve

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


@pytest.mark.parametrize("host", ["10.0.0.7", "::1", "fe80::1%eth0", "0.0.0.0", "::"])
def test_an_ip_address_is_its_own_answer(monkeypatch, host):
    asked = fake_resolver(monkeypatch, {})
    assert resolve(host, "kv_ip") == [host]
    assert asked == []


@pytest.mark.parametrize("answers,chosen", [
    (["::1"], "::1"),  # a name with only an IPv6 address
    (["127.0.0.1"], "127.0.0.1"),
    (["::1", "127.0.0.1"], "::1"),  # the resolver's first answer picks the family
    (["127.0.0.1", "::1"], "127.0.0.1"),
    (["10.0.0.9", "::1", "10.0.0.5"], "10.0.0.5"),  # then the lowest of that family
    (["10.0.0.5", "10.0.0.9"], "10.0.0.5"),
    (["10.0.0.9", "10.0.0.5"], "10.0.0.5"),  # the same whatever order DNS rotates to
])
def test_a_name_resolves_to_one_address_chosen_the_same_way_each_time(monkeypatch, answers, chosen):
    fake_resolver(monkeypatch, {"node.test": answers})
    found = resolve("node.test", "kv_ip")
    assert found[0] == chosen
    assert sorted(found) == sorted(set(answers))


def test_a_name_that_does_not_resolve_says_what_to_set():
    with pytest.raises(HostError) as e:
        resolve("no-such-host.invalid", "kv_connector_extra_config kv_ip")
    assert str(e.value).startswith(
        "kv_connector_extra_config kv_ip 'no-such-host.invalid' does not resolve to an address (")
    assert str(e.value).endswith("give an IP address instead, or make the name resolve on "
                                 "this host (/etc/hosts or DNS)")


def test_brackets_are_refused_with_the_address_to_write():
    with pytest.raises(HostError, match=r"kv_ip '\[::1\]': write an IPv6 address without "
                                        r"brackets, e.g. '::1'"):
        resolve("[::1]", "kv_ip")


def test_family_of():
    assert family_of("::1") == socket.AF_INET6
    assert family_of("fe80::1%eth0") == socket.AF_INET6
    assert family_of("10.0.0.7") == socket.AF_INET
