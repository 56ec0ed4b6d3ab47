"""``vllm-ascend-pd doctor``: check this host for a PD deployment and say
how to fix each problem. Exit code 1 when any check fails.

This is a command-line program: it prints its report to stdout.
"""

from __future__ import annotations

import argparse
import os

from vllm_ascend_pd.cli import checks
from vllm_ascend_pd.cli.checks import FAIL, Finding


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check vLLM, the NPU stack, ports, device IPs and reachability",
        description="Check this host for a prefill/decode deployment. Prints each problem "
                    "with its fix; exits 1 when something is wrong.")
    p.add_argument("--device", choices=("auto", "npu", "cpu"), default="auto",
                   help="auto: npu when torch_npu or /dev/davinci* is present")
    p.add_argument("--host", default="127.0.0.1", help="address the planned ports bind")
    p.add_argument("--kv-port", type=int, action="append", default=[],
                   help="planned kv_port of an instance on this host (repeatable)")
    p.add_argument("--http-port", type=int, action="append", default=[],
                   help="planned HTTP port (instance or proxy) on this host (repeatable)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (ports per kv_port)")
    p.add_argument("--devices", type=_ints, default=None, metavar="IDS",
                   help="NPU ids whose IPs to read with hccn_tool "
                        "(default on NPU: $ASCEND_RT_VISIBLE_DEVICES, else every /dev/davinciN)")
    p.add_argument("--reach", action="append", default=[], metavar="HOST:PORT",
                   help="must accept a TCP connection, e.g. a peer's kv_port (repeatable)")
    p.add_argument("--health", action="append", default=[], metavar="HOST:PORT",
                   help="an instance or proxy whose GET /health must answer 200 (repeatable)")
    p.set_defaults(run=run)


def collect(args: argparse.Namespace) -> list[Finding]:
    device = checks.detect_device() if args.device == "auto" else args.device
    found = [*checks.check_vllm(), *checks.check_torch_extras(), *checks.check_npu_stack(device)]
    found += checks.check_ports(args.host, args.kv_port, args.http_port, args.tp)
    devices = args.devices
    if devices is None and device == "npu":
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "")
        devices = _ints(visible) if visible.strip() else checks.npu_devices()
    if devices:
        found += checks.check_device_ips(devices)
    try:
        found += checks.check_reach(args.reach)
        found += checks.check_health(args.health)
    except ValueError as exc:  # a malformed HOST:PORT
        found.append(Finding(FAIL, "args", str(exc), "pass HOST:PORT"))
    return found


def report(found: list[Finding]) -> str:
    lines = []
    for f in found:
        lines.append(f"[{f.status:^4}] {f.check:<11} {f.message}")
        if f.fix and f.status != "ok":
            lines.append(f"{'':19}fix: {f.fix}")
    fails = sum(f.status == FAIL for f in found)
    lines.append(f"{fails} problem(s) found" if fails else "no problems found")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    found = collect(args)
    print(report(found), flush=True)
    return 1 if any(f.status == FAIL for f in found) else 0
