"""Prefix-affinity benchmark: ``--policy round_robin`` against ``--policy
prefix_affinity`` on real vLLM (CPU), 2 producers + 2 consumers by default
(``--producers``, ``--consumers``), in one run.

Starts P1..Pn (kv_producer) and D1..Dm (kv_consumer, AscendSimpleConnector
over tcp) once, in parallel, and two proxies over the same instances, one per
policy. ``--producer-kv-blocks`` / ``--consumer-kv-blocks`` shrink the
instances' KV caches (vLLM's ``--num-gpu-blocks-override``; without them each
holds 1 GiB, every family at once) so that a cache holds only a few families. The workload is F prompt families: each family shares a
prefix of random token ids, each request adds a suffix of its own; the
families' requests arrive shuffled together and are sent streaming, greedy,
a few at a time. Every round sends the whole workload through one proxy and
then through the other (which goes first alternates between rounds), with a
``cache_salt`` of its own per (round, policy): vLLM's prefix cache never
serves one policy's requests from blocks the other policy's requests left,
nor a round from an earlier round's. Samples are pooled per policy. Measured
per policy: TTFT and end-to-end latency; the prefix-cache hit rate of the
producers and of the consumers and the KV bytes the consumers pulled (deltas
of the instances' ``/metrics``); how the requests split across P and D; how
often the affinity proxy's load bound passed over a prefix's own instance
(``vllm_pd_proxy_affinity_spills_total``, per leg); and whether every answer
is token for token the same under both policies.

    flock /tmp/vllm-heavy.lock python benchmarks/proxy/bench_affinity.py          # writes docs/proxy-affinity-benchmark.md
    flock /tmp/vllm-heavy.lock python benchmarks/proxy/bench_affinity.py --quick  # smoke run, no files
    flock /tmp/vllm-heavy.lock python benchmarks/proxy/bench_affinity.py --producers 4 --consumers 2 \
        --concurrency 6 --producer-kv-blocks 256 --out docs/proxy-affinity-benchmark-4p.md

About 4 minutes with the defaults, one of them starting vLLM (on a busy machine more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.e2e.cluster import (  # noqa: E402
    MAX_MODEL_LEN, MODEL_SHAPE, Sample, make_server, model_dir, pct, random_prompt, stream_one,
)
from vllm_ascend_pd.testing.servers import (  # noqa: E402
    PortPicker, ProxyServer, kv_config, start_all, stop_all,
)

POLICIES = ("round_robin", "prefix_affinity")
BLOCK = 32  # BASE_ARGS --block-size
HANDWRITTEN = "## Reading these numbers"
OUT = REPO / "docs" / "proxy-affinity-benchmark.md"

# Counters read from each instance's /metrics: key -> (sample name, labels).
WATCH = {
    "queries": ("vllm:prefix_cache_queries_total", {}),
    "hits": ("vllm:prefix_cache_hits_total", {}),
    "requests": ("vllm:request_success_total", {}),
    "recv_bytes": ("vllm:ascend_pd_bytes_transferred_total", {"direction": "recv"}),
    "recv_blocks": ("vllm:ascend_pd_blocks_transferred_total", {"direction": "recv"}),
    "loaded_tokens": ("vllm:ascend_pd_loaded_tokens_total", {}),
    "failed": ("vllm:ascend_pd_failed_transfers_total", {}),
}
PRODUCERS, CONSUMERS = ("P1", "P2"), ("D1", "D2")  # the default deployment
SPILLS = "vllm_pd_proxy_affinity_spills_total"  # the proxy's counter, label leg
LEGS = ("prefill", "decode")
# KV bytes per token: K and V, per layer, per KV head, head_dim float32 values.
KV_TOKEN_BYTES = (2 * MODEL_SHAPE["num_layers"] * MODEL_SHAPE["kv_heads"]
                  * MODEL_SHAPE["hidden"] // MODEL_SHAPE["heads"] * 4)
DEFAULT_KV_BYTES = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1, as servers.py sets it


def instance_names(producers: int, consumers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"P{i + 1}" for i in range(producers)),
            tuple(f"D{i + 1}" for i in range(consumers)))


def roles_of(delta: dict) -> tuple[list[str], list[str]]:
    """Producer and consumer names of a phase's counters, in start order."""
    return [n for n in delta if n.startswith("P")], [n for n in delta if n.startswith("D")]


