"""End to end on real vLLM (CPU): TTFT, ITL and throughput of

  pd       1P1D through our proxy and AscendSimpleConnector (tcp)
  single   one monolithic instance
  example  1P1D with vLLM's ExampleConnector (shared-storage safetensors),
           driven by the client (P with max_tokens=1, then D): our proxy
           needs P to answer with kv_transfer_params, which ExampleConnector
           does not produce

    flock /tmp/vllm-heavy.lock python -m benchmarks.e2e [--quick]

All setups run side by side and take turns: each round sends the next
``concurrency`` prompts to every setup in turn (the order rotates every
round), so a change in the machine's load hits all of them alike. Idle
servers use 0.00-0.04 of a core. ``--sequential`` runs one setup after the
other instead (the older method, which compared setups measured minutes
apart: single-instance TTFT moved 427-1049 ms within one such run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from pathlib import Path

from benchmarks.e2e.cluster import (
    MODEL_SHAPE, closed_loop, idle_cpu, model_dir, random_prompt, setup_example, setup_pd, setup_single,
    summarize,
)
from benchmarks.report import header, pyplot, run_id, table

OUT_DIR = Path(__file__).resolve().parent
DOCS = OUT_DIR.parents[1] / "docs"
SETUPS = {"pd": setup_pd, "single": setup_single, "example": setup_example}


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / time.strftime("e2e-%H%M%S")
    logs.mkdir()
    model = model_dir(work)
    if args.sequential:
        rows = []
        for name in args.setups:
            rows += _measure(args, [SETUPS[name](model, logs)])
        return rows
    return _measure(args, [SETUPS[name](model, logs) for name in args.setups])


def _measure(args, setups: list) -> list[dict]:
    """Start ``setups`` together, warm each, then run interleaved rounds."""
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        for setup in setups:
            setup.start_servers()
            stack.callback(setup.stop)
        for setup in setups:
            setup.wait_started()
        print(f"[{' '.join(s.name for s in setups)}] ready after {time.monotonic() - t0:.0f}s", flush=True)
        warm = random.Random(99)
        warm_prompts = [random_prompt(warm, args.prompt_tokens) for _ in range(2)]
        for setup in setups:
            asyncio.run(closed_loop(setup, warm_prompts, args.max_tokens, 1))
        cpu_before = {s.name: idle_cpu(s) for s in setups}
        rows = []
        for conc in args.concurrency:
            rnd = random.Random(1000 + conc)  # same prompts for every setup
            prompts = [random_prompt(rnd, args.prompt_tokens) for _ in range(args.requests)]
            samples = {s.name: [] for s in setups}
            wall = {s.name: 0.0 for s in setups}
            for r, start in enumerate(range(0, len(prompts), conc)):
                batch = prompts[start:start + conc]
                for setup in setups[r % len(setups):] + setups[:r % len(setups)]:
                    got, took = asyncio.run(closed_loop(setup, batch, args.max_tokens, conc))
                    samples[setup.name] += got
                    wall[setup.name] += took
            for setup in setups:
                row = {"setup": setup.name, "concurrency": conc, **summarize(samples[setup.name], wall[setup.name])}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for setup in setups:
            evidence = (kv_evidence(setup) + f"; idle CPU (cores) before load {cpu_before[setup.name]}, "
                        f"after {idle_cpu(setup)}")
            for row in rows:
                if row["setup"] == setup.name:
                    row["kv_evidence"] = evidence
            print(f"[{setup.name}] {evidence}", flush=True)
    return rows


def kv_evidence(setup) -> str:
    """Proof that D loaded KV rather than recomputing the prompt."""
    import urllib.request

    if setup.name == "pd":
        text = urllib.request.urlopen(setup.servers[1].url + "/metrics", timeout=10).read().decode()
        keep = [ln for ln in text.splitlines() if ln.startswith(("vllm:ascend_pd_transfers_total",
                "vllm:ascend_pd_failed_transfers_total", "vllm:ascend_pd_loaded_tokens_total",
                "vllm:ascend_pd_bytes_transferred_total", "vllm:ascend_pd_xfer_time_seconds_sum",
                "vllm:ascend_pd_xfer_time_seconds_count"))]
        text = urllib.request.urlopen(setup.entry + "/metrics", timeout=10).read().decode()
        keep += [ln for ln in text.splitlines() if ln.split(" ")[0].endswith(("_seconds_sum", "_seconds_count"))]
        return "D and proxy metrics: " + "; ".join(ln.split("{")[0] + " " + ln.rsplit(" ", 1)[1] for ln in keep)
    if setup.name == "example":
        log = setup.servers[1].log_path.read_text(errors="replace")
        return f"D log: {log.count('External Cache Hit')} external cache hits, {log.count('Inject KV cache')} injections"
    return ""


def markdown(rows: list[dict]) -> str:
    cols = ["setup", "concurrency", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "first_itl_p50_ms", "tokens_per_s", "requests_per_s", "ttft_p50_vs_single"]
    base = {r["concurrency"]: r["ttft_p50_ms"] for r in rows if r["setup"] == "single"}
    rows = [{**r, "ttft_p50_vs_single": r["ttft_p50_ms"] / b if (b := base.get(r["concurrency"])) else float("nan")}
            for r in rows]
    return table(rows, cols, two_decimals=lambda c: c.endswith("vs_single"))


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    concs = list(dict.fromkeys(r["concurrency"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    w = 0.8 / len(setups)
    for k, s in enumerate(setups):
        by = {r["concurrency"]: r for r in rows if r["setup"] == s}
        xs = [i + (k - (len(setups) - 1) / 2) * w for i in range(len(concs))]
        for ax, key, lo in ((axes[0], "ttft_p99_ms", "ttft_p50_ms"), (axes[1], "itl_p99_ms", "itl_p50_ms")):
            ax.bar(xs, [by[c][lo] for c in concs], w, label=f"{s} p50")
            ax.scatter(xs, [by[c][key] for c in concs], marker="_", s=200, color="k")
        axes[2].bar(xs, [by[c]["tokens_per_s"] for c in concs], w, label=s)
        for x, c in zip(xs, concs):
            if by[c]["errors"]:
                for ax in axes:
                    ax.annotate(f"{by[c]['errors']}/{by[c]['requests']}\nfailed", (x, 0), ha="center",
                                va="bottom", fontsize=7, color="red", xytext=(0, 12), textcoords="offset points")
    for ax, t in zip(axes, ("TTFT ms (bar p50, dash p99)", "ITL ms (bar p50, dash p99)", "output tokens/s")):
        ax.set_xticks(range(len(concs)), [f"conc {c}" for c in concs])
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(results: Path, png: Path) -> None:
    data = json.loads(results.read_text())
    plot(data["rows"], png, f"{data['meta']['command']} ({data['meta']['when']})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="concurrency 1 only, 4 requests")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--work", default="/tmp/vllm-ascend-pd-bench")
    ap.add_argument("--sequential", action="store_true",
                    help="run one setup after the other instead of interleaved rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests = [1], 4
    load0 = os.getloadavg()
    rows = run(args)
    load1 = os.getloadavg()
    meta = {
        **run_id("e2e", argv),
        "model": MODEL_SHAPE, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "load_before": load0, "load_after": load1,
    }
    (OUT_DIR / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows)
    (OUT_DIR / "results.md").write_text(
        f"{header(meta)}, "
        f"model {MODEL_SHAPE}, {args.prompt_tokens}-token prompts, {args.max_tokens} output tokens\n\n{md}\n")
    plot(rows, DOCS / "benchmarks-e2e.png", f"{meta['command']} ({meta['when']})")
    print(md)


if __name__ == "__main__":
    main()
