"""Real 1P1D on two Ascend NPUs. Everything here is marked ``npu`` and skips,
with the reason, wherever torch_npu, two NPUs or vllm-ascend are missing (as
on the CPU CI). The Ascend CI job runs ``pytest -m npu tests/npu``.

Environment knobs: NPU_TEST_MODEL (default Qwen/Qwen2.5-0.5B-Instruct),
NPU_TEST_DEVICES (physical device ids, default "0,1"; three for the
heterogeneous-TP test), NPU_TEST_LOG_DIR.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

MODEL = os.environ.get("NPU_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
DEVICES = os.environ.get("NPU_TEST_DEVICES", "0,1").split(",")


@functools.cache
def npu_skip_reason() -> str | None:
    """Why NPU tests cannot run here, or None. Probes in a child process so
    the test process itself never initialises an NPU context."""
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (no Ascend stack on this machine)"
    if importlib.util.find_spec("vllm_ascend") is None:
        return "vllm-ascend is not installed"
    probe = subprocess.run(
        [sys.executable, "-c", "import torch, torch_npu; print(torch.npu.device_count())"],
        capture_output=True, text=True, timeout=300,
    )
    if probe.returncode != 0:
        return f"torch_npu does not load: {probe.stderr.strip().splitlines()[-1:]}"
    count = int(probe.stdout.split()[-1])
    if count < 2:
        return f"needs 2 NPUs, found {count}"
    return None


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    reason = None
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.npu)
        reason = reason or npu_skip_reason()
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def device_ip(device: str) -> str | None:
    """The NPU NIC's IPv4 address (vllm_ascend_pd.hccn), or None if unreadable."""
    from vllm_ascend_pd import hccn

    try:
        return hccn.device_ip(int(device))
    except hccn.HccnError:
        return None
