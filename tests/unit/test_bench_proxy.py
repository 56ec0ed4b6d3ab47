"""The proxy benchmark's own machinery: the floor relay forwards bytes
verbatim, and a tiny run covers both scenarios and every target (correctness
only; the timing runs hold the heavy lock)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

os.environ.setdefault("VLLM_ASCEND_PD_PLAIN_LOGGING", "1")

import pytest

from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("proxy/bench_proxy.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_floor_relays_bytes_verbatim_both_ways(bench):
    """Whatever the upstream sees is exactly what the client sent, and the
    reverse, including a payload far larger than any socket buffer (so the
    pump's backpressure path runs), and a client close reaches the upstream."""
    seen = bytearray()
    upstream_eof = asyncio.Event()
    reply = bytes(range(256)) * 40000  # 10 MiB

    async def upstream(reader, writer):
        while len(seen) < 5:
            seen.extend(await reader.read(65536))
        writer.write(reply)
        await writer.drain()
        while chunk := await reader.read(65536):
            seen.extend(chunk)
        upstream_eof.set()
        writer.close()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]
    port = _free_port()
    floor = await bench.start_floor(port, up_port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"he")  # likely before the floor's upstream connection is up
        writer.write(b"llo")
        got = await asyncio.wait_for(reader.readexactly(len(reply)), 30)
        assert got == reply
        writer.write(b"\x00tail\xff")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(upstream_eof.wait(), 10)
        assert bytes(seen) == b"hello\x00tail\xff"
    finally:
        floor.close()
        up.close()


async def test_floor_closes_client_when_upstream_is_down(bench):
    port = _free_port()
    floor = await bench.start_floor(port, _free_port())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        floor.close()


async def test_tiny_run_covers_both_scenarios_and_floor(bench, tmp_path):
    args = bench.parse_args(["--concurrency", "1", "3", "--tokens", "3", "--token-ms", "1",
                             "--paced-token-ms", "4", "--duration", "0.25", "--warmup",
                             "0.05", "--rounds", "2", "--proxy-workers", "2"])
    results = await bench.run(args)
    by = {(r.token_ms, r.target, r.concurrency): r for r in results}
    targets = ("direct", "proxy", "proxy-w2", "passthrough", "floor")
    assert set(by) == {(ms, t, c) for ms in (1.0, 4.0) for t in targets for c in (1, 3)}
    for key, r in by.items():
        assert r.errors == 0, (key, r.error_kinds)
        assert r.e2e, key
        # errors == 0 also says every request got its 3 token events and
        # [DONE] through every relay; the window saw at least those requests'.
        assert r.tokens >= 4 * len(r.e2e), key
        assert len(r.rounds) == 2, key
        assert "relay" in r.cpu or r.target == "direct", key
        # Every token event (not [DONE]) carried its send time through the
        # relay, and was read after it was sent (one machine clock).
        assert len(r.event) >= 3 * len(r.e2e), key
        assert len(r.event) < r.tokens, key
        assert 0 <= min(r.event) < max(r.event) < 5, key
        # Proxies report their prefill leg per request (Server-Timing).
        if r.target.startswith("proxy"):
            assert all(np < t for np, t in zip(r.ttft_np, r.ttft)), key
        else:
            assert r.ttft_np == r.ttft, key
    # The paced decode really is paced: 4 events 4 ms apart take >= 16 ms.
    assert min(by[(4.0, "direct", 1)].e2e) >= 0.016
    args.load_before = args.load_after = "n/a"
    text = bench.write_report(results, args, tmp_path / "r.md", tmp_path / "r.png")
    sat = text.index("## Scenario saturation: decode events 1 ms apart")
    paced = text.index("## Scenario paced: decode events 4 ms apart")
    assert sat < paced
    for part in (text[sat:paced], text[paced:]):
        assert part.count("### Relay CPU against the floor") == 1
        assert part.count("### Per-event delivery latency (ms)") == 1
        assert "| 3 | floor |" in part and "| 3 | proxy |" in part
        assert "| 3 | proxy-w2 |" in part


def test_cpu_of_a_relay_counts_its_worker_processes(bench):
    """A multi-worker proxy's CPU is its supervisor's plus its workers'."""
    import subprocess
    import time

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n" \
           "time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time\n"
                               f"c = subprocess.Popen([sys.executable, '-c', {spin!r}])\n"
                               f"time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tree = bench._process_tree(parent.pid)
            if len(tree) == 2 and bench._cpu_seconds(parent.pid) >= 0.6:
                break
            time.sleep(0.1)
        assert len(tree) == 2 and tree[0] == parent.pid
        child = tree[1]
        # The parent itself sleeps; what it reports is mostly its child's.
        assert bench._cpu_seconds(parent.pid) - bench._cpu_seconds(child) < 0.5
        assert bench._cpu_seconds(parent.pid) >= 0.6
    finally:
        for pid in bench._process_tree(parent.pid)[::-1]:
            os.kill(pid, 9)
        parent.wait(10)
