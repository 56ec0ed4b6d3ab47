"""Configuration users of the original Ascend connector already know, and the
llmdatadist port plan."""

from __future__ import annotations

import pytest

from vllm_ascend_pd.config import (
    KV_PORT_SPAN,
    ConfigError,
    llmdatadist_endpoint,
    parse_extra_config,
)

IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


@pytest.mark.parametrize("key,new_form", [
    ("prompt_device_ips", "use prefill_device_ips"),
    ("kv_parallel_size", "use nothing: vLLM 0.32 sizes transfers from tensor_parallel_size"),
    ("kv_rank", "use nothing: the role is set by kv_role (kv_producer / kv_consumer"),
    ("kv_buffer_size", "use `buffer_pool_mb`"),
])
def test_old_keys_are_refused_with_the_new_form(key, new_form):
    with pytest.raises(ConfigError) as err:
        parse_extra_config({key: 1})
    assert str(err.value).startswith(f"kv_connector_extra_config key {key!r} is not supported; {new_form}")


def test_known_ascend_keys_are_accepted():
    cfg = parse_extra_config({
        "prefill_device_ips": IPS, "decode_device_ips": IPS[:2],
        "llmdatadist_comm_port": 26000, "proxy_ip": "10.1.1.1", "proxy_port": 8000,
        "http_port": 8100, "transport": "llmdatadist",
    })
    assert cfg.prefill_device_ips == IPS and cfg.llmdatadist_comm_port == 26000


@pytest.mark.parametrize("extra,match", [
    ({"prefill_device_ips": ["10.0.0.1", "10.0.0"]}, "prefill_device_ips entry '10.0.0'"),
    ({"decode_device_ips": ["fe80::1"]}, "decode_device_ips entry 'fe80::1' is not an IPv4"),
    ({"decode_device_ips": "10.0.0.1"}, "decode_device_ips"),
    ({"llmdatadist_comm_port": 0}, "llmdatadist_comm_port"),
    ({"llmdatadist_comm_port": 65536}, "llmdatadist_comm_port"),
])
def test_bad_ascend_values_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        parse_extra_config(extra)


def test_endpoint_per_rank():
    cfg = parse_extra_config({"prefill_device_ips": IPS, "decode_device_ips": IPS[::-1]})
    assert llmdatadist_endpoint(cfg, kv_port=20000, rank=2, tp_size=4, is_producer=True) == ("10.0.0.3", 26002)
    assert llmdatadist_endpoint(cfg, kv_port=20000, rank=0, tp_size=4, is_producer=False) == ("10.0.0.4", 26000)


def test_endpoint_without_ips_leaves_discovery_to_the_transport():
    cfg = parse_extra_config({})
    assert llmdatadist_endpoint(cfg, kv_port=20000, rank=3, tp_size=4, is_producer=True) == ("", 26003)


def test_endpoint_needs_one_ip_per_rank_and_says_how_to_get_them():
    cfg = parse_extra_config({"prefill_device_ips": IPS[:2]})
    with pytest.raises(ConfigError) as err:
        llmdatadist_endpoint(cfg, kv_port=20000, rank=0, tp_size=4, is_producer=True)
    msg = str(err.value)
    assert "prefill_device_ips" in msg and "(4), got 2" in msg and "hccn_tool -i <device> -ip -g" in msg
    cfg = parse_extra_config({"decode_device_ips": IPS[:1]})
    with pytest.raises(ConfigError, match="decode_device_ips"):
        llmdatadist_endpoint(cfg, kv_port=20000, rank=0, tp_size=2, is_producer=False)


@pytest.mark.parametrize("kv_port,comm_port,tp", [
    (26000, 26000, 1),                       # same base
    (25900, 26000, 1),                       # comm port inside [kv_port, kv_port + 128)
    (26003, 26000, 4),                       # kv_port inside the comm range
    (26000 - KV_PORT_SPAN + 1, 26000, 1),    # last port of the kv range
])
def test_endpoint_refuses_overlap_with_kv_ports(kv_port, comm_port, tp):
    cfg = parse_extra_config({"prefill_device_ips": IPS, "llmdatadist_comm_port": comm_port})
    with pytest.raises(ConfigError, match="overlap the KV ports"):
        llmdatadist_endpoint(cfg, kv_port=kv_port, rank=0, tp_size=tp, is_producer=True)


def test_endpoint_adjacent_ranges_are_fine_and_overflow_is_refused():
    cfg = parse_extra_config({"prefill_device_ips": IPS, "llmdatadist_comm_port": 26000})
    assert llmdatadist_endpoint(cfg, kv_port=26000 - KV_PORT_SPAN, rank=0, tp_size=4, is_producer=True)[1] == 26000
    assert llmdatadist_endpoint(cfg, kv_port=26004, rank=3, tp_size=4, is_producer=True)[1] == 26003
    cfg = parse_extra_config({"prefill_device_ips": IPS, "llmdatadist_comm_port": 65534})
    with pytest.raises(ConfigError, match="exceeds 65535"):
        llmdatadist_endpoint(cfg, kv_port=20000, rank=0, tp_size=4, is_producer=True)
