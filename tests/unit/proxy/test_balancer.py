"""Policies: fairness on ties, least-outstanding choices, token estimates."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vllm_ascend_pd.proxy.balancer import (POLICY_CLASSES, LeastRequests, LeastTokens,
                                           RoundRobin, estimate_prompt_tokens, make_policy)
from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.registry import Instance, Source


def _insts(n):
    return [Instance(role="decode", address=f"10.0.0.{i}:8000", source=Source.STATIC)
            for i in range(n)]


@pytest.mark.parametrize("policy", ["round_robin", "least_requests", "least_tokens",
                                    "prefix_affinity"])
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


@pytest.mark.parametrize("policy", list(POLICY_CLASSES))
def test_every_policy_takes_the_same_options(policy):
    assert make_policy(policy, random.Random(0), load_factor=2.0).load_factor == 2.0
    with pytest.raises(TypeError, match="load_facter"):
        make_policy(policy, random.Random(0), load_facter=2.0)


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


# ---------------------------------------------------------------- prefix affinity
def _key(text: str, nbytes: int = 512) -> bytes:
    from vllm_ascend_pd.proxy.balancer import affinity_key
    return affinity_key(RequestBody.from_dict({"prompt": text}), nbytes)


def test_affinity_same_prefix_same_instance_across_policy_objects():
    """Stateless: two workers (two policy objects, other seeds) agree."""
    insts = _insts(4)
    a, b = make_policy("prefix_affinity", random.Random(1)), \
        make_policy("prefix_affinity", random.Random(2))
    system = "You are a careful assistant. " * 30  # > 512 bytes shared
    picks = {a.pick(insts, _key(system + f"question {i}")).address for i in range(20)}
    picks |= {b.pick(list(reversed(insts)), _key(system + f"other {i}")).address
              for i in range(20)}
    assert len(picks) == 1, picks


def test_affinity_spreads_distinct_prefixes_evenly():
    insts = _insts(4)
    pol = make_policy("prefix_affinity", random.Random(0))
    counts = Counter(pol.pick(insts, _key(f"tenant {i}: " + "x" * 600)).address
                     for i in range(4000))
    assert set(counts) == {i.address for i in insts}
    assert max(counts.values()) < 1150 and min(counts.values()) > 850, counts


def test_affinity_only_the_prefix_counts():
    assert _key("a" * 100 + "tail one", 100) == _key("a" * 100 + "tail two", 100)
    assert _key("a" * 100 + "tail one", 200) != _key("a" * 100 + "tail two", 200)
    chat = RequestBody.from_dict({"messages": [{"role": "user", "content": "hi"}]})
    from vllm_ascend_pd.proxy.balancer import affinity_key
    assert affinity_key(chat, 512) and affinity_key(chat, 512) != _key("hi")
    assert affinity_key(RequestBody.from_dict({"model": "m"}), 512) == b""


def test_affinity_removing_an_instance_moves_only_its_keys():
    insts = _insts(5)
    pol = make_policy("prefix_affinity", random.Random(0))
    keys = [_key(f"doc {i}") for i in range(500)]
    before = {k: pol.pick(insts, k).address for k in keys}
    gone = insts[2].address
    after = {k: pol.pick([i for i in insts if i.address != gone], k).address for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == gone)


def test_affinity_spills_past_the_load_bound_and_returns():
    insts = _insts(2)
    spills = []
    pol = make_policy("prefix_affinity", random.Random(0), load_factor=1.25,
                      on_spill=lambda: spills.append(1))
    key = _key("hot prefix " * 60)
    home = pol.pick(insts, key)
    other = next(i for i in insts if i is not home)
    # 6 outstanding on home, 0 elsewhere: bound ceil(1.25 * 7 / 2) = 5 -> spill.
    home.inflight_requests = 6
    assert pol.pick(insts, key) is other
    assert len(spills) == 1
    # 4 on home, 2 elsewhere: bound ceil(1.25 * 7 / 2) = 5 -> home again.
    home.inflight_requests, other.inflight_requests = 4, 2
    assert pol.pick(insts, key) is home
    assert len(spills) == 1


def test_affinity_without_a_prompt_falls_back_to_least_requests():
    insts = _insts(3)
    insts[0].inflight_requests, insts[1].inflight_requests, insts[2].inflight_requests = 3, 0, 2
    pol = make_policy("prefix_affinity", random.Random(0))
    assert {pol.pick(insts, b"").address for _ in range(20)} == {insts[1].address}


async def test_affinity_spill_is_counted_and_goes_elsewhere(backend, proxy):
    """Three concurrent requests with one prefix: two fit under the bound on
    the prefix's own decode instance, the third spills, and the metric says so."""
    import asyncio

    from conftest import sse_events, state_of

    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    for d in (d1, d2):
        d.events = sse_events(4)
        d.event_delay = 0.2  # keep the streams in flight together
    client = await proxy([p], [d1, d2], policy="prefix_affinity")
    body = {"prompt": "shared system prompt " * 40, "stream": True}

    async def one():
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 200
        return await resp.read()

    first = asyncio.ensure_future(one())
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(one())
    await asyncio.sleep(0.1)
    await asyncio.gather(first, second, one())
    home, other = (d1, d2) if len(d1.requests) == 2 else (d2, d1)
    assert (len(home.requests), len(other.requests)) == (2, 1)
    spills = state_of(client).metrics.affinity_spills
    assert spills.labels("decode")._value.get() == 1
    assert spills.labels("prefill")._value.get() == 0
