"""Multi-worker membership: snapshots, their application in a worker, admin
changes forwarded to the supervisor's hub (in one process here; the real
processes are in test_workers.py)."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import free_port, state_of, wait_for
from vllm_ascend_pd.announce import Announcement, Announcer
from vllm_ascend_pd.proxy import membership
from vllm_ascend_pd.proxy.app import create_app
from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.hub import MembershipHub
from vllm_ascend_pd.proxy.link import SupervisorLink
from vllm_ascend_pd.proxy.membership import (Authority, ControlReply, ControlRequest, Member,
                                             Snapshot, apply_snapshot, snapshot_of)
from vllm_ascend_pd.proxy.registry import Health, Registry, Source
from vllm_ascend_pd.proxy.supervisor import CrashGuard
from vllm_ascend_pd.proxy.worker import WorkerContext

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _members(registry):
    return sorted((i.role, i.address, i.source.value) for i in registry.instances())


def test_apply_snapshot_adds_removes_and_keeps_state():
    reg = Registry(health_checks=True)
    kept, _ = reg.add("decode", "d:1", Source.STATIC)
    gone, _ = reg.add("prefill", "p:1", Source.STATIC)
    reg.acquire(kept, 7)
    reg.mark_failure(kept)
    snap = Snapshot(seq=3, members=[
        Member("decode", "d:1", "static"),
        Member("decode", "d:2", "registered", meta={"engine_id": "e2"}, heartbeat_age=1.5),
        Member("both", "b:1", "admin")])
    added, removed = apply_snapshot(reg, snap, now=100.0)
    assert sorted(i.address for i in added) == ["b:1", "d:2"]
    assert removed == [gone] and gone.removed
    assert _members(reg) == [("both", "b:1", "admin"), ("decode", "d:1", "static"),
                             ("decode", "d:2", "registered")]
    # The survivor kept its load and failure record; the new ones wait for a probe.
    assert kept.inflight_requests == 1 and kept.inflight_tokens == 7
    assert kept.failures_total == 1
    new = reg.get("decode", "d:2")
    assert new.health is Health.UNKNOWN and new.meta == {"engine_id": "e2"}
    assert new.last_heartbeat == 98.5 and new.ttl is None
    # Applying it again changes nothing.
    assert apply_snapshot(reg, snap, now=100.0) == ([], [])
    # Source and metadata follow the supervisor (an operator pinned d:2).
    apply_snapshot(reg, Snapshot(seq=4, members=[
        Member("decode", "d:1", "static"), Member("decode", "d:2", "admin")]))
    assert _members(reg) == [("decode", "d:1", "static"), ("decode", "d:2", "admin")]
    assert reg.get("decode", "d:2").meta == {}


def test_snapshot_round_trip():
    reg = Registry()
    reg.add("prefill", "p:1", Source.REGISTERED, meta={"engine_id": "e"}, ttl=3.0)
    reg.add("decode", "d:1", Source.STATIC)
    snap = snapshot_of(reg, seq=9)
    again = membership.decode_snapshot(membership.encode(snap))
    assert again == snap and again.seq == 9
    other = Registry()
    apply_snapshot(other, again)
    assert _members(other) == _members(reg)


def test_authority_add_remove_and_sequence():
    auth = Authority(Registry(health_checks=False))
    seq = auth.seq
    reply = auth.handle(ControlRequest(req_id=1, op="add", role="decode", address="d:1"))
    assert reply.req_id == 1 and reply.changed and reply.snapshot.seq == seq + 1
    assert [(m.address, m.source) for m in reply.snapshot.members] == [("d:1", "admin")]
    reply = auth.handle(ControlRequest(req_id=2, op="add", role="decode", address="d:1"))
    assert not reply.changed and reply.snapshot.seq == seq + 1  # nothing changed
    reply = auth.handle(ControlRequest(req_id=3, op="remove", role="prefill", address="d:1"))
    assert not reply.changed and reply.snapshot.seq == seq + 1
    reply = auth.handle(ControlRequest(req_id=4, op="remove", role="decode", address="d:1"))
    assert reply.changed and reply.snapshot.members == [] and reply.snapshot.seq == seq + 2
    # Pinning a registered instance is a change (it no longer expires).
    auth.registry.add("prefill", "p:1", Source.REGISTERED, ttl=1.0)
    reply = auth.handle(ControlRequest(req_id=5, op="add", role="prefill", address="p:1"))
    assert not reply.changed and reply.snapshot.seq == seq + 3
    assert reply.snapshot.members[0].source == "admin"


async def test_link_ignores_older_snapshots():
    reg = Registry(health_checks=False)
    seen = []
    link = SupervisorLink(reg, control="ipc://unused", updates="ipc://unused",
                          on_added=lambda i: seen.append(("+", i.address)),
                          on_removed=lambda i: seen.append(("-", i.address)))
    assert link.apply(Snapshot(seq=5, members=[Member("decode", "d:1", "admin")]))
    assert not link.apply(Snapshot(seq=4, members=[]))  # late reply of an older change
    assert [i.address for i in reg.instances()] == ["d:1"]
    assert link.apply(Snapshot(seq=5, members=[Member("decode", "d:1", "admin")]))
    assert link.apply(Snapshot(seq=6, members=[]))
    assert seen == [("+", "d:1"), ("-", "d:1")] and reg.instances() == []


async def test_link_skips_malformed_replies_and_snapshots(tmp_path):
    """A bad message from the supervisor is logged and skipped; the link keeps
    answering requests and applying snapshots."""
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/c")
    pub.bind(f"ipc://{tmp_path}/u")
    reg = Registry(health_checks=False)
    link = SupervisorLink(reg, control=f"ipc://{tmp_path}/c", updates=f"ipc://{tmp_path}/u",
                          on_added=lambda i: None, on_removed=lambda i: None, timeout=5)

    async def answer(seq: int, members: list[Member]) -> None:
        ident, data = await asyncio.wait_for(router.recv_multipart(), 5)
        req = membership.decode_request(data)
        await router.send_multipart([ident, b"\x00garbage"])
        await router.send_multipart([ident, membership.encode(ControlReply(
            req_id=req.req_id, snapshot=Snapshot(seq=seq, members=members)))])

    try:
        await asyncio.gather(link.start(), answer(1, [Member("decode", "d:1", "static")]))
        assert link.seq == 1 and [i.address for i in reg.instances()] == ["d:1"]
        snap = Snapshot(seq=2, members=[Member("decode", "d:2", "admin")])

        async def broadcast():
            # PUB drops what it sends before the subscription arrived: repeat.
            while True:
                await pub.send(b"\x00garbage")
                await pub.send(membership.encode(snap))
                await asyncio.sleep(0.02)

        sender = asyncio.get_running_loop().create_task(broadcast())
        try:
            await wait_for(lambda: link.seq == 2)
        finally:
            sender.cancel()
        assert [i.address for i in reg.instances()] == ["d:2"]
        reply, _ = await asyncio.gather(link.request("snapshot"), answer(3, []))
        assert reply.snapshot.seq == 3
    finally:
        await link.stop()
        router.close()
        pub.close()
        ctx.term()


def test_crash_guard_window():
    guard = CrashGuard(limit=3, window=10.0)
    assert not guard.record(0.0) and not guard.record(5.0)
    assert not guard.record(10.5)  # the first one left the window
    assert guard.record(11.0)


def test_inflight_share_adds_up():
    cfg = ProxyConfig(prefill=["a:1"], decode=["b:2"], max_inflight=10, workers=3)
    assert [cfg.inflight_share(i) for i in range(3)] == [4, 3, 3]
    with pytest.raises(Exception, match="--max-inflight .2. is split"):
        cfg.replace(max_inflight=2).validate()
    with pytest.raises(Exception, match="--workers must be >= 1"):
        cfg.replace(workers=0).validate()


@pytest.fixture
async def hub_and_workers(tmp_path, backend):
    """A hub and two worker apps in this process, talking over ipc://."""
    made: dict = {"clients": [], "hub": None}

    async def make(cfg: ProxyConfig, n: int = 2):
        hub = MembershipHub(cfg, control=f"ipc://{tmp_path}/c", updates=f"ipc://{tmp_path}/u",
                            publish_interval=0.2)
        hub.start()
        made["hub"] = hub
        os.makedirs(tmp_path / "m", exist_ok=True)
        clients = []
        for index in range(n):
            ctx = WorkerContext(index=index, count=n, parent_pid=os.getpid(),
                                control=hub.control, updates=hub.updates,
                                metrics_dir=str(tmp_path / "m"),
                                registration=(hub.registration.endpoint
                                              if hub.registration else None))
            client = TestClient(TestServer(create_app(cfg, worker=ctx), host="127.0.0.1"))
            await client.start_server()
            made["clients"].append(client)
            clients.append(client)
        return hub, clients

    yield make
    for c in made["clients"]:
        await c.close()
    if made["hub"] is not None:
        await made["hub"].stop()


