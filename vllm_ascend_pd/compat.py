"""Differences between the vLLM versions we support, found by feature
detection (vllm-ascend users run 0.23-0.27; the CPU stack here is 0.32)."""

from __future__ import annotations

import inspect
from typing import Any

SUPPORTED_VLLM = ">=0.23,<0.34"


def init_connector_base(self: Any, base: type, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
    """Call the base constructor with the arguments this vLLM accepts."""
    params = inspect.signature(base.__init__).parameters
    if "kv_cache_config" in params:
        base.__init__(self, vllm_config, role, kv_cache_config)
    else:  # older API: (vllm_config, role)
        base.__init__(self, vllm_config, role)
        self._kv_cache_config = kv_cache_config


def vllm_version() -> str:
    try:
        import vllm

        return getattr(vllm, "__version__", "unknown")
    except ImportError:
        return "missing"


def check_vllm_version() -> str | None:
    """Return a problem description when the installed vLLM is out of range."""
    from packaging.version import InvalidVersion, Version

    v = vllm_version()
    if v == "missing":
        return (
            "vLLM is not installed. On Ascend install vllm (VLLM_TARGET_DEVICE=empty) and "
            "vllm-ascend; on CPUs `pip install 'vllm-ascend-pd[cpu]'`."
        )
    try:
        ver = Version(v.split("+")[0])
    except InvalidVersion:
        return None  # a dev build: let it try
    if not (Version("0.23") <= ver < Version("0.34")):
        return f"vLLM {v} is outside the supported range {SUPPORTED_VLLM}"
    return None
