"""Admin API: bearer token, add, remove."""

from __future__ import annotations

import asyncio

from conftest import state_of

TOKEN = "s3cret-token"


async def test_admin_disabled_without_token(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d])
    resp = await client.post("/admin/instances", json={"role": "decode",
                                                       "address": "127.0.0.1:1"},
                             headers={"Authorization": "Bearer anything"})
    assert resp.status == 403
    assert "--admin-token" in (await resp.json())["error"]["message"]
    assert len(state_of(client).registry.instances("decode")) == 1


async def test_admin_requires_bearer_token(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], admin_token=TOKEN)
    target = {"role": "decode", "address": "127.0.0.1:1"}
    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        for method in (client.post, client.delete):
            resp = await method("/admin/instances", json=target, headers=headers)
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["code"] == 401
    assert [i.address for i in state_of(client).registry.instances("decode")] == [d.address]
    # A token of non-UTF-8 bytes was a text/plain 500 (UnicodeEncodeError).
    body = b'{"role": "decode", "address": "127.0.0.1:1"}'
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /admin/instances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                 b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b'"code": 401' in answer or b'"code":401' in answer


async def test_admin_add_and_remove(backend, proxy):
    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    client = await proxy([p], [d1], admin_token=TOKEN, health_interval=30)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/admin/instances", headers=auth,
                             json={"role": "decode", "address": f"http://{d2.address}"})
    assert resp.status == 201
    body = await resp.json()
    assert body["added"] is True and body["instance"]["health"] == "healthy"
    await asyncio.sleep(0.2)  # a second, unawaited probe would show by now
    assert d2.health_probes == 1  # probed once, before being put in rotation
    for _ in range(6):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d1.requests) == 3 and len(d2.requests) == 3

    resp = await client.delete("/admin/instances", headers=auth,
                               json={"role": "decode", "address": d1.address})
    assert resp.status == 200
    for _ in range(3):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d1.requests) == 3 and len(d2.requests) == 6

    resp = await client.delete("/admin/instances", headers=auth,
                               json={"role": "decode", "address": d1.address})
    assert resp.status == 404
    for bad in ({"role": "router", "address": "a:1"}, {"role": "decode", "address": "nope"},
                {"role": "decode", "address": "h:99999"}):
        resp = await client.post("/admin/instances", headers=auth, json=bad)
        assert resp.status == 400, bad


async def test_admin_remove_while_the_first_probe_runs(backend, proxy):
    """The add answers once its probe ends, with the removed instance's
    health (never probed healthy); adding it again probes the new one."""
    from conftest import wait_for

    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    client = await proxy([p], [d1], admin_token=TOKEN, health_interval=30)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    target = {"role": "decode", "address": d2.address}
    d2.health_delay = 0.5
    add = asyncio.ensure_future(client.post("/admin/instances", headers=auth, json=target))
    await wait_for(lambda: d2.health_probes == 1)
    resp = await client.delete("/admin/instances", headers=auth, json=target)
    assert resp.status == 200
    resp = await add
    assert resp.status == 201
    assert (await resp.json())["instance"]["health"] == "unknown"
    assert [i.address for i in state_of(client).registry.instances("decode")] == [d1.address]

    d2.health_delay = 0.0
    resp = await client.post("/admin/instances", headers=auth, json=target)
    assert resp.status == 201
    assert (await resp.json())["instance"]["health"] == "healthy"
    assert d2.health_probes == 2


async def test_addresses_that_are_no_host_are_refused(backend, proxy):
    # parse_address took any host: "a\\b:80" then broke every URL of that
    # instance (ValueError): the admin add answered 500, the health loop died
    # for every instance, and requests routed to it got 500; with "u@host"
    # requests carrying Authorization did.
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], admin_token=TOKEN, health_interval=0.05)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for address in ("a\\b:80", f"u@{d.address}", "a?b:80"):
        resp = await client.post("/admin/instances", json={"role": "decode",
                                                           "address": address}, headers=auth)
        assert resp.status == 400, address
        assert "the host must be a hostname" in (await resp.json())["error"]["message"]
    assert [i.address for i in state_of(client).registry.instances("decode")] == [d.address]
    probes = d.health_probes
    await asyncio.sleep(0.3)
    assert d.health_probes > probes
    resp = await client.post("/v1/completions", json={"prompt": "x"}, headers=auth)
    assert resp.status == 200


async def test_a_probe_that_raises_does_not_end_the_health_loop(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], health_interval=0.05)
    state = state_of(client)
    real = state.clients.session

    def session(address):
        if address == p.address:
            raise ValueError("no URL for you")
        return real(address)
    state.clients.session = session
    probes = d.health_probes
    await asyncio.sleep(0.3)
    assert d.health_probes >= probes + 3
    assert state.registry.get("prefill", p.address).health.value == "unhealthy"
