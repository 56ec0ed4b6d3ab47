"""Proxy overhead benchmark: direct-to-decode vs through the PD proxy.

Starts, as separate processes on 127.0.0.1:
  * fake OpenAI backends: a prefill that answers ``kv_transfer_params`` at once
    and a decode that streams ``--tokens`` SSE events ``--token-ms`` apart;
  * the proxy (``python -m vllm_ascend_pd.proxy``, uvloop, 1P1D);
  * a bare aiohttp passthrough (no prefill leg, no SSE framing) as the
    calibration point of machine-ceilings.md;
  * the relay floor: an asyncio Protocol byte pump (uvloop) with no HTTP
    parsing, one decode connection per client connection; what no Python
    relay can go below.
Then drives each target with 1, 64 and 256 concurrent streaming clients
(closed loop) in the same run and reports added latency (p50/p99 of
end-to-end, time-to-first-token, and each event's delivery: the fake decode
stamps every event with its send time) and the throughput ratio. It does so in
two scenarios, each with its own set of processes: *saturation* (decode
events ``--token-ms`` apart, 2 ms: the direct path alone fills the cores)
and *paced* (``--paced-token-ms``, 20 ms: a realistic decode pace).

    python benchmarks/proxy/bench_proxy.py            # writes docs/proxy-benchmark.md
    python benchmarks/proxy/bench_proxy.py --quick    # smoke run, no files
    python benchmarks/proxy/bench_proxy.py --pin      # relays on their own core:
                                                      # docs/proxy-benchmark-pinned.md

Runs in about 9 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import functools
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from vllm_ascend_pd.proxy.aio import Runner  # noqa: E402
from vllm_ascend_pd.testing.proxy_status import worker_statuses  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(procs: list[subprocess.Popen], cmd: list[str], cpus: set[int] | None,
           **popen) -> int:
    """Start ``cmd``, pinned with what it spawns to ``cpus`` (None: not pinned),
    and add it to ``procs`` for teardown; returns its pid."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    procs.append(subprocess.Popen(cmd, preexec_fn=pin, **popen))
    return procs[-1].pid


def _new_loop_factory():
    try:
        import uvloop
        return uvloop.new_event_loop
    except ImportError:
        return None


