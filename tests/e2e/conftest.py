"""Session-scoped real vLLM servers on the CPU: a producer (P), a consumer
(D), a single reference instance (S) and the proxy. Started in parallel once,
shared by every end-to-end test, always torn down."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import log_dir, serve
from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, PortPicker, ProxyServer, VllmServer, kv_config, start_all, stop_all,
)
from vllm_ascend_pd.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e

# Short enough for the lease-expiry test, long enough for 32 concurrent pulls.
LEASE_S = 15.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_model_24(tmp_path_factory) -> str:
    """24 layers (same tokenizer): with small chunks a transfer lasts seconds,
    long enough for fault tests to interrupt it."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama-24"), num_layers=24))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


class Cluster:
    def __init__(self, model: str, logs: Path):
        ports = PortPicker()
        kv = self.kv_port = ports.kv(span=8)
        port = ports.http
        self.proxy_port = port()
        # A second proxy learns P and D only from their registration heartbeats.
        self.dyn_proxy_port = port()
        self.register_port = port()
        p_port, d_port = port(), port()
        announce = {"proxy_ip": "127.0.0.1", "proxy_port": self.register_port, "heartbeat_s": 0.5}
        self.P = VllmServer(
            "P", model, p_port,
            [*BASE_ARGS, "--kv-transfer-config",
             kv_config("kv_producer", kv, http_port=p_port, lease_s=LEASE_S, **announce)],
            log_path=logs / "P.log",
        )
        self.D = VllmServer(
            "D", model, d_port,
            [*BASE_ARGS, "--kv-transfer-config",
             kv_config("kv_consumer", kv + 2, failure_policy="recompute", http_port=d_port, **announce)],
            log_path=logs / "D.log",
        )
        self.S = VllmServer("S", model, port(), list(BASE_ARGS), log_path=logs / "S.log")
        # A second pair for 2P2D through the proxy.
        self.P2 = VllmServer("P2", model, port(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_producer", kv + 4)],
                             log_path=logs / "P2.log")
        self.D2 = VllmServer("D2", model, port(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_consumer", kv + 6)],
                             log_path=logs / "D2.log")
        self.xpyd_proxy_port = port()
        self.proxies: list[ProxyServer] = []
        self.logs = logs

    @property
    def servers(self):
        return (self.P, self.D, self.S, self.P2, self.D2)

    def start(self) -> None:
        self.start_registration_proxy()
        start_all(self.servers, 600)
        self._start_proxy("proxy", self.proxy_port, "--prefill", f"127.0.0.1:{self.P.port}",
                          "--decode", f"127.0.0.1:{self.D.port}")
        self._start_proxy("xpyd-proxy", self.xpyd_proxy_port,
                          "--prefill", f"127.0.0.1:{self.P.port}", f"127.0.0.1:{self.P2.port}",
                          "--decode", f"127.0.0.1:{self.D.port}", f"127.0.0.1:{self.D2.port}")

    def start_registration_proxy(self) -> None:
        """Started before the servers so their first heartbeats are heard."""
        self._start_proxy("dyn-proxy", self.dyn_proxy_port, "--register-port", str(self.register_port),
                          "--heartbeat-ttl", "3")

    def _start_proxy(self, name: str, port: int, *args: str) -> None:
        proxy = ProxyServer(port, self.logs / f"{name}.log", *args)
        self.proxies.append(proxy)  # stopped by stop(), also if it never answers
        proxy.start()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def xpyd_proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.xpyd_proxy_port}"

    @property
    def dyn_proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.dyn_proxy_port}"

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        stop_all(self.servers)


@pytest.fixture(scope="session")
def cluster(tiny_model, tmp_path_factory):
    yield from serve(Cluster(tiny_model, log_dir(tmp_path_factory, "e2e-logs")))
