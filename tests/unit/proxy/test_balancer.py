"""Policies: fairness on ties, least-outstanding choices, token estimates."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vllm_ascend_pd.proxy.balancer import (LeastRequests, LeastTokens, RoundRobin,
                                           estimate_prompt_tokens, make_policy)
from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.registry import Instance, Source


def _insts(n):
    return [Instance(role="decode", address=f"10.0.0.{i}:8000", source=Source.STATIC)
            for i in range(n)]


@pytest.mark.parametrize("policy", ["round_robin", "least_requests", "least_tokens"])
def test_ties_do_not_bias_any_node(policy):
    insts = _insts(4)
    pol = make_policy(policy, random.Random(1))
    counts = Counter(pol.pick(insts).address for _ in range(4000))
    assert set(counts) == {i.address for i in insts}
    assert max(counts.values()) - min(counts.values()) < 250, counts


def test_first_pick_is_not_always_node_zero():
    firsts = Counter()
    for seed in range(200):
        for cls in (RoundRobin, LeastRequests, LeastTokens):
            firsts[cls(random.Random(seed)).pick(_insts(3)).address] += 1
    assert len(firsts) == 3 and min(firsts.values()) > 120, firsts


def test_round_robin_is_strict_rotation():
    insts = _insts(3)
    pol = RoundRobin(random.Random(0))
    picks = [pol.pick(list(reversed(insts))).address for _ in range(9)]
    assert sorted(Counter(picks).values()) == [3, 3, 3]
    assert picks[:3] == picks[3:6] == picks[6:]


def test_least_requests_picks_lowest_load():
    insts = _insts(3)
    insts[0].inflight_requests, insts[1].inflight_requests, insts[2].inflight_requests = 5, 1, 3
    pol = LeastRequests(random.Random(0))
    assert {pol.pick(insts).address for _ in range(50)} == {insts[1].address}
    insts[2].inflight_requests = 1  # tie between 1 and 2
    assert {pol.pick(insts).address for _ in range(200)} == {insts[1].address,
                                                             insts[2].address}


def test_least_tokens_uses_tokens_not_requests():
    insts = _insts(2)
    insts[0].inflight_requests, insts[0].inflight_tokens = 1, 10
    insts[1].inflight_requests, insts[1].inflight_tokens = 0, 5000
    assert LeastTokens(random.Random(0)).pick(insts) is insts[0]
    assert LeastRequests(random.Random(0)).pick(insts) is insts[1]


def test_estimate_prompt_tokens():
    def est(obj):
        return estimate_prompt_tokens(RequestBody.from_dict(obj))
    assert est({"prompt": list(range(77))}) == 77  # token ids are counted exactly
    assert est({"prompt": [5]}) == 1
    assert 95 <= est({"prompt": "x" * 400}) <= 110  # ~4 bytes per token
    big, small = est({"prompt": "x" * 4000}), est({"prompt": "x" * 40})
    assert big > 10 * small
    chat = est({"messages": [{"role": "user", "content": "x" * 800}]})
    assert 200 <= chat <= 230
    assert est({}) == 1


def test_unknown_policy():
    with pytest.raises(ValueError, match="least_requests"):
        make_policy("fastest")


async def test_least_requests_spreads_concurrent_load(backend, proxy):
    """Through the proxy: concurrent requests spread by outstanding count."""
    import asyncio
    p = await backend("p")
    d1, d2 = await backend("d"), await backend("d")
    d1.header_delay = d2.header_delay = 0.3
    client = await proxy([p], [d1, d2], policy="least_requests")
    resps = await asyncio.gather(*(client.post("/v1/completions", json={"prompt": "x"})
                                   for _ in range(8)))
    assert [r.status for r in resps] == [200] * 8
    assert len(d1.requests) == len(d2.requests) == 4
