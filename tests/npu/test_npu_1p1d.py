"""1P1D on two NPUs (ASCEND_RT_VISIBLE_DEVICES = one device each) with a small
public model: greedy output through the proxy is token-exact against a single
instance, and the decode instance loaded the whole prompt, for each NPU
transport (hccl, llmdatadist)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import metric, post, wait_for
from tests.npu.conftest import DEVICES, MODEL, device_ip
from vllm_ascend_pd.testing.servers import ProxyServer, VllmServer, free_kv_port, free_port

pytestmark = pytest.mark.npu

NPU_ARGS = [
    "--distributed-executor-backend", "uni", "--enforce-eager", "--max-model-len", "2048",
    "--dtype", "bfloat16", "--block-size", "128", "--seed", "0",
    "--gpu-memory-utilization", "0.5", "--served-model-name", "m",
]
PROMPTS = [
    "The capital of France is",
    "Explain prefill/decode disaggregation in one paragraph: " + "why split the work? " * 40,
    "List the planets of the solar system, nearest to the Sun first:",
]
COMM_PORT = 26000


class NpuServer(VllmServer):
    def command(self) -> list[str]:
        # The base class names the model "tiny"; NPU_ARGS name it "m".
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]


def completion(url: str, prompt: str, max_tokens: int = 24) -> tuple[list[int], int]:
    """(greedy output token ids, prompt length in tokens)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    out = post(url, "/v1/completions", body, timeout=300)
    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens"]