# ---------------------------------------------------------------- workload
@dataclass
class Workload:
    families: list[list[int]]  # each family's shared prefix
    requests: list[tuple[int, list[int]]]  # (family, prompt) in arrival order

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for _, p in self.requests)

    def shared_ceiling(self) -> float:
        """Share of prompt tokens a prefix cache can serve if every request but
        each family's first finds its family's full shared blocks cached."""
        per_family = len(self.requests) // len(self.families)
        blocks = len(self.families[0]) // BLOCK * BLOCK
        return len(self.families) * (per_family - 1) * blocks / self.prompt_tokens

    def rotation_ceiling(self, instances: int) -> float:
        """The same share for round robin over ``instances`` whose caches
        never evict, if request i lands on instance i mod n (where the
        rotation starts does not matter): a family misses once on each
        instance it reaches. Exact with one client; with several, the proxy
        sees the legs in a slightly different order."""
        blocks = len(self.families[0]) // BLOCK * BLOCK
        reached: dict[int, set[int]] = {}
        for i, (fam, _) in enumerate(self.requests):
            reached.setdefault(fam, set()).add(i % instances)
        hits = sum(len(self.requests) // len(self.families) - len(r) for r in reached.values())
        return hits * blocks / self.prompt_tokens

    def key_room(self) -> int:
        """Bytes of the shortest shared prefix as the client sends it (raw
        JSON of ``prompt``): the most ``--affinity-prefix-bytes`` may cover."""
        return min(len(json.dumps(f)) - 1 for f in self.families)  # without "]"


def make_workload(seed: int, families: int, per_family: int, shared: int,
                  suffix: tuple[int, int]) -> Workload:
    rnd = random.Random(seed)
    prefixes = [random_prompt(rnd, shared) for _ in range(families)]
    reqs = [(f, prefixes[f] + random_prompt(rnd, rnd.randint(*suffix)))
            for f in range(families) for _ in range(per_family)]
    rnd.shuffle(reqs)  # arrivals mix the families
    return Workload(prefixes, reqs)


# ---------------------------------------------------------------- metrics
def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = dict.fromkeys(WATCH, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for key, (name, labels) in WATCH.items():
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] += s.value
    return out


def scrape_all(servers: dict) -> dict[str, dict[str, float]]:
    return {name: scrape(s.url) for name, s in servers.items()}


def settled(servers: dict, timeout: float = 15.0) -> dict[str, dict[str, float]]:
    """Counters once two reads 0.5 s apart agree: instances report their
    stats per engine step, so the last pulls may show up a step late."""
    last = scrape_all(servers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = scrape_all(servers)
        if now == last:
            break
        last = now
    return last


def delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {n: {k: after[n][k] - before[n][k] for k in WATCH} for n in after}


def scrape_spills(url: str) -> dict[str, float]:
    """The proxy's affinity spills by leg (0 for any other policy)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = dict.fromkeys(LEGS, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == SPILLS and s.labels.get("leg") in out:
                out[s.labels["leg"]] += s.value
    return out


# ---------------------------------------------------------------- driving
async def drive(url: str, wl: Workload, concurrency: int, max_tokens: int,
                salt: str) -> list[Sample]:
    """Closed loop: ``concurrency`` clients take the requests in arrival order."""
    import aiohttp

    out: list[Sample | None] = [None] * len(wl.requests)
    todo = iter(enumerate(wl.requests))
    extra = {"cache_salt": salt, "return_token_ids": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client():
            for i, (_, prompt) in todo:
                out[i] = await stream_one(session, url, prompt, max_tokens, extra=extra)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return out  # type: ignore[return-value]


@dataclass
class Phase:
    """One policy's pass over the workload in one round."""

    policy: str
    round: int
    first: bool
    samples: list[Sample]
    delta: dict[str, dict[str, float]]
    wall: float
    spills: dict[str, float] = field(default_factory=dict)  # this proxy's, by leg


def salt_check(server, rnd: random.Random, tokens: int) -> dict[str, float]:
    """Hit tokens on one instance for a prompt sent with salt a, then with
    salt b (must be 0: the salt keeps apart what the policies cache), then
    with salt a again (must be the prompt's full blocks)."""
    prompt = random_prompt(rnd, tokens)
    hits = {}
    for label, salt in (("first", "check-a"), ("other_salt", "check-b"), ("same_salt", "check-a")):
        before = scrape(server.url)["hits"]
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1,
                           "cache_salt": salt}).encode()
        req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=120).read()
        hits[label] = scrape(server.url)["hits"] - before
    return hits


