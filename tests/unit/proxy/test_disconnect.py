"""Client disconnects: the in-flight leg is cancelled, abandoned KV is released."""

from __future__ import annotations

import asyncio

from conftest import sse_events, state_of, wait_for


async def test_disconnect_mid_stream_cancels_decode(backend, proxy, release):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(50)
    d.event_delay = 0.05
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert resp.status == 200
    first = await resp.content.readuntil(b"\n\n")
    assert first == d.events[0]
    resp.close()  # client goes away
    await wait_for(lambda: d.cancelled == 1)
    assert d.completed == 0
    await wait_for(lambda: state_of(client).inflight == 0)
    inst = state_of(client).registry.instances("decode")[0]
    assert inst.inflight_requests == 0
    # Decode output had started: its KV was consumed, nothing to release.
    await asyncio.sleep(0.05)
    assert release.calls == []
    assert state_of(client).metrics.errors.labels("client_disconnect")._value.get() == 1
    assert state_of(client).metrics.requests.labels("completions", "499")._value.get() == 1


async def test_client_leaving_after_done_is_a_complete_request(backend, proxy, release):
    """A client that hangs up once it has [DONE], before D ends its HTTP
    stream, got its whole answer: a 200, not a client disconnect."""
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(2)
    d.event_delay = 0.5  # D ends its response 0.5 s after sending [DONE]
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert resp.status == 200
    got = b""
    while not got.endswith(b"data: [DONE]\n\n"):
        got += await resp.content.readany()
    assert got == b"".join(d.events)
    resp.close()
    await wait_for(lambda: d.cancelled == 1)  # the proxy saw the hang-up before D's end
    await wait_for(lambda: state_of(client).inflight == 0)
    m = state_of(client).metrics
    assert m.errors.labels("client_disconnect")._value.get() == 0
    assert m.requests.labels("completions", "200")._value.get() == 1
    assert m.requests.labels("completions", "499")._value.get() == 0
    assert release.calls == []


async def test_disconnect_between_prefill_and_decode_releases_kv(backend, proxy, release):
    p, d = await backend("p"), await backend("d")
    d.header_delay = 30  # decode has not answered yet
    client = await proxy([p], [d])
    task = asyncio.create_task(
        client.post("/v1/completions", json={"prompt": "x", "stream": True}))
    await asyncio.wait_for(d.handler_started.wait(), 2)
    task.cancel()
    await asyncio.wait_for(release.called.wait(), 2)
    assert release.calls == [p.params(0)]
    await wait_for(lambda: d.cancelled == 1)


async def test_disconnect_during_prefill_finishes_prefill_and_releases_kv(backend, proxy, release):
    """Cancelling the prefill leg could orphan a lease P already granted (its
    answer is the only place that names it): the leg runs to its end and
    its KV is released; decode is never started."""
    p, d = await backend("p"), await backend("d")
    p.header_delay = 0.5
    client = await proxy([p], [d])
    task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x"}))
    await asyncio.wait_for(p.handler_started.wait(), 2)
    task.cancel()
    await asyncio.wait_for(release.called.wait(), 5)
    assert release.calls == [p.params(0)]
    assert p.cancelled == 0 and p.completed == 1
    await wait_for(lambda: state_of(client).inflight == 0)
    assert d.requests == []
    assert state_of(client).registry.instances("prefill")[0].inflight_requests == 0
    assert state_of(client).metrics.errors.labels("client_disconnect")._value.get() == 1
    await wait_for(lambda: not state_of(client)._background)  # the leg's task ended


async def test_disconnect_during_failing_prefill_releases_nothing(backend, proxy, release):
    p, d = await backend("p"), await backend("d")
    p.header_delay = 0.3
    p.status = 500
    client = await proxy([p], [d])
    task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x"}))
    await asyncio.wait_for(p.handler_started.wait(), 2)
    task.cancel()
    await wait_for(lambda: p.completed + len(p.requests) >= 1 and state_of(client).inflight == 0)
    await asyncio.sleep(0.6)
    assert release.calls == [] and d.requests == []


