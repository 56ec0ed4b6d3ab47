"""Dynamic registration with a proxy, and a failed load under the
``recompute`` policy, on real vLLM (shares the session cluster)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import completion, producer_idle

pytestmark = pytest.mark.e2e


def test_instances_register_with_the_proxy_and_serve(cluster, tokenizer):
    def registered():
        status = json.loads(urllib.request.urlopen(cluster.dyn_proxy_url + "/status", timeout=5).read())
        return status["healthy"] == {"prefill": 1, "decode": 1} and status

    status = wait_for(registered, timeout=30)
    addresses = {role: [i["address"] for i in insts] for role, insts in status["instances"].items()}
    assert addresses == {"prefill": [f"127.0.0.1:{cluster.P.port}"], "decode": [f"127.0.0.1:{cluster.D.port}"]}
    prompt = prompt_of(tokenizer, 77, seed=3)
    assert completion(cluster.dyn_proxy_url, prompt) == completion(cluster.S.url, prompt)


def test_replayed_params_are_refused_and_recomputed_exactly(cluster, tokenizer):
    prompt = prompt_of(tokenizer, 70, seed=11)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    pre = post(cluster.P.url, "/v1/completions",
               {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    params = pre["kv_transfer_params"]
    expected = completion(cluster.S.url, prompt, 8)

    first = post(cluster.D.url, "/v1/completions", {**body, "kv_transfer_params": dict(params)})
    assert first["choices"][0]["token_ids"] == expected
    wait_for(lambda: producer_idle(cluster))

    refused_before = _failures(cluster, "refused")
    replay = post(cluster.D.url, "/v1/completions", {**body, "kv_transfer_params": dict(params)})
    # The producer sends no data for an ended transfer; D recomputes (policy
    # "recompute") and the answer is still exact.
    assert replay["choices"][0]["token_ids"] == expected
    assert _failures(cluster, "refused") == refused_before + 1
    assert producer_idle(cluster)


def _failures(cluster, cause: str) -> float:
    try:
        return metric(cluster.D.url, "vllm:ascend_pd_failed_transfers_total", cause=cause)
    except KeyError:
        return 0.0
