"""``--workers N``: the real supervisor and worker processes in front of fake
backends.  Each proxy runs in its own process group (testing.servers.
ProxyServer); only processes it started are signalled, by PID."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port, sse_events
from vllm_ascend_pd.announce import Announcement, Announcer
from vllm_ascend_pd.testing.proxy_status import worker_statuses
from vllm_ascend_pd.testing.servers import ProxyServer, ipv6_loopback

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _request(method: str, url: str, **kw):
    """One request on a connection of its own (so the kernel may hand it to
    any worker); returns (status, body bytes)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.request(method, url, **kw) as resp:
            return resp.status, await resp.read()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples with these labels (e.g. over status labels)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    assert seen, f"{name}{labels} not exported"
    return total


async def metrics(url: str) -> str:
    code, body = await _request("GET", url + "/metrics")
    assert code == 200
    return body.decode()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
async def multi(tmp_path):
    made: list[ProxyServer] = []

    async def start(*args: str, workers: int = 2, healthy: bool = True):
        px = ProxyServer(free_port(), tmp_path / f"proxy{len(made)}.log",
                         "--workers", str(workers), "--health-interval", "0", *args)
        made.append(px)
        await asyncio.to_thread(px.start, 60, healthy)
        px.workers = await worker_statuses(px.url, workers)  # every worker serves
        return px

    yield start
    for px in made:
        await asyncio.to_thread(px.stop)


def _log(px: ProxyServer) -> str:
    return Path(px.log).read_text()


async def until_both_workers_show(px: ProxyServer, view, want, tries: int = 100) -> dict[int, dict]:
    """Poll both workers' /status until ``view(status) == want`` on each
    (instance changes reach the workers asynchronously); assert it did, and
    return the statuses by pid."""
    for _ in range(tries):
        sts = await worker_statuses(px.url, 2)
        if all(view(st) == want for st in sts.values()):
            break
        await asyncio.sleep(0.05)
    assert [view(st) for st in sts.values()] == [want] * 2
    return sts


async def test_serves_on_every_worker_with_exact_bodies(backend, multi):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(6, usage=True)
    d.event_delay = 0.01
    px = await multi("--prefill", p.address, "--decode", d.address)
    assert sorted(st["worker"]["index"] for st in px.workers.values()) == [0, 1]
    assert {st["worker"]["count"] for st in px.workers.values()} == {2}
    assert sum(st["max_inflight"] for st in px.workers.values()) == 4096
    url = px.url + "/v1/completions"
    streams = [_request("POST", url, json={"prompt": f"s{i}", "stream": True})
               for i in range(8)]
    plain = [_request("POST", url, json={"prompt": f"n{i}", "model": "tiny"})
             for i in range(8)]
    results = await asyncio.gather(*streams, *plain)
    for code, body in results[:8]:
        assert code == 200 and body == b"".join(d.events)
    for code, body in results[8:]:
        assert code == 200
        assert json.loads(body) == d.nonstream_answer({"model": "tiny"})
    assert len(d.requests) == 16 and len(p.requests) == 16
    # Both workers together served exactly those, and any worker's /metrics
    # counts all of them.
    per_worker = {pid: st["instances"]["decode"][0]["requests_total"]
                  for pid, st in (await worker_statuses(px.url, 2)).items()}
    assert sum(per_worker.values()) == 16, per_worker
    for _ in range(4):
        text = await metrics(px.url)
        assert metric(text, "vllm_pd_proxy_requests_total", endpoint="completions") == 16
        assert metric(text, "vllm_pd_proxy_inflight_requests") == 0
        assert metric(text, "vllm_pd_proxy_instance_inflight_requests", role="decode") == 0
        assert metric(text, "vllm_pd_proxy_instance_healthy", role="decode",
                      address=d.address) == 1