async def _serve_app(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until the process is killed."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


# ---------------------------------------------------------------- backends
_SENT = b'"sent":'
# Every event carries the decode's CLOCK_MONOTONIC send time (one clock for
# all processes on the machine), so the client can time each event's delivery.
_SENT_RE = re.compile(rb'"sent":([0-9.]+)')


def _event(i: int) -> tuple[bytes, bytes]:
    """(before, after) the send time of event ``i``."""
    chunk = {"id": "cmpl-bench", "object": "text_completion", "created": 1700000000,
             "model": "bench", "choices": [{"index": 0, "text": f" tok{i}",
                                            "logprobs": None, "finish_reason": None}],
             "sent": 0}
    text = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    before, _, after = text.partition(_SENT + b"0")
    return before + _SENT, after


def serve_backend(role: str, port: int, tokens: int, token_ms: float) -> None:
    events = [_event(i) for i in range(tokens)]
    delay = token_ms / 1000.0
    prefill_answer = json.dumps({
        "id": "cmpl-p", "object": "text_completion", "choices": [
            {"index": 0, "text": "x", "finish_reason": "length"}],
        "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                               "remote_engine_id": "e", "remote_host": "127.0.0.1",
                               "remote_port": 1, "remote_block_ids": [1, 2, 3],
                               "transfer_id": "t"}}).encode()

    async def prefill(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=prefill_answer, content_type="application/json")

    async def decode(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for before, after in events:
            await asyncio.sleep(delay)
            await resp.write(before + b"%.6f" % time.monotonic() + after)
        await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", prefill if role == "prefill" else decode)
        app.router.add_get("/health", health)
        await _serve_app(app, port)

    with Runner(loop_factory=_new_loop_factory()) as r:
        r.run(main())


def serve_passthrough(port: int, d_port: int) -> None:
    """The simplest aiohttp relay: one session, chunks forwarded as they come."""

    async def main() -> None:
        sess = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def relay(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            async with sess.post(f"http://127.0.0.1:{d_port}{request.path}", data=body,
                                 headers={"Content-Type": "application/json"}) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    "Content-Type": up.headers.get("Content-Type", "text/plain")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application()
        app.router.add_post("/v1/completions", relay)
        await _serve_app(app, port)

    with Runner(loop_factory=_new_loop_factory()) as r:
        r.run(main())


async def start_floor(port: int, d_port: int) -> asyncio.AbstractServer:
    """The relay floor: bytes pumped verbatim between each client connection
    and its own connection to the decode, no HTTP parsing, no copies beyond
    the transports' own. Backpressure is passed on both ways."""
    loop = asyncio.get_running_loop()

    def nodelay(transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class Upstream(asyncio.Protocol):
        def __init__(self, client: "Client") -> None:
            self.client = client

        def connection_made(self, transport) -> None:
            self.transport = transport
            nodelay(transport)

        def data_received(self, data: bytes) -> None:
            self.client.transport.write(data)

        def connection_lost(self, exc) -> None:
            self.client.transport.close()

        def pause_writing(self) -> None:
            self.client.transport.pause_reading()

        def resume_writing(self) -> None:
            self.client.transport.resume_reading()

    class Client(asyncio.Protocol):
        up: Upstream | None = None
        closed = False

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.pending: list[bytes] = []
            nodelay(transport)
            loop.create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, up = await loop.create_connection(lambda: Upstream(self), "127.0.0.1",
                                                     d_port)
            except OSError:
                self.transport.close()
                return
            if self.closed:
                up.transport.close()
                return
            self.up = up
            if self.pending:
                up.transport.write(b"".join(self.pending))
            self.pending = []

        def data_received(self, data: bytes) -> None:
            if self.up is None:
                self.pending.append(data)
            else:
                self.up.transport.write(data)

        def connection_lost(self, exc) -> None:
            self.closed = True
            if self.up is not None:
                self.up.transport.close()

        def pause_writing(self) -> None:
            if self.up is not None:
                self.up.transport.pause_reading()

        def resume_writing(self) -> None:
            if self.up is not None:
                self.up.transport.resume_reading()

    return await loop.create_server(Client, "127.0.0.1", port, backlog=4096)


def serve_floor(port: int, d_port: int) -> None:
    async def main() -> None:
        await start_floor(port, d_port)
        await asyncio.Event().wait()

    with Runner(loop_factory=_new_loop_factory()) as r:
        r.run(main())


# ---------------------------------------------------------------- client
def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc), e.g. proxy workers."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            try:
                tree += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
        i += 1
    return tree


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process and its descendants (Linux /proc; None =
    this process alone), 0 elsewhere."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    total = 0.0
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Result:
    target: str
    concurrency: int
    duration: float
    token_ms: float = 0.0  # the scenario: the fake decode's event spacing
    e2e: list = field(default_factory=list)
    ttft: list = field(default_factory=list)
    # TTFT less the prefill leg the proxy reports in Server-Timing (same as
    # ttft for targets without a prefill leg): what the relay itself adds.
    ttft_np: list = field(default_factory=list)
    # Delivery latency of each event (decode's send to the client's read).
    event: array.array = field(default_factory=lambda: array.array("d"))
    tokens: int = 0
    errors: int = 0
    error_kinds: dict = field(default_factory=dict)  # "Type: message" -> count
    # CPU seconds in the measured window, by process: client (this one),
    # decode, prefill, relay (proxy/passthrough).
    cpu: dict = field(default_factory=dict)
    # (events/s of this target, events/s of direct) per round, for the spread.
    rounds: list = field(default_factory=list)
    # Proxies only: their own prefill-leg histogram (sum s, count) over the cells.
    prefill_leg: list = field(default_factory=lambda: [0.0, 0])

    @property
    def prefill_leg_ms(self) -> float:
        s, n = self.prefill_leg
        return s / n * 1000.0 if n else float("nan")

    def cpu_us_per_event(self, proc: str | None = None) -> float:
        if not self.tokens:
            return float("nan")
        secs = sum(self.cpu.values()) if proc is None else self.cpu.get(proc, 0.0)
        return secs / self.tokens * 1e6

    @property
    def relay_us_per_event(self) -> float:
        return self.cpu_us_per_event("relay")

    def ratio_spread(self) -> tuple[float, float]:
        ratios = [t / d for t, d in self.rounds if d]
        return (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))

    @property
    def throughput(self) -> float:  # streamed events per second
        return self.tokens / self.duration

    def pct(self, name: str, q: float) -> float:
        data = sorted(getattr(self, name))
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))] * 1000.0


