"""``vllm-ascend-pd up``: a local xPyD topology (N prefill + M decode vLLM
instances and the proxy) on this machine, until Ctrl-C or SIGTERM.

This is a command-line program: it prints its progress to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import threading
import time
from pathlib import Path

from vllm_ascend_pd.cli.checks import port_free
from vllm_ascend_pd.cli.supervisor import Child, stop_all
from vllm_ascend_pd.cli.topology import Plan, PlanError, make_plan
from vllm_ascend_pd.net import HostError, host_port, resolve


def _device_list(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected device ids like 0,1,2,3, got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and [] (a required flag, or a default the
    help text explains: "--served-model-name: default: --model (default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "up", help="start N prefill + M decode vLLM instances and the proxy on this machine",
        description="Start a local xPyD topology: N prefill (kv_producer) and M decode "
                    "(kv_consumer) vLLM instances with free ports and kv configs, then the "
                    "proxy. Stops everything on Ctrl-C or SIGTERM. Arguments after `--` go "
                    "to every vLLM instance.",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="model path or name, as for `vllm serve`")
    p.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill instances")
    p.add_argument("--decode", type=int, default=1, metavar="M", help="decode instances")
    p.add_argument("--tp", type=int, default=1, metavar="K",
                   help="tensor parallel size: K consecutive NPUs per instance")
    p.add_argument("--port", type=int, default=8000, help="the proxy's HTTP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address every process binds")
    p.add_argument("--served-model-name", default=None, help="default: --model")
    p.add_argument("--device", choices=("auto", "npu", "cpu"), default="auto",
                   help="auto: npu when torch_npu is installed, else cpu")
    p.add_argument("--devices", type=_device_list, default=None, metavar="IDS",
                   help="NPU ids to hand out (default: $ASCEND_RT_VISIBLE_DEVICES, else 0,1,...)")
    p.add_argument("--kv-port", type=int, default=None,
                   help="first kv_port (each instance gets its own 128-port range; default: free)")
    p.add_argument("--kv-extra", type=_json_object, default=None, metavar="JSON",
                   help='extra kv_connector_extra_config keys, e.g. \'{"transport": "tcp"}\'')
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                   help="extra proxy flag (repeatable), e.g. --proxy-arg=--policy=least_tokens")
    p.add_argument("--log-dir", default="pd-up-logs", help="one log file per process")
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="seconds to wait for all instances to answer /health")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress lines while instances start")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra `vllm serve` arguments for every instance")
    p.set_defaults(run=run)


def resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    return "npu" if importlib.util.find_spec("torch_npu") is not None else "cpu"


def plan_from_args(args: argparse.Namespace) -> Plan:
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return make_plan(
        model=args.model, n_prefill=args.prefill, n_decode=args.decode, tp=args.tp,
        device=resolve_device(args.device), proxy_port=args.port, host=args.host,
        served_model_name=args.served_model_name, devices=args.devices, kv_port=args.kv_port,
        kv_extra=args.kv_extra, vllm_args=extra, proxy_args=args.proxy_arg)


def _say(text: str) -> None:
    print(f"[up] {text}", flush=True)


class _Stop:
    """Set by SIGINT/SIGTERM; the main loop polls it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        self.event.set()


def _wait_ready(children: list[Child], stop: _Stop, t0: float, timeout_s: float, interval: float) -> bool:
    """Poll until every child answers /health; print progress. False when a
    child died, the timeout passed, or a stop was requested."""
    last_report = time.monotonic()
    pending = [c for c in children if c.ready_after is None]
    while pending:
        if stop.event.is_set():
            return False
        for c in list(pending):
            code = c.exited()
            if code is not None:
                _say(f"{c.name} exited with code {code} before it was ready; log {c.log_path}:")
                print(c.report(), flush=True)
                return False
            if c.healthy():
                c.ready_after = time.monotonic() - t0
                pending.remove(c)
                _say(f"{c.name} ready on {c.url} after {c.ready_after:.1f}s "
                     f"({len(children) - len(pending)}/{len(children)} ready)")
        elapsed = time.monotonic() - t0
        if pending and elapsed > timeout_s:
            _say(f"not ready after {timeout_s:.0f}s: " + ", ".join(f"{c.name} (log {c.log_path})" for c in pending))
            return False
        if pending and time.monotonic() - last_report >= interval:
            last_report = time.monotonic()
            _say(f"{elapsed:.0f}s: waiting for " + ", ".join(c.name for c in pending))
        stop.event.wait(0.5)
    return True


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except PlanError as exc:
        print(f"vllm-ascend-pd up: {exc}", file=sys.stderr)
        return 2
    # Fail now rather than after the instances spent minutes loading.
    try:
        resolve(plan.host, "--host")
    except HostError as exc:
        print(f"vllm-ascend-pd up: {exc}", file=sys.stderr)
        return 2
    busy = port_free(plan.host, plan.proxy_port)
    if busy:
        print(f"vllm-ascend-pd up: the proxy port {host_port(plan.host, plan.proxy_port)} is not free "
              f"({busy}); pass another --port, or --port 0 for any free port", file=sys.stderr)
        return 2
    logs = Path(args.log_dir).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    instances = [
        Child(i.name, i.argv, plan.url_of(i), logs / f"{i.name}.log", i.env)
        for i in plan.instances]
    proxy = Child("proxy", plan.proxy_argv, plan.proxy_url, logs / "proxy.log",
                  {"VLLM_ASCEND_PD_PLAIN_LOGGING": "1"})
    started: list[Child] = []
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        for i, c in zip(plan.instances, instances):
            where = f" on NPU {','.join(map(str, i.devices))}" if i.devices else ""
            c.start()
            started.append(c)
            _say(f"started {c.name} ({i.role}, pid {c.proc.pid}) on {c.url}{where}, "
                 f"kv_port {i.kv_port}; log {c.log_path}")
        if not _wait_ready(instances, stop, t0, args.ready_timeout, args.progress_interval):
            return 130 if stop.event.is_set() else 1
        proxy.start()
        started.append(proxy)
        _say(f"started the proxy (pid {proxy.proc.pid}) on {proxy.url}; log {proxy.log_path}")
        if not _wait_ready([proxy], stop, t0, args.ready_timeout, args.progress_interval):
            return 130 if stop.event.is_set() else 1
        _say(f"all {len(instances)} instances ready after {time.monotonic() - t0:.1f}s")
        _say(f"proxy ready: {plan.proxy_url}  (model {plan.served_model_name!r}; Ctrl-C stops everything)")
        while not stop.event.wait(1.0):
            dead = [c for c in started if c.exited() is not None]
            if dead:
                for c in dead:
                    _say(f"{c.name} exited with code {c.exited()}; log {c.log_path}:")
                    print(c.report(), flush=True)
                _say("stopping the rest")
                return 1
        return 0
    finally:
        if stop.event.is_set():
            _say(f"{signal.Signals(stop.signum).name} received, stopping {len(started)} processes")
        # The proxy is signalled first, so it stops taking new requests.
        killed = stop_all(list(reversed(started)))
        if killed:
            _say("had to SIGKILL: " + ", ".join(killed))
        _say("all processes stopped")
        for s, h in previous.items():
            signal.signal(s, h)