def _addresses(client, role="decode"):
    return sorted(i.address for i in state_of(client).registry.instances(role))


async def test_admin_forwarded_to_supervisor(backend, hub_and_workers):
    p, d, d2 = await backend("p"), await backend("d"), await backend("d")
    cfg = ProxyConfig(prefill=[p.address], decode=[d.address], admin_token=TOKEN,
                      health_interval=30, workers=2, max_inflight=5)
    hub, (w0, w1) = await hub_and_workers(cfg)
    assert state_of(w0).max_inflight == 3 and state_of(w1).max_inflight == 2
    target = {"role": "decode", "address": f"http://{d2.address}"}
    resp = await w0.post("/admin/instances", json=target, headers=AUTH)
    assert resp.status == 201
    body = await resp.json()
    # Answered after the change reached this worker, probed like in one process.
    assert body["added"] is True and body["instance"]["health"] == "healthy"
    assert body["instance"]["source"] == "admin"
    assert _addresses(w0) == sorted([d.address, d2.address])
    assert hub.authority.registry.get("decode", d2.address).source is Source.ADMIN
    await wait_for(lambda: _addresses(w1) == sorted([d.address, d2.address]))
    resp = await w1.post("/admin/instances", json=target, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["added"] is False

    # Remove through the other worker, also a static instance.
    resp = await w1.delete("/admin/instances", json={"role": "decode", "address": d.address},
                           headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"removed": True, "inflight_requests": 0}
    assert _addresses(w1) == [d2.address]
    await wait_for(lambda: _addresses(w0) == [d2.address])
    resp = await w0.delete("/admin/instances", json={"role": "decode", "address": d.address},
                           headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == f"no decode instance {d.address}"
    # Auth and validation stay in the worker, with the same answers.
    resp = await w0.post("/admin/instances", json=target, headers={})
    assert resp.status == 401
    resp = await w0.post("/admin/instances", json={"role": "router", "address": "a:1"},
                         headers=AUTH)
    assert resp.status == 400
    # Requests route over the synced membership.
    resp = await w0.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 200 and len(d2.requests) == 1 and len(d.requests) == 0
    status = await (await w1.get("/status")).json()
    assert status["worker"] == {"index": 1, "pid": os.getpid(), "count": 2}
    assert status["max_inflight"] == 2

    # Supervisor gone: a clear 503, the worker keeps serving.
    await hub.stop()
    state_of(w0).link.timeout = 0.3
    resp = await w0.post("/admin/instances", json={"role": "decode", "address": d.address},
                         headers=AUTH)
    assert resp.status == 503
    assert "supervisor did not answer" in (await resp.json())["error"]["message"]
    assert (await w0.post("/v1/completions", json={"prompt": "x"})).status == 200


async def test_registration_reaches_every_worker(backend, hub_and_workers):
    p, d = await backend("p"), await backend("d")
    port = free_port()
    cfg = ProxyConfig(prefill=[p.address], register_port=port, heartbeat_ttl=0.5,
                      health_interval=0, workers=2)
    hub, (w0, w1) = await hub_and_workers(cfg)
    ann = Announcer(f"127.0.0.1:{port}", Announcement(role="decode", http_address=d.address,
                                                      engine_id="ed"), interval=0.05)
    ann.start()
    try:
        await wait_for(lambda: _addresses(w0) == [d.address] == _addresses(w1))
        for w in (w0, w1):
            status = await (await w.get("/status")).json()
            [inst] = status["instances"]["decode"]
            assert inst["source"] == "registered" and inst["meta"]["engine_id"] == "ed"
            assert status["registration"] == f"tcp://127.0.0.1:{port}"
            assert (await w.post("/v1/completions", json={"prompt": "x"})).status == 200
        assert len(d.requests) == 2
    finally:
        ann.stop()
    # "leaving" reaches the supervisor, which tells every worker.
    await wait_for(lambda: _addresses(w0) == [] == _addresses(w1))


async def test_late_worker_catches_up(backend, hub_and_workers):
    """A worker started after a change gets it before serving (snapshot query)."""
    p, d = await backend("p"), await backend("d")
    cfg = ProxyConfig(prefill=[p.address], decode=[d.address], admin_token=TOKEN,
                      health_interval=0, workers=2)
    hub, (w0,) = await hub_and_workers(cfg, n=1)
    resp = await w0.delete("/admin/instances", json={"role": "decode", "address": d.address},
                           headers=AUTH)
    assert resp.status == 200
    ctx = WorkerContext(index=1, count=2, parent_pid=os.getpid(), control=hub.control,
                        updates=hub.updates, metrics_dir=state_of(w0).worker.metrics_dir)
    app = create_app(cfg, worker=ctx)
    late = TestClient(TestServer(app, host="127.0.0.1"))
    await late.start_server()
    try:
        # Static d came from the config, and is gone right at start.
        assert _addresses(late) == []
        assert (await late.post("/v1/completions", json={"prompt": "x"})).status == 503
    finally:
        await late.close()
    await asyncio.sleep(0)


async def test_hub_survives_bad_control_requests(tmp_path):
    import zmq
    import zmq.asyncio

    cfg = ProxyConfig(prefill=["127.0.0.1:1"], decode=["127.0.0.1:2"], workers=2)
    hub = MembershipHub(cfg, control=f"ipc://{tmp_path}/c", updates=f"ipc://{tmp_path}/u")
    hub.start()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(hub.control)
    try:
        await sock.send(b"\x00garbage")
        await sock.send(membership.encode(ControlRequest(req_id=1, op="add", role="router",
                                                         address="a:1")))
        await sock.send(membership.encode(ControlRequest(req_id=2, op="add", role="decode",
                                                         address="127.0.0.1:3")))
        reply = membership.decode_reply(await asyncio.wait_for(sock.recv(), 5))
        assert reply.req_id == 2 and reply.changed  # the bad ones got no answer
        assert sorted(m.address for m in reply.snapshot.members) == [
            "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    finally:
        sock.close()
        ctx.term()
        await hub.stop()


def test_worker_metrics_skip_a_file_still_being_created(tmp_path):
    """A starting worker's metric file exists empty for a moment; /metrics
    and /status of the other workers must not fail on it."""
    from vllm_ascend_pd.proxy.metrics import ProxyMetrics

    metrics = ProxyMetrics(lambda: [], multiprocess_dir=str(tmp_path))
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    body, _ = metrics.exposition()
    assert body == b""  # no worker has written a sample yet
    assert metrics.all_workers() == {"inflight": 0, "instances": []}
