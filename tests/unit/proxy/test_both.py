"""kv_both instances: one instance serving as P for one request and as D
for another, never both legs of one request while another can decode."""

from __future__ import annotations

import pytest

from conftest import free_port, registration_dealer, state_of, wait_for
from vllm_ascend_pd.announce import Announcement, encode_announcement
from vllm_ascend_pd.proxy.config import ConfigError, ProxyConfig, config_from_args


def legs(backend) -> list[str]:
    """'P' or 'D' for every generation request the fake backend served."""
    return ["P" if (r["body"].get("kv_transfer_params") or {}).get("do_remote_decode")
            else "D" for r in backend.requests]


async def test_two_both_instances_alternate_roles(backend, proxy):
    a, b = await backend("a"), await backend("b")
    client = await proxy(both=[a.address, b.address])
    for _ in range(4):
        resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert resp.status == 200
    # Round robin alternates the prefill leg; the decode leg always goes to
    # the other instance, with the params the prefilling one returned.
    assert legs(a) in (["P", "D", "P", "D"], ["D", "P", "D", "P"])
    assert legs(b) == ["D" if x == "P" else "P" for x in legs(a)]
    for dec, pre in ((a, b), (b, a)):
        for r in dec.requests:
            params = r["body"]["kv_transfer_params"]
            if not params.get("do_remote_decode"):
                assert params["remote_engine_id"] == f"engine-{pre.name}"
    # One instance per address, shared by both roles.
    status = await (await client.get("/status")).json()
    assert sorted(i["address"] for i in status["instances"]["both"]) == sorted(
        [a.address, b.address])
    assert status["instances"]["prefill"] == status["instances"]["decode"] == []
    assert {i["requests_total"] for i in status["instances"]["both"]} == {4}
    resp = await client.get("/health")
    assert await resp.json() == {"status": "ok", "prefill": 2, "decode": 2, "both": 2}


async def test_single_both_instance_serves_both_legs(backend, proxy):
    a = await backend("a")
    client = await proxy(both=[a.address])
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200
    assert legs(a) == ["P", "D"]


async def test_decode_falls_back_to_the_prefilling_instance(backend, proxy):
    a, b = await backend("a"), await backend("b")
    client = await proxy(both=[a.address, b.address], suspect_cooldown=0)
    pick = state_of(client).policies["prefill"]
    pick._next = 0  # prefill on the lower address
    first, other = sorted((a, b), key=lambda x: x.address)
    other.status = 500  # the only other decode candidate fails
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200
    assert legs(first) == ["P", "D"]
    assert len(other.requests) == 1  # its failed decode attempt


async def test_mixed_prefill_and_both(backend, proxy):
    p, a = await backend("p"), await backend("a")
    client = await proxy([p], both=[a.address])
    for _ in range(4):
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
    # P serves prefill only; A decodes everything and prefills when picked.
    assert set(legs(p)) == {"P"}
    assert legs(a).count("D") == 4
    assert len(p.requests) + legs(a).count("P") == 4


def test_config_both_flag():
    cfg = config_from_args(["--both", "127.0.0.1:1,127.0.0.1:2", "--both", "localhost:3"])
    assert cfg.validate().both == ["127.0.0.1:1", "127.0.0.1:2", "localhost:3"]
    assert cfg.prefill == cfg.decode == []
    with pytest.raises(ConfigError, match="--both and --prefill"):
        ProxyConfig(prefill=["127.0.0.1:1"], both=["127.0.0.1:1"]).validate()
    with pytest.raises(ConfigError, match="no decode instance"):
        ProxyConfig(prefill=["127.0.0.1:1"]).validate()
    ProxyConfig(prefill=["127.0.0.1:1"], both=["127.0.0.1:2"]).validate()


async def test_registered_both_instance_is_one_instance(backend, proxy):
    a = await backend("a")
    port = free_port()
    client = await proxy(register_port=port, heartbeat_ttl=5)
    with registration_dealer(port) as sock:
        sock.send(encode_announcement(Announcement(role="both", http_address=a.address)))
        reg = state_of(client).registry
        await wait_for(lambda: len(reg.instances("both")) == 1)
        (inst,) = reg.instances("both")
        assert reg.instances("prefill") == [inst] and reg.instances("decode") == [inst]
        assert reg.instances() == [inst]
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status == 200
        assert inst.requests_total == 2 and legs(a) == ["P", "D"]
        sock.send(encode_announcement(Announcement(role="both", http_address=a.address,
                                                   leaving=True)))
        await wait_for(lambda: reg.instances() == [])


async def test_admin_adds_both_instance(backend, proxy):
    p, a = await backend("p"), await backend("a")
    client = await proxy([p], [p], admin_token="t" * 16, health_interval=30)
    auth = {"Authorization": "Bearer " + "t" * 16}
    resp = await client.post("/admin/instances", headers=auth,
                             json={"role": "both", "address": a.address})
    assert resp.status == 201
    assert (await resp.json())["instance"]["role"] == "both"
    assert a.address in {i.address for i in state_of(client).registry.candidates("decode")}
