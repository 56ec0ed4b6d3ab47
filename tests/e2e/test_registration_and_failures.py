"""Dynamic registration with a proxy, and a failed load under the
``recompute`` policy, on real vLLM (shares the session cluster)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from vllm_ascend_pd.kvclient import release_transfer_sync
from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import completion, producer_idle

pytestmark = pytest.mark.e2e


def test_instances_register_with_the_proxy_and_serve(cluster, tokenizer):
    def registered():
        status = json.loads(urllib.request.urlopen(cluster.dyn_proxy_url + "/status", timeout=5).read())
        healthy = {role: status["healthy"].get(role) for role in ("prefill", "decode")}
        return healthy == {"prefill": 1, "decode": 1} and status  # "both" is counted too now

    status = wait_for(registered, timeout=30)
    addresses = {role: [i["address"] for i in insts] for role, insts in status["instances"].items()}
    assert addresses == {"prefill": [f"127.0.0.1:{cluster.P.port}"], "decode": [f"127.0.0.1:{cluster.D.port}"],
                         "both": []}
    prompt = prompt_of(tokenizer, 77, seed=3)
    assert completion(cluster.dyn_proxy_url, prompt) == completion(cluster.S.url, prompt)


def test_replayed_params_are_computed_locally_and_refused_by_p(cluster, tokenizer):
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
    loaded_before = metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total")
    replay = post(cluster.D.url, "/v1/completions", {**body, "kv_transfer_params": dict(params)})
    # D remembers the transfers it pulled (for the sibling requests of n > 1)
    # and computes a replay itself: no pull, no round trip to P, still exact.
    assert replay["choices"][0]["token_ids"] == expected
    assert metric(cluster.D.url, "vllm:ascend_pd_loaded_tokens_total") == loaded_before
    assert _failures(cluster, "refused") == refused_before
    # P refuses the ended transfer to anyone else.
    assert release_transfer_sync(dict(params), timeout=5) is False
    assert producer_idle(cluster)


def _failures(cluster, cause: str) -> float:
    try:
        return metric(cluster.D.url, "vllm:ascend_pd_failed_transfers_total", cause=cause)
    except KeyError:
        return 0.0


def _prefill(cluster, prompt) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True}}
    return post(cluster.P.url, "/v1/completions", body)["kv_transfer_params"]


def test_expired_lease_frees_producer_and_decode_recomputes(cluster, tokenizer):
    from tests.e2e.conftest import LEASE_S

    prompt = prompt_of(tokenizer, 90, seed=21)
    expired_before = metric(cluster.P.url, "vllm:ascend_pd_leases_expired_total")
    params = _prefill(cluster, prompt)
    # The lease registers in the step after the prefill's; its gauge reaches
    # /metrics with that step's output, which may come after the answer.
    wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 1, timeout=5)
    wait_for(lambda: producer_idle(cluster), timeout=LEASE_S + 15)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_expired_total") == expired_before + 1
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "kv_transfer_params": params}
    late = post(cluster.D.url, "/v1/completions", body)
    assert late["choices"][0]["token_ids"] == completion(cluster.S.url, prompt, 8)


def test_release_without_pull_frees_producer(cluster, tokenizer):
    from vllm_ascend_pd.kvclient import release_transfer_sync

    released_before = metric(cluster.P.url, "vllm:ascend_pd_leases_released_total")
    params = _prefill(cluster, prompt_of(tokenizer, 50, seed=31))
    assert release_transfer_sync(params, timeout=5) is True
    wait_for(lambda: producer_idle(cluster), timeout=5)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released_before + 1
    # Releasing again is harmless and reports that nothing was freed.
    assert release_transfer_sync(params, timeout=5) is False


def test_decode_rejection_releases_producer(cluster, tokenizer):
    import urllib.error

    released_before = metric(cluster.P.url, "vllm:ascend_pd_leases_released_total")
    prompt = prompt_of(tokenizer, 120, seed=41)
    params = _prefill(cluster, prompt)
    # More logprobs than D allows: D refuses the request before admitting it.
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "logprobs": 1000, "kv_transfer_params": params}
    with pytest.raises(urllib.error.HTTPError) as err:
        post(cluster.D.url, "/v1/completions", body)
    assert err.value.code == 400
    wait_for(lambda: producer_idle(cluster), timeout=5)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released_before + 1


def test_unusable_params_of_this_prompt_release_the_producer_at_once(cluster, tokenizer):
    """Params D cannot use (here another protocol version; a block size
    mismatch goes the same way) are prefilled locally, and D tells P to free
    the blocks instead of P holding them until lease_s (120 s)."""
    released_before = metric(cluster.P.url, "vllm:ascend_pd_leases_released_total")
    prompt = prompt_of(tokenizer, 60, seed=45)
    params = _prefill(cluster, prompt)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "kv_transfer_params": {**params, "protocol": params["protocol"] - 1}}
    out = post(cluster.D.url, "/v1/completions", body)
    assert out["choices"][0]["token_ids"] == completion(cluster.S.url, prompt, 8)
    wait_for(lambda: producer_idle(cluster), timeout=5)
    assert metric(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released_before + 1


def test_params_rebound_to_another_prompt_never_fill_the_prefix_cache(cluster, tokenizer):
    """kv_transfer_params are client data and ``prompt_hash`` is not signed:
    a client that got a transfer for prompt X from P could post prompt Y to D
    with X's transfer and Y's hash. D then loaded X's KV into Y's blocks and
    cached them under Y's block hashes, so every later request sharing Y's
    prefix, anyone's, decoded from X's KV. P now checks the pull's prompt
    hash against the one it leased."""
    from vllm_ascend_pd.params import prompt_hash

    x = prompt_of(tokenizer, 130, seed=41)
    y = prompt_of(tokenizer, 130, seed=42)
    expected = completion(cluster.S.url, y, 8)
    params = _prefill(cluster, x)
    forged = {**params, "prompt_hash": prompt_hash(y)}
    refused_before = _failures(cluster, "refused")
    body = {"model": "tiny", "prompt": y, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    out = post(cluster.D.url, "/v1/completions", {**body, "kv_transfer_params": forged})
    assert out["choices"][0]["token_ids"] == expected  # recomputed after P refused
    assert _failures(cluster, "refused") == refused_before + 1
    # An honest request for Y hits D's prefix cache: it must hold Y's KV.
    assert completion(cluster.D.url, y, 8) == expected
    # P kept the lease for the pull of X (no data went out): free it.
    assert release_transfer_sync(dict(params), timeout=5) is True
    wait_for(lambda: producer_idle(cluster))


def test_params_naming_producer_ports_that_cannot_exist_prefill_locally(cluster, tokenizer):
    """tp_size 2 at remote_port 65535 names a control port 65536; D's worker
    raised ConfigError out of start_load_kv for it, killing D's engine."""
    from vllm_ascend_pd import protocol as wire
    from vllm_ascend_pd.params import prompt_hash

    prompt = prompt_of(tokenizer, 70, seed=43)
    params = {"do_remote_prefill": True, "remote_engine_id": "P", "remote_host": "127.0.0.1",
              "remote_port": 65535, "remote_block_ids": [0, 1, 2], "remote_request_id": "r",
              "transfer_id": "x" * 32, "tp_size": 2, "block_size": 32, "num_tokens": len(prompt),
              "prompt_hash": prompt_hash(prompt), "protocol": wire.PROTOCOL_VERSION}
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "kv_transfer_params": params}
    out = post(cluster.D.url, "/v1/completions", body)
    assert out["choices"][0]["token_ids"] == completion(cluster.S.url, prompt, 8)
    other = prompt_of(tokenizer, 40, seed=44)
    assert completion(cluster.D.url, other, 4) == completion(cluster.S.url, other, 4)
