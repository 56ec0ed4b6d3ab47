"""examples/offline_disagg.py (LLM class, producer + consumer processes) is
token-exact against the single reference server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import post
from vllm_ascend_pd.testing.servers import free_kv_port

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "offline_disagg.py"


def test_offline_example_matches_single_instance(cluster, tiny_model, tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", tiny_model, "--kv-port", str(free_kv_port())],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rows, summary = lines[:-1], lines[-1]
    assert summary["loaded_tokens"] == summary["prompt_tokens"] > 0
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from offline_disagg import PROMPTS
    finally:
        sys.path.pop(0)
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        ref = post(cluster.S.url, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert row["token_ids"] == ref["choices"][0]["token_ids"]
