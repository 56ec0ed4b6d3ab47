"""Two kv_both instances on real vLLM (CPU) that swap roles per request: A
prefills and B decodes, then B prefills and A decodes; directly and through
the proxy (``--both``). Token-exact against the single instance S, the KV
really pulled, and every block freed on both sides."""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.helpers import metric, post, wait_for
from tests.e2e.test_pd_e2e import completion
from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, ProxyServer, VllmServer, free_kv_port, free_port, kv_config,
)

pytestmark = pytest.mark.e2e

BLOCK = 32  # BASE_ARGS --block-size


def distinct_prompt(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """Random ordinary token ids. helpers.prompt_of has only ten distinct
    word sequences, so its prompts share prefixes; two of these never share
    a cached block, so an instance that served earlier prompts still has to
    load or compute every token."""
    rnd = random.Random(seed)
    first = max(tokenizer.all_special_ids) + 1
    return [rnd.randrange(first, tokenizer.vocab_size) for _ in range(n_tokens)]


def start_pair(request, servers: list[VllmServer]):
    """Start ``servers`` while the session cluster (for S) comes up, then wait
    for all of them; the caller stops the servers."""
    for s in servers:
        s.start()
    cluster = request.getfixturevalue("cluster")
    with ThreadPoolExecutor(len(servers)) as ex:
        list(ex.map(lambda s: s.wait_ready(600), servers))
    return cluster


class Pair:
    def __init__(self, A: VllmServer, B: VllmServer, proxy_url: str, S: VllmServer):
        self.A, self.B, self.proxy_url, self.S = A, B, proxy_url, S


@pytest.fixture(scope="module")
def pair(request, tiny_model, tmp_path_factory):
    logs = Path(os.environ.get("E2E_LOG_DIR") or tmp_path_factory.mktemp("kv-both-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    kv_a = free_kv_port(span=2)
    kv_b = free_kv_port(set(range(kv_a, kv_a + 2)), span=2)
    a_port = free_port()
    b_port = free_port({a_port})
    A = VllmServer("A", tiny_model, a_port,
                   [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_both", kv_a)],
                   log_path=logs / "A-both.log")
    B = VllmServer("B", tiny_model, b_port,
                   [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_both", kv_b)],
                   log_path=logs / "B-both.log")
    proxy = None
    try:
        cluster = start_pair(request, [A, B])
        proxy = ProxyServer(free_port({a_port, b_port}), logs / "both-proxy.log",
                            "--both", f"127.0.0.1:{A.port}", f"127.0.0.1:{B.port}")
        proxy.start()
        yield Pair(A, B, proxy.url, cluster.S)
    finally:
        if proxy is not None:
            proxy.stop()
        A.stop()
        B.stop()


def _counter(url: str, name: str, **labels: str) -> float:
    try:
        return metric(url, name, **labels)
    except KeyError:  # not exported before its first increment
        return 0.0


def idle(server: VllmServer) -> bool:
    return (
        metric(server.url, "vllm:kv_cache_usage_perc") == 0.0
        and metric(server.url, "vllm:num_requests_running") == 0
        and _counter(server.url, "vllm:ascend_pd_leases_pending") == 0
    )


def pd_direct(producer: VllmServer, consumer: VllmServer, prompt: list[int], max_tokens: int = 12) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    params = post(producer.url, "/v1/completions", body)["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    assert params["remote_port"] == producer_kv_port(producer)
    body.update(max_tokens=max_tokens, kv_transfer_params=params, return_token_ids=True)
    return post(consumer.url, "/v1/completions", body)["choices"][0]["token_ids"]


def producer_kv_port(server: VllmServer) -> int:
    i = server.args.index("--kv-transfer-config")
    return json.loads(server.args[i + 1])["kv_port"]


@pytest.mark.parametrize("n_tokens", [3 * BLOCK + 5, 700])
def test_roles_swap_directly(pair, tokenizer, n_tokens):
    for k, (prod, cons) in enumerate(((pair.A, pair.B), (pair.B, pair.A))):
        prompt = distinct_prompt(tokenizer, n_tokens, seed=1000 + 10 * n_tokens + k)
        expected = completion(pair.S.url, prompt)
        loaded = _counter(cons.url, "vllm:ascend_pd_loaded_tokens_total")
        local = _counter(cons.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
        sent = _counter(prod.url, "vllm:ascend_pd_transfers_total", direction="send")

        assert pd_direct(prod, cons, prompt) == expected, f"{prod.name} -> {cons.name}"

        # The consumer pulled the whole prompt and computed none of it.
        assert wait_for(lambda: _counter(cons.url, "vllm:ascend_pd_loaded_tokens_total") - loaded) == n_tokens
        assert _counter(cons.url, "vllm:prompt_tokens_by_source_total", source="local_compute") == local
        # P reports its send when its engine next collects connector stats.
        assert wait_for(lambda: _counter(prod.url, "vllm:ascend_pd_transfers_total", direction="send") - sent) == 1
        # Both sides back to baseline: no lease pending, no block held.
        wait_for(lambda: idle(prod) and idle(cons))


def test_roles_alternate_through_proxy(pair, tokenizer):
    prompts = [distinct_prompt(tokenizer, 80 + 31 * i, seed=2000 + i) for i in range(4)]
    expected = [completion(pair.S.url, p) for p in prompts]
    servers = (pair.A, pair.B)
    sends = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="send") for s in servers]
    recvs = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="recv") for s in servers]
    loaded = [_counter(s.url, "vllm:ascend_pd_loaded_tokens_total") for s in servers]

    got = [completion(pair.proxy_url, p) for p in prompts]
    assert got == expected

    # Round robin picks A and B in turn for prefill, the other one decodes:
    # each instance produced twice and consumed twice.
    def counts():
        sent = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="send") - b for s, b in zip(servers, sends)]
        recv = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="recv") - b for s, b in zip(servers, recvs)]
        return sent, recv

    # A producer reports its sends when its engine next collects connector stats.
    try:
        wait_for(lambda: counts() == ([2, 2], [2, 2]), timeout=15)
    except AssertionError:
        pass
    sent, recv = counts()
    assert sent == [2, 2] and recv == [2, 2], (sent, recv)
    total = sum(_counter(s.url, "vllm:ascend_pd_loaded_tokens_total") - b for s, b in zip(servers, loaded))
    assert total == sum(len(p) for p in prompts)
    for s in servers:
        wait_for(lambda s=s: idle(s))


