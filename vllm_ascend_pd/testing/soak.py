"""Soak load through the proxy: many concurrent requests, some clients
hanging up at random, then the books: lost requests, leaked KV blocks on
every instance, errors by kind and latency.

Used by ``benchmarks/soak.py`` (full run, its own servers) and by
``tests/e2e/test_soak.py`` (reduced run on the session cluster).

A request is *lost* when its client did not hang up and yet it did not get
a complete answer (an error status, a broken stream, a wrong number of
tokens, or a mismatch with the reference instance when one is given).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    kind: str  # "ok", "aborted", or an error kind
    latency: float = 0.0
    detail: str = ""


@dataclass
class SoakReport:
    requests: int
    concurrency: int
    aborted: int = 0
    completed: int = 0
    lost: int = 0
    checked_exact: int = 0
    mismatched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    latency_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    settle_s: float = 0.0
    leaks: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def leaked_blocks(self) -> float:
        return sum(v.get("used_blocks", 0) for v in self.leaks.values())

    @property
    def leaked_leases(self) -> float:
        return sum(v.get("leases_pending", 0) for v in self.leaks.values())

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["leaked_blocks"] = self.leaked_blocks
        d["leaked_leases"] = self.leaked_leases
        return d


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                    "vllm:ascend_pd_leases_pending"):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        elif name == "vllm:cache_config_info" and 'num_gpu_blocks="' in line:
            out["num_blocks"] = float(line.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    return out


def instance_state(url: str) -> dict[str, float]:
    m = _metrics(url)
    usage = m.get("vllm:kv_cache_usage_perc", 0.0)
    return {
        "used_blocks": round(usage * m.get("num_blocks", 0.0)),
        "kv_cache_usage_perc": usage,
        "running": m.get("vllm:num_requests_running", 0.0),
        "waiting": m.get("vllm:num_requests_waiting", 0.0),
        "leases_pending": m.get("vllm:ascend_pd_leases_pending", 0.0),
    }


def _idle(state: dict[str, float]) -> bool:
    return not any(state[k] for k in ("kv_cache_usage_perc", "running", "waiting", "leases_pending"))


async def _one(session, url: str, body: dict, abort_after: float | None) -> tuple[Outcome, list[int] | None]:
    import aiohttp

    t0 = time.perf_counter()

    async def call() -> tuple[Outcome, list[int] | None]:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if body.get("stream"):
                if resp.status != 200:
                    return Outcome(f"http_{resp.status}", detail=(await resp.text())[:200]), None
                tokens: list[int] = []
                done = False
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        return Outcome("stream_error", detail=str(event["error"])[:200]), None
                    tokens.extend(event["choices"][0].get("token_ids") or [])
                if not done:
                    return Outcome("stream_truncated"), None
            else:
                text = await resp.text()
                if resp.status != 200:
                    return Outcome(f"http_{resp.status}", detail=text[:200]), None
                tokens = json.loads(text)["choices"][0]["token_ids"]
        if len(tokens) != body["max_tokens"]:
            return Outcome("wrong_length", detail=f"{len(tokens)} of {body['max_tokens']} tokens"), None
        return Outcome("ok", time.perf_counter() - t0), tokens

    try:
        if abort_after is None:
            return await call()
        try:
            return await asyncio.wait_for(call(), abort_after)
        except asyncio.TimeoutError:
            return Outcome("aborted"), None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return Outcome(f"client_{type(e).__name__}", detail=str(e)[:200]), None


async def _reference(session, url: str, body: dict) -> list[int]:
    ref = {**body, "stream": False, "cache_salt": "soak-reference"}
    async with session.post(url + "/v1/completions", json=ref) as resp:
        return json.loads(await resp.text())["choices"][0]["token_ids"]


def make_bodies(n: int, seed: int, *, vocab: tuple[int, int] = (3, 460), max_prompt: int = 600) -> list[dict]:
    rnd = random.Random(seed)
    bodies = []
    for _ in range(n):
        plen = rnd.choice((rnd.randint(4, 64), rnd.randint(64, max_prompt)))
        bodies.append({
            "model": "tiny",
            "prompt": [rnd.randrange(*vocab) for _ in range(plen)],
            "max_tokens": rnd.randint(1, 24),
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": rnd.random() < 0.5,
        })
    return bodies


async def soak(
    proxy_url: str,
    instance_urls: list[str],
    *,
    requests: int = 1000,
    concurrency: int = 64,
    abort_fraction: float = 0.1,
    abort_window_s: float = 1.0,
    reference_url: str | None = None,
    check_fraction: float = 0.1,
    settle_timeout_s: float = 60.0,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> SoakReport:
    """Run the load; then wait (up to ``settle_timeout_s``) for every instance
    to be idle and report what is still held as leaked."""
    import aiohttp

    rnd = random.Random(seed + 1)
    bodies = make_bodies(requests, seed)
    aborts = [rnd.uniform(0, abort_window_s) if rnd.random() < abort_fraction else None for _ in bodies]
    checks = [reference_url is not None and a is None and rnd.random() < check_fraction for a in aborts]
    report = SoakReport(requests=requests, concurrency=concurrency)
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        to_check: list[tuple[dict, list[int]]] = []

        async def run(i: int) -> None:
            async with sem:
                outcome, tokens = await _one(session, proxy_url, bodies[i], aborts[i])
            if outcome.kind == "aborted":
                report.aborted += 1
                return
            if outcome.kind != "ok":
                report.lost += 1
                report.errors[outcome.kind] = report.errors.get(outcome.kind, 0) + 1
                if len(report.examples) < 5:
                    report.examples.append(f"{outcome.kind}: {outcome.detail}")
                return
            report.completed += 1
            latencies.append(outcome.latency)
            if checks[i] and tokens is not None:
                to_check.append((bodies[i], tokens))

        await asyncio.gather(*(run(i) for i in range(requests)))
        report.wall_s = time.perf_counter() - t0
        for body, tokens in to_check:
            report.checked_exact += 1
            if await _reference(session, reference_url, body) != tokens:
                report.mismatched += 1
                report.lost += 1
                report.errors["mismatch"] = report.errors.get("mismatch", 0) + 1
    if latencies:
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
        report.latency_s = {"p50": round(q[49], 3), "p90": round(q[89], 3), "p99": round(q[98], 3),
                            "max": round(max(latencies), 3)}
    start = time.monotonic()
    while True:
        states = {u: instance_state(u) for u in instance_urls}
        if all(_idle(s) for s in states.values()) or time.monotonic() - start > settle_timeout_s:
            break
        await asyncio.sleep(0.25)
    report.settle_s = round(time.monotonic() - start, 2)
    report.leaks = {u: s for u, s in states.items() if not _idle(s)}
    return report