def local_compute(url: str) -> float | None:
    """Prompt tokens D computed itself; None on vLLM versions without the metric."""
    try:
        return metric(url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    except KeyError:
        return None


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    path = Path(os.environ.get("NPU_TEST_LOG_DIR") or tmp_path_factory.mktemp("npu-logs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def reference(logs) -> list[tuple[list[int], int]]:
    """Greedy outputs of one plain instance, started alone and stopped first."""
    s = NpuServer("S", MODEL, free_port(), list(NPU_ARGS), env={"ASCEND_RT_VISIBLE_DEVICES": DEVICES[0]},
                  log_path=logs / "S.log")
    try:
        s.start().wait_ready(1200)
        return [completion(s.url, p) for p in PROMPTS]
    finally:
        s.stop()


def transport_skip_reason(transport: str) -> str | None:
    from vllm_ascend_pd.transport import TRANSPORTS

    if transport not in TRANSPORTS:
        return f"transport {transport} is not part of this build"
    if transport == "llmdatadist":
        if importlib.util.find_spec("llm_datadist") is None:
            return "CANN's llm_datadist is not importable (source CANN's set_env.sh)"
        if None in (device_ip(DEVICES[0]), device_ip(DEVICES[1])):
            return "hccn_tool reports no device IPs for the test NPUs"
    return None


def npu_kv_config(role: str, kv_port: int, extra: dict) -> str:
    return json.dumps({"kv_connector": "AscendSimpleConnector", "kv_role": role, "kv_port": kv_port,
                       "kv_buffer_device": "npu", "kv_connector_extra_config": extra})


@contextlib.contextmanager
def proxied(p: NpuServer, d: NpuServer, proxy_log: Path):
    """Start P and D together, then a proxy in front of them; yields the
    proxy's URL and always stops all three."""
    proxy = None
    try:
        p.start()
        d.start()
        p.wait_ready(1200)
        d.wait_ready(1200)
        proxy = ProxyServer(free_port(), proxy_log, "--prefill", f"127.0.0.1:{p.port}",
                            "--decode", f"127.0.0.1:{d.port}", model="m")
        proxy.start()
        yield proxy.url
    finally:
        if proxy is not None:
            proxy.stop()
        d.stop()
        p.stop()


@pytest.mark.parametrize("transport", ["hccl", "llmdatadist"])
def test_1p1d_token_exact_on_two_npus(transport, logs, request):
    reason = transport_skip_reason(transport)
    if reason:
        pytest.skip(reason)
    reference = request.getfixturevalue("reference")  # only started when needed
    kv = free_kv_port(span=8)
    extra = {"transport": transport, "kv_ip": "127.0.0.1", "llmdatadist_comm_port": COMM_PORT}
    if transport == "llmdatadist":
        extra["prefill_device_ips"] = [device_ip(DEVICES[0])]
        extra["decode_device_ips"] = [device_ip(DEVICES[1])]

    p = NpuServer("P", MODEL, free_port(), [*NPU_ARGS, "--kv-transfer-config", npu_kv_config("kv_producer", kv, extra)],
                  env={"ASCEND_RT_VISIBLE_DEVICES": DEVICES[0]}, log_path=logs / f"P-{transport}.log")
    d = NpuServer("D", MODEL, free_port(), [*NPU_ARGS, "--kv-transfer-config", npu_kv_config("kv_consumer", kv, extra)],
                  env={"ASCEND_RT_VISIBLE_DEVICES": DEVICES[1]}, log_path=logs / f"D-{transport}.log")
    with proxied(p, d, logs / f"proxy-{transport}.log") as url:
        loaded_before = metric(d.url, "vllm:ascend_pd_loaded_tokens_total")
        local_before = local_compute(d.url)
        # One request at a time: the same batch shapes as the reference run.
        got = [completion(url, prompt) for prompt in PROMPTS]
        assert got == reference
        # D loaded every prompt token from P and computed none itself.
        prompt_tokens = sum(n for _, n in reference)
        loaded = wait_for(lambda: metric(d.url, "vllm:ascend_pd_loaded_tokens_total") - loaded_before)
        assert loaded == prompt_tokens
        if local_before is not None:
            assert local_compute(d.url) - local_before == 0
        wait_for(lambda: metric(p.url, "vllm:ascend_pd_leases_pending") == 0)


def test_tp2_prefill_to_tp1_decode_over_hccl(logs):
    """Heterogeneous TP on NPUs: P with TP 2 (one KV head per rank for
    Qwen2.5-0.5B's 2) and D with TP 1 pulling both halves over hccl and
    merging them. float32 keeps TP 2's different reduction order below
    greedy decoding's resolution, so the output must match a TP-1 instance
    token for token, with every prompt token loaded from P."""
    if len(DEVICES) < 3:
        pytest.skip("needs three NPUs: set NPU_TEST_DEVICES to three device ids, e.g. 0,1,2")
    args = [a if a != "bfloat16" else "float32" for a in NPU_ARGS]
    s = NpuServer("S32", MODEL, free_port(), args, env={"ASCEND_RT_VISIBLE_DEVICES": DEVICES[2]},
                  log_path=logs / "S32.log")
    try:
        s.start().wait_ready(1200)
        expected = [completion(s.url, prompt, 16) for prompt in PROMPTS]
    finally:
        s.stop()
    kv = free_kv_port(span=8)
    extra = {"transport": "hccl", "kv_ip": "127.0.0.1"}
    p_args = [a if a != "uni" else "mp" for a in args] + ["--tensor-parallel-size", "2"]
    p = NpuServer("P-tp2", MODEL, free_port(), [*p_args, "--kv-transfer-config", npu_kv_config("kv_producer", kv, extra)],
                  env={"ASCEND_RT_VISIBLE_DEVICES": f"{DEVICES[0]},{DEVICES[1]}"}, log_path=logs / "P-tp2.log")
    d = NpuServer("D-tp1", MODEL, free_port(), [*args, "--kv-transfer-config", npu_kv_config("kv_consumer", kv + 4, extra)],
                  env={"ASCEND_RT_VISIBLE_DEVICES": DEVICES[2]}, log_path=logs / "D-tp1.log")
    with proxied(p, d, logs / "proxy-tp2.log") as url:
        loaded_before = metric(d.url, "vllm:ascend_pd_loaded_tokens_total")
        got = [completion(url, prompt, 16) for prompt in PROMPTS]
        assert got == expected
        loaded = wait_for(lambda: metric(d.url, "vllm:ascend_pd_loaded_tokens_total") - loaded_before)
        assert loaded == sum(n for _, n in expected)
        wait_for(lambda: metric(p.url, "vllm:ascend_pd_leases_pending") == 0)