def _prefill_s(server_timing: str | None) -> float:
    """The prefill leg of a proxied answer, from its Server-Timing header."""
    for part in (server_timing or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "prefill":
            return float(dur) / 1000.0
    return 0.0


async def drive(url: str, target: str, concurrency: int, duration: float,
                warmup: float, pids: dict | None = None, token_ms: float = 0.0,
                events: int | None = None) -> Result:
    """``pids``: process name -> pid whose CPU time to measure (None = this one).
    ``events``: SSE events a complete answer has; fewer or more is an error.

    The workers' first requests are spread over one nominal request time
    (``events`` x ``token_ms``), as arrivals would be: with fixed request
    times, streams that start together stay in lock step and every relay
    would see a burst of ``concurrency`` request set-ups at once."""
    body = json.dumps({"model": "bench", "prompt": "hello " * 64, "max_tokens": 32,
                       "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    res = Result(target, concurrency, duration, token_ms)
    stagger = (events or 0) * token_ms / 1000.0 / concurrency
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as sess:
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        t_measure = t_start + warmup
        t_end = t_measure + duration

        async def worker(i: int) -> None:
            await asyncio.sleep(i * stagger)
            while True:
                t0 = time.perf_counter()
                if loop.time() >= t_end:
                    return
                measuring = loop.time() >= t_measure
                first = None
                n = 0
                prefill = 0.0
                try:
                    async with sess.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"status {resp.status}")
                        prefill = _prefill_s(resp.headers.get("Server-Timing"))
                        async for chunk in resp.content.iter_any():
                            now = time.monotonic()
                            if first is None:
                                first = time.perf_counter()
                            k = chunk.count(b"\n\n")
                            n += k
                            # Throughput counts events as they arrive inside the
                            # window: counting whole requests that fit in it
                            # would lose more of a slower target's events.
                            if t_measure <= loop.time() <= t_end:
                                res.tokens += k
                                res.event.extend(now - float(t)
                                                 for t in _SENT_RE.findall(chunk))
                    if events is not None and n != events:
                        raise RuntimeError(f"{n} events, expected {events}")
                except Exception as e:  # noqa: BLE001 - counted and named
                    if measuring:
                        res.errors += 1
                        kind = f"{type(e).__name__}: {str(e)[:80]}"
                        res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                # Latency: only requests that started and finished inside the window.
                if measuring and loop.time() <= t_end:
                    res.e2e.append(t1 - t0)
                    res.ttft.append(first - t0)
                    res.ttft_np.append(first - t0 - prefill)
        async def cpu_window() -> None:
            if not pids:
                return
            await asyncio.sleep(max(0.0, t_measure - loop.time()))
            c0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
            await asyncio.sleep(max(0.0, t_end - loop.time()))
            res.cpu = {name: _cpu_seconds(pid) - c0[name] for name, pid in pids.items()}

        await asyncio.gather(cpu_window(), *(worker(i) for i in range(concurrency)))
    return res


async def prefill_histogram(base: str) -> tuple[float, int]:
    """(sum, count) of the proxy's vllm_pd_proxy_prefill_latency_seconds."""
    async with aiohttp.ClientSession() as sess:
        async with sess.get(f"{base}/metrics") as r:
            text = await r.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("vllm_pd_proxy_prefill_latency_seconds_sum",
                    "vllm_pd_proxy_prefill_latency_seconds_count"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", 0.0), int(values.get("count", 0))


async def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as sess:
        while True:
            try:
                async with sess.get(url) as r:
                    if r.status in (200, 404, 405):
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- report
HANDWRITTEN = "## Reading these numbers"


def targets(args) -> tuple[str, ...]:
    """Every target name in report order."""
    workers = tuple(f"proxy-w{n}" for n in args.proxy_workers)
    return ("direct", "proxy", *workers, "passthrough", "floor", "baseline")


def _is_proxy(target: str) -> bool:
    return target == "baseline" or target.startswith("proxy")


def scenarios(args) -> list[tuple[str, float]]:
    """(name, decode event spacing in ms), in run and report order."""
    return [("saturation", args.token_ms)] + [("paced", ms) for ms in args.paced_token_ms]


def _cells(args, by, token_ms):
    """(streams, target, result, direct's result or None for direct itself)
    for every measured cell of one scenario, in report order."""
    for c in args.concurrency:
        d = by.get((token_ms, "direct", c))
        for target in targets(args):
            r = by.get((token_ms, target, c))
            if r is not None:
                yield c, target, r, (None if target == "direct" else d)


SCENARIO_TEXT = {
    "saturation": "{per_s:.0f} events/s per stream: at 64 and 256 streams the direct path "
                  "alone keeps {cores} busy, so these cells measure CPU per event.",
    "paced": "{per_s:.0f} events/s per stream, a realistic decode pace (see *Scenarios* "
             "below): the cores are not saturated by the direct path, so these cells "
             "measure what the relay adds to a real stream.",
}


def _ceiling(args, r: "Result", d: "Result") -> float:
    """Best throughput ratio the CPU allows when saturated (see the report text)."""
    if not args.pin:
        return d.cpu_us_per_event() / r.cpu_us_per_event()
    side = ("client", "decode", "prefill")
    backend = (sum(d.cpu_us_per_event(p) for p in side)
               / sum(r.cpu_us_per_event(p) for p in side))
    relay_cpus = len(args.pin[1])
    relay = relay_cpus * 1e6 / (r.relay_us_per_event * d.throughput) if "relay" in r.cpu \
        else float("inf")
    return min(backend, relay)


def _scenario_section(name: str, token_ms: float, results_by: dict, args) -> list[str]:
    by = results_by
    lines = [
        f"## Scenario {name}: decode events {token_ms:g} ms apart",
        "",
        f"Fake decode streams {args.tokens} events {token_ms:g} ms apart, " +
        SCENARIO_TEXT[name].format(per_s=1000.0 / token_ms if token_ms else float("inf"),
                                   cores="the backend core" if args.pin else "both cores"),
        "",
        "### Latency (ms)",
        "",
        "| streams | target | requests | e2e p50 | e2e p99 | TTFT p50 | TTFT p99 | "
        "added e2e p50 | added e2e p99 | added TTFT p50 | added TTFT p99 | "
        "prefill leg (mean) | added TTFT − leg p50 | added TTFT − leg p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, target, r, d in _cells(args, by, token_ms):
        if d is None:
            added, relay = ["", "", "", ""], ["", ""]
        else:
            added = [f"{r.pct(k, q) - d.pct(k, q):+.2f}"
                     for k, q in (("e2e", .5), ("e2e", .99), ("ttft", .5), ("ttft", .99))]
            relay = [f"{r.pct('ttft_np', q) - d.pct('ttft', q):+.2f}" for q in (.5, .99)]
        lines.append(
            f"| {c} | {target} | {len(r.e2e)} | {r.pct('e2e', .5):.2f} | "
            f"{r.pct('e2e', .99):.2f} | {r.pct('ttft', .5):.2f} | "
            f"{r.pct('ttft', .99):.2f} | " + " | ".join(added) +
            f" | {'' if r.prefill_leg[1] == 0 else f'{r.prefill_leg_ms:.2f}'}"
            f" | {' | '.join(relay)} | {r.errors} |")
    lines += [
        "",
        "### Per-event delivery latency (ms)",
        "",
        "Decode's send of each event (its time is in the event) to the client's read "
        "of it: for a relay, the delay it adds to every token after the first.",
        "",
        "| streams | target | events | p50 | p90 | p99 | added p50 | added p90 | "
        "added p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, target, r, d in _cells(args, by, token_ms):
        qs = (.5, .9, .99)
        added = ([""] * 3 if d is None else
                 [f"{r.pct('event', q) - d.pct('event', q):+.2f}" for q in qs])
        lines.append(f"| {c} | {target} | {len(r.event)} | " +
                     " | ".join(f"{r.pct('event', q):.2f}" for q in qs) + " | " +
                     " | ".join(added) + " |")
    lines += [
        "",
        "### Throughput and CPU per streamed event",
        "",
        "| streams | target | events/s | vs direct | rounds min–max | client | decode | "
        "prefill | relay | total | CPU ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, target, r, d in _cells(args, by, token_ms):
        if d is None:
            ratio = spread = ceiling = ""
        else:
            lo, hi = r.ratio_spread()
            ratio = f"{r.throughput / d.throughput:.2f}x"
            spread = f"{lo:.2f}–{hi:.2f}"
            ceiling = f"{_ceiling(args, r, d):.2f}x"
        cpu = [f"{r.cpu_us_per_event(p):.1f}" if p in r.cpu else ""
               for p in ("client", "decode", "prefill", "relay")]
        lines.append(f"| {c} | {target} | {r.throughput:.0f} | {ratio} | {spread} | " +
                     " | ".join(cpu) + f" | {r.cpu_us_per_event():.1f} | {ceiling} |")
    floor_rows = []
    for c in args.concurrency:
        f = by.get((token_ms, "floor", c))
        if f is None or not f.tokens:
            continue
        fl = f.relay_us_per_event
        cells = [f"{fl:.1f}"]
        for target in ("passthrough", "proxy"):
            r = by.get((token_ms, target, c))
            if r is None or not r.tokens:
                cells += ["", ""]
            else:
                cells += [f"{r.relay_us_per_event:.1f}",
                          f"{r.relay_us_per_event / fl:.1f}x" if fl else ""]
        d = by.get((token_ms, "direct", c))
        tput = [f"{by[(token_ms, t, c)].throughput / d.throughput:.2f}x"
                if d is not None and (token_ms, t, c) in by else ""
                for t in ("floor", "passthrough", "proxy")]
        floor_rows.append(f"| {c} | " + " | ".join(cells) + " | " + " / ".join(tput) + " |")
    if floor_rows:
        lines += [
            "",
            "### Relay CPU against the floor",
            "",
            "Relay process CPU µs per streamed event, and its multiple of the floor's.",
            "",
            "| streams | floor | passthrough | ÷ floor | proxy | ÷ floor | "
            "vs direct: floor / passthrough / proxy |",
            "|---|---|---|---|---|---|---|",
            *floor_rows,
        ]
    return lines + [""]


def _placement(args) -> str:
    if not args.pin:
        return ("Client, relays and backends share the machine's cores, each in its own "
                "process (uvloop).")
    side, relays = (",".join(map(str, sorted(c))) for c in args.pin)
    return (f"**Pinned** (`--pin`): the client and the fake backends run on CPU {side}, "
            f"every relay on CPU {relays}, each in its own process (uvloop): the relay "
            "neither takes CPU from the backends nor waits for it behind them, as a proxy "
            "on cores of its own in a deployment. Direct is then bounded by one core.")


def write_report(results: list[Result], args, path: Path, plot_path: Path) -> str:
    by = {(r.token_ms, r.target, r.concurrency): r for r in results}
    lines = [
        "# Proxy benchmark",
        "",
        f"Generated by `{' '.join(['python benchmarks/proxy/bench_proxy.py', *args.argv])}`"
        f" on {time.strftime('%Y-%m-%d %H:%M')}"
        f" ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}).",
        "",
        "Each scenario starts its own processes: fake prefill and decode, proxy, "
        "passthrough and floor. The fake prefill answers at once, so that *added* "
        "latency is only the relay's (direct has no prefill leg). " + _placement(args) +
        " Closed "
        "loop, the streams' first requests spread over one nominal request time (as "
        "arrivals would be; started together, fixed-length streams stay in lock step); "
        f"per cell {args.rounds} rounds of {args.duration:g} s measured after "
        f"{args.warmup:g} s warm-up, target order alternating between rounds, samples "
        "pooled. Latency: requests that started and ended in the window. Events/s: "
        "events that arrived in the window; a request with the wrong number of events "
        "counts as an error. *Added* = proxied minus direct, same run. *Prefill leg*: mean of the "
        "proxy's own `vllm_pd_proxy_prefill_latency_seconds` over the cell (warm-up "
        "included): the part of the added TTFT that is the round trip to the prefill "
        "instance. *Added TTFT − leg*: each proxied request's TTFT less the prefill "
        "leg the proxy reports for it in its `Server-Timing` header, percentile minus "
        "direct's TTFT percentile: what the relay adds besides the prefill round "
        "trip. `passthrough` is a bare aiohttp relay (no prefill leg, no SSE "
        "framing, no failover): the calibration point of machine-ceilings.md. `floor` "
        "is an asyncio Protocol byte pump (uvloop) that forwards bytes verbatim between "
        "each client connection and its own decode connection, with no HTTP parsing: "
        "the kernel and event-loop cost of relaying, which no Python relay goes below.",
        "",
        "*vs direct*: pooled events/s over direct's, with the lowest and highest ratio of "
        "single rounds. *CPU µs/event*: CPU time of each process over the measured "
        "windows divided by the events the client received. When the two cores are "
        "saturated, throughput is bounded by CPU per event, so *CPU ceiling* = direct's "
        "total CPU per event over this target's is the best ratio this machine allows"
        + (" (pinned: the lower of that ratio over the backend core's processes alone "
           "and the relay cores' capacity, their CPU seconds per second over the relay's "
           "CPU per event, relative to direct's events/s)." if args.pin else "."),
        "",
        f"Load average (1/5/15 min) before the run: {args.load_before}; after: "
        f"{args.load_after}. The machine has {os.cpu_count()} cores, so anything above "
        f"{os.cpu_count()} means other work competed for CPU.",
        "",
    ]
    scens = [(n, ms) for n, ms in scenarios(args)
             if any(k[0] == ms for k in by)]
    for name, token_ms in scens:
        lines += _scenario_section(name, token_ms, by, args)
    text = "\n".join(lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(len(scens), 2, figsize=(10, 4 * len(scens)), squeeze=False)
        for (name, token_ms), (a1, a2) in zip(scens, axes):
            for target in targets(args):
                cs = [c for c in args.concurrency if (token_ms, target, c) in by]
                if not cs:
                    continue
                a1.plot(cs, [by[(token_ms, target, c)].pct("e2e", .5) for c in cs], "o-",
                        label=target)
                a2.plot(cs, [by[(token_ms, target, c)].throughput for c in cs], "o-",
                        label=target)
            a1.set(xscale="log", xlabel="concurrent streams", ylabel="e2e p50 (ms)",
                   title=f"{name}: events {token_ms:g} ms apart")
            a2.set(xscale="log", xlabel="concurrent streams", ylabel="events/s",
                   title=f"{name}: events {token_ms:g} ms apart")
            a1.legend()
            a2.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=90)
        text += f"\n![latency and throughput]({plot_path.name})\n"
    except ImportError:
        pass
    return text


# ---------------------------------------------------------------- main
def _merge(merged: dict, r: Result, hist: tuple[float, int]) -> Result:
    m = merged.setdefault((r.token_ms, r.target, r.concurrency),
                          Result(r.target, r.concurrency, 0.0, r.token_ms))
    m.prefill_leg[0] += hist[0]
    m.prefill_leg[1] += hist[1]
    m.duration += r.duration
    m.e2e += r.e2e
    m.ttft += r.ttft
    m.ttft_np += r.ttft_np
    m.event += r.event
    m.tokens += r.tokens
    m.errors += r.errors
    for kind, n in r.error_kinds.items():
        m.error_kinds[kind] = m.error_kinds.get(kind, 0) + n
    for proc, secs in r.cpu.items():
        m.cpu[proc] = m.cpu.get(proc, 0.0) + secs
    return m


async def run_scenario(args, token_ms: float) -> list[Result]:
    p_port, d_port, x_port, b_port, y_port, f_port = (_free_port() for _ in range(6))
    env = dict(os.environ, VLLM_ASCEND_PD_PLAIN_LOGGING="1")
    procs: list[subprocess.Popen] = []
    start = functools.partial(_start, procs, env=env)

    def serve(*argv) -> list[str]:  # this script in one of its --serve-* modes
        return [sys.executable, str(Path(__file__).resolve()), *map(str, argv)]
    # --pin: backends (and this client) on one core, relays on the other, as a
    # proxy deployed on its own cores would run.
    side, relay_cpus = args.pin or (None, None)
    try:
        backends = {"client": None}
        for role, port in (("prefill", p_port), ("decode", d_port)):
            backends[role] = start(serve("--serve-backend", role, port, args.tokens, token_ms),
                                   side)

        def proxy_cmd(port: int) -> list[str]:
            return [sys.executable, "-m", "vllm_ascend_pd.proxy", "--prefill",
                    f"127.0.0.1:{p_port}", "--decode", f"127.0.0.1:{d_port}", "--port",
                    str(port), "--health-interval", "0", "--max-inflight", "100000",
                    "--log-level", "WARNING"]
        relays = {"proxy": (x_port, start(proxy_cmd(x_port), relay_cpus, cwd=REPO))}
        workers: dict[str, int] = {}
        for n in args.proxy_workers:
            # CPU is counted over the supervisor and all its workers.
            port = _free_port()
            relays[f"proxy-w{n}"] = (port, start(proxy_cmd(port) + ["--workers", str(n)],
                                                 relay_cpus, cwd=REPO))
            workers[f"proxy-w{n}"] = n
        if not args.no_passthrough:
            relays["passthrough"] = (b_port, start(serve("--serve-passthrough", b_port, d_port),
                                                   relay_cpus))
        if not args.no_floor:
            relays["floor"] = (f_port, start(serve("--serve-floor", f_port, d_port), relay_cpus))
        if args.baseline:
            # The same proxy command, importing vllm_ascend_pd from another tree.
            relays["baseline"] = (y_port, start(proxy_cmd(y_port), relay_cpus, cwd=args.baseline,
                                                env=dict(env, PYTHONPATH=str(
                                                    Path(args.baseline).resolve()))))
        await wait_ready(f"http://127.0.0.1:{d_port}/health")
        targets = {"direct": (f"http://127.0.0.1:{d_port}/v1/completions", backends)}
        for name, (port, pid) in relays.items():
            await wait_ready(f"http://127.0.0.1:{port}/v1/completions")
            if name in workers:
                await worker_statuses(f"http://127.0.0.1:{port}", workers[name], timeout=60)
            targets[name] = (f"http://127.0.0.1:{port}/v1/completions",
                             {**backends, "relay": pid})
        merged: dict[tuple[float, str, int], Result] = {}
        for c in args.concurrency:
            # Alternate the order between rounds so that drift in background
            # load hits every target alike; samples of all rounds are pooled.
            for rnd in range(args.rounds):
                items = list(targets.items())
                this_round = {}
                for name, (url, pids) in (items if rnd % 2 == 0 else items[::-1]):
                    base = url.rsplit("/v1/", 1)[0]
                    is_proxy = _is_proxy(name)
                    h0 = await prefill_histogram(base) if is_proxy else (0.0, 0)
                    r = await drive(url, name, c, args.duration, args.warmup, pids, token_ms,
                                    args.tokens + 1)
                    h1 = await prefill_histogram(base) if is_proxy else (0.0, 0)
                    this_round[name] = r.throughput
                    _merge(merged, r, (h1[0] - h0[0], h1[1] - h0[1]))
                for name, tput in this_round.items():
                    merged[(token_ms, name, c)].rounds.append((tput, this_round["direct"]))
            for name in targets:
                r = merged[(token_ms, name, c)]
                lo, hi = r.ratio_spread()
                print(f"[{token_ms:g} ms] {c:4d} streams {name:11s} e2e p50 "
                      f"{r.pct('e2e', .5):7.2f} ms p99 {r.pct('e2e', .99):7.2f} ms  TTFT p50 "
                      f"{r.pct('ttft', .5):6.2f} p99 {r.pct('ttft', .99):6.2f} ms  event p50 "
                      f"{r.pct('event', .5):5.2f} p99 {r.pct('event', .99):6.2f} ms  "
                      f"{r.throughput:8.0f} events/s (x{lo:.2f}-{hi:.2f})  CPU us/event: "
                      f"relay {r.cpu_us_per_event('relay'):5.1f} total "
                      f"{r.cpu_us_per_event():5.1f}  errors {r.errors}", flush=True)
        return list(merged.values())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


async def run(args) -> list[Result]:
    results: list[Result] = []
    for _, token_ms in scenarios(args):
        results += await run_scenario(args, token_ms)
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--token-ms", type=float, default=2.0,
                    help="event spacing of the saturation scenario (default 2)")
    ap.add_argument("--paced-token-ms", type=float, nargs="*", default=[20.0],
                    metavar="MS", help="event spacing of each paced scenario, run after "
                    "the saturation one (default 20; give no value to skip)")
    ap.add_argument("--duration", type=float, default=4.0, help="measured s per round")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--proxy-workers", type=int, nargs="*", default=[], metavar="N",
                    help="also run the proxy with --workers N as target proxy-wN")
    ap.add_argument("--no-passthrough", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--baseline", metavar="DIR", help="also run the proxy imported from "
                    "DIR (e.g. `git worktree add DIR main`) as target 'baseline', for a "
                    "before/after comparison in one run")
    ap.add_argument("--pin", action="store_true", help="pin the client and the fake "
                    "backends to the first CPU and every relay to the others, as a proxy "
                    "on cores of its own (default --out: docs/proxy-benchmark-pinned.md)")
    ap.add_argument("--quick", action="store_true", help="short smoke run, no files")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.out is None:
        args.out = str(REPO / "docs" / ("proxy-benchmark-pinned.md" if args.pin
                                        else "proxy-benchmark.md"))
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error(f"--pin needs at least 2 usable CPUs, this process may use {cpus}")
        args.pin = ({cpus[0]}, set(cpus[1:]))
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 0.5, 1
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-backend":
        serve_backend(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-passthrough":
        serve_passthrough(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), int(sys.argv[3]))
        return
    args = parse_args(sys.argv[1:])
    if args.pin:
        os.sched_setaffinity(0, args.pin[0])
    args.load_before = _loadavg()
    with Runner(loop_factory=_new_loop_factory()) as r:
        results = r.run(run(args))
    args.load_after = _loadavg()
    if not args.quick:
        out = Path(args.out)
        text = write_report(results, args, out, out.with_suffix(".png"))
        # Keep the hand-written reading of the previous report.
        old = out.read_text() if out.exists() else ""
        if HANDWRITTEN in old:
            text += "\n" + old[old.index(HANDWRITTEN):]
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
