"""Decode-leg latency of 1P1D with vLLM's in-process engine vs its default
multiprocess engine, in one run (see docs/known-issues.md, "lost wake-ups").

    python benchmarks/mp_wakeups/run.py [--requests 6]

Prints one line per request and mode, then the medians; the multiprocess
numbers cluster near multiples of 5 s when vLLM's MessageQueue loses a
wake-up (SHM_READER_RECHECK_INTERVAL_MS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from vllm_ascend_pd.testing.servers import BASE_ARGS, VllmServer, free_kv_port, free_port, kv_config
from vllm_ascend_pd.testing.tiny_model import build_tiny_model


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def run_mode(model: str, multiprocess: bool, n: int, logs: Path) -> list[float]:
    args = list(BASE_ARGS)
    i = args.index("--distributed-executor-backend")
    del args[i:i + 2]
    if not multiprocess:
        args += ["--distributed-executor-backend", "uni"]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0"}
    kv = free_kv_port(span=4)
    tag = "mp" if multiprocess else "inproc"
    p = VllmServer(f"P-{tag}", model, free_port(), [*args, "--kv-transfer-config", kv_config("kv_producer", kv)],
                   env=env, log_path=logs / f"P-{tag}.log")
    d = VllmServer(f"D-{tag}", model, free_port(), [*args, "--kv-transfer-config",
                   kv_config("kv_consumer", kv + 2, failure_policy="recompute")],
                   env=env, log_path=logs / f"D-{tag}.log")
    times = []
    try:
        p.start(), d.start()
        p.wait_ready(), d.wait_ready()
        for k in range(n):
            prompt = [100 + (k * 7 + j) % 500 for j in range(97 + k)]
            r = _post(p.url, {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                              "kv_transfer_params": {"do_remote_decode": True}})
            t0 = time.monotonic()
            _post(d.url, {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                          "kv_transfer_params": r["kv_transfer_params"]})
            times.append(time.monotonic() - t0)
            print(f"{tag:7s} request {k}: decode leg {times[-1]:.2f} s", flush=True)
    finally:
        p.stop(), d.stop()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6)
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mp-wakeups-"))
    model = str(build_tiny_model(work / "model"))
    res = {mp: run_mode(model, mp, ns.requests, work) for mp in (False, True)}
    med = {mp: statistics.median(t) for mp, t in res.items()}
    print(f"median decode leg: in-process {med[False]:.2f} s, multiprocess {med[True]:.2f} s "
          f"({med[True] / med[False]:.1f}x); logs in {work}")


if __name__ == "__main__":
    main()
