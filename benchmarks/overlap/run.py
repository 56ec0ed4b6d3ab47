"""Does D keep decoding while KV transfers arrive? Real vLLM on the CPU.

Streaming requests (short prompt, long output) run on the decode instance;
their inter-token latency (ITL) is measured without and with a background
load of long-prompt requests. For 1P1D the background requests go through
our proxy, so D pulls their KV (and then decodes their last tokens); for the
single instance they are prefilled locally, the interference PD removes.

P is pinned to CPU 0 and D (or the single instance) to CPU 1 with taskset, so
the prefill itself does not take D's core; the client and the proxy float.

    flock /tmp/vllm-heavy.lock python -m benchmarks.overlap [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from benchmarks.e2e.cluster import (
    MODEL_SHAPE, closed_loop, model_dir, pct, random_prompt, running, setup_pd, setup_single,
    stream_one,
)
from benchmarks.report import header, pyplot, run_id, table

OUT_DIR = Path(__file__).resolve().parent
DOCS = OUT_DIR.parents[1] / "docs"


async def one_round(stream_url: str, load_setup, loaded: bool, args, rnd: random.Random) -> dict:
    """Run ``args.streams`` decode streams; with ``loaded``, keep long-prompt
    requests flowing through ``load_setup`` until the streams end."""
    import aiohttp

    stop = asyncio.Event()
    background: list = []

    async def load_loop():
        while not stop.is_set():
            prompt = random_prompt(rnd, args.prompt_tokens)
            samples, _ = await closed_loop(load_setup, [prompt], args.load_max_tokens, 1)
            background.extend(samples)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        task = asyncio.create_task(load_loop()) if loaded else None
        if loaded:
            await asyncio.sleep(args.lead_s)  # let the first prefill reach D
        prompts = [random_prompt(rnd, 64) for _ in range(args.streams)]
        streams = await asyncio.gather(*(stream_one(session, stream_url, p, args.stream_tokens) for p in prompts))
        stop.set()
        if task:
            await task
    errors = [s.error for s in streams + background if s.error]
    duration = max(s.end for s in streams) - min(s.start for s in streams)
    return {"itls": [x for s in streams for x in s.itls], "background": len(background),
            "errors": errors, "seconds": duration}


def run(args) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / time.strftime("overlap-%H%M%S")
    logs.mkdir()
    model = model_dir(work)
    rows = []
    for name in args.setups:
        # vLLM's default chunked prefill (2048-token chunks): how a single
        # instance really interleaves long prefills with running decodes.
        setup = (setup_pd(model, logs, p_cpus="0", d_cpus="1", one_chunk=False) if name == "pd"
                 else setup_single(model, logs, cpus="1", one_chunk=False))
        decode = setup.servers[-1]
        with running(setup):
            rnd = random.Random(7)
            asyncio.run(closed_loop(setup, [random_prompt(rnd, args.prompt_tokens)], 2, 1))  # warm-up
            itls = {False: [], True: []}
            background, errors, loaded_s = 0, [], 0.0
            for r in range(args.rounds):
                for loaded in ((False, True) if r % 2 == 0 else (True, False)):
                    res = asyncio.run(one_round(decode.url, setup, loaded, args, rnd))
                    itls[loaded].extend(res["itls"])
                    background += res["background"]
                    loaded_s += res["seconds"] if loaded else 0.0
                    errors += res["errors"]
            base, load = itls[False], itls[True]
            row = {
                "setup": name, "streams": args.streams, "tokens_per_stream": args.stream_tokens,
                "background_requests": background, "background_per_s": background / loaded_s if loaded_s else 0.0,
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
                "idle_p50_ms": 1e3 * pct(base, 50), "idle_p99_ms": 1e3 * pct(base, 99),
                "loaded_p50_ms": 1e3 * pct(load, 50), "loaded_p99_ms": 1e3 * pct(load, 99),
                "p50_ratio": pct(load, 50) / pct(base, 50), "p99_ratio": pct(load, 99) / pct(base, 99),
                "idle_itls": base, "loaded_itls": load,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("itls")}), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["setup", "streams", "tokens_per_stream", "background_requests", "background_per_s", "errors", "idle_p50_ms",
            "idle_p99_ms", "loaded_p50_ms", "loaded_p99_ms", "p50_ratio", "p99_ratio"]
    return table(rows, cols, two_decimals=lambda c: c.endswith("ratio"))


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, label in (("idle_itls", "no background load"), ("loaded_itls", "with long-prompt load")):
            v = sorted(1e3 * x for x in r[key])
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("ITL ms on the decode instance (log)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{r['setup']}: p50 x{r['p50_ratio']:.2f}, p99 x{r['p99_ratio']:.2f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, 100 tokens per stream")
    ap.add_argument("--setups", nargs="+", default=["pd", "single"], choices=["pd", "single"])
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--stream-tokens", type=int, default=300)
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--load-max-tokens", type=int, default=2)
    ap.add_argument("--lead-s", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/vllm-ascend-pd-bench")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.stream_tokens = 1, 100
    load0 = os.getloadavg()
    rows = run(args)
    load1 = os.getloadavg()
    meta = {
        **run_id("overlap", argv),
        "model": MODEL_SHAPE, "args": vars(args), "load_before": load0, "load_after": load1,
    }
    (OUT_DIR / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows)
    (OUT_DIR / "results.md").write_text(
        f"{header(meta)}\n\n{md}\n")
    plot(rows, DOCS / "benchmarks-overlap.png", f"{meta['command']} ({meta['when']})")
    print(md)


if __name__ == "__main__":
    main()
