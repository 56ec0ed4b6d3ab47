"""Flags and validation."""

from __future__ import annotations

import pytest

from vllm_ascend_pd.proxy.config import (
    ConfigError,
    ProxyConfig,
    build_parser,
    config_from_args,
    parse_address,
)


def test_flags_of_other_proxies():
    cfg = config_from_args([
        "--prefill", "127.0.0.1:8100", "127.0.0.1:8101", "--prefill", "127.0.0.1:8102",
        "--decode", "h1:8200,h2:8201", "--http-port", "9000", "--host", "0.0.0.0",
        "--model", "qwen", "--register-port", "30001", "--policy", "least_tokens",
    ]).validate()
    assert cfg.prefill == ["127.0.0.1:8100", "127.0.0.1:8101", "127.0.0.1:8102"]
    assert cfg.decode == ["h1:8200", "h2:8201"]
    assert (cfg.port, cfg.host, cfg.model, cfg.register_port, cfg.policy) == (
        9000, "0.0.0.0", "qwen", 30001, "least_tokens")
    assert config_from_args(["--port", "1234", "--prefill", "a:1", "--decode", "b:2"]
                            ).port == 1234


def test_defaults_bind_loopback():
    cfg = config_from_args(["--register-port", "5000"]).validate()
    assert cfg.host == "127.0.0.1" and cfg.register_host == "127.0.0.1"


def test_validation_says_what_to_set():
    with pytest.raises(ConfigError) as e:
        ProxyConfig().validate()
    assert "--prefill" in str(e.value) and "--register-port" in str(e.value)
    with pytest.raises(ConfigError, match="--event-gap-timeout"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], event_gap_timeout=0).validate()
    with pytest.raises(ConfigError, match="--admin-token"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], admin_token="short").validate()
    with pytest.raises(ConfigError, match="port must be"):
        ProxyConfig(prefill=["a:0"], decode=["b:2"]).validate()
    with pytest.raises(ConfigError, match=r"--affinity-load-factor must be > 1\.0"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], policy="prefix_affinity",
                    affinity_load_factor=1.0).validate()
    with pytest.raises(ConfigError, match="--affinity-prefix-bytes must be >= 16"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], affinity_prefix_bytes=8).validate()


def test_prefix_affinity_flags():
    cfg = config_from_args(["--prefill", "a:1", "--decode", "b:2", "--policy",
                            "prefix_affinity", "--affinity-prefix-bytes", "2048",
                            "--affinity-load-factor", "1.5"]).validate()
    assert (cfg.policy, cfg.affinity_prefix_bytes, cfg.affinity_load_factor) == \
        ("prefix_affinity", 2048, 1.5)


def test_duplicate_addresses_are_merged():
    cfg = ProxyConfig(prefill=["a:1", "http://a:1/", "a:1"], decode=["b:2"]).validate()
    assert cfg.prefill == ["a:1"]


@pytest.mark.parametrize("text,expected", [
    ("h:1", ("h", 1)), ("http://h:80", ("h", 80)), ("[::1]:8000", ("::1", 8000)),
    ("tcp://10.0.0.1:5", ("10.0.0.1", 5))])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["h", ":1", "h:x", "h:70000", "::1:80", "h:1/path", "",
                                  "a\\b:80", "u@127.0.0.1:80", "a?b:80", "a b:80", "-:80", "..:1",
                                  "\u00e9:80"])
def test_parse_address_rejects(text):
    with pytest.raises(ConfigError):
        parse_address(text)


def test_main_rejects_bad_config(capsys):
    from vllm_ascend_pd.proxy.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--prefill", "a:1"])
    assert e.value.code == 2
    assert "--decode" in capsys.readouterr().err


def test_admin_token_from_environment(monkeypatch):
    monkeypatch.setenv("P2P_PROXY_ADMIN_TOKEN", "from-the-env")
    assert config_from_args(["--prefill", "a:1", "--decode", "b:2"]).admin_token == \
        "from-the-env"
    assert config_from_args(["--prefill", "a:1", "--decode", "b:2", "--admin-token",
                             "from-the-flag"]).admin_token == "from-the-flag"


def test_kv_secret_env_must_be_set(monkeypatch):
    monkeypatch.delenv("TEST_PD_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"--kv-secret-env names \$TEST_PD_SECRET"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], kv_secret_env="TEST_PD_SECRET").validate()
    monkeypatch.setenv("TEST_PD_SECRET", "x" * 16)
    assert config_from_args(["--prefill", "a:1", "--decode", "b:2", "--kv-secret-env",
                             "TEST_PD_SECRET"]).validate().kv_secret_env == "TEST_PD_SECRET"


async def test_backend_keepalive_stays_below_vllms():
    """vLLM closes idle connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
    a pool that kept them longer could send a request on a closing one
    (seen in CI: one 502, "Connection reset by peer")."""
    from vllm_ascend_pd.proxy.clients import BackendClients

    cfg = config_from_args(["--prefill", "a:1", "--decode", "b:2"]).validate()
    assert 0 < cfg.backend_keepalive < 5
    cfg = config_from_args(["--prefill", "a:1", "--decode", "b:2",
                            "--backend-keepalive", "2.5"]).validate()
    clients = BackendClients(cfg)
    try:
        assert clients.session("127.0.0.1:9").connector._keepalive_timeout == 2.5
    finally:
        await clients.close()
    with pytest.raises(ConfigError, match="--backend-keepalive must be > 0"):
        ProxyConfig(prefill=["a:1"], decode=["b:2"], backend_keepalive=0).validate()


def test_help_never_prints_the_admin_token_and_shows_every_default(monkeypatch, capsys):
    monkeypatch.setenv("P2P_PROXY_ADMIN_TOKEN", "token-from-the-env")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "token-from-the-env" not in text
    assert "(default: True)" not in text  # --no-uvloop
    assert "3x their announced interval) (default" not in text
    for shown in ("--connect-timeout CONNECT_TIMEOUT seconds to open a connection to an "
                  "instance (default: 10.0)",
                  "--release-timeout RELEASE_TIMEOUT seconds to wait",
                  "(default: round_robin)", "--health-timeout HEALTH_TIMEOUT seconds a GET "
                  "/health probe may take (default: 2.0)"):
        assert shown in text
