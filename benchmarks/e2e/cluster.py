"""Shared by the e2e and overlap benchmarks: a bigger tiny model, server
set-ups (1P1D through our proxy, a single instance, 1P1D with vLLM's
ExampleConnector) and a streaming load generator that records per-token
timestamps."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, ProxyServer, VllmServer, free_kv_port, free_port, kv_config,
)
from vllm_ascend_pd.testing.tiny_model import build_tiny_model

# Big enough that a ~4k-token prefill costs a few hundred ms on this CPU, small
# enough that a run takes minutes. The tests keep the default (2 layers, 128).
MODEL_SHAPE = dict(num_layers=4, hidden=256, heads=4, kv_heads=2, max_positions=8192)
MAX_MODEL_LEN = 4608


def model_dir(work: Path) -> str:
    return str(build_tiny_model(work / "tiny-llama-bench", **MODEL_SHAPE))


def server_args(extra: list[str], one_chunk: bool = True) -> list[str]:
    # BASE_ARGS caps --max-model-len at 4096; argparse keeps the last value.
    # One prefill chunk per prompt everywhere: ExampleConnector saves only the
    # first chunk of a chunked prefill and D then fails on the shape mismatch.
    chunk = ["--max-num-batched-tokens", str(MAX_MODEL_LEN)] if one_chunk else []
    return [*BASE_ARGS, "--max-model-len", str(MAX_MODEL_LEN), *chunk, *extra]


class PinnedServer(VllmServer):
    """A VllmServer confined to some CPUs (``taskset``), for the overlap runs."""

    cpus: str = ""

    def command(self) -> list[str]:
        cmd = super().command()
        return ["taskset", "-c", self.cpus, *cmd] if self.cpus else cmd


def make_server(name: str, model: str, extra: list[str], logs: Path, cpus: str = "",
                one_chunk: bool = True) -> VllmServer:
    s = PinnedServer(name, model, free_port(), server_args(extra, one_chunk), log_path=logs / f"{name}.log")
    s.cpus = cpus
    return s


@dataclass
class Setup:
    """One way of serving: ``entry`` takes requests; ``driver`` says how."""

    name: str
    servers: list[VllmServer]
    logs: Path
    driver: str  # "direct" | "two_step" (P then D by the client)
    proxy_args: list[str] = field(default_factory=list)
    proxy: ProxyServer | None = None
    proxy_port: int = 0

    @property
    def entry(self) -> str:
        if self.proxy_args:
            return f"http://127.0.0.1:{self.proxy_port}"
        return self.servers[-1].url if self.driver == "direct" else ""

    def start(self) -> None:
        self.start_servers()
        self.wait_started()

    def start_servers(self) -> None:
        for s in self.servers:
            s.start()

    def wait_started(self) -> None:
        """Wait for the servers started by ``start_servers``, then start the proxy."""
        try:
            for s in self.servers:
                s.wait_ready(900)
            if self.proxy_args:
                self._start_proxy()
        except BaseException:
            self.stop()
            raise

    def _start_proxy(self) -> None:
        self.proxy_port = free_port()
        # Set before start(): stop() then reaches a proxy that never got healthy.
        self.proxy = ProxyServer(self.proxy_port, self.logs / f"{self.name}-proxy.log",
                                 *self.proxy_args)
        self.proxy.start(healthy=True)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.proxy = None
        for s in self.servers:
            s.stop()


def setup_pd(model: str, logs: Path, p_cpus: str = "", d_cpus: str = "", one_chunk: bool = True) -> Setup:
    kv = free_kv_port(span=4)
    P = make_server("P", model, ["--kv-transfer-config", kv_config("kv_producer", kv)], logs, p_cpus, one_chunk)
    D = make_server("D", model, ["--kv-transfer-config", kv_config("kv_consumer", kv + 2)], logs, d_cpus, one_chunk)
    return Setup("pd", [P, D], logs, "direct",
                 proxy_args=["--prefill", f"127.0.0.1:{P.port}", "--decode", f"127.0.0.1:{D.port}"])


def setup_single(model: str, logs: Path, cpus: str = "", one_chunk: bool = True) -> Setup:
    return Setup("single", [make_server("S", model, [], logs, cpus, one_chunk)], logs, "direct")


def setup_example(model: str, logs: Path) -> Setup:
    # vLLM's reference connector: P writes every layer's KV to a shared
    # directory as safetensors, D finds the prompt's hash there and loads it.
    store = tempfile.mkdtemp(prefix="example-connector-", dir=logs)
    cfg = json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                      "kv_connector_extra_config": {"shared_storage_path": store}})
    P = make_server("P-example", model, ["--kv-transfer-config", cfg], logs)
    D = make_server("D-example", model, ["--kv-transfer-config", cfg], logs)
    return Setup("example", [P, D], logs, "two_step")


@contextmanager
def running(setup: Setup):
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


# --------------------------------------------------------------------------
# Load generation

@dataclass
class Sample:
    start: float
    ttft: float = float("nan")
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    error: str = ""
    token_ids: list[int] = field(default_factory=list)  # with return_token_ids
    text: str = ""


def random_prompt(rnd: random.Random, n: int, vocab: int = 460) -> list[int]:
    # Token ids, so every prompt has exactly n tokens; distinct first tokens
    # keep the prefix cache from short-cutting prefill.
    return [rnd.randrange(3, vocab) for _ in range(n)]


async def stream_one(session, url: str, prompt: list[int], max_tokens: int,
                     prefill_url: str = "", extra: dict | None = None) -> Sample:
    """One streaming completion; with ``prefill_url``, first run the prompt
    there with max_tokens=1 (the two-step ExampleConnector driver). ``extra``:
    more body fields (e.g. ``cache_salt``, ``return_token_ids``)."""
    s = Sample(time.perf_counter())
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, **(extra or {})}
    try:
        if prefill_url:
            pre = {**body, "max_tokens": 1, "stream": False}
            async with session.post(prefill_url + "/v1/completions", json=pre) as r:
                if r.status != 200:
                    raise RuntimeError(f"prefill {r.status}: {(await r.text())[:200]}")
                await r.read()
        last = None
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[5:])
                if not ev.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    s.ttft = now - s.start
                else:
                    s.itls.append(now - last)
                last = now
                s.tokens += 1
                choice = ev["choices"][0]
                s.text += choice.get("text") or ""
                s.token_ids += choice.get("token_ids") or []
    except Exception as e:  # noqa: BLE001 - recorded, reported as an error count
        s.error = str(e)[:300]
    s.end = time.perf_counter()
    return s


def idle_cpu(setup: Setup, seconds: float = 2.0) -> dict[str, float]:
    """CPU share (1.0 = one core) each server's process tree uses with no
    requests: a spinning engine shows up here."""
    import psutil

    def tree(pid):
        try:
            p = psutil.Process(pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(procs):
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    procs = {s.name: tree(s.proc.pid) for s in setup.servers if s.proc}
    before = {k: cpu(v) for k, v in procs.items()}
    time.sleep(seconds)
    return {k: round((cpu(v) - before[k]) / seconds, 2) for k, v in procs.items()}


async def closed_loop(setup: Setup, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[list[Sample], float]:
    import aiohttp

    queue = list(prompts)
    out: list[Sample] = []
    url = setup.entry or setup.servers[1].url
    prefill_url = setup.servers[0].url if setup.driver == "two_step" else ""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker():
            while queue:
                p = queue.pop()
                out.append(await stream_one(session, url, p, max_tokens, prefill_url))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return out, wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[k]


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if not s.error]
    ttft = [s.ttft for s in ok]
    itl = [x for s in ok for x in s.itls]
    first = [s.itls[0] for s in ok if s.itls]
    return {
        "requests": len(samples), "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if s.error), ""),
        "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan"),
        "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
        "first_itl_p50_ms": 1e3 * pct(first, 50), "ttfts_ms": [round(1e3 * x, 1) for x in ttft],
        "tokens_per_s": sum(s.tokens for s in ok) / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "wall_s": wall,
    }
