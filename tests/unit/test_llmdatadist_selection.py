"""How the worker opens the llmdatadist transport: the port plan goes into its
options, an explicit choice fails loudly, and `auto` falls back to tcp."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from tests.unit.fakes import fake_llm_datadist as fake
from vllm_ascend_pd.config import ConfigError, parse_extra_config
from vllm_ascend_pd.connector.worker import open_transport, resolve_transport
from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache
from vllm_ascend_pd.transport import TransportOptions

IPS = ["10.30.0.1", "10.30.0.2"]


def cache() -> PagedKVCache:
    return PagedKVCache.from_vllm({"l": torch.zeros(8, 4, 2, 8, dtype=torch.float16)}, 8, 4, lambda *_: CacheAxes(block=0))


def opts(role: str, rank: int = 1) -> TransportOptions:
    return TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, role=role, local_rank=rank)


@pytest.fixture
def with_fake(monkeypatch):
    fake.FABRIC.reset()
    monkeypatch.setitem(sys.modules, "llm_datadist", fake)
    yield fake.FABRIC
    fake.FABRIC.reset()


def test_auto_prefers_llmdatadist_on_npu_only(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "llm_datadist" else real(n, *a))
    assert resolve_transport("auto", "npu") == "llmdatadist"
    assert resolve_transport("auto", "cpu") == "tcp"
    assert resolve_transport("tcp", "npu") == "tcp"


def test_rank_gets_its_device_ip_and_port(with_fake):
    cfg = parse_extra_config({"transport": "llmdatadist", "prefill_device_ips": IPS, "llmdatadist_comm_port": 27000})
    name, t = open_transport(cfg, "llmdatadist", cache(), opts("producer"), kv_port=20000, tp_size=2)
    try:
        assert name == "llmdatadist"
        assert (t.device_ip, t.options.comm_port) == ("10.30.0.2", 27001)
        init = [c for c in with_fake.calls if c[0] == "init"][0]
        assert init[3]["llm.listenIpInfo"] == "10.30.0.2:27001"
    finally:
        t.close()


def test_explicit_llmdatadist_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_datadist", None)
    cfg = parse_extra_config({"transport": "llmdatadist", "decode_device_ips": IPS})
    with pytest.raises(ConfigError, match="set_env.sh"):
        open_transport(cfg, "llmdatadist", cache(), opts("consumer"), kv_port=20000, tp_size=2)
    cfg = parse_extra_config({"transport": "llmdatadist", "decode_device_ips": IPS, "llmdatadist_comm_port": 20001})
    with pytest.raises(ConfigError, match="overlap"):
        open_transport(cfg, "llmdatadist", cache(), opts("consumer"), kv_port=20000, tp_size=2)


def test_auto_falls_back_to_tcp_and_says_why(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "llm_datadist", None)
    cfg = parse_extra_config({"decode_device_ips": IPS})
    with caplog.at_level(logging.WARNING):
        name, t = open_transport(cfg, "llmdatadist", cache(), opts("consumer"), kv_port=20000, tp_size=2)
    assert name == "tcp" and t.name == "tcp"
    assert "transport auto chose llmdatadist" in caplog.text and "set_env.sh" in caplog.text


def test_a_listen_port_clash_at_init_is_a_config_error_and_auto_falls_back(with_fake, caplog):
    """LLMDataDist.init reports a failure as LLMException (a RuntimeError, not
    a ValueError): it must become a ConfigError naming the port, so `auto`
    falls back to tcp as docs/ascend.md promises and an explicit choice says
    what to change."""
    squatter = fake.LLMDataDist(fake.LLMRole.PROMPT, 1)
    squatter.init({"llm.EnableCacheManager": "1", "llm.listenIpInfo": "10.30.0.2:27001"})
    cfg = parse_extra_config({"transport": "llmdatadist", "prefill_device_ips": IPS, "llmdatadist_comm_port": 27000})
    with pytest.raises(ConfigError, match="llmdatadist_comm_port"):
        open_transport(cfg, "llmdatadist", cache(), opts("producer"), kv_port=20000, tp_size=2)
    cfg = parse_extra_config({"prefill_device_ips": IPS, "llmdatadist_comm_port": 27000})
    with caplog.at_level(logging.WARNING):
        name, t = open_transport(cfg, "llmdatadist", cache(), opts("producer"), kv_port=20000, tp_size=2)
    try:
        assert name == "tcp" and "transport auto chose llmdatadist" in caplog.text
    finally:
        t.close()
        squatter.finalize()