async def test_inflight_gauges_sum_over_workers(backend, multi):
    p, d = await backend("p"), await backend("d")
    d.stall_after = 1  # streams stay open until the client leaves
    px = await multi("--prefill", p.address, "--decode", d.address)
    url = px.url + "/v1/completions"
    sessions, streams = [], []
    try:
        # Open streams until both workers hold at least one.
        for _ in range(40):
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            sessions.append(s)
            resp = await s.post(url, json={"prompt": "x", "stream": True})
            await resp.content.readuntil(b"\n\n")
            streams.append(resp)
            per_worker = [st["inflight"] for st in (await worker_statuses(px.url, 2)).values()]
            if len(streams) >= 3 and min(per_worker) >= 1:
                break
        assert min(per_worker) >= 1 and sum(per_worker) == len(streams), per_worker
        text = await metrics(px.url)
        assert metric(text, "vllm_pd_proxy_inflight_requests") == len(streams)
        assert metric(text, "vllm_pd_proxy_instance_inflight_requests", role="decode",
                      address=d.address) == len(streams)
        # /status is the answering worker's view, plus every worker's load.
        for st in (await worker_statuses(px.url, 2)).values():
            assert st["inflight"] < len(streams)
            assert st["all_workers"] == {"inflight": len(streams), "instances": [
                {"role": "decode", "address": d.address, "healthy": True,
                 "inflight_requests": len(streams)},
                {"role": "prefill", "address": p.address, "healthy": True,
                 "inflight_requests": 0}]}
    finally:
        for resp in streams:
            resp.close()
        for s in sessions:
            await s.close()

    async def drained():
        text = await metrics(px.url)
        return metric(text, "vllm_pd_proxy_instance_inflight_requests", role="decode") == 0

    for _ in range(100):
        if await drained():
            break
        await asyncio.sleep(0.05)
    assert await drained()
    assert metric(await metrics(px.url), "vllm_pd_proxy_inflight_requests") == 0


async def _session_on_worker(url: str, index: int) -> aiohttp.ClientSession:
    """A session whose one keep-alive connection the kernel gave worker ``index``.

    The workers share one accept queue: on a loaded host the worker that is
    awake takes every connection for a while, so keep trying for seconds."""
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with s.get(url + "/status") as resp:
            if (await resp.json())["worker"]["index"] == index:
                return s
        await s.close()
        await asyncio.sleep(0.005)
    raise AssertionError(f"no connection reached worker {index} in 20 s")


async def test_least_requests_weighs_every_workers_streams(backend, multi):
    """Streams opened one after another, alternately through each worker:
    every new one goes to the decode instance with fewer streams over both
    workers. Balancing each worker's own streams, worker 1 sent each of its
    odd streams at random (half the time beside worker 0's odd one)."""
    p = await backend("p")
    ds = [await backend("d1"), await backend("d2")]
    for d in ds:
        d.stall_after = 1  # streams stay open until the client leaves
    px = await multi("--policy", "least_requests", "--prefill", p.address,
                     "--decode", ds[0].address, "--decode", ds[1].address)
    sessions, streams, history = [], [], []
    try:
        for n in range(20):
            s = await _session_on_worker(px.url, n % 2)
            sessions.append(s)
            resp = await s.post(px.url + "/v1/completions",
                                json={"prompt": "x", "stream": True})
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            streams.append(resp)
            loads = [len(d.requests) for d in ds]
            history.append(loads)
            assert abs(loads[0] - loads[1]) <= 1, history
        per_worker = {st["worker"]["index"]: st["inflight"]
                      for st in (await worker_statuses(px.url, 2)).values()}
        assert per_worker == {0: 10, 1: 10}
    finally:
        for resp in streams:
            resp.close()
        for s in sessions:
            await s.close()


async def test_admin_change_reaches_every_worker(backend, multi):
    p, d, d2 = await backend("p"), await backend("d"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address, "--admin-token", TOKEN)
    code, body = await _request("POST", px.url + "/admin/instances", headers=AUTH,
                                json={"role": "decode", "address": d2.address})
    assert code == 201 and json.loads(body)["added"] is True

    def decodes(st):
        return sorted((i["address"], i["source"]) for i in st["instances"]["decode"])

    await until_both_workers_show(px, decodes, sorted([(d.address, "static"), (d2.address, "admin")]),
                                  tries=50)
    code, body = await _request("DELETE", px.url + "/admin/instances", headers=AUTH,
                                json={"role": "decode", "address": d.address})
    assert code == 200 and json.loads(body) == {"removed": True, "inflight_requests": 0}
    code, body = await _request("DELETE", px.url + "/admin/instances", headers=AUTH,
                                json={"role": "decode", "address": d.address})
    assert code == 404
    await until_both_workers_show(px, decodes, [(d2.address, "admin")], tries=50)
    for _ in range(6):
        code, _ = await _request("POST", px.url + "/v1/completions", json={"prompt": "x"})
        assert code == 200
    assert len(d.requests) == 0 and len(d2.requests) == 6