async def test_decode_4xx_is_relayed_and_kv_released(backend, proxy, release):
    p, d = await backend("p"), await backend("d")
    d.status = 400
    client = await proxy([p], [d])
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == f"{d.name} failed"
    await asyncio.wait_for(release.called.wait(), 2)
    assert release.calls == [p.params(0)]


async def test_default_release_is_lazy_and_injectable(monkeypatch):
    """Without kvclient the default release logs and returns False, never raises."""
    import sys

    from vllm_ascend_pd.proxy import state

    monkeypatch.setitem(sys.modules, "vllm_ascend_pd.kvclient", None)  # ImportError
    assert await state.default_release_transfer({"transfer_id": "t"}, timeout=0.1) is False

    calls = []
    contexts = []

    class FakeKV:
        @staticmethod
        async def release_transfer(params, *, timeout=2.0, secret="", ctx=None):
            calls.append((params, timeout, secret))
            contexts.append(ctx)
            return True

    monkeypatch.setitem(sys.modules, "vllm_ascend_pd.kvclient", FakeKV)
    assert await state.default_release_transfer({"transfer_id": "t"}, timeout=0.5) is True
    assert calls == [({"transfer_id": "t"}, 0.5, "")]

    # The instances' shared secret reaches the release through --kv-secret-env.
    from vllm_ascend_pd.proxy.config import ProxyConfig

    monkeypatch.setenv("TEST_PD_SECRET", "s" * 20)
    cfg = ProxyConfig(prefill=["a:1"], decode=["b:2"], kv_secret_env="TEST_PD_SECRET").validate()
    proxy_state = state.ProxyState(cfg)
    assert await proxy_state.release_transfer({"transfer_id": "u"}, timeout=0.5) is True
    assert calls[-1] == ({"transfer_id": "u"}, 0.5, "s" * 20)
    # Every release of a proxy shares one ZMQ context, closed with the app.
    assert await proxy_state.release_transfer({"transfer_id": "v"}, timeout=0.5) is True
    assert contexts[-1] is contexts[-2] is not None
    proxy_state.close_release_context()
    assert contexts[-1].closed


async def test_disconnect_while_sending_the_body_is_counted(backend, proxy):
    # It was a 499 without errors_total{kind=client_disconnect}.
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    await wait_for(lambda: state_of(client).inflight == 1)
    writer.close()
    await wait_for(lambda: state_of(client).inflight == 0)
    metrics = state_of(client).metrics
    await wait_for(lambda: metrics.requests.labels("completions", "499")._value.get() == 1)
    assert metrics.errors.labels("client_disconnect")._value.get() == 1
    assert p.requests == []


async def test_a_client_hanging_up_as_the_response_ends_is_not_a_499(backend, proxy,
                                                                      monkeypatch):
    # A client that closes its connection as soon as it has read the whole
    # answer (one connection per request) can do so before the handler
    # resumes from the finished work: the handler's cancellation was counted
    # as a 499 (10% of requests in a 300-request run), though the client got
    # everything, including streams ended by an error event.
    from vllm_ascend_pd.proxy.handlers import Handlers

    real = Handlers._serve

    async def serve(self, req, request):
        resp = await real(self, req, request)
        request.transport.close()  # the client hangs up as the response ends
        return resp
    monkeypatch.setattr(Handlers, "_serve", serve)
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    metrics = state_of(client).metrics
    close = {"Connection": "close"}  # the connection does not outlive the test's hang-up
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True},
                             headers=close)
    assert (await resp.read()) == b"".join(d.events)
    d.abort_after = 2  # a stream ended by the proxy's error event
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True},
                             headers=close)
    assert b'"error"' in await resp.read()
    await wait_for(lambda: metrics.requests.labels("completions", "200")._value.get() == 2)
    assert metrics.requests.labels("completions", "499")._value.get() == 0
    assert metrics.errors.labels("client_disconnect")._value.get() == 0


