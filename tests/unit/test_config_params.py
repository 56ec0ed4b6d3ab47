from __future__ import annotations

import json
import re

import pytest

from fake_dns import fake_resolver
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.config import (
    ConfigError, check_proxy_ip, control_port, group_port, parse_extra_config, resolve_bind_host,
    resolve_kv_ip,
)
from vllm_ascend_pd.params import InvalidParams, parse_producer_params, prompt_hash


def good_params(**over):
    p = dict(remote_engine_id="e", remote_host="127.0.0.1", remote_port=20000,
             remote_block_ids=[1, 2], remote_request_id="r", transfer_id="x" * 32,
             tp_size=1, block_size=32, num_tokens=40, prompt_hash=prompt_hash([1, 2]),
             protocol=wire.PROTOCOL_VERSION, do_remote_prefill=True)
    p.update(over)
    return p


def test_defaults_and_unknown_key():
    assert parse_extra_config({}).transport == "auto"
    with pytest.raises(ConfigError, match="kv_ipp"):
        parse_extra_config({"kv_ipp": "1.2.3.4"})


@pytest.mark.parametrize("key,hint", [("prompt_device_ips", "prefill_device_ips"), ("kv_rank", "kv_role")])
def test_old_keys_name_the_new_form(key, hint):
    with pytest.raises(ConfigError, match=hint):
        parse_extra_config({key: 1})


def test_bad_values():
    with pytest.raises(ConfigError, match="lease_s"):
        parse_extra_config({"lease_s": 0})
    with pytest.raises(ConfigError, match="http_port"):
        parse_extra_config({"proxy_ip": "127.0.0.1", "proxy_port": 9000})
    with pytest.raises(ConfigError, match="buffer_pool_mb"):
        parse_extra_config({"chunk_mb": 8, "buffer_pool_mb": 8})


@pytest.mark.parametrize("key", ["lease_s", "registration_grace_s", "connect_timeout_s",
                                 "transfer_timeout_s", "buffer_pool_mb", "heartbeat_s"])
def test_infinite_values_are_refused_at_start_up(key):
    # vLLM parses --kv-transfer-config with json.loads, which takes Infinity:
    # a lease or timeout that never ends, a pool that fails start-up with
    # OverflowError, an announcer thread that dies at its first wait.
    with pytest.raises(ConfigError, match=f"{key} is inf: give a finite number"):
        parse_extra_config(json.loads('{"%s": Infinity}' % key))


@pytest.mark.parametrize("key", ["kv_ip", "kv_bind_host"])
def test_a_bracketed_ipv6_kv_address_says_to_drop_the_brackets(key):
    with pytest.raises(ConfigError, match=re.escape(f"{key} '[::1]': write an IPv6 address without brackets, e.g. '::1'")):
        parse_extra_config({key: "[::1]"})
    assert getattr(parse_extra_config({key: "::1"}), key) == "::1"


def test_host_names_resolve_once_at_start_up_to_the_address_sockets_get(monkeypatch):
    fake_resolver(monkeypatch, {"p.test": ["::1", "127.0.0.1"], "any.test": ["0.0.0.0"]})
    cfg = parse_extra_config({"kv_ip": "p.test"})
    assert resolve_kv_ip(cfg) == "::1"  # advertised to consumers and the proxy
    assert resolve_bind_host(cfg) == "::1"  # bound
    cfg = parse_extra_config({"kv_ip": "p.test", "kv_bind_host": "any.test"})
    assert (resolve_kv_ip(cfg), resolve_bind_host(cfg)) == ("::1", "0.0.0.0")
    assert resolve_bind_host(parse_extra_config({"kv_ip": "::1"})) == "::1"


@pytest.mark.parametrize("key", ["kv_ip", "kv_bind_host", "proxy_ip"])
def test_a_host_name_that_does_not_resolve_fails_start_up_naming_the_key(key):
    cfg = parse_extra_config({key: "no-such-host.invalid", "proxy_port": 9000, "http_port": 8000,
                              **({} if key == "proxy_ip" else {"proxy_ip": "127.0.0.1"})})
    check = {"kv_ip": resolve_kv_ip, "kv_bind_host": resolve_bind_host,
             "proxy_ip": check_proxy_ip}[key]
    with pytest.raises(ConfigError, match=re.escape(
            f"kv_connector_extra_config {key} 'no-such-host.invalid' does not resolve to an "
            "address (")) as e:
        check(cfg)
    assert str(e.value).endswith("give an IP address instead, or make the name resolve on this "
                                 "host (/etc/hosts or DNS)")


def test_proxy_ip_may_be_bracketed_or_a_name(monkeypatch):
    fake_resolver(monkeypatch, {"proxy.test": ["::1"]})
    for ip in ("[::1]", "::1", "proxy.test", "127.0.0.1"):
        check_proxy_ip(parse_extra_config({"proxy_ip": ip, "proxy_port": 9000, "http_port": 8000}))


def test_port_plan():
    assert control_port(20000, 3) == 20003
    with pytest.raises(ConfigError):
        control_port(65535, 1)
    assert group_port(20000, 3) == 20067
    # Not OverflowError from bind() at start-up: say which setting to lower.
    with pytest.raises(ConfigError, match="lower kv_port to at most 65408"):
        group_port(65500, 0)


def test_params_roundtrip():
    assert parse_producer_params(good_params()).num_tokens == 40


@pytest.mark.parametrize("bad", [
    None, [], "x",
    {"do_remote_prefill": True},
    good_params(remote_port="20000"),
    good_params(remote_port=70000),
    good_params(remote_block_ids=[1]),  # 40 tokens need 2 blocks
    good_params(remote_block_ids=[1, -2]),
    good_params(transfer_id="short"),
    good_params(num_tokens=0),
    good_params(tp_size=65),
    good_params(tp_size=2, remote_port=65535),
    good_params(remote_port=65500),  # its data port, kv_port + 64, would not exist
])
def test_malformed_params_rejected(bad):
    with pytest.raises(InvalidParams):
        parse_producer_params(bad)


@pytest.mark.parametrize("host", ["10.0.0.7", "::1", "fe80::1%eth0"])
def test_params_name_the_producer_by_ip_address(host):
    assert parse_producer_params(good_params(remote_host=host)).remote_host == host


@pytest.mark.parametrize("host", ["p.example", "localhost", "[::1]", ""])
def test_a_remote_host_that_is_no_ip_address_is_refused(host):
    # Producers advertise the address they resolved; resolving a name here
    # would block the consumer's engine thread (or the proxy's loop).
    with pytest.raises(InvalidParams, match=re.escape(
            f"remote_host {host!r} is not an IP address; pass the dict returned by the "
            "prefill instance unchanged")):
        parse_producer_params(good_params(remote_host=host))


def test_configuration_reference_is_generated_from_config():
    from pathlib import Path

    from vllm_ascend_pd.config_doc import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "run: python -m vllm_ascend_pd.config_doc > docs/configuration.md"