async def test_admin_add_through_a_worker_probes_the_instance_once(backend, multi):
    """The answering worker learns the new instance from the supervisor's reply
    (or broadcast) and answers once its one probe is done; the other worker
    probes it once as it learns it: one probe per worker, none twice."""
    p, d, d2 = await backend("p"), await backend("d"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address, "--admin-token", TOKEN,
                     "--health-interval", "60")
    d2.health_delay = 0.3  # an answer not waiting for the probe would say "unknown"
    code, body = await _request("POST", px.url + "/admin/instances", headers=AUTH,
                                json={"role": "decode", "address": d2.address})
    assert code == 201
    body = json.loads(body)
    assert body["added"] is True
    assert {k: body["instance"][k] for k in ("role", "address", "source", "health")} == {
        "role": "decode", "address": d2.address, "source": "admin", "health": "healthy"}

    def health(st):
        return [i["health"] for i in st["instances"]["decode"] if i["address"] == d2.address]

    await until_both_workers_show(px, health, ["healthy"])
    await asyncio.sleep(1.0)  # a second, unawaited probe would show by now
    assert d2.health_probes == 2


async def test_announcer_registration_reaches_every_worker(backend, multi, monkeypatch):
    """Signed with the deployment's secret; a stranger's unsigned announcement
    reaches no worker."""
    secret = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("TEST_PD_SECRET", secret)  # inherited by the proxy process
    p, d, rogue = await backend("p"), await backend("d"), await backend("rogue")
    rport = free_port()
    px = await multi("--prefill", p.address, "--register-port", str(rport),
                     "--heartbeat-ttl", "2", "--kv-secret-env", "TEST_PD_SECRET",
                     healthy=False)
    ann = Announcer(f"127.0.0.1:{rport}", Announcement(role="decode", http_address=d.address,
                                                       engine_id="ed"), interval=0.1,
                    secret=secret)
    stranger = Announcer(f"127.0.0.1:{rport}", Announcement(role="decode",
                                                            http_address=rogue.address),
                         interval=0.1)
    ann.start()
    stranger.start()
    try:
        sts = await until_both_workers_show(
            px, lambda st: [i["address"] for i in st["instances"]["decode"]], [d.address])
        for st in sts.values():
            [inst] = st["instances"]["decode"]
            assert inst["source"] == "registered" and inst["meta"]["engine_id"] == "ed"
            assert st["registration"] == f"tcp://127.0.0.1:{rport}"
        for _ in range(4):
            code, _ = await _request("POST", px.url + "/v1/completions", json={"prompt": "x"})
            assert code == 200
        assert len(d.requests) == 4 and not rogue.requests
        # The stranger's frames race the signed ones; under load its first
        # refusal can be logged after the workers already serve.
        for _ in range(100):
            if "refusing announcement of decode instance" in _log(px):
                break
            await asyncio.sleep(0.05)
        assert "refusing announcement of decode instance" in _log(px)
    finally:
        stranger.stop()
        ann.stop()
    # The "leaving" message removes it everywhere.
    await until_both_workers_show(px, lambda st: st["instances"]["decode"], [])


async def test_killed_worker_is_restarted(backend, multi):
    p, d = await backend("p"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address)
    for _ in range(5):
        code, _ = await _request("POST", px.url + "/v1/completions", json={"prompt": "x"})
        assert code == 200
    text = await metrics(px.url)
    assert metric(text, "vllm_pd_proxy_requests_total", endpoint="completions") == 5
    victim = next(pid for pid, st in px.workers.items() if st["worker"]["index"] == 1)
    os.kill(victim, signal.SIGKILL)  # a worker of the proxy this test started
    # The other worker serves meanwhile: the socket stays open in the supervisor.
    for _ in range(10):
        code, body = await _request("POST", px.url + "/v1/completions",
                                    json={"prompt": "x", "stream": True})
        assert code == 200 and body == b"".join(d.events)
    for _ in range(200):
        sts = await worker_statuses(px.url, 2)
        if victim not in sts and sorted(st["worker"]["index"] for st in sts.values()) == [0, 1]:
            break
        await asyncio.sleep(0.05)
    assert victim not in sts and sorted(st["worker"]["index"] for st in sts.values()) == [0, 1]
    assert not alive(victim)
    text = await metrics(px.url)
    assert metric(text, "vllm_pd_proxy_requests_total", endpoint="completions") == 15
    assert f"worker 1 (pid {victim}) exited unexpectedly (signal SIGKILL); restarting" \
        in _log(px)
    for _ in range(5):
        code, _ = await _request("POST", px.url + "/v1/completions", json={"prompt": "x"})
        assert code == 200
    # The dead worker's requests still count.
    text = await metrics(px.url)
    assert metric(text, "vllm_pd_proxy_requests_total", endpoint="completions") == 20
    assert metric(text, "vllm_pd_proxy_inflight_requests") == 0


