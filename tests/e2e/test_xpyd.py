"""2P2D through the proxy on real vLLM: token-exact, every instance used,
every producer block freed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.helpers import metric, prompt_of, wait_for
from tests.e2e.test_pd_e2e import completion

pytestmark = pytest.mark.e2e


def _transfers(server, direction: str) -> float:
    try:
        return metric(server.url, "vllm:ascend_pd_transfers_total", direction=direction)
    except KeyError:
        return 0.0


def test_2p2d_token_exact_and_balanced(cluster, tokenizer):
    prompts = [prompt_of(tokenizer, 60 + 13 * i, seed=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        expected = list(ex.map(lambda p: completion(cluster.S.url, p, 8), prompts))
    producers, consumers = (cluster.P, cluster.P2), (cluster.D, cluster.D2)
    sends = [_transfers(p, "send") for p in producers]
    recvs = [_transfers(d, "recv") for d in consumers]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: completion(cluster.xpyd_proxy_url, p, 8), prompts))
    assert got == expected
    def counts():
        sent = [_transfers(p, "send") - b for p, b in zip(producers, sends)]
        received = [_transfers(d, "recv") - b for d, b in zip(consumers, recvs)]
        return sent, received

    # Producers report sends when their engines next collect connector stats.
    try:
        wait_for(lambda: sum(counts()[0]) == sum(counts()[1]) == 8, timeout=15)
    except AssertionError:
        pass
    sent, received = counts()
    assert sum(sent) == sum(received) == 8
    assert min(sent) >= 1 and min(received) >= 1, (sent, received)
    for p in producers:
        wait_for(lambda p=p: metric(p.url, "vllm:kv_cache_usage_perc") == 0.0)
        assert metric(p.url, "vllm:ascend_pd_leases_pending") == 0
