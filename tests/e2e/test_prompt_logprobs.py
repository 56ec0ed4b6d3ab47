"""Requests that ask for prompt logprobs, through the proxy on real vLLM.

vLLM computes such a request's whole prompt itself: it skips every cache,
the connector's remote KV included (``skip_reading_prefix_cache``). So the
proxy sends it to a decode instance alone; a prefill leg would only burn
P's compute and lease blocks that nobody pulls."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import producer_idle

pytestmark = pytest.mark.e2e


def _counters(cluster) -> tuple[float, float, float]:
    return (metric(cluster.P.url, "vllm:prompt_tokens_total"),
            metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total"),
            metric(cluster.D.url, "vllm:prompt_tokens_by_source_total", source="local_compute"))


def _logprob_values(entries) -> list:
    """prompt_logprobs as [(token id, logprob rounded)] per position."""
    out = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        out.append(sorted((int(k), round(v["logprob"], 4)) for k, v in entry.items()))
    return out


@pytest.mark.parametrize("case", ["prompt_logprobs", "echo_logprobs", "chat"])
def test_prompt_logprobs_served_by_decode_alone(cluster, tokenizer, case):
    prompt = prompt_of(tokenizer, 2 * 32 + 9, seed=7300 + len(case))
    if case == "chat":
        path = "/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "delta " * 40}],
                "prompt_logprobs": 1}
    else:
        path = "/v1/completions"
        body = {"model": "tiny", "prompt": prompt}
        body.update({"prompt_logprobs": 2} if case == "prompt_logprobs"
                    else {"echo": True, "logprobs": 1})
    body.update({"max_tokens": 6, "temperature": 0, "ignore_eos": True,
                 "return_token_ids": True})
    ref = post(cluster.S.url, path, body)
    p0, loaded0, local0 = _counters(cluster)
    got = post(cluster.proxy_url, path, body)

    g, r = got["choices"][0], ref["choices"][0]
    assert g["token_ids"] == r["token_ids"]
    if case == "echo_logprobs":
        assert g["text"] == r["text"]
        assert g["logprobs"]["tokens"] == r["logprobs"]["tokens"]
        assert [round(x, 4) if x is not None else None for x in g["logprobs"]["token_logprobs"]] \
            == [round(x, 4) if x is not None else None for x in r["logprobs"]["token_logprobs"]]
    else:
        want = ref.get("prompt_logprobs") or r.get("prompt_logprobs")
        have = got.get("prompt_logprobs") or g.get("prompt_logprobs")
        assert want and _logprob_values(have) == _logprob_values(want)
    # D computed the whole prompt; P never saw the request.
    p1, loaded1, local1 = _counters(cluster)
    assert loaded1 == loaded0
    assert local1 - local0 == got["usage"]["prompt_tokens"]
    assert p1 == p0
    wait_for(lambda: producer_idle(cluster))
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0


def test_consumer_releases_a_lease_it_cannot_use(cluster, tokenizer):
    """Another router may still send P's params with a prompt-logprobs
    request: vLLM then hands D's connector no tokens to load, and D frees
    P's lease at once instead of leaving it to expire (lease_s)."""
    prompt = prompt_of(tokenizer, 3 * 32 + 3, seed=7399)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "prompt_logprobs": 1}
    ref = post(cluster.S.url, "/v1/completions", body)
    released0 = metric(cluster.P.url, "vllm:ascend_pd_leases_released_total")
    loaded0 = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    pre = post(cluster.P.url, "/v1/completions",
               {**body, "max_tokens": 1, "prompt_logprobs": None,
                "kv_transfer_params": {"do_remote_decode": True}})
    wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 1, timeout=10)
    got = post(cluster.D.url, "/v1/completions",
               {**body, "kv_transfer_params": pre["kv_transfer_params"]})
    assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert _logprob_values(got["choices"][0]["prompt_logprobs"]) \
        == _logprob_values(ref["choices"][0]["prompt_logprobs"])
    wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0, timeout=10)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_released_total") - released0 == 1
    assert metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") == loaded0
    wait_for(lambda: producer_idle(cluster))