@pytest.mark.parametrize("target", ["supervisor", "process group"])
async def test_sigterm_drains_streams_and_exits_clean(backend, multi, target):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(20)
    d.event_delay = 0.05
    px = await multi("--prefill", p.address, "--decode", d.address, "--drain-timeout", "10")
    pids = list(px.workers)
    tmp = re.search(r"supervisor state \(.*\) in (\S+)", _log(px)).group(1)
    assert os.path.isdir(tmp)
    async with aiohttp.ClientSession() as sess:
        async with sess.post(px.url + "/v1/completions",
                             json={"prompt": "x", "stream": True}) as resp:
            first = await resp.content.readuntil(b"\n\n")
            if target == "supervisor":
                px.proc.send_signal(signal.SIGTERM)
            else:
                px.signal(signal.SIGTERM)
            rest = await resp.read()
    assert first + rest == b"".join(d.events)
    rc = await asyncio.to_thread(px.wait, 20)
    assert rc == 0, _log(px)
    assert [pid for pid in pids if alive(pid)] == []
    assert not os.path.exists(tmp)
    assert d.completed == 1 and d.cancelled == 0
    assert "draining 1 in-flight requests" in _log(px)


def _run_to_exit(host: str, port: int, **env: str) -> subprocess.CompletedProcess:
    """A 2-worker proxy expected to exit at start-up (its port is taken)."""
    return subprocess.run(
        [sys.executable, "-m", "vllm_ascend_pd.proxy", "--workers", "2", "--host", host,
         "--port", str(port), "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"],
        env=dict(os.environ, VLLM_ASCEND_PD_PLAIN_LOGGING="1", **env), capture_output=True,
        text=True, timeout=60, start_new_session=True)


def test_port_clash_names_the_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run_to_exit("127.0.0.1", port)
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "choose another --port" in out.stderr
    assert "worker 0 started" not in out.stderr


# The second address "localhost" resolves to in these tests: ::1 where the
# machine has an IPv6 loopback, else another IPv4 loopback address (the
# multi-address path is the same).
SECOND = "::1" if ipv6_loopback() else "127.0.0.2"
# Like a dual-stack /etc/hosts, which this machine may not have: localhost is
# 127.0.0.1 and SECOND, with 127.0.0.1 listed twice.
FAKE_RESOLVER = f"""
import socket
_real = socket.getaddrinfo
def _fake(host, port, *args, **kw):
    if host == "localhost":
        return [a for h in ("127.0.0.1", {SECOND!r}, "127.0.0.1")
                for a in _real(h, port, *args, **kw)]
    return _real(host, port, *args, **kw)
"""


def _fake_resolver_env(tmp_path: Path) -> dict[str, str]:
    """Env for a proxy process that resolves localhost as above (sitecustomize
    runs before the proxy, in the supervisor and in its workers)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAKE_RESOLVER + "socket.getaddrinfo = _fake\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                        os.environ.get("PYTHONPATH")]))}


def _free_port_on(*hosts: str) -> int:
    """A port free on 127.0.0.1 and on each of ``hosts``."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on 127.0.0.1 and {hosts}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def test_workers_serve_every_address_of_the_host(backend, tmp_path):
    """``--host localhost`` with N workers listens where one process would:
    on every address localhost resolves to, each served by every worker."""
    p, d = await backend("p"), await backend("d")
    port = _free_port_on(SECOND)
    px = ProxyServer(port, tmp_path / "proxy.log", "--workers", "2", "--host", "localhost",
                     "--health-interval", "0", "--prefill", p.address, "--decode", d.address,
                     env=_fake_resolver_env(tmp_path))
    try:
        await asyncio.to_thread(px.start, 60, True)
        for host in ("127.0.0.1", SECOND):
            url = _url(host, port)
            assert len(await worker_statuses(url, 2)) == 2  # both workers accept here
            code, body = await _request("POST", url + "/v1/completions",
                                        json={"prompt": "x", "stream": True})
            assert code == 200 and body == b"".join(d.events)
        assert len(d.requests) == 2
        assert (f"proxy listening on http://127.0.0.1:{port}, "
                f"{_url(SECOND, port)} with 2 workers") in _log(px)
    finally:
        await asyncio.to_thread(px.stop)


