"""Active health checks take dead nodes out and bring recovered ones back."""

from __future__ import annotations

from conftest import state_of, wait_for


async def test_health_eviction_and_recovery(backend, proxy):
    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    client = await proxy([p], [d1, d2], health_interval=0.05, health_failures=2)
    state = state_of(client)
    inst1 = state.registry.get("decode", d1.address)
    d1.healthy = False
    await wait_for(lambda: inst1.health.value == "unhealthy")
    before = len(d1.requests)
    for _ in range(6):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d1.requests) == before and len(d2.requests) == 6
    status = await (await client.get("/status")).json()
    assert {i["address"]: i["health"] for i in status["instances"]["decode"]} == {
        d1.address: "unhealthy", d2.address: "healthy"}

    d1.healthy = True
    await wait_for(lambda: inst1.health.value == "healthy")
    for _ in range(6):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d1.requests) == before + 3


async def test_single_failed_probe_below_threshold_keeps_node(backend, proxy):
    p, d = await backend("p"), await backend("d")
    client = await proxy([p], [d], health_interval=0)
    state = state_of(client)
    inst = state.registry.get("decode", d.address)
    state.registry.health_failures = 3
    for _ in range(2):
        state.registry.record_probe(inst, False)
    assert inst.health.value == "healthy"
    state.registry.record_probe(inst, False)
    assert inst.health.value == "unhealthy"


async def test_dead_backend_is_detected_by_probe(backend, proxy):
    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    client = await proxy([p], [d1, d2], health_interval=0.05, health_failures=1)
    inst = state_of(client).registry.get("decode", d1.address)
    await d1.stop()  # connection refused from now on
    await wait_for(lambda: inst.health.value == "unhealthy")
    for _ in range(4):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d2.requests) == 4


async def test_failed_request_marks_suspect_until_probe_passes(backend, proxy):
    p, d1, d2 = await backend("p"), await backend("d"), await backend("d")
    d1.status = 500
    client = await proxy([p], [d1, d2], suspect_cooldown=60, policy="round_robin")
    state = state_of(client)
    for _ in range(4):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    inst = state.registry.get("decode", d1.address)
    assert len(d1.requests) == 1 and inst.is_suspect(state.registry._clock())
    d1.status = 200
    await state.health.probe(inst)  # a passing probe clears the suspicion
    assert not inst.is_suspect(state.registry._clock())
    for _ in range(4):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    assert len(d1.requests) == 3