def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / time.strftime("affinity-%H%M%S")
    logs.mkdir()
    model = model_dir(work)
    wl = make_workload(args.seed, args.families, args.per_family, args.shared_tokens,
                       tuple(args.suffix_tokens))
    if args.affinity_bytes > wl.key_room():
        raise SystemExit(f"--affinity-prefix-bytes {args.affinity_bytes} exceeds the shared "
                         f"prefix's {wl.key_room()} JSON bytes: lower it or raise --shared-tokens")
    producers, consumers = instance_names(args.producers, args.consumers)
    picker = PortPicker()
    # One range 8 apart per instance (at most 8); data ports at +64.. stay outside.
    kv = picker.kv(span=8 * (len(producers) + len(consumers)))
    # Start order P1, D1, P2, D2, ... (the kv ranges of the original 2P2D run).
    order = [n for pair in zip(producers, consumers) for n in pair]
    order += [n for n in (*producers, *consumers) if n not in order]
    blocks = {"P": args.producer_kv_blocks, "D": args.consumer_kv_blocks}
    servers = {}
    for i, name in enumerate(order):
        role = "kv_producer" if name[0] == "P" else "kv_consumer"
        extra = ["--kv-transfer-config", kv_config(role, kv + 8 * i)]
        if blocks[name[0]]:
            extra += ["--num-gpu-blocks-override", str(blocks[name[0]])]
        servers[name] = make_server(name, model, extra, logs)
    servers = {n: servers[n] for n in (*producers, *consumers)}  # report order
    legs = ["--prefill", *(f"127.0.0.1:{servers[n].port}" for n in producers),
            "--decode", *(f"127.0.0.1:{servers[n].port}" for n in consumers)]
    proxies = {
        "round_robin": ProxyServer(picker.http(), logs / "rr-proxy.log", "--policy", "round_robin", *legs),
        "prefix_affinity": ProxyServer(picker.http(), logs / "affinity-proxy.log", "--policy",
                                       "prefix_affinity", "--affinity-prefix-bytes",
                                       str(args.affinity_bytes), "--affinity-load-factor",
                                       str(args.load_factor), *legs),
    }
    t0 = time.monotonic()
    try:
        start_all(list(servers.values()), 900)
        for proxy in proxies.values():
            proxy.start(healthy=True)
        started = time.monotonic() - t0
        print(f"{len(servers)} instances and 2 proxies ready after {started:.0f}s; logs in {logs}",
              flush=True)
        warm = make_workload(args.seed + 7, 2, max(len(producers), len(consumers)),
                             args.shared_tokens, tuple(args.suffix_tokens))
        for name, proxy in proxies.items():  # round robin: two requests on every P and D
            asyncio.run(drive(proxy.url, warm, 1, args.max_tokens, f"warm-{name}"))
        check = salt_check(servers["P1"], random.Random(args.seed + 11), 4 * BLOCK + 5)
        print(f"cache_salt check on P1 (hit tokens): {check}", flush=True)
        tag = f"{os.getpid()}-{int(time.time())}"
        phases: list[Phase] = []
        for r in range(args.rounds):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for k, policy in enumerate(order):
                before = settled(servers)
                spilled = scrape_spills(proxies[policy].url)
                t = time.perf_counter()
                samples = asyncio.run(drive(proxies[policy].url, wl, args.concurrency,
                                            args.max_tokens, f"{tag}-r{r}-{policy}"))
                wall = time.perf_counter() - t
                now = scrape_spills(proxies[policy].url)
                spills = {leg: now[leg] - spilled[leg] for leg in LEGS}
                phases.append(Phase(policy, r, k == 0, samples, delta(settled(servers), before),
                                    wall, spills))
                print(json.dumps(phase_row(phases[-1])), flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        stop_all(list(servers.values()))
    return {"workload": wl, "phases": phases, "salt_check": check, "startup_s": started,
            "elapsed_s": time.monotonic() - t0}


# ---------------------------------------------------------------- summary
def _ok(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.error]


def _rate(num: float, den: float) -> float:
    return num / den if den else float("nan")


def summarize(phases: list[Phase]) -> dict:
    """Pooled figures of some phases (one policy's, or one phase)."""
    samples = [s for p in phases for s in p.samples]
    ok = _ok(samples)
    ttft = [1e3 * s.ttft for s in ok]
    e2e = [1e3 * (s.end - s.start) for s in ok]

    def total(names, key):
        return sum(p.delta[n][key] for p in phases for n in names)

    producers, consumers = roles_of(phases[0].delta)

    return {
        "requests": len(samples), "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if s.error), ""),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
        "p_hit_rate": _rate(total(producers, "hits"), total(producers, "queries")),
        "p_computed_tokens": total(producers, "queries") - total(producers, "hits"),
        "d_hit_rate": _rate(total(consumers, "hits"), total(consumers, "queries")),
        "pulled_mb": total(consumers, "recv_bytes") / 1e6,
        "pulled_blocks": total(consumers, "recv_blocks"),
        "loaded_tokens": total(consumers, "loaded_tokens"),
        "failed_pulls": total(consumers, "failed"),
        "split_p": {n: total([n], "requests") for n in producers},
        "split_d": {n: total([n], "requests") for n in consumers},
        "spills": {leg: sum(p.spills.get(leg, 0.0) for p in phases) for leg in LEGS},
    }


def phase_row(p: Phase) -> dict:
    s = summarize([p])
    return {"round": p.round, "policy": p.policy, "first": p.first, "wall_s": round(p.wall, 1),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}}


