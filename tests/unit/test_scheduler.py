"""The scheduler-side state machine with minimal stand-ins for vLLM's Request
and KVCacheBlocks (plain data; the real ones are exercised end to end)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vllm_ascend_pd.connector.scheduler import SchedulerSide
from vllm_ascend_pd.params import parse_producer_params

vllm_request = pytest.importorskip("vllm.v1.request")
RequestStatus = vllm_request.RequestStatus


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None
    status: object = None
    num_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class FakeBlocks:
    ids: list[int] = field(default_factory=list)

    def get_block_ids(self):
        return (self.ids,)


def side(producer=False, consumer=False):
    return SchedulerSide(engine_id="E", is_producer=producer, is_consumer=consumer,
                         block_size=4, tp_size=1, kv_host="127.0.0.1", kv_port=20000)


def produce(prompt):
    p = side(producer=True)
    req = FakeRequest("p-1", prompt, {"do_remote_decode": True}, RequestStatus.FINISHED_LENGTH_CAPPED, len(prompt))
    delay, params = p.request_finished(req, [7, 8, 9, 10])
    return p, delay, params


def consumer_with_params(num_tokens: int):
    """A consumer, the prompt 0..num_tokens-1, and the kv_transfer_params P
    returned for that prompt."""
    prompt = list(range(num_tokens))
    _, _, params = produce(prompt)
    return side(consumer=True), prompt, params


def test_producer_leases_blocks_and_returns_params():
    p, delay, params = produce(list(range(10)))
    assert delay is True
    parsed = parse_producer_params(params)
    assert parsed.remote_block_ids == [7, 8, 9] and parsed.num_tokens == 10
    meta = p.build_connector_meta()
    assert [s.block_ids for s in meta.sends] == [[7, 8, 9]]
    # The lease is bound to the prompt the params name (P checks each pull).
    assert [s.prompt_hash for s in meta.sends] == [parsed.prompt_hash]
    assert p.build_connector_meta().sends == []  # per-step state resets


def test_producer_aborted_request_frees_immediately():
    p = side(producer=True)
    req = FakeRequest("p", [1, 2, 3], {"do_remote_decode": True}, RequestStatus.FINISHED_ABORTED, 3)
    assert p.request_finished(req, [1]) == (False, None)
    assert p.build_connector_meta().sends == []


def test_consumer_pulls_only_missing_blocks_after_prefix_hit():
    c, prompt, params = consumer_with_params(10)
    req = FakeRequest("d-1", prompt, dict(params))
    # 4 tokens (one block) already cached locally.
    assert c.get_num_new_matched_tokens(req, 4) == (6, True)
    assert c.get_num_new_matched_tokens(req, 4) == (6, True)  # side-effect free
    c.update_state_after_alloc(req, FakeBlocks([100, 101, 102]), 6)
    meta = c.build_connector_meta()
    (r,) = meta.recvs
    assert r.remote_block_ids == [8, 9] and r.local_block_ids == [101, 102] and r.num_tokens == 6
    assert r.prompt_hash == params["prompt_hash"]
    # A second call after the load does not start another transfer.
    c.update_state_after_alloc(req, FakeBlocks([100, 101, 102]), 0)
    assert c.build_connector_meta().recvs == [] and req.kv_transfer_params["do_remote_prefill"] is False


def test_consumer_full_prefix_hit_releases_producer():
    c, prompt, params = consumer_with_params(8)
    req = FakeRequest("d", prompt, dict(params))
    assert c.get_num_new_matched_tokens(req, 8) == (0, False)
    c.update_state_after_alloc(req, FakeBlocks([1, 2]), 0)
    meta = c.build_connector_meta()
    assert meta.recvs == [] and [x.transfer_id for x in meta.releases] == [params["transfer_id"]]


def test_consumer_rejected_before_alloc_releases_producer():
    c, prompt, params = consumer_with_params(8)
    req = FakeRequest("d", prompt, dict(params), RequestStatus.FINISHED_ABORTED)
    assert c.request_finished(req, []) == (False, None)
    (r,) = c.build_connector_meta().releases
    assert (r.transfer_id, r.prompt_hash) == (params["transfer_id"], params["prompt_hash"])
    # Params of another prompt: not this request's blocks to free.
    other = FakeRequest("x", [1, 2], dict(params), RequestStatus.FINISHED_ABORTED)
    assert c.request_finished(other, []) == (False, None)
    assert c.build_connector_meta().releases == []


def test_a_request_rejected_before_admission_releases_by_the_params_hash():
    # vLLM's rejection hook passes a stand-in request with prompt [0]: the
    # release names the params' hash, which P checks against its lease.
    c, _, params = consumer_with_params(8)
    stub = FakeRequest("d", [0], dict(params), RequestStatus.FINISHED_ABORTED)
    assert c.request_finished(stub, []) == (False, None)
    (r,) = c.build_connector_meta().releases
    assert (r.transfer_id, r.prompt_hash) == (params["transfer_id"], params["prompt_hash"])


@pytest.mark.parametrize("mutate,block_size", [
    (lambda p: None, 16),  # D runs another --block-size than P
    (lambda p: p.update(protocol=p["protocol"] - 1), 4),
])
def test_unusable_params_of_this_prompt_release_the_producer(mutate, block_size):
    # D prefills locally; before, P kept the blocks until lease_s (120 s).
    c, prompt, params = consumer_with_params(10)
    params = dict(params)
    mutate(params)
    c.block_size = block_size
    req = FakeRequest("d", prompt, params)
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)
    c.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 0)
    meta = c.build_connector_meta()
    assert meta.recvs == []
    (r,) = meta.releases
    assert (r.transfer_id, r.remote_request_id, r.prompt_hash, r.remote_port) == (
        params["transfer_id"], params["remote_request_id"], params["prompt_hash"], params["remote_port"]
    )
    c.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 0)  # asked again: once only
    assert c.build_connector_meta().releases == []


def _consumer_with_mutated_params(mutate):
    """A consumer and a request for prompt 0..9 carrying P's params for
    that prompt, changed by ``mutate``."""
    c, prompt, params = consumer_with_params(10)
    params = dict(params)
    mutate(params)
    return c, FakeRequest("d", prompt, params)


@pytest.mark.parametrize("mutate", [
    lambda p: p.update(prompt_hash="0" * 32),  # params rebound to this prompt's length
    lambda p: p.update(remote_port="nope"),
    lambda p: p.pop("transfer_id"),
])
def test_params_that_are_not_this_prompts_release_nothing(mutate):
    c, req = _consumer_with_mutated_params(mutate)
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)
    c.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 0)
    # Another prompt with the params of this one.
    other = FakeRequest("o", list(range(1, 11)), dict(produce(req.prompt_token_ids)[2]))
    assert c.get_num_new_matched_tokens(other, 0) == (0, False)
    c.update_state_after_alloc(other, FakeBlocks([4, 5, 6]), 0)
    meta = c.build_connector_meta()
    assert meta.recvs == [] and meta.releases == []


@pytest.mark.parametrize("mutate", [
    lambda p: p.update(remote_port="nope"),
    lambda p: p.update(block_size=16),
    lambda p: p.update(prompt_hash="0" * 32),
    lambda p: p.pop("transfer_id"),
])
def test_consumer_bad_params_prefill_locally(mutate):
    c, req = _consumer_with_mutated_params(mutate)
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)


@pytest.mark.parametrize("over", [
    {"tp_size": 2, "remote_port": 65535},  # producer rank 1's control port would be 65536
    {"tp_size": 65},  # beyond the 64-rank port plan
    {"tp_size": 10**9},  # the puller's per-rank loops would never end
])
def test_params_naming_producer_ports_that_cannot_exist_never_reach_a_worker(over):
    # The worker derives a port per producer rank from these; before they were
    # checked here, that raised ConfigError out of start_load_kv (killing the
    # engine) or looped over a billion ranks, for the pull and for the release
    # of a request that finished before allocation alike.
    c, prompt, params = consumer_with_params(10)
    req = FakeRequest("d", prompt, {**params, **over})
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)
    gone = FakeRequest("d2", prompt, {**params, **over}, RequestStatus.FINISHED_ABORTED)
    assert c.request_finished(gone, []) == (False, None)
    meta = c.build_connector_meta()
    assert meta.recvs == [] and meta.releases == []


def test_params_for_another_prompt_are_not_applied():
    c, _, params = consumer_with_params(10)
    req = FakeRequest("d", list(range(1, 11)), dict(params))
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)


@pytest.mark.parametrize("status,cancelled", [
    (RequestStatus.FINISHED_ABORTED, True),
    (RequestStatus.FINISHED_STOPPED, False),
    (RequestStatus.FINISHED_LENGTH_CAPPED, False),
])
def test_consumer_aborted_while_loading_cancels_its_pull(status, cancelled):
    c, prompt, params = consumer_with_params(10)
    req = FakeRequest("d-1", prompt, dict(params))
    assert c.get_num_new_matched_tokens(req, 0) == (10, True)
    c.update_state_after_alloc(req, FakeBlocks([100, 101, 102]), 10)
    assert len(c.build_connector_meta().recvs) == 1
    req.status = status
    assert c.request_finished(req, [100, 101, 102]) == (False, None)
    assert c.build_connector_meta().cancels == (["d-1"] if cancelled else [])
    # Finished once: a second call (and any other request) cancels nothing.
    req.status = RequestStatus.FINISHED_ABORTED
    c.request_finished(req, [100, 101, 102])
    c.request_finished(FakeRequest("other", [1], None, RequestStatus.FINISHED_ABORTED), [])
    assert c.build_connector_meta().cancels == []


def test_parallel_sampling_siblings_share_one_pull():
    """vLLM turns n > 1 into child requests that carry the parent's params
    (one dict in-process, copies across processes): the first pulls, the
    others wait for it, then compute the rest from the prefix cache."""
    c, prompt, params = consumer_with_params(10)
    a = FakeRequest("0_r", prompt, dict(params), RequestStatus.WAITING)
    b = FakeRequest("1_r", prompt, dict(params), RequestStatus.WAITING)
    assert c.get_num_new_matched_tokens(a, 0) == (10, True)
    c.update_state_after_alloc(a, FakeBlocks([1, 2, 3]), 10)
    a.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    assert len(c.build_connector_meta().recvs) == 1
    # While a pulls, b waits (None: ask again next step) ...
    assert c.get_num_new_matched_tokens(b, 0) == (None, False)
    # ... then takes a's blocks from the prefix cache and computes the rest.
    a.status = RequestStatus.RUNNING
    assert c.get_num_new_matched_tokens(b, 8) == (0, False)
    c.update_state_after_alloc(b, FakeBlocks([1, 2, 4]), 0)
    assert c.request_finished(b, [1, 2, 4]) == (False, None)
    meta = c.build_connector_meta()
    assert meta.recvs == [] and meta.releases == []  # no second pull, no release
    # A sibling queued until after a finished still does not pull.
    c.request_finished(a, [1, 2, 3])
    late = FakeRequest("2_r", prompt, dict(params), RequestStatus.WAITING)
    assert c.get_num_new_matched_tokens(late, 8) == (0, False)
    assert c.build_connector_meta().recvs == []


def test_same_transfer_id_with_another_prompt_is_not_a_sibling():
    c, prompt, params = consumer_with_params(10)
    a = FakeRequest("a", prompt, dict(params), RequestStatus.WAITING)
    c.get_num_new_matched_tokens(a, 0)
    c.update_state_after_alloc(a, FakeBlocks([1, 2, 3]), 10)
    a.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    # Params copied onto another prompt: refused by the prompt check, prefilled locally.
    other = FakeRequest("x", list(range(50, 60)), dict(params), RequestStatus.WAITING)
    assert c.get_num_new_matched_tokens(other, 0) == (0, False)


def test_a_request_id_too_long_for_the_producers_kv_port_is_not_handed_off():
    """vLLM takes request ids of any length (X-Request-Id, the body's
    request_id). Every pull and release carries it, and P's KV port drops a
    connection whose frame exceeds its cap: D's pull failed as "producer
    closed the connection" and the lease held P's blocks until lease_s.
    Such a request is not handed off (D prefills it); the longest id that
    is still fits (test_kv_server_fuzz.py)."""
    from vllm_ascend_pd.protocol import MAX_REQUEST_ID_BYTES

    p = side(producer=True)
    prompt = list(range(10))
    longest = "é" * (MAX_REQUEST_ID_BYTES // 2)  # two bytes each in UTF-8
    req = FakeRequest(longest, prompt, {"do_remote_decode": True},
                      RequestStatus.FINISHED_LENGTH_CAPPED, len(prompt))
    delay, params = p.request_finished(req, [7, 8, 9])
    assert delay is True and parse_producer_params(params).remote_request_id == longest
    assert len(p.build_connector_meta().sends) == 1
    req = FakeRequest(longest + "x", prompt, {"do_remote_decode": True},
                      RequestStatus.FINISHED_LENGTH_CAPPED, len(prompt))
    assert p.request_finished(req, [7, 8, 9]) == (False, None)
    assert p.build_connector_meta().sends == []
