"""The scheduler-side state machine of kv_both instances: one SchedulerSide
produces for requests carrying do_remote_decode and consumes for requests
carrying do_remote_prefill, in any interleaving; and misrouted legs on
single-role instances are ignored safely."""

from __future__ import annotations

import logging

import pytest

from vllm_ascend_pd.connector.scheduler import SchedulerSide
from vllm_ascend_pd.params import parse_producer_params

vllm_request = pytest.importorskip("vllm.v1.request")
RequestStatus = vllm_request.RequestStatus

from test_scheduler import FakeBlocks, FakeRequest  # noqa: E402


def both(name: str, kv_port: int) -> SchedulerSide:
    return SchedulerSide(engine_id=name, is_producer=True, is_consumer=True,
                         block_size=4, tp_size=1, kv_host="127.0.0.1", kv_port=kv_port)


def prefill(side: SchedulerSide, rid: str, prompt: list[int], blocks: list[int]) -> dict:
    req = FakeRequest(rid, prompt, {"do_remote_decode": True, "do_remote_prefill": False},
                      RequestStatus.FINISHED_LENGTH_CAPPED, len(prompt))
    # A prefill leg loads nothing from elsewhere.
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    side.update_state_after_alloc(req, FakeBlocks(blocks), 0)
    delay, params = side.request_finished(req, blocks)
    assert delay is True
    return params


def test_both_roles_swap_between_two_instances():
    a, b = both("A", 21000), both("B", 22000)
    prompt1, prompt2 = list(range(10)), list(range(50, 57))

    # A prefills request 1, B decodes it.
    p1 = prefill(a, "a-1", prompt1, [5, 6, 7])
    assert (p1["remote_engine_id"], p1["remote_port"]) == ("A", 21000)
    assert [s.block_ids for s in a.build_connector_meta().sends] == [[5, 6, 7]]
    d1 = FakeRequest("b-1", prompt1, dict(p1))
    assert b.get_num_new_matched_tokens(d1, 0) == (10, True)
    b.update_state_after_alloc(d1, FakeBlocks([40, 41, 42]), 10)

    # Same step on B: it prefills request 2 while pulling request 1.
    p2 = prefill(b, "b-2", prompt2, [43, 44])
    meta_b = b.build_connector_meta()
    (recv,) = meta_b.recvs
    assert (recv.remote_port, recv.remote_block_ids, recv.local_block_ids) == (21000, [5, 6, 7], [40, 41, 42])
    assert [s.block_ids for s in meta_b.sends] == [[43, 44]]
    assert (p2["remote_engine_id"], p2["remote_port"]) == ("B", 22000)

    # A decodes request 2 from B.
    d2 = FakeRequest("a-2", prompt2, dict(p2))
    assert a.get_num_new_matched_tokens(d2, 0) == (7, True)
    a.update_state_after_alloc(d2, FakeBlocks([8, 9]), 7)
    (recv,) = a.build_connector_meta().recvs
    assert (recv.remote_port, recv.transfer_id) == (22000, p2["transfer_id"])

    # Finishing a decode leg hands nothing on: no new lease, no params.
    for side, req in ((b, d1), (a, d2)):
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        req.num_computed_tokens = len(req.prompt_token_ids) + 5
        assert side.request_finished(req, [1, 2, 3, 4]) == (False, None)
        meta = side.build_connector_meta()
        assert meta.sends == [] and meta.recvs == [] and meta.releases == []


def test_both_plain_request_is_neither_produced_nor_consumed():
    a = both("A", 21000)
    req = FakeRequest("r", list(range(9)), None, RequestStatus.FINISHED_STOPPED, 9)
    assert a.get_num_new_matched_tokens(req, 0) == (0, False)
    a.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 0)
    assert a.request_finished(req, [1, 2, 3]) == (False, None)
    meta = a.build_connector_meta()
    assert meta.sends == [] and meta.recvs == [] and meta.releases == []


def test_both_rejected_decode_leg_releases_and_does_not_lease():
    a, b = both("A", 21000), both("B", 22000)
    p = prefill(a, "a-1", list(range(8)), [1, 2])
    a.build_connector_meta()
    req = FakeRequest("b-1", list(range(8)), dict(p), RequestStatus.FINISHED_ABORTED)
    assert b.request_finished(req, []) == (False, None)
    meta = b.build_connector_meta()
    assert [r.transfer_id for r in meta.releases] == [p["transfer_id"]]
    assert meta.sends == []


def test_both_aborted_prefill_leg_leases_nothing():
    a = both("A", 21000)
    req = FakeRequest("a-1", list(range(8)), {"do_remote_decode": True},
                      RequestStatus.FINISHED_ABORTED, 8)
    assert a.request_finished(req, [1, 2]) == (False, None)
    assert a.build_connector_meta().sends == []


def test_decode_leg_on_producer_only_instance_is_ignored(caplog):
    a = both("A", 21000)
    p = prefill(a, "a-1", list(range(8)), [1, 2])
    producer = SchedulerSide(engine_id="P", is_producer=True, is_consumer=False, block_size=4,
                             tp_size=1, kv_host="127.0.0.1", kv_port=23000)
    req = FakeRequest("p-1", list(range(8)), dict(p), RequestStatus.FINISHED_LENGTH_CAPPED, 8)
    assert producer.get_num_new_matched_tokens(req, 0) == (0, False)
    producer.update_state_after_alloc(req, FakeBlocks([3, 4]), 0)
    with caplog.at_level(logging.WARNING):
        assert producer.request_finished(req, [3, 4]) == (False, None)
    meta = producer.build_connector_meta()
    # Nothing this worker could not carry out (it has no puller).
    assert meta.releases == [] and meta.recvs == [] and meta.sends == []
    assert "kv_consumer or kv_both" in caplog.text


def test_prefill_leg_on_consumer_only_instance_returns_no_params(caplog):
    consumer = SchedulerSide(engine_id="D", is_producer=False, is_consumer=True, block_size=4,
                             tp_size=1, kv_host="127.0.0.1", kv_port=23000)
    req = FakeRequest("d-1", list(range(8)), {"do_remote_decode": True},
                      RequestStatus.FINISHED_LENGTH_CAPPED, 8)
    with caplog.at_level(logging.WARNING):
        assert consumer.request_finished(req, [1, 2]) == (False, None)
    assert consumer.build_connector_meta().sends == []
    assert "kv_producer or kv_both" in caplog.text


def test_params_round_trip_between_both_instances_validate():
    a = both("A", 21000)
    p = prefill(a, "a-1", list(range(13)), [1, 2, 3, 4])
    parsed = parse_producer_params(p)
    assert parsed.num_tokens == 13 and parsed.remote_block_ids == [1, 2, 3, 4]
    assert parsed.do_remote_prefill is True and parsed.do_remote_decode is False
