"""The fan-in benchmark (benchmarks/transfer/fanin.py) still runs end to end:
a tiny cache, one timed repetition per transport, its own processes, every
pull checked head by head (correctness only; timing runs hold the heavy lock)."""

from __future__ import annotations

import json

import pytest

from benchmarks.transfer import fanin


def test_fanin_tiny_run_is_exact_and_reports_every_cell(tmp_path):
    rows = fanin.main(["--layouts", "tiny", "--tokens", "256", "--reps", "1",
                       "--transports", "tcp", "gloo", "--out", str(tmp_path)])
    assert [(r["layout"], r["tokens"], r["transport"], r["ok"]) for r in rows] == [
        ("tiny", 256, "tcp", True), ("tiny", 256, "gloo", True)]
    for r in rows:
        assert r["MiB"] == 256 * 2 * 2 * 4 * 16 * 2 / (1 << 20)  # tokens x layers x (k, v) x heads x dim x bf16
        assert r["TP1 ms"] > 0 and r["TP2 ms"] > 0 and r["socket 1 GB/s"] > 0 and r["socket 2 GB/s"] > 0
        assert r["x TP2/TP1"] == pytest.approx(r["TP1 ms"] / r["TP2 ms"])
    data = json.loads((tmp_path / "results-fanin.json").read_text())
    assert data["meta"]["cores"] >= 1 and len(data["raw"]) == 2
    assert "| tiny | 256 | gloo |" in (tmp_path / "results-fanin.md").read_text()
