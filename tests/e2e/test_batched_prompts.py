"""A completions request with several prompts, through the proxy on real
vLLM. P would lease one transfer per prompt but answer with the first
prompt's params only (vLLM's OpenAI server returns
``final_res_batch[0].kv_transfer_params``): the other leases would hold P's
blocks until ``lease_s``. So the proxy sends such a request to D alone."""

from __future__ import annotations

import time

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import producer_idle

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("form", ["token_lists", "strings"])
def test_batched_prompts_exact_and_nothing_leased(cluster, tokenizer, form):
    prompts = [prompt_of(tokenizer, 32 + 11 * i, seed=7600 + i) for i in range(3)]
    if form == "strings":
        prompts = [tokenizer.decode(p) for p in prompts]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    ref = post(cluster.S.url, "/v1/completions", body)
    p_tokens0 = metric(cluster.P.url, "vllm:prompt_tokens_total")
    got = post(cluster.proxy_url, "/v1/completions", body)
    by_index = lambda out: [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert len(got["choices"]) == 3
    assert by_index(got) == by_index(ref)
    # P computed nothing and holds nothing, at once (not after lease_s).
    t0 = time.monotonic()
    wait_for(lambda: producer_idle(cluster), timeout=10)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0
    assert time.monotonic() - t0 < 5
    assert metric(cluster.P.url, "vllm:prompt_tokens_total") == p_tokens0


def test_one_prompt_in_a_list_still_goes_through_p(cluster, tokenizer):
    prompt = prompt_of(tokenizer, 2 * 32 + 5, seed=7650)
    body = {"model": "tiny", "prompt": [prompt], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    ref = post(cluster.S.url, "/v1/completions", body)
    loaded0 = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    got = post(cluster.proxy_url, "/v1/completions", body)
    assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert wait_for(lambda: metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
                    - loaded0) == len(prompt)
    wait_for(lambda: producer_idle(cluster))
