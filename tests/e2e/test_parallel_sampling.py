"""Parallel sampling (``n`` > 1) through the proxy on real vLLM: every
choice identical to the single instance's with the same seed, and the
producer holds no transfer for the extra choices (one prefill, one lease,
consumed at once). vLLM refuses ``n`` > 1 with greedy sampling, so these
requests sample with a fixed seed."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import producer_idle

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("stream", [False, True])
def test_n2_token_exact_and_no_lease_left(cluster, tokenizer, stream):
    prompt = prompt_of(tokenizer, 3 * 32 + 5, seed=7100 + stream)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 1.0,
            "seed": 1234, "ignore_eos": True, "return_token_ids": True, "n": 2}
    ref = post(cluster.S.url, "/v1/completions", body)
    expected = [c["token_ids"] for c in sorted(ref["choices"], key=lambda c: c["index"])]
    assert expected[0] != expected[1]  # two real samples
    loaded0 = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    if stream:
        req = urllib.request.Request(cluster.proxy_url + "/v1/completions",
                                     json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
        ids: dict[int, list[int]] = {0: [], 1: []}
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        ids[ch["index"]] += ch.get("token_ids") or []
        got = [ids[0], ids[1]]
    else:
        out = post(cluster.proxy_url, "/v1/completions", body)
        got = [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert got == expected
    # P prefilled once and its one lease was pulled: nothing waits for lease_s.
    t0 = time.monotonic()
    wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 0, timeout=10)
    assert time.monotonic() - t0 < 10
    wait_for(lambda: producer_idle(cluster))
    # One pull for both choices: the second waited for it and took the
    # blocks from D's prefix cache.
    wait_for(lambda: metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded0)
    time.sleep(0.5)
    assert metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded0 == len(prompt)