async def test_a_failed_write_to_the_client_is_a_499(backend, proxy, monkeypatch):
    # A write that fails mid-stream (ClientGone) returned the prepared
    # response, which was counted under its status, 200.
    from aiohttp import web

    from vllm_ascend_pd.proxy.pd import _CLIENT_GONE

    real = web.StreamResponse.write
    writes = []

    async def write(self, data):
        if "Server-Timing" in self.headers:  # the proxy's answer, not the backend's
            writes.append(data)
        if len(writes) == 3:
            raise _CLIENT_GONE[-1]("Cannot write to closing transport")
        return await real(self, data)
    monkeypatch.setattr(web.StreamResponse, "write", write)
    p, d = await backend("p"), await backend("d")
    d.event_delay = 0.01
    client = await proxy([p], [d])
    metrics = state_of(client).metrics
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    await resp.read()
    await wait_for(lambda: metrics.requests.labels("completions", "499")._value.get() == 1)
    assert metrics.requests.labels("completions", "200")._value.get() == 0
    assert metrics.errors.labels("client_disconnect")._value.get() == 1


async def test_a_client_gone_before_its_answer_is_sent_is_a_disconnect(backend, proxy,
                                                                        monkeypatch):
    # The non-streamed twin of the race above: the answer is returned to
    # aiohttp, which never sends it; a 499 that errors_total did not count.
    from vllm_ascend_pd.proxy.handlers import Handlers

    real = Handlers._serve

    async def serve(self, req, request):
        resp = await real(self, req, request)
        request.transport.close()
        return resp
    monkeypatch.setattr(Handlers, "_serve", serve)
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    metrics = state_of(client).metrics
    try:
        await client.post("/v1/completions", json={"prompt": "x"})
    except Exception:  # noqa: BLE001 - the connection closes without an answer
        pass
    await wait_for(lambda: metrics.requests.labels("completions", "499")._value.get() == 1)
    assert metrics.errors.labels("client_disconnect")._value.get() == 1


async def test_a_client_that_stops_reading_is_cut_after_the_write_timeout(backend, proxy,
                                                                          release):
    # It held its --max-inflight slot and D's stream for ever: the gap
    # watchdog pauses while the proxy writes to the client, and nothing else
    # timed the write.
    p, d = await backend("p"), await backend("d")
    d.events = [b"data: " + b"x" * 65536 + b"\n\n"] * 400  # 26 MB: more than any buffer
    client = await proxy([p], [d], client_write_timeout=0.5)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    body = b'{"prompt": "x", "stream": true}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    try:
        await wait_for(lambda: d.handler_started.is_set())
        s = state_of(client)
        await wait_for(lambda: s.inflight == 0, timeout=10)
        await wait_for(lambda: d.cancelled == 1)
        assert d.completed == 0
        assert s.registry.instances("decode")[0].inflight_requests == 0
        assert s.metrics.errors.labels("client_stalled")._value.get() == 1
        assert s.metrics.errors.labels("client_disconnect")._value.get() == 0
        assert s.metrics.requests.labels("completions", "499")._value.get() == 1
        # The proxy closed the connection: what the client reads now ends.
        got = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
            got += len(chunk)
        assert got < 400 * 65536
    finally:
        writer.close()


async def test_a_slow_reader_is_not_cut(backend, proxy, release):
    # Each write makes progress within the timeout: the stream completes.
    p, d = await backend("p"), await backend("d")
    d.events = [b"data: " + b"y" * 65536 + b"\n\n"] * 100 + [b"data: [DONE]\n\n"]
    client = await proxy([p], [d], client_write_timeout=1.0)
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    got = b""
    while chunk := await resp.content.read(1 << 20):
        got += chunk
        await asyncio.sleep(0.02)
    assert got == b"".join(d.events)
    assert state_of(client).metrics.errors.labels("client_stalled")._value.get() == 0
