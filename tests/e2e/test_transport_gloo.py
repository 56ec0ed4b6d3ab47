"""1P1D on real vLLM (CPU) with the process-group transport over gloo:
token-exact against the session's single instance S, the KV really loaded
through a gloo group, and every producer block freed. Starts its own P and D
(the session cluster's pair uses tcp)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import BLOCK, completion
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.testing.servers import BASE_ARGS, VllmServer, free_kv_port, free_port, kv_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gloo_pd(cluster, tiny_model):
    kv_p = free_kv_port(span=GROUP_PORT_OFFSET + 1)  # control and group ports of rank 0
    kv_d = free_kv_port(avoid=set(range(kv_p, kv_p + GROUP_PORT_OFFSET + 1)))
    p_port = free_port()
    d_port = free_port({p_port})
    P = VllmServer("Pg", tiny_model, p_port,
                   [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_producer", kv_p, transport="gloo")],
                   log_path=cluster.logs / "Pg.log")
    D = VllmServer("Dg", tiny_model, d_port,
                   [*BASE_ARGS, "--kv-transfer-config",
                    kv_config("kv_consumer", kv_d, failure_policy="recompute", transport="gloo")],
                   log_path=cluster.logs / "Dg.log")
    try:
        for s in (P, D):
            s.start()
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda s: s.wait_ready(600), (P, D)))
        yield P, D
    finally:
        for s in (P, D):
            s.stop()


def unique_prompt(tokenizer, n_tokens: int, k: int) -> list[int]:
    """prompt_of has ten sequences; a first token of its own per prompt keeps
    D's prefix cache from serving part of a prompt, so loaded counts are exact."""
    return [20 + k] + prompt_of(tokenizer, n_tokens - 1, seed=k)


def loaded_tokens(D) -> float:
    return metric(D.url, "vllm:ascend_pd_loaded_tokens_total")


def pd_completion(P, D, prompt: list[int], max_tokens: int = 12) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    pre = post(P.url, "/v1/completions", {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    out = post(D.url, "/v1/completions", {**body, "kv_transfer_params": pre["kv_transfer_params"]})
    return out["choices"][0]["token_ids"]


def producer_idle(P) -> bool:
    return (
        metric(P.url, "vllm:kv_cache_usage_perc") == 0.0
        and metric(P.url, "vllm:num_requests_running") == 0
        and metric(P.url, "vllm:ascend_pd_leases_pending") == 0
    )


def failures(D, cause: str) -> float:
    try:
        return metric(D.url, "vllm:ascend_pd_failed_transfers_total", cause=cause)
    except KeyError:
        return 0.0


@pytest.mark.parametrize("n_tokens", [BLOCK - 7, 3 * BLOCK + 1, 1100])
def test_gloo_transfer_is_token_exact(gloo_pd, cluster, tokenizer, n_tokens):
    P, D = gloo_pd
    prompt = unique_prompt(tokenizer, n_tokens, k=n_tokens % 97)
    loaded_before = loaded_tokens(D)
    local_before = metric(D.url, "vllm:prompt_tokens_by_source_total", source="local_compute")

    expected = completion(cluster.S.url, prompt)
    assert pd_completion(P, D, prompt) == expected

    wait_for(lambda: loaded_tokens(D) - loaded_before >= n_tokens)
    assert loaded_tokens(D) - loaded_before == n_tokens
    assert metric(D.url, "vllm:prompt_tokens_by_source_total", source="local_compute") == local_before
    wait_for(lambda: producer_idle(P))
    # Both sides really ran the gloo transport.
    for s in (P, D):
        assert "transport gloo" in s.log_path.read_text(errors="replace")


def test_concurrent_gloo_transfers_are_token_exact(gloo_pd, cluster, tokenizer):
    P, D = gloo_pd
    prompts = [unique_prompt(tokenizer, 40 + 23 * i, k=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        expected = list(ex.map(lambda p: completion(cluster.S.url, p, 6), prompts))
    loaded_before = loaded_tokens(D)
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: pd_completion(P, D, p, 6), prompts))
    assert got == expected
    total = sum(len(p) for p in prompts)
    wait_for(lambda: loaded_tokens(D) - loaded_before >= total)
    assert loaded_tokens(D) - loaded_before == total
    wait_for(lambda: producer_idle(P))


def test_transport_mismatch_is_refused_and_recomputed(gloo_pd, cluster, tokenizer):
    """The session's P moves KV over tcp; the gloo consumer refuses it at the
    handshake (instead of waiting for data that never comes) and recomputes."""
    _, D = gloo_pd
    prompt = unique_prompt(tokenizer, 50, k=150)
    before = failures(D, "incompatible")
    assert pd_completion(cluster.P, D, prompt, 8) == completion(cluster.S.url, prompt, 8)
    assert failures(D, "incompatible") == before + 1
    # D released the lease on the tcp producer instead of leaving it to expire.
    wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0)
