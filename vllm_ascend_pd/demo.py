"""``make demo``: tiny model, 1P1D + proxy on the CPU, one completion and one
chat completion, the answers and the transfer statistics, then shutdown.

This is a command-line program, so it prints its results to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, PortPicker, ProxyServer, VllmServer, kv_config, start_all, stop_all,
)
from vllm_ascend_pd.testing.tiny_model import build_tiny_model


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _metrics(url: str, prefix: str) -> list[str]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    skip = ("_created", "_bucket")
    return [ln for ln in text.splitlines() if ln.startswith(prefix) and not ln.split("{")[0].endswith(skip)]


def main(argv: list[str] | None = None) -> int:
    work = Path(os.environ.get("DEMO_DIR", "demo-work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[demo] building the tiny model in {work / 'tiny-llama'}")
    model = str(build_tiny_model(work / "tiny-llama"))
    ports = PortPicker()
    kv = ports.kv()
    p = VllmServer("prefill", model, ports.http(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_producer", kv)], log_path=work / "prefill.log")
    d = VllmServer("decode", model, ports.http(), [*BASE_ARGS, "--kv-transfer-config", kv_config("kv_consumer", kv + 2)], log_path=work / "decode.log")
    proxy = ProxyServer(ports.http(), work / "proxy.log", "--prefill", f"127.0.0.1:{p.port}",
                        "--decode", f"127.0.0.1:{d.port}")
    try:
        print(f"[demo] starting prefill :{p.port} and decode :{d.port} (logs in {work})")
        start_all((p, d), 600)
        proxy.start(healthy=True)
        url = proxy.url
        print(f"[demo] proxy on {url}")
        prompt = "the prefill instance computes the cache and the decode instance " * 6
        out = _post(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0})
        print("\n[completion]", repr(out["choices"][0]["text"]))
        chat = _post(url, "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "alpha beta gamma delta " * 8}],
            "max_tokens": 16, "temperature": 0})
        print("[chat]", repr(chat["choices"][0]["message"]["content"]))
        time.sleep(0.5)
        print("\n[transfer statistics: decode instance]")
        for ln in _metrics(d.url, "vllm:ascend_pd_") + _metrics(d.url, "vllm:prompt_tokens_by_source_total"):
            print("  " + ln)
        print("[transfer statistics: prefill instance]")
        for ln in _metrics(p.url, "vllm:ascend_pd_"):
            print("  " + ln)
        print("\n[demo] the decode instance generated both answers from KV cache pulled from the prefill instance")
        return 0
    finally:
        proxy.stop()
        stop_all((d, p))
        print("[demo] all processes stopped")


if __name__ == "__main__":
    sys.exit(main())
