"""1P1D through the proxy on real vLLM (CPU): token-exact against a single
instance, the KV really transferred, and every producer block freed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for

pytestmark = pytest.mark.e2e

BLOCK = 32  # BASE_ARGS --block-size


def completion(url: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    out = post(url, "/v1/completions", body)
    return out["choices"][0]["token_ids"]


def producer_idle(cluster) -> bool:
    return (
        metric(cluster.P.url, "vllm:kv_cache_usage_perc") == 0.0
        and metric(cluster.P.url, "vllm:num_requests_running") == 0
    )


@pytest.mark.parametrize("n_tokens", [BLOCK - 7, 3 * BLOCK, 3 * BLOCK + 1, 1100])
def test_token_exact_and_kv_loaded(cluster, tokenizer, n_tokens):
    prompt = prompt_of(tokenizer, n_tokens, seed=n_tokens)
    loaded_before = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    local_before = metric(cluster.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute")

    expected = completion(cluster.S.url, prompt)
    got = completion(cluster.proxy_url, prompt)

    assert got == expected
    # D loaded the whole prompt from P and computed none of it itself.
    loaded = wait_for(lambda: metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded_before)
    assert loaded == n_tokens
    local = metric(cluster.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute") - local_before
    assert local == 0
    # The producer freed every block of the transfer.
    wait_for(lambda: producer_idle(cluster))
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0


def test_chat_completion_token_exact(cluster):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "alpha beta gamma " * 20}],
            "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    expected = post(cluster.S.url, "/v1/chat/completions", body)
    got = post(cluster.proxy_url, "/v1/chat/completions", body)
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert got["choices"][0].get("token_ids") == expected["choices"][0].get("token_ids")


def test_32_concurrent_requests_token_exact(cluster, tokenizer):
    prompts = [prompt_of(tokenizer, 40 + 9 * i, seed=i) for i in range(32)]
    with ThreadPoolExecutor(32) as ex:
        expected = list(ex.map(lambda p: completion(cluster.S.url, p, 8), prompts))
    pulls_before = metric(cluster.D.url, "vllm:ascend_pd_transfers_total", direction="recv")
    with ThreadPoolExecutor(32) as ex:
        got = list(ex.map(lambda p: completion(cluster.proxy_url, p, 8), prompts))
    assert got == expected
    assert metric(cluster.D.url, "vllm:ascend_pd_transfers_total", direction="recv") - pulls_before == 32
    wait_for(lambda: producer_idle(cluster))


def test_decode_without_params_prefills_locally(cluster, tokenizer):
    prompt = prompt_of(tokenizer, 50, seed=99)
    loaded_before = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    local_before = metric(cluster.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert completion(cluster.D.url, prompt) == completion(cluster.S.url, prompt)
    # Computed on D (beyond any local prefix-cache hit), nothing pulled.
    assert metric(cluster.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute") > local_before
    assert metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") == loaded_before


def test_malformed_params_fall_back_to_local_prefill(cluster, tokenizer):
    prompt = prompt_of(tokenizer, 60, seed=5)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
            "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": "x"}}
    out = post(cluster.D.url, "/v1/completions", body)
    assert out["choices"][0]["token_ids"] == completion(cluster.S.url, prompt, 8)
