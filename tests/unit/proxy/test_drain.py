"""Graceful shutdown: stop accepting, drain in-flight requests, then exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from conftest import free_port, sse_events
from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.server import ProxyServer


def _cfg(p, d, **kw):
    return ProxyConfig(prefill=[p.address], decode=[d.address], port=0,
                       health_interval=0, **kw)


async def test_shutdown_drains_inflight_stream(backend, release):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(10)
    d.event_delay = 0.05
    server = ProxyServer(_cfg(p, d, drain_timeout=10), release_transfer=release)
    await server.start()
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as sess:
        async with sess.post(url, json={"prompt": "x", "stream": True}) as resp:
            first = await resp.content.readuntil(b"\n\n")
            shutdown = asyncio.create_task(server.shutdown())
            await asyncio.sleep(0.05)
            # No new connections once draining ...
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as other:
                    await other.post(url, json={"prompt": "x"})
            assert not shutdown.done()
            # ... while the in-flight stream runs to its end.
            rest = await resp.read()
        assert first + rest == b"".join(d.events)
    await asyncio.wait_for(shutdown, 5)
    assert d.completed == 1 and d.cancelled == 0


async def test_drain_timeout_bounds_shutdown(backend, release):
    p, d = await backend("p"), await backend("d")
    d.stall_after = 1  # never finishes
    server = ProxyServer(_cfg(p, d, drain_timeout=0.3), release_transfer=release)
    await server.start()
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as sess:
        async with sess.post(url, json={"prompt": "x", "stream": True}) as resp:
            await resp.content.readuntil(b"\n\n")
            t0 = time.monotonic()
            await asyncio.wait_for(server.shutdown(), 5)
            assert time.monotonic() - t0 < 2.5
    for _ in range(100):
        if d.cancelled:
            break
        await asyncio.sleep(0.02)
    assert d.cancelled == 1  # the cut request was aborted on the decode side


async def test_sigterm_drains_then_exits(backend):
    p, d = await backend("p"), await backend("d")
    d.events = sse_events(10)
    d.event_delay = 0.05
    port = free_port()
    env = dict(os.environ, VLLM_ASCEND_PD_PLAIN_LOGGING="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm_ascend_pd.proxy", "--prefill", p.address,
        "--decode", d.address, "--port", str(port), "--health-interval", "0",
        "--drain-timeout", "10", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as sess:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with sess.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "proxy did not start"
                await asyncio.sleep(0.1)
            async with sess.post(f"http://127.0.0.1:{port}/v1/completions",
                                 json={"prompt": "x", "stream": True}) as resp:
                first = await resp.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                rest = await resp.read()
            assert first + rest == b"".join(d.events)
        rc = await asyncio.wait_for(proc.wait(), 10)
        stderr = (await proc.stderr.read()).decode()
        assert rc == 0, stderr
        assert "draining 1 in-flight requests" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_taken_port_fails_start_and_leaves_no_open_backend_session(backend, release):
    import socket

    p, d = await backend("p"), await backend("d")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ProxyConfig(prefill=[p.address], decode=[d.address], port=port,
                          health_interval=0)
        server = ProxyServer(cfg, release_transfer=release)
        sessions = server.state.clients._sessions  # opened by the app's start-up
        with pytest.raises(OSError, match="address already in use"):
            await server.start()
    assert len(sessions) == 2 and all(s.closed for s in sessions.values())
    await server.shutdown()  # still safe: nothing left to stop


async def _leave_during_prefill(p, d, release, *, prefill_s: float,
                                drain_s: float) -> ProxyServer:
    """A proxy whose only client left while P takes ``prefill_s``."""
    p.header_delay = prefill_s
    server = ProxyServer(_cfg(p, d, drain_timeout=drain_s), release_transfer=release)
    await server.start()
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with aiohttp.ClientSession() as sess:
        task = asyncio.create_task(sess.post(url, json={"prompt": "x", "stream": True}))
        await asyncio.wait_for(p.handler_started.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return server


async def test_shutdown_lets_a_departed_clients_prefill_finish_and_release(backend, release):
    # A client that left during a slow prefill: the prefill must finish so
    # its answer names the KV to free. Shutdown cancelled it after 3 s (and
    # the producer held the KV until its lease expired).
    p, d = await backend("p"), await backend("d")
    server = await _leave_during_prefill(p, d, release, prefill_s=4.0, drain_s=10)
    await asyncio.sleep(0.1)
    assert release.calls == []
    t0 = time.monotonic()
    await asyncio.wait_for(server.shutdown(), 15)
    assert 3.0 < time.monotonic() - t0 < 9.0
    assert p.completed == 1 and p.cancelled == 0
    assert [c["transfer_id"] for c in release.calls] == [f"{p.name}-0"]
    assert d.requests == []


async def test_drain_timeout_also_bounds_departed_clients_prefills(backend, release):
    p, d = await backend("p"), await backend("d")
    server = await _leave_during_prefill(p, d, release, prefill_s=30.0, drain_s=0.5)
    t0 = time.monotonic()
    await asyncio.wait_for(server.shutdown(), 10)
    assert time.monotonic() - t0 < 4.5  # the drain budget, then the 3 s clean-up at most
