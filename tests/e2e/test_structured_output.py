"""Structured output through the proxy on real vLLM: D applies the grammar
from the first generated token, on KV pulled from P (P's one token, taken
under the same grammar, is discarded), so the answer is the single
instance's."""

from __future__ import annotations

import re

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import producer_idle

pytestmark = pytest.mark.e2e

CHOICES = ["alpha beta", "gamma", "delta epsilon zeta"]


@pytest.mark.parametrize("constraint", [
    {"structured_outputs": {"choice": CHOICES}},
    {"structured_outputs": {"regex": "[a-z]{3,6}( [a-z]{2,5}){2}"}},
])
def test_structured_output_token_exact(cluster, tokenizer, constraint):
    prompt = prompt_of(tokenizer, 2 * 32 + 17, seed=7500 + len(str(constraint)))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "return_token_ids": True, **constraint}
    ref = post(cluster.S.url, "/v1/completions", body)
    loaded0 = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    got = post(cluster.proxy_url, "/v1/completions", body)
    assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    text = got["choices"][0]["text"]
    assert text == ref["choices"][0]["text"]
    so = constraint["structured_outputs"]
    assert text in CHOICES if "choice" in so else re.fullmatch(so["regex"], text)
    # The KV did come from P.
    assert wait_for(lambda: metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
                    - loaded0) == len(prompt)
    wait_for(lambda: producer_idle(cluster))