def test_port_clash_on_a_later_address_names_the_flag(tmp_path):
    port = _free_port_on(SECOND)
    with socket.socket(socket.AF_INET6 if ":" in SECOND else socket.AF_INET) as taken:
        taken.bind((SECOND, port))
        taken.listen()
        out = _run_to_exit("localhost", port, **_fake_resolver_env(tmp_path))
    assert out.returncode == 1, out.stderr
    where = _url(SECOND, port).removeprefix("http://")
    assert (f"cannot listen on {where} (--host 'localhost'): Address already in use; "
            "choose another --port") in out.stderr
    assert "worker 0 started" not in out.stderr


def test_bind_listeners_closes_what_it_bound_when_one_address_fails(monkeypatch):
    from vllm_ascend_pd.proxy import supervisor

    scope: dict = {}
    exec(FAKE_RESOLVER, scope)
    monkeypatch.setattr(socket, "getaddrinfo", scope["_fake"])
    port = _free_port_on(SECOND)
    socks = supervisor.bind_listeners("localhost", port)  # the duplicate is bound once
    try:
        assert [s.getsockname()[:2] for s in socks] == [("127.0.0.1", port), (SECOND, port)]
    finally:
        for s in socks:
            s.close()
    with socket.socket(socket.AF_INET6 if ":" in SECOND else socket.AF_INET) as taken:
        taken.bind((SECOND, port))
        taken.listen()
        with pytest.raises(supervisor.ListenError, match="Address already in use"):
            supervisor.bind_listeners("localhost", port)
    with socket.socket() as again:  # fails if 127.0.0.1's listener were still open
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "3", "--max-inflight", "2"], "--max-inflight (2) is split"),
])
def test_workers_flag_validated(capsys, args, message):
    from vllm_ascend_pd.proxy.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--prefill", "a:1", "--decode", "b:2", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


async def test_crash_loop_stops_the_proxy(backend, multi):
    """Workers that keep dying stop everything with a non-zero status."""
    p, d = await backend("p"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address)
    killed: set[int] = set()
    while len(killed) < 5:  # CRASH_LIMIT
        assert px.proc.poll() is None, _log(px)
        sts = await worker_statuses(px.url, 1, timeout=10)
        for pid in sorted(set(sts) - killed)[:5 - len(killed)]:
            os.kill(pid, signal.SIGKILL)  # a worker of the proxy this test started
            killed.add(pid)
    rc = await asyncio.to_thread(px.wait, 30)
    assert rc == 1, _log(px)
    assert "workers died 5 times within 30s: stopping the proxy" in _log(px)
    assert [pid for pid in killed if alive(pid)] == []


async def test_workers_leave_when_the_supervisor_is_killed(backend, multi):
    p, d = await backend("p"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address)
    pids = list(px.workers)
    px.proc.send_signal(signal.SIGKILL)  # the supervisor this test started
    await asyncio.to_thread(px.wait, 10)
    for _ in range(100):
        if not any(alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []


async def test_restarted_worker_probes_members_before_serving(backend, multi):
    """A worker that replaces a dead one routes to admin-added instances from
    its first request, even when their health checks are slow."""
    p, d, d2 = await backend("p"), await backend("d"), await backend("d")
    px = await multi("--prefill", p.address, "--decode", d.address, "--admin-token", TOKEN,
                     "--health-interval", "60")
    code, _ = await _request("POST", px.url + "/admin/instances", headers=AUTH,
                             json={"role": "decode", "address": d2.address})
    assert code == 201
    code, _ = await _request("DELETE", px.url + "/admin/instances", headers=AUTH,
                             json={"role": "decode", "address": d.address})
    assert code == 200

    def decodes(st):
        return [(i["address"], i["health"]) for i in st["instances"]["decode"]]

    sts = await until_both_workers_show(px, decodes, [(d2.address, "healthy")])
    d2.health_delay = 1.0
    probes = d2.health_probes
    victim = next(pid for pid, st in sts.items() if st["worker"]["index"] == 1)
    os.kill(victim, signal.SIGKILL)  # a worker of the proxy this test started
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        code, body = await _request("GET", px.url + "/status")
        st = json.loads(body)
        if st["worker"]["index"] == 1 and st["worker"]["pid"] != victim:
            break  # the new worker's first answer
        assert loop.time() < deadline, "worker 1 was not restarted"
    assert decodes(st) == [(d2.address, "healthy")]
    await asyncio.sleep(1.5)  # a second, unawaited probe would show by now
    assert d2.health_probes == probes + 1  # one round at start, not one per path