def mismatches(phases: list[Phase], max_tokens: int) -> tuple[int, int, int]:
    """(pairs compared, pairs whose tokens differ, answers without
    ``max_tokens`` token ids): the same prompt's answer under each policy,
    round by round."""
    compared = differ = short = 0
    for r in sorted({p.round for p in phases}):
        by = {p.policy: p.samples for p in phases if p.round == r}
        if len(by) < 2:
            continue
        a, b = (by[name] for name in POLICIES)
        for x, y in zip(a, b):
            if x.error or y.error:
                continue
            compared += 1
            short += (len(x.token_ids) != max_tokens) + (len(y.token_ids) != max_tokens)
            differ += (x.token_ids, x.text) != (y.token_ids, y.text)
    return compared, differ, short


def ratios(rr: dict, aff: dict) -> dict[str, float]:
    keys = ("ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "e2e_p50_ms", "e2e_p99_ms",
            "p_computed_tokens", "pulled_mb")
    return {k: _rate(aff[k], rr[k]) for k in keys}


# ---------------------------------------------------------------- report
def _split(d: dict[str, float]) -> str:
    return " / ".join(f"{v:.0f}" for v in d.values())


_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def _count(n: int, what: str, names) -> str:
    """Words like 'two producers P1, P2'."""
    word = _WORDS[n] if n < len(_WORDS) else str(n)
    return f"{word} {what}{'s' if n != 1 else ''} {', '.join(names)}"


