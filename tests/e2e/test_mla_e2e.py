"""MLA (DeepSeek-V2-style latent cache) through P -> transfer -> D on real
vLLM (CPU_MLA backend): token-exact against a single instance of the same
model, the whole prompt loaded from P, every producer block freed.

Own servers (the session cluster serves the Llama model): P, D and a single
reference S, started in parallel once for this module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import log_dir, metric, post, prompt_of, serve, wait_for
from vllm_ascend_pd.testing.servers import BASE_ARGS, PortPicker, VllmServer, kv_config, start_all, stop_all
from vllm_ascend_pd.testing.tiny_model import MLA_BLOCK_SIZE, build_tiny_mla_model

pytestmark = pytest.mark.e2e

BLOCK = MLA_BLOCK_SIZE  # vLLM's CPU MLA kernel only takes 16-token blocks


def _args(*extra: str) -> list[str]:
    args = list(BASE_ARGS)
    i = args.index("--block-size")
    args[i + 1] = str(BLOCK)
    i = args.index("--max-model-len")
    args[i + 1] = "1024"  # MLA on CPU disables chunked prefill: keep the batch small
    return [*args, *extra]


class MlaCluster:
    def __init__(self, model: str, logs: Path):
        ports = PortPicker()
        kv = ports.kv(span=4)
        port = ports.http
        self.P = VllmServer("mla-P", model, port(),
                            _args("--kv-transfer-config", kv_config("kv_producer", kv, lease_s=30)),
                            log_path=logs / "mla-P.log")
        self.D = VllmServer("mla-D", model, port(),
                            _args("--kv-transfer-config",
                                  kv_config("kv_consumer", kv + 2, failure_policy="recompute")),
                            log_path=logs / "mla-D.log")
        self.S = VllmServer("mla-S", model, port(), _args(), log_path=logs / "mla-S.log")

    @property
    def servers(self):
        return (self.P, self.D, self.S)

    def start(self) -> None:
        start_all(self.servers, 600)

    def stop(self) -> None:
        stop_all(self.servers)


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory) -> str:
    return str(build_tiny_mla_model(tmp_path_factory.mktemp("tiny-mla")))


@pytest.fixture(scope="module")
def mla_tokenizer(mla_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mla_model)


@pytest.fixture(scope="module")
def mla(mla_model, tmp_path_factory):
    yield from serve(MlaCluster(mla_model, log_dir(tmp_path_factory, "mla-logs")))


def _completion(url: str, prompt: list[int], max_tokens: int, params: dict | None = None) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if params is not None:
        body["kv_transfer_params"] = params
    return post(url, "/v1/completions", body)


def _producer_idle(c: MlaCluster) -> bool:
    return (
        metric(c.P.url, "vllm:kv_cache_usage_perc") == 0.0
        and metric(c.P.url, "vllm:num_requests_running") == 0
        and metric(c.P.url, "vllm:ascend_pd_leases_pending") == 0
    )


def test_servers_use_the_mla_cache(mla):
    # The connector logs the layout it registered; MLA must be on, one latent
    # tensor per layer, on the CPU MLA backend.
    for s in (mla.P, mla.D):
        log = s.log_path.read_text(errors="replace")
        assert "Using CPU_MLA backend" in log
        assert "MLA True" in log, s.tail()


@pytest.mark.parametrize("n_tokens", [BLOCK - 5, 3 * BLOCK, 3 * BLOCK + 1, 300])
def test_mla_pd_token_exact_and_kv_loaded(mla, mla_tokenizer, n_tokens):
    prompt = prompt_of(mla_tokenizer, n_tokens, seed=n_tokens)
    expected = _completion(mla.S.url, prompt, 12)["choices"][0]["token_ids"]

    loaded_before = metric(mla.D.url, "vllm:ascend_pd_loaded_tokens_total")
    local_before = metric(mla.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    pre = _completion(mla.P.url, prompt, 1, {"do_remote_decode": True})
    params = pre["kv_transfer_params"]
    assert params["block_size"] == BLOCK and len(params["remote_block_ids"]) == -(-n_tokens // BLOCK)
    got = _completion(mla.D.url, prompt, 12, params)["choices"][0]["token_ids"]

    assert got == expected
    loaded = wait_for(lambda: metric(mla.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded_before)
    assert loaded == n_tokens
    assert metric(mla.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute") == local_before
    wait_for(lambda: _producer_idle(mla))
