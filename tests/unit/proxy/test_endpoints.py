"""Request hardening, admission control and the auxiliary endpoints."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import state_of, wait_for


async def test_body_too_large_413(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], max_body_bytes=2048)
    resp = await client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert resp.status == 413
    body = await resp.json()
    assert body["error"]["code"] == 413 and "2048" in body["error"]["message"]

    async def chunked():  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b" " * 1000
    resp = await client.post("/v1/completions", data=chunked(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == 413
    assert p.requests == []


async def test_invalid_json_400(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    for raw in (b"{not json", b"[1, 2]", b""):
        resp = await client.post("/v1/completions", data=raw,
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 400, raw
        body = await resp.json()
        assert body["error"]["code"] == 400 and body["error"]["type"] == "BadRequestError"
    assert p.requests == []


async def test_deeply_nested_json_is_a_400_not_a_500(backend, proxy):
    # msgspec raises RecursionError (not DecodeError) past ~1000 levels: it
    # escaped the handler as aiohttp's text/plain 500 (and a 500 instead of
    # failover for such a prefill answer).
    p, d = await backend("p"), await backend("d")
    deep = b"[" * 5000 + b"]" * 5000
    client = await proxy([p], [d], admin_token="s3cret-token")
    resp = await client.post("/v1/completions", data=b'{"prompt": ' + deep + b"}",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == 400 and "nested too deeply" in body["error"]["message"]
    assert p.requests == []
    resp = await client.post("/admin/instances", data=deep,
                             headers={"Authorization": "Bearer s3cret-token"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == 400
    # A prefill instance answering such JSON is a failed attempt: 502 and
    # failover, like any other invalid answer.
    async def nested_answer(request):
        return web.Response(body=b'{"kv_transfer_params": ' + deep + b"}",
                            content_type="application/json")
    app = web.Application()
    app.router.add_post("/v1/completions", nested_answer)
    bad = TestServer(app, host="127.0.0.1")
    await bad.start_server()
    try:
        client = await proxy([f"127.0.0.1:{bad.port}"], [d], prefill_attempts=1)
        resp = await client.post("/v1/completions", json={"prompt": "x"})
        assert resp.status == 502
        assert "invalid JSON" in (await resp.json())["error"]["message"]
        errors = state_of(client).metrics.errors
        assert errors.labels("prefill_protocol")._value.get() == 1
        client = await proxy([f"127.0.0.1:{bad.port}", p], [d], prefill_attempts=2)
        for _ in range(2):  # round robin: one of the two starts at the bad one
            resp = await client.post("/v1/completions", json={"prompt": "x"})
            assert resp.status == 200
    finally:
        await bad.close()


async def test_trickled_body_gets_408_and_frees_its_slot(backend, proxy):
    # Admission happens before the body is read: without a deadline, a few
    # clients sending a byte of their body and then nothing held every
    # --max-inflight slot for ever (503 for everyone else).
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], max_inflight=1, body_timeout=0.3)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    await wait_for(lambda: state_of(client).inflight == 1)
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503  # the slow client holds the only slot ...
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # ... until its deadline
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"Connection: close" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    error = __import__("json").loads(body)["error"]
    assert error["code"] == 408 and "--body-timeout" in error["message"]
    assert state_of(client).inflight == 0
    assert state_of(client).metrics.errors.labels("body_timeout")._value.get() == 1
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200
    assert len(p.requests) == 1


async def test_unknown_model_404(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], model="served")
    resp = await client.post("/v1/chat/completions", json={
        "model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 404
    assert await resp.json() == {"error": {
        "message": "The model `other` does not exist.", "type": "NotFoundError",
        "code": 404}}
    ok = await client.post("/v1/completions", json={"model": "served", "prompt": "x"})
    assert ok.status == 200
    assert p.requests[0]["body"]["model"] == "served"


async def test_max_inflight_503_with_retry_after(backend, proxy):
    p, d = await backend("p"), await backend("d")
    d.header_delay = 1.0
    client = await proxy([p], [d], max_inflight=2, retry_after=7)
    slow = [asyncio.create_task(client.post("/v1/completions", json={"prompt": "x"}))
            for _ in range(2)]
    await wait_for(lambda: state_of(client).inflight == 2)
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "7"
    assert (await resp.json())["error"]["code"] == 503
    assert [r.status for r in await asyncio.gather(*slow)] == [200, 200]
    # Capacity is back once they finished.
    assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert state_of(client).metrics.errors.labels("overloaded")._value.get() == 1


async def test_models_forwarded_then_synthesized(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], model="served")
    resp = await client.get("/v1/models")
    assert resp.status == 200
    assert (await resp.json())["data"][0]["id"] == f"model-of-{d.name}"  # decode first
    await d.stop()
    await p.stop()
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["served"]


async def test_models_without_backends_or_model_503(proxy):
    from conftest import dead_address
    client = await proxy([dead_address()], [dead_address()])
    resp = await client.get("/v1/models")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == 503


async def test_health_and_status(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], policy="least_requests")
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "prefill": 1, "decode": 1, "both": 0}
    await client.post("/v1/completions", json={"prompt": "x"})
    status = await (await client.get("/status")).json()
    assert status["policy"] == "least_requests" and status["inflight"] == 0
    [pi] = status["instances"]["prefill"]
    [di] = status["instances"]["decode"]
    assert pi["address"] == p.address and di["address"] == d.address
    assert pi["health"] == "healthy" and pi["requests_total"] == 1
    assert di["inflight_requests"] == 0 and di["source"] == "static"
    assert status["worker"]["count"] == 1 and "all_workers" not in status
    state = state_of(client)
    for inst in state.registry.instances("decode"):
        state.registry.record_probe(inst, False)
        state.registry.record_probe(inst, False)
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["decode"] == 0


async def test_metrics_exposition(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    assert (await client.post("/v1/completions", json={"prompt": "x", "stream": True})
            ).status == 200
    await client.post("/v1/completions", data=b"{", headers={"Content-Type": "x"})
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    lines = set(text.splitlines())
    assert 'vllm_pd_proxy_requests_total{endpoint="completions",status="200"} 1.0' in lines
    assert 'vllm_pd_proxy_requests_total{endpoint="completions",status="400"} 1.0' in lines
    assert 'vllm_pd_proxy_errors_total{kind="bad_request"} 1.0' in lines
    assert 'vllm_pd_proxy_errors_total{kind="decode_connect"} 0.0' in lines
    assert "vllm_pd_proxy_prefill_latency_seconds_count 1.0" in lines
    assert "vllm_pd_proxy_decode_latency_seconds_count 1.0" in lines
    assert "vllm_pd_proxy_decode_first_byte_seconds_count 1.0" in lines
    assert "vllm_pd_proxy_ttft_seconds_count 1.0" in lines
    assert "vllm_pd_proxy_inflight_requests 0.0" in lines
    assert f'vllm_pd_proxy_instance_healthy{{address="{d.address}",role="decode"}} 1.0' \
        in lines


async def test_header_passthrough_long_or_odd_request_id_replaced(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x"},
                             headers={"X-Request-Id": "a" * 300,
                                      "traceparent": "00-abc-def-01"})
    rid = resp.headers["X-Request-Id"]
    assert rid != "a" * 300 and len(rid) == 32
    assert d.requests[0]["headers"]["traceparent"] == "00-abc-def-01"


async def test_draining_answers_503_and_health_says_so(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], retry_after=3)
    state_of(client).draining = True
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    assert "shutting down" in (await resp.json())["error"]["message"]
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "draining"
    assert p.requests == []


async def test_stream_given_as_a_string_is_read_as_vllm_reads_it(backend, proxy):
    # "stream": "false" was a streaming request to the proxy (bool("false")),
    # so a long non-streaming answer was cut by --first-byte-timeout.
    p, d = await backend("p"), await backend("d")
    d.header_delay = 0.6
    client = await proxy([p], [d], first_byte_timeout=0.3)
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": "false"})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["text"] == f"answer from {d.name}"
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": "true"})
    assert resp.status == 504  # a stream: D's first event is late


def test_stream_flag_parsing_matches_pydantic():
    import pydantic

    from vllm_ascend_pd.proxy.handlers import _is_stream
    lax = pydantic.TypeAdapter(bool)
    for value in (True, False, None, 0, 1, "true", "True", "false", "FALSE", "0", "1",
                  "yes", "no", "on", "off", "t", "f", "y", "n"):
        assert _is_stream(value) == lax.validate_python(value or False), value