def test_concurrent_mixed_roles_through_proxy(pair, tokenizer):
    """Each instance sends and receives at the same time."""
    prompts = [distinct_prompt(tokenizer, 50 + 17 * i, seed=3000 + i) for i in range(12)]
    with ThreadPoolExecutor(6) as ex:
        expected = list(ex.map(lambda p: completion(pair.S.url, p, 8), prompts))
    servers = (pair.A, pair.B)
    recvs = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="recv") for s in servers]
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda p: completion(pair.proxy_url, p, 8), prompts))
    assert got == expected
    recv = [_counter(s.url, "vllm:ascend_pd_transfers_total", direction="recv") - b for s, b in zip(servers, recvs)]
    assert sum(recv) == 12 and min(recv) >= 1, recv
    for s in servers:
        wait_for(lambda s=s: idle(s))


def test_one_instance_serves_both_legs(pair, tokenizer):
    """The proxy's fallback when no other decode instance is left: A pulls
    from itself. Its prefix cache already holds the full blocks, so only the
    partial last block is pulled (server and puller pumped by one thread)."""
    n_tokens = 3 * BLOCK + 5
    prompt = distinct_prompt(tokenizer, n_tokens, seed=5000)
    expected = completion(pair.S.url, prompt)
    A = pair.A
    loaded = _counter(A.url, "vllm:ascend_pd_loaded_tokens_total")
    local = _counter(A.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    pulls = _counter(A.url, "vllm:ascend_pd_transfers_total", direction="recv")
    assert pd_direct(A, A, prompt) == expected
    assert wait_for(lambda: _counter(A.url, "vllm:ascend_pd_transfers_total", direction="recv") - pulls) == 1
    assert _counter(A.url, "vllm:ascend_pd_loaded_tokens_total") - loaded == n_tokens - 3 * BLOCK
    # The prefill leg computed the prompt once; the decode leg computed none of it.
    assert _counter(A.url, "vllm:prompt_tokens_by_source_total", source="local_compute") - local == n_tokens
    wait_for(lambda: idle(A))
