"""The proxy only ever contacts configured or registered instances, whatever
the client puts in the request line, the headers or the body."""

from __future__ import annotations

import asyncio

from conftest import state_of, wait_for

TOKEN = "s3cret-token"


async def _raw(client, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_absolute_request_target_and_host_header_are_ignored(backend, proxy):
    p, d, evil = await backend("p"), await backend("d"), await backend("evil")
    client = await proxy([p], [d])
    body = b'{"prompt": "x"}'
    for target in (f"http://{evil.address}/v1/completions", "/v1/completions"):
        answer = await _raw(client, (
            f"POST {target} HTTP/1.1\r\nHost: {evil.address}\r\nContent-Type: application/json\r\n"
            f"X-Forwarded-Host: {evil.address}\r\nForwarded: host={evil.address}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert evil.requests == [] and evil.health_probes == 0
    assert len(p.requests) == 2 and len(d.requests) == 2


async def test_chat_kv_transfer_params_and_prefill_hints_are_ignored(backend, proxy):
    p, d, evil = await backend("p"), await backend("d"), await backend("evil")
    client = await proxy([p], [d])
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}],
        "kv_transfer_params": {"remote_host": "127.0.0.1", "remote_port": evil.port,
                               "do_remote_prefill": True, "transfer_id": "forged"},
        "prefill_host": evil.address, "decode_host": evil.address},
        headers={"X-Prefill-Url": f"http://{evil.address}", "X-Decode-Url": f"http://{evil.address}"})
    assert resp.status == 200
    assert evil.requests == []
    assert d.requests[0]["body"]["kv_transfer_params"] == p.params(0)


async def test_admin_token_only_in_the_authorization_header(backend, proxy):
    p, d, evil = await backend("p"), await backend("d"), await backend("evil")
    client = await proxy([p], [d], admin_token=TOKEN)
    target = {"role": "prefill", "address": evil.address}
    for url in (f"/admin/instances?token={TOKEN}", f"/admin/instances?access_token={TOKEN}"):
        resp = await client.post(url, json=target)
        assert resp.status == 401
    resp = await client.post("/admin/instances", json=target, headers={"X-Admin-Token": TOKEN})
    assert resp.status == 401
    assert [i.address for i in state_of(client).registry.instances("prefill")] == [p.address]
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200
    assert evil.requests == [] and evil.health_probes == 0


async def test_backend_redirects_are_not_followed(backend, proxy):
    # aiohttp follows redirects by default: an instance answering 307 made
    # the proxy POST the client's prompt to an address of its choosing.
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    evil = await backend("evil")

    async def redirect(request):
        raise web.HTTPTemporaryRedirect(f"http://{evil.address}{request.path}")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    red = TestServer(app, host="127.0.0.1")
    await red.start_server()
    red_addr = f"127.0.0.1:{red.port}"
    try:
        p, d = await backend("p"), await backend("d")
        for prefill, decode in (([red_addr], [d]), ([p], [red_addr])):
            client = await proxy(prefill, decode, prefill_attempts=1, decode_attempts=1)
            for stream in (False, True):
                resp = await client.post("/v1/completions",
                                         json={"prompt": "x", "stream": stream})
                assert resp.status == 502, await resp.text()
                body = await resp.json()
                assert "answered 307" in body["error"]["message"]
            assert state_of(client).inflight == 0
        # With a second instance the attempt fails over to it.
        client = await proxy([red_addr, p], [red_addr, d])
        for _ in range(4):
            resp = await client.post("/v1/completions", json={"prompt": "x"})
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["text"] == f"answer from {d.name}"
        # Health probes and /v1/models do not follow them either.
        client = await proxy([red_addr], [red_addr], health_interval=0.05)
        await wait_for(lambda: all(i.health.value == "unhealthy"
                                   for i in state_of(client).registry.instances()))
        resp = await client.get("/v1/models")
        assert resp.status == 503
        assert evil.requests == [] and evil.health_probes == 0
    finally:
        await red.close()


async def test_a_proxy_among_its_own_instances_is_a_loop_not_a_storm(backend, release):
    # The proxy's own address as an instance (a typo, or two proxies routing
    # to each other): each hop admitted the request again, so one client
    # request recursed until --max-inflight was full (and /v1/models until
    # its timeout), failing everyone else with 503 meanwhile.
    from aiohttp.test_utils import TestClient, TestServer

    from conftest import free_port
    from vllm_ascend_pd.proxy.app import create_app
    from vllm_ascend_pd.proxy.config import ProxyConfig
    from vllm_ascend_pd.proxy.registry import Health

    d = await backend("d")
    port = free_port()
    cfg = ProxyConfig(prefill=[f"127.0.0.1:{port}"], decode=[d.address], health_interval=0,
                      max_inflight=50, prefill_attempts=1)
    client = TestClient(TestServer(create_app(cfg, release_transfer=release),
                                   host="127.0.0.1", port=port))
    await client.start_server()
    try:
        resp = await client.post("/v1/completions", json={"prompt": "x"},
                                 headers={"Via": "1.1 edge"})
        assert resp.status == 502
        assert "routing loop" in (await resp.json())["error"]["message"]
        metrics = state_of(client).metrics
        assert metrics.errors.labels("loop_detected")._value.get() == 1
        assert metrics.requests.labels("completions", "508")._value.get() == 1
        assert metrics.requests.labels("completions", "502")._value.get() == 1
        assert d.requests == [] and state_of(client).inflight == 0
        # /v1/models asks D first: with D out, it asks itself.
        state_of(client).registry.get("decode", d.address).health = Health.UNHEALTHY
        resp = await client.get("/v1/models")
        assert resp.status == 503
        assert metrics.errors.labels("loop_detected")._value.get() == 2
        # Other proxies' marks pass through, up to a hop limit.
        resp = await client.post("/v1/completions", json={"prompt": "x"},
                                 headers={"Via": ", ".join(["1.1 p"] * 9)})
        assert resp.status == 508
    finally:
        await client.close()
