"""The disaggregated request path against fake prefill/decode servers."""

from __future__ import annotations

import json
import random

from aiohttp import web

from conftest import sse_events, state_of


async def test_nonstream_completion_bodies_and_headers(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    body = {"model": "m", "prompt": "hello", "max_tokens": 50, "stream": False,
            "min_tokens": 5, "stream_options": {"include_usage": True}, "temperature": 0}
    resp = await client.post("/v1/completions", json=body,
                             headers={"Authorization": "Bearer sk-client",
                                      "X-Request-Id": "req-42"})
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "req-42"
    assert await resp.json() == d.nonstream_answer(body)

    [preq] = p.requests
    assert preq["body"] == {"model": "m", "prompt": "hello", "max_tokens": 1,
                            "stream": False, "temperature": 0,
                            "kv_transfer_params": {"do_remote_decode": True,
                                                   "do_remote_prefill": False}}
    [dreq] = d.requests
    assert dreq["body"] == {**body, "kv_transfer_params": p.params(0)}
    for r in (preq, dreq):
        assert r["headers"]["Authorization"] == "Bearer sk-client"
        assert r["headers"]["X-Request-Id"] == "req-42"


async def test_request_id_generated_when_absent(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200
    rid = resp.headers["X-Request-Id"]
    assert len(rid) == 32
    assert p.requests[0]["headers"]["X-Request-Id"] == rid
    assert d.requests[0]["headers"]["X-Request-Id"] == rid
    # No Authorization invented when the client sent none ("Bearer None").
    assert "Authorization" not in p.requests[0]["headers"]
    assert "Authorization" not in d.requests[0]["headers"]


async def test_chat_prefill_caps_completion_tokens(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 30, "stream": False}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    pbody = p.requests[0]["body"]
    assert pbody["max_completion_tokens"] == 1 and pbody["max_tokens"] == 1
    assert p.requests[0]["path"] == d.requests[0]["path"] == "/v1/chat/completions"
    assert d.requests[0]["body"]["max_completion_tokens"] == 30


async def test_stream_relayed_byte_for_byte_with_usage(backend, proxy):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(20, usage=True)
    # Decode writes in 7-byte pieces: events arrive split across chunks.
    d.chunker = lambda data: [data[i:i + 7] for i in range(0, len(data), 7)]
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={
        "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert await resp.read() == b"".join(d.events)
    assert d.requests[0]["body"]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in p.requests[0]["body"]


async def test_stream_events_intact_with_one_byte_chunks(backend, proxy):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(3)
    d.chunker = lambda data: [data[i:i + 1] for i in range(len(data))]
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    received = []
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
    assert buf == b"".join(d.events)
    # Every event is parseable JSON (or [DONE]).
    for ev in buf.split(b"\n\n")[:-1]:
        payload = ev[len(b"data: "):]
        received.append(payload if payload == b"[DONE]" else json.loads(payload))
    assert [r["choices"][0]["text"] for r in received[:-1]] == ["tok0 ", "tok1 ", "tok2 "]


async def test_relay_writes_whole_events_batched_per_read(backend, proxy, monkeypatch):
    """Whatever the decode's chunking, each write the proxy makes to its client
    ends on an event boundary (usage, an error event and [DONE] included), a
    read that finishes several events is one write, and the bytes are D's."""
    p, d = await backend("p"), await backend("d")
    events = sse_events(30, usage=True)
    err = b'data: {"error":{"message":"oops","type":"InternalServerError","code":500}}\n\n'
    events.insert(12, err)
    d.events = events
    data = b"".join(events)
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    d.chunker = lambda b: [b[i:j] for i, j in zip([0, *cuts], [*cuts, len(b)])]
    writes: list[bytes] = []
    real_write = web.StreamResponse.write

    async def spy(self, chunk):
        if self.headers.get("Cache-Control") == "no-cache":  # the proxy's response
            writes.append(bytes(chunk))
        return await real_write(self, chunk)

    monkeypatch.setattr(web.StreamResponse, "write", spy)
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert await resp.read() == data
    bounds, pos = set(), 0
    for e in events:
        pos += len(e)
        bounds.add(pos)
    pos = 0
    for w in writes:
        pos += len(w)
        assert pos in bounds, w
    assert b"".join(writes) == data
    assert len(writes) < len(events)  # batched: fewer writes than events


async def test_client_kv_transfer_params_are_ignored_no_ssrf(backend, proxy):
    p, d, evil = await backend("p"), await backend("d"), await backend("evil")
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={
        "prompt": "x", "kv_transfer_params": {
            "remote_host": "127.0.0.1", "remote_port": evil.port, "do_remote_prefill": True}},
        headers={"X-Prefiller-Host-Port": evil.address})
    assert resp.status == 200
    assert evil.requests == [] and evil.health_probes == 0
    assert d.requests[0]["body"]["kv_transfer_params"] == p.params(0)
    assert p.requests[0]["body"]["kv_transfer_params"] == {
        "do_remote_decode": True, "do_remote_prefill": False}


async def test_prefill_client_error_is_relayed_not_retried(backend, proxy):
    p1, p2, d = await backend("p"), await backend("p"), await backend("d")
    p1.status = p2.status = 400
    client = await proxy([p1, p2], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == 400
    assert len(p1.requests) + len(p2.requests) == 1
    assert d.requests == []


async def test_decode_leg_starts_in_the_prefill_legs_task(backend, proxy, monkeypatch):
    """No task hand-off between the legs: under load each hand-off waits a
    loop iteration, and that wait is added to every request's TTFT
    (docs/proxy-benchmark.md, "Loop hand-offs")."""
    import asyncio

    from vllm_ascend_pd.proxy.pd import PDForwarder

    tasks = {}
    prefill, decode = PDForwarder.prefill, PDForwarder.decode

    async def spy_prefill(self, req):
        tasks["prefill"] = asyncio.current_task()
        return await prefill(self, req)

    async def spy_decode(self, req, request):
        tasks["decode"] = asyncio.current_task()
        return await decode(self, req, request)

    monkeypatch.setattr(PDForwarder, "prefill", spy_prefill)
    monkeypatch.setattr(PDForwarder, "decode", spy_decode)
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(3)
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert resp.status == 200
    assert await resp.read() == b"".join(d.events)
    assert tasks["prefill"] is not None and tasks["prefill"] is tasks["decode"]


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def test_server_timing_splits_time_to_first_byte(backend, proxy):
    """Server-Timing names the prefill leg and the decode leg up to D's first
    byte, streaming and not."""
    p, d = await backend("p"), await backend("d")
    p.header_delay = 0.15
    d.header_delay = 0.1
    client = await proxy([p], [d])
    for stream in (False, True):
        resp = await client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        assert resp.status == 200
        await resp.read()
        timing = _server_timing(resp.headers["Server-Timing"])
        assert set(timing) == {"prefill", "decode"}
        assert 150 <= timing["prefill"] < 650 and 100 <= timing["decode"] < 600, timing
    # The decode part is also a histogram: one sample per answer, each >= 0.1 s.
    hist = state_of(client).metrics.decode_first_byte
    samples = {smp.name: smp.value for metric in hist.collect() for smp in metric.samples}
    assert samples["vllm_pd_proxy_decode_first_byte_seconds_count"] == 2
    assert samples["vllm_pd_proxy_decode_first_byte_seconds_sum"] >= 0.2


async def test_parallel_sampling_prefills_once(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    body = {"prompt": "hello", "max_tokens": 5, "n": 3, "temperature": 0.7, "seed": 1}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200
    [preq], [dreq] = p.requests, d.requests
    assert preq["body"]["n"] == 1 and dreq["body"]["n"] == 3
    assert dreq["body"]["seed"] == 1 and preq["body"]["seed"] == 1


async def test_non_json_client_errors_become_json_errors(backend, proxy, release):
    # A 4xx was relayed verbatim: an empty body (with aiohttp's
    # application/octet-stream) or the HTML of a server in front of vLLM
    # reached OpenAI clients, which expect {"error": {...}}.
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    answers = [(413, b"<html>too big</html>", "text/html"), (400, b"", None),
               (422, b"[1]", "application/json")]

    def answering(status, body, ctype):
        async def handler(request):
            await request.read()
            return web.Response(status=status, body=body, content_type=ctype)
        return handler
    servers = []
    for answer in answers:
        app = web.Application()
        app.router.add_post("/v1/completions", answering(*answer))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
    p, d = await backend("p"), await backend("d")
    try:
        for (status, body, _), server in zip(answers, servers):
            bad = f"127.0.0.1:{server.port}"
            for prefill, decode in (([bad], [d]), ([p], [bad])):
                client = await proxy(prefill, decode)
                resp = await client.post("/v1/completions", json={"prompt": "x"})
                assert resp.status == status
                error = (await resp.json())["error"]
                assert error["code"] == status and repr(body.decode()) in error["message"]
                assert error["type"] == {413: "RequestTooLargeError"}.get(status,
                                                                          "BadRequestError")
    finally:
        for server in servers:
            await server.close()