def cache_text(blocks: int | None, who: str, shared_tokens: int) -> str:
    """One role's KV cache size, in blocks, tokens and the families it holds."""
    per_block = BLOCK * KV_TOKEN_BYTES
    family = max(1, shared_tokens // BLOCK)  # a family's full shared blocks
    if blocks:
        how = f"{blocks} blocks (`--num-gpu-blocks-override {blocks}`)"
    else:
        blocks = DEFAULT_KV_BYTES // per_block
        how = f"{DEFAULT_KV_BYTES >> 30} GiB (`VLLM_CPU_KVCACHE_SPACE`), {blocks} blocks"
    return (f"{who}: {how}, {blocks * BLOCK} tokens, the shared prefixes of "
            f"{blocks / family:.1f} families with nothing in flight")


def markdown(res: dict, args) -> str:
    wl, phases = res["workload"], res["phases"]
    pooled = {pol: summarize([p for p in phases if p.policy == pol]) for pol in POLICIES}
    rr, aff = pooled["round_robin"], pooled["prefix_affinity"]
    q = ratios(rr, aff)
    compared, differ, short = mismatches(phases, args.max_tokens)
    check = res["salt_check"]
    suffix = "–".join(map(str, args.suffix_tokens))
    producers, consumers = roles_of(phases[0].delta)
    n_inst = _WORDS[len(producers) + len(consumers)] if len(producers) + len(consumers) < len(
        _WORDS) else str(len(producers) + len(consumers))
    slash_p, slash_d = " / ".join(producers), " / ".join(consumers)
    p_blocks = getattr(args, "producer_kv_blocks", None)
    d_blocks = getattr(args, "consumer_kv_blocks", None)
    cache = (f"KV cache per instance, {cache_text(p_blocks, 'producers', len(wl.families[0]))}; "
             f"{cache_text(d_blocks, 'consumers', len(wl.families[0]))}.")
    warm = 2 * max(len(producers), len(consumers))
    deployment = f"{len(producers)}P{len(consumers)}D"
    lines = [
        "# Prefix-affinity benchmark" + ("" if deployment == "2P2D" else f" ({deployment})"),
        "",
        f"Generated by `{' '.join(['python benchmarks/proxy/bench_affinity.py', *args.argv])}`"
        f" on {time.strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}); load average before {args.load_before}, after "
        f"{args.load_after} (above {os.cpu_count()}, other work competed for the CPU). "
        f"Start-up {res['startup_s']:.0f} s, whole run {res['elapsed_s']:.0f} s.",
        "",
        "## Method",
        "",
        f"Real vLLM on the CPU: {_count(len(producers), 'producer', producers)} and "
        f"{_count(len(consumers), 'consumer', consumers)} "
        f"(AscendSimpleConnector, tcp transport, `--enforce-eager`, block size {BLOCK}), model "
        f"{MODEL_SHAPE} (float32), all started once. {cache} Two proxies over the same "
        f"{n_inst} instances: "
        f"`--policy round_robin` and `--policy prefix_affinity --affinity-prefix-bytes "
        f"{args.affinity_bytes} --affinity-load-factor {args.load_factor:g}`. The key covers the "
        f"first {args.affinity_bytes} bytes of the prompt's JSON, inside every family's shared "
        f"prefix (the shortest is {wl.key_room()} bytes), so a family's requests share a key "
        "and different families do not.",
        "",
        f"Workload: {len(wl.families)} families × {len(wl.requests) // len(wl.families)} "
        f"requests; each family shares a prefix of {len(wl.families[0])} random token ids, each "
        f"request adds {suffix} of its own ({wl.prompt_tokens} prompt tokens per pass); arrivals "
        f"shuffled across families; {args.concurrency} clients in a closed loop; streaming, "
        f"greedy, {args.max_tokens} output tokens (`ignore_eos`). {args.rounds} rounds; each runs "
        "the whole workload through one proxy, then the other, and which goes first alternates. "
        "Each (round, policy) sends its own `cache_salt`, so no pass finds blocks an earlier pass "
        "cached: every pass starts with cold prefix caches for its prompts. Check before the "
        f"rounds, one prompt sent to P1 three times: hit tokens {check['first']:.0f} (first), "
        f"{check['other_salt']:.0f} (another salt), {check['same_salt']:.0f} (the first salt "
        f"again). Warm-up ({warm} requests per proxy) is not counted.",
        "",
        "Hit rates are deltas of `vllm:prefix_cache_hits_total` over "
        "`vllm:prefix_cache_queries_total` summed over all producers (P) or all consumers "
        "(D). *P computed*: prompt tokens the producers prefilled (queries − hits). *Pulled*: "
        "`vllm:ascend_pd_bytes_transferred_total{direction=\"recv\"}` and "
        "`vllm:ascend_pd_loaded_tokens_total` on the consumers: what the connector moved, after "
        "subtracting what D's own prefix cache held. *Split*: `vllm:request_success_total` per "
        "instance. *Spills*: `vllm_pd_proxy_affinity_spills_total` of the affinity proxy, "
        "prefill / decode leg: picks that passed over the prefix's own instance because it held "
        f"more than {args.load_factor:g}× its share of the outstanding requests. If every request "
        "but each family's first hit its family's full shared "
        f"blocks, the hit rate would be {100 * wl.shared_ceiling():.1f}%. Round robin over caches "
        "that never evict would reach "
        f"{100 * wl.rotation_ceiling(len(producers)):.1f}% on P and "
        f"{100 * wl.rotation_ceiling(len(consumers)):.1f}% on D (each family missing once on "
        "each instance the rotation sends it to, counted in the order the clients send the "
        "requests; with more than one client the proxy sees the prefill legs in about that "
        "order and the decode legs in the order prefills finish, so these are estimates).",
        "",
        "## Results",
        "",
        "| policy | requests | errors | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | e2e p50 ms | "
        "e2e p99 ms | P hit rate | P computed tokens | D hit rate | pulled MB | pulled tokens | "
        f"requests {slash_p} | requests {slash_d} | spills P / D |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pol in POLICIES:
        s = pooled[pol]
        lines.append(
            f"| {pol} | {s['requests']} | {s['errors']} | {s['ttft_p50_ms']:.0f} | "
            f"{s['ttft_p99_ms']:.0f} | {s['ttft_mean_ms']:.0f} | {s['e2e_p50_ms']:.0f} | "
            f"{s['e2e_p99_ms']:.0f} | {100 * s['p_hit_rate']:.1f}% | {s['p_computed_tokens']:.0f} | "
            f"{100 * s['d_hit_rate']:.1f}% | {s['pulled_mb']:.1f} | {s['loaded_tokens']:.0f} | "
            f"{_split(s['split_p'])} | {_split(s['split_d'])} | {_split(s['spills'])} |")
    lines.append(
        f"| **affinity / round_robin** | | | **{q['ttft_p50_ms']:.2f}** | {q['ttft_p99_ms']:.2f} | "
        f"**{q['ttft_mean_ms']:.2f}** | {q['e2e_p50_ms']:.2f} | {q['e2e_p99_ms']:.2f} | | "
        f"{q['p_computed_tokens']:.2f} | | **{q['pulled_mb']:.2f}** | | | | |")
    errs = [f"{pol}: {pooled[pol]['first_error']}" for pol in POLICIES if pooled[pol]["errors"]]
    fails = sum(pooled[pol]["failed_pulls"] for pol in POLICIES)
    lines += [
        "",
        f"**Correctness**: {compared} answers compared, same prompt under both policies in the "
        f"same round (token ids and text): **{differ} mismatches**; {short} answers without "
        f"{args.max_tokens} token ids; {fails:.0f} failed pulls."
        + (f" Errors: {'; '.join(errs)}." if errs else ""),
        "",
        "### Per round",
        "",
        "The spread between rounds is the machine's noise (two cores shared with other work).",
        "",
        "| round | policy | ran | wall s | TTFT p50 ms | TTFT mean ms | P hit rate | D hit rate | "
        f"pulled MB | requests {slash_p} | requests {slash_d} | spills P / D |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        s = summarize([p])
        lines.append(
            f"| {p.round + 1} | {p.policy} | {'first' if p.first else 'second'} | {p.wall:.1f} | "
            f"{s['ttft_p50_ms']:.0f} | {s['ttft_mean_ms']:.0f} | {100 * s['p_hit_rate']:.1f}% | "
            f"{100 * s['d_hit_rate']:.1f}% | {s['pulled_mb']:.1f} | {_split(s['split_p'])} | "
            f"{_split(s['split_d'])} | {_split(s['spills'])} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    try:
        from benchmarks.report import pyplot
        plt = pyplot()
    except ImportError:
        return False
    pooled = {pol: summarize([p for p in res["phases"] if p.policy == pol]) for pol in POLICIES}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    xs = range(len(POLICIES))
    for k, (key, label) in enumerate((("ttft_p50_ms", "p50"), ("ttft_mean_ms", "mean"),
                                      ("ttft_p99_ms", "p99"))):
        axes[0].bar([x + (k - 1) * 0.27 for x in xs], [pooled[p][key] for p in POLICIES], 0.27,
                    label=label)
    axes[0].set_title("TTFT ms", fontsize=9)
    for k, (key, label) in enumerate((("p_hit_rate", "P"), ("d_hit_rate", "D"))):
        axes[1].bar([x + (k - 0.5) * 0.4 for x in xs], [100 * pooled[p][key] for p in POLICIES],
                    0.4, label=label)
    axes[1].set_title("prefix cache hit rate %", fontsize=9)
    axes[2].bar(xs, [pooled[p]["pulled_mb"] for p in POLICIES], 0.5)
    axes[2].set_title("KV pulled by D, MB", fontsize=9)
    for ax in axes:
        ax.set_xticks(list(xs), list(POLICIES), fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def with_reading(text: str, old: str) -> str:
    """The report, followed by the previous report's hand-written reading
    (or a stub to write one)."""
    if HANDWRITTEN in old:
        return text + "\n" + old[old.index(HANDWRITTEN):]
    return text + f"\n{HANDWRITTEN}\n\n(Hand-written after a run; kept when the benchmark is re-run.)\n"


# ---------------------------------------------------------------- main
def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", type=int, default=8)
    ap.add_argument("--per-family", type=int, default=6)
    ap.add_argument("--shared-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--affinity-bytes", type=int, default=4096,
                    help="the affinity proxy's --affinity-prefix-bytes")
    ap.add_argument("--load-factor", type=float, default=1.25,
                    help="the affinity proxy's --affinity-load-factor")
    ap.add_argument("--producers", type=int, default=2, help="kv_producer instances P1..Pn")
    ap.add_argument("--consumers", type=int, default=2, help="kv_consumer instances D1..Dm")
    ap.add_argument("--producer-kv-blocks", type=int, default=None, metavar="N",
                    help=f"each producer's KV cache in {BLOCK}-token blocks (vLLM's "
                         "--num-gpu-blocks-override); default 1 GiB, every family at once")
    ap.add_argument("--consumer-kv-blocks", type=int, default=None, metavar="N",
                    help="the same for each consumer")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--work", default="/tmp/vllm-ascend-pd-bench")
    ap.add_argument("--quick", action="store_true", help="small smoke run, writes no files")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.families, args.per_family, args.shared_tokens, args.affinity_bytes = 4, 3, 512, 1024
        args.rounds = 2
    if not (args.producers >= 1 and args.consumers >= 1 and args.producers + args.consumers <= 8):
        ap.error("--producers and --consumers must be >= 1 and add up to at most 8 (each "
                 "instance takes 8 kv ports below the first one's data ports at +64)")
    # vLLM refuses a cache that cannot hold one request, plus the null block it keeps.
    least = -(-MAX_MODEL_LEN // BLOCK) + 1
    for opt in ("producer_kv_blocks", "consumer_kv_blocks"):
        n = getattr(args, opt)
        if n is not None and n < least:
            ap.error(f"--{opt.replace('_', '-')} {n} is below {least}, the blocks of one "
                     f"{MAX_MODEL_LEN}-token request (--max-model-len): vLLM would not start")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.load_before = _loadavg()
    res = run(args)
    args.load_after = _loadavg()
    text = markdown(res, args)
    print(text)
    if args.quick:
        return
    out = Path(args.out)
    png = out.with_suffix(".png")
    if plot(res, png):
        text += f"\n![TTFT, hit rates and pulled KV per policy]({png.name})\n"
    out.write_text(with_reading(text, out.read_text() if out.exists() else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
