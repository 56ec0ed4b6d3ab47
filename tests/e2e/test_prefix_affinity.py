"""``--policy prefix_affinity`` on real vLLM 2P2D: prompts that share a
prefix are prefilled on one P, whose prefix cache then serves the shared
blocks; two prefix families land where the policy says; output is
token-exact against the single reference instance S."""

from __future__ import annotations

import json

import pytest

from vllm_ascend_pd.proxy.balancer import PrefixAffinity, affinity_key
from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.registry import Instance, Source
from vllm_ascend_pd.testing.servers import ProxyServer, free_port
from tests.e2e.helpers import metric, prompt_of, wait_for
from tests.e2e.test_pd_e2e import completion

pytestmark = pytest.mark.e2e

BLOCK = 32  # BASE_ARGS --block-size
SHARED = 3 * BLOCK
KEY_BYTES = 200  # inside the shared ids' JSON: every id takes >= 3 bytes ("7, ")
PER_FAMILY = 4


@pytest.fixture(scope="module")
def affinity_proxy(cluster):
    proxy = ProxyServer(free_port(), cluster.logs / "affinity-proxy.log",
                        "--policy", "prefix_affinity",
                        "--affinity-prefix-bytes", str(KEY_BYTES),
                        "--prefill", f"127.0.0.1:{cluster.P.port}",
                        f"127.0.0.1:{cluster.P2.port}",
                        "--decode", f"127.0.0.1:{cluster.D.port}",
                        f"127.0.0.1:{cluster.D2.port}")
    try:
        proxy.start(healthy=True)
        yield proxy
    finally:
        proxy.stop()


def _body(prompt: list[int]) -> dict:
    # The body test_pd_e2e.completion sends, to predict the pick from it.
    return {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}


def _predicted(producers, prompt: list[int]):
    key = affinity_key(RequestBody.parse(json.dumps(_body(prompt)).encode()), KEY_BYTES)
    insts = [Instance(role="prefill", address=f"127.0.0.1:{p.port}", source=Source.STATIC)
             for p in producers]
    chosen = PrefixAffinity().pick(insts, key).address
    return next(p for p in producers if chosen.endswith(f":{p.port}"))


def _hits(server) -> float:
    try:
        return metric(server.url, "vllm:prefix_cache_hits_total")
    except KeyError:
        return 0.0


def _prompt_tokens(server) -> float:
    try:
        return metric(server.url, "vllm:prompt_tokens_total")
    except KeyError:
        return 0.0


def test_shared_prefix_goes_to_one_producer_and_hits_its_cache(cluster, tokenizer,
                                                               affinity_proxy):
    producers = (cluster.P, cluster.P2)
    # Two prefix families the policy sends to different producers.
    seeds = [9100]
    home = [_predicted(producers, prompt_of(tokenizer, SHARED, seed=9100))]
    seed = 9101
    while len(seeds) < 2:
        p = _predicted(producers, prompt_of(tokenizer, SHARED, seed=seed))
        if p is not home[0]:
            seeds.append(seed)
            home.append(p)
        seed += 1
    assert {p.name for p in home} == {"P", "P2"}

    for fam, owner in zip(seeds, home):
        shared = prompt_of(tokenizer, SHARED, seed=fam)
        prompts = [shared + prompt_of(tokenizer, 40, seed=fam * 10 + i)
                   for i in range(PER_FAMILY)]
        expected = [completion(cluster.S.url, p, 6) for p in prompts]
        hits0 = {p.name: _hits(p) for p in producers}
        tokens0 = {p.name: _prompt_tokens(p) for p in producers}
        # One at a time: a request's blocks enter the prefix cache once computed.
        got = [completion(affinity_proxy.url, p, 6) for p in prompts]
        assert got == expected, f"family {fam}"
        other = next(p for p in producers if p is not owner)
        # Every request of the family was prefilled by its owner...
        assert _prompt_tokens(owner) - tokens0[owner.name] == sum(map(len, prompts))
        assert _prompt_tokens(other) == tokens0[other.name]
        # ...whose prefix cache served the shared blocks to all but the first.
        assert _hits(owner) - hits0[owner.name] == (PER_FAMILY - 1) * SHARED
        assert _hits(other) == hits0[other.name]
    for p in producers:
        wait_for(lambda p=p: metric(p.url, "vllm:kv_cache_usage_perc") == 0.0)
        assert metric(p.url, "vllm:ascend_pd_leases_pending") == 0
