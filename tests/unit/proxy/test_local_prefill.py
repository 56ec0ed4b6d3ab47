"""Requests whose prefill leg would be wasted (prompt logprobs: vLLM
computes the prompt itself) or would leak P's leases (several prompts in one
request) go to a decode instance alone."""

from __future__ import annotations

import asyncio

import pytest

from conftest import sse_events, state_of, wait_for
from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.pd import local_prefill_reason


PL, BATCH = "prompt_logprobs", "batch"


@pytest.mark.parametrize("body, chat, expected", [
    ({"prompt": "x"}, False, None),
    ({"prompt": "x", "prompt_logprobs": 0}, False, PL),
    ({"prompt": "x", "prompt_logprobs": None}, False, None),
    ({"prompt": "x", "echo": True}, False, None),  # echo alone: no logprobs
    ({"prompt": "x", "echo": True, "logprobs": 0}, False, PL),
    ({"prompt": "x", "echo": False, "logprobs": 3}, False, None),
    ({"prompt": "x", "logprobs": 3}, False, None),
    # chat: echo takes top_logprobs, whose default is 0
    ({"messages": [], "echo": True}, True, PL),
    ({"messages": [], "echo": True, "top_logprobs": None}, True, None),
    ({"messages": [], "echo": True, "top_logprobs": 2, "logprobs": True}, True, PL),
    ({"messages": [], "logprobs": True, "top_logprobs": 2}, True, None),
    ({"messages": [], "prompt_logprobs": 1}, True, PL),
    # several prompts in one completions request
    ({"prompt": ["a", "b"]}, False, BATCH),
    ({"prompt": [[1, 2], [3]]}, False, BATCH),
    ({"prompt": ["a"]}, False, None),
    ({"prompt": [[1, 2]]}, False, None),
    ({"prompt": [1, 2, 3]}, False, None),  # one tokenized prompt
    ({"prompt": []}, False, None),
    ({"prompt": ["a", "b"], "prompt_logprobs": 1}, False, PL),
    ({"prompt": [[[[[[1]]]]]]}, False, None),  # D answers the 400
    ({"prompt": [["a"], "b"]}, False, BATCH),  # D answers the 400
])
def test_which_requests_skip_the_prefill_leg(body, chat, expected):
    assert local_prefill_reason(RequestBody.from_dict(body), chat) == expected


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1}),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "prompt_logprobs": 1}),
    ("/v1/completions", {"prompt": ["x", "y"]}),
])
async def test_decode_alone_without_prefill_leg(backend, proxy, release, path, body):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    resp = await client.post(path, json={**body, "kv_transfer_params": {"remote_host": "evil"}})
    assert resp.status == 200
    assert p.requests == []
    [dreq] = d.requests
    # Client params are still never honoured: D prefills locally.
    assert dreq["body"] == {**body, "kv_transfer_params": None}
    assert resp.headers["Server-Timing"].startswith("prefill;dur=0.000, decode;dur=")
    m = state_of(client).metrics
    reason = BATCH if isinstance(body.get("prompt"), list) else PL
    assert m.local_prefill.labels(reason)._value.get() == 1
    endpoint = "chat_completions" if "chat" in path else "completions"
    assert m.requests.labels(endpoint, "200")._value.get() == 1
    await asyncio.sleep(0.05)
    assert release.calls == []


async def test_disconnect_cancels_a_local_prefill_decode_leg(backend, proxy, release):
    """The handler must not mistake a local-prefill request (no KV params)
    for one still in its prefill leg: the decode leg is cancelled on D."""
    p, d = await backend("p"), await backend("d")
    d.header_delay = 30
    client = await proxy([p], [d])
    task = asyncio.create_task(client.post(
        "/v1/completions", json={"prompt": "x", "prompt_logprobs": 1}))
    await asyncio.wait_for(d.handler_started.wait(), 2)
    task.cancel()
    await wait_for(lambda: d.cancelled == 1)
    await wait_for(lambda: state_of(client).inflight == 0)
    assert p.requests == [] and release.calls == []
    assert state_of(client).metrics.errors.labels("client_disconnect")._value.get() == 1


async def test_decode_failover_for_local_prefill(backend, proxy):
    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    d1.status = 503
    client = await proxy([p], [d1, d2], policy="round_robin")
    for _ in range(2):
        resp = await client.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": 1,
                                                          "stream": True})
        assert resp.status == 200
        assert await resp.read() == b"".join(sse_events(5))
    assert p.requests == [] and len(d2.requests) == 2


def test_a_long_token_prompt_is_not_decoded(monkeypatch):
    """The prompt stays raw JSON on the hot path (proxy/codec.py): deciding
    whether a body holds several prompts decodes no prompt."""
    from vllm_ascend_pd.proxy import codec

    body = RequestBody.parse(b'{"prompt": [' + b", ".join([b"7"] * 100_000) + b'], '
                             b'"max_tokens": 3}')
    calls = []
    real = codec.loads_items
    monkeypatch.setattr(codec, "loads_items", lambda b: calls.append(len(b)) or real(b))
    assert local_prefill_reason(body, False) is None
    assert calls == []
    batch = RequestBody.parse(b'{"prompt": [ "a" , "b"]}')
    assert local_prefill_reason(batch, False) == "batch" and len(calls) == 1
