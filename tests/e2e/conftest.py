"""Session-scoped real vLLM servers on the CPU: a producer (P), a consumer
(D), a single reference instance (S) and the proxy. Started in parallel once,
shared by every end-to-end test, always torn down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_ascend_pd.testing.servers import BASE_ARGS, VllmServer, free_kv_port, free_port, kv_config
from vllm_ascend_pd.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


class Cluster:
    def __init__(self, model: str, logs: Path):
        used: set[int] = set()
        kv = free_kv_port()
        used.update(range(kv, kv + 4))
        self.kv_port = kv

        def port() -> int:
            p = free_port(used)
            used.add(p)
            return p

        self.P = VllmServer("P", model, port(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_producer", kv)], log_path=logs / "P.log")
        self.D = VllmServer("D", model, port(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_consumer", kv + 2)], log_path=logs / "D.log")
        self.S = VllmServer("S", model, port(), list(BASE_ARGS), log_path=logs / "S.log")
        self.proxy_port = port()
        self.proxy: subprocess.Popen | None = None
        self.logs = logs

    @property
    def servers(self):
        return (self.P, self.D, self.S)

    def start(self) -> None:
        for s in self.servers:
            s.start()
        with ThreadPoolExecutor(3) as ex:
            list(ex.map(lambda s: s.wait_ready(600), self.servers))
        env = dict(os.environ, VLLM_ASCEND_PD_PLAIN_LOGGING="1")
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "vllm_ascend_pd.proxy", "--host", "127.0.0.1",
             "--port", str(self.proxy_port), "--prefill", f"127.0.0.1:{self.P.port}",
             "--decode", f"127.0.0.1:{self.D.port}", "--model", "tiny"],
            stdout=open(self.logs / "proxy.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.proxy_url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("proxy did not start; see proxy.log")

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            os.killpg(self.proxy.pid, 15)
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proxy.pid, 9)
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="session")
def cluster(tiny_model, tmp_path_factory):
    logs = Path(os.environ.get("E2E_LOG_DIR") or tmp_path_factory.mktemp("e2e-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    c = Cluster(tiny_model, logs)
    try:
        c.start()
        yield c
    finally:
        c.stop()
