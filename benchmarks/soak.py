"""Soak test: 1P1D + proxy on the CPU (tiny model), many concurrent requests
through the proxy with some clients hanging up at random; reports lost
requests, leaked KV blocks and leases on P and D, errors and latency.

    flock /tmp/vllm-heavy.lock python benchmarks/soak.py --requests 1000 --concurrency 64

Starts its own P, D, a single-instance reference S (for exactness checks on
a sample of answers) and the proxy; or pass --proxy/--instances to soak a
running deployment. Prints one JSON report; exits 1 if a request was lost
or a block or lease leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_ascend_pd.testing.servers import (  # noqa: E402
    BASE_ARGS, PortPicker, ProxyServer, VllmServer, kv_config, start_all, stop_all,
)
from vllm_ascend_pd.testing.soak import soak  # noqa: E402
from vllm_ascend_pd.testing.tiny_model import build_tiny_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--abort-fraction", type=float, default=0.1, help="share of clients that hang up")
    ap.add_argument("--abort-window", type=float, default=2.0, help="they hang up within this many seconds")
    ap.add_argument("--check-fraction", type=float, default=0.1,
                    help="share of answers compared token by token with the reference instance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settle-timeout", type=float, default=60.0)
    ap.add_argument("--proxy", help="soak this proxy instead of starting servers")
    ap.add_argument("--instances", nargs="*", default=[], help="their /metrics URLs (with --proxy)")
    ap.add_argument("--reference", help="single-instance URL for exactness checks (with --proxy)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    kw = dict(requests=args.requests, concurrency=args.concurrency, abort_fraction=args.abort_fraction,
              abort_window_s=args.abort_window, check_fraction=args.check_fraction,
              settle_timeout_s=args.settle_timeout, seed=args.seed)
    if args.proxy:
        report = asyncio.run(soak(args.proxy, args.instances, reference_url=args.reference, **kw))
    else:
        report = _with_servers(Path(args.workdir or tempfile.mkdtemp(prefix="soak-")), kw)
    out = report.as_dict()
    print(json.dumps(out, indent=2))
    return 0 if report.lost == 0 and report.leaked_blocks == 0 and report.leaked_leases == 0 else 1


def _with_servers(work: Path, kw: dict):
    work.mkdir(parents=True, exist_ok=True)
    model = str(build_tiny_model(work / "tiny-llama"))
    ports = PortPicker()
    kv = ports.kv()
    port = ports.http
    P = VllmServer("P", model, port(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_producer", kv)],
                   log_path=work / "P.log")
    D = VllmServer("D", model, port(), [*BASE_ARGS, "--kv-transfer-config",
                                        kv_config("kv_consumer", kv + 2, failure_policy="recompute")],
                   log_path=work / "D.log")
    S = VllmServer("S", model, port(), list(BASE_ARGS), log_path=work / "S.log")
    proxy = ProxyServer(port(), work / "proxy.log", "--prefill", f"127.0.0.1:{P.port}",
                        "--decode", f"127.0.0.1:{D.port}")
    try:
        start_all((P, D, S), 900)
        proxy.start(healthy=True)
        print(f"[soak] servers ready (logs in {work}); {kw['requests']} requests at concurrency "
              f"{kw['concurrency']}", file=sys.stderr)
        return asyncio.run(soak(proxy.url, [P.url, D.url], reference_url=S.url, **kw))
    finally:
        proxy.stop()
        stop_all((P, D, S))


if __name__ == "__main__":
    sys.exit(main())
