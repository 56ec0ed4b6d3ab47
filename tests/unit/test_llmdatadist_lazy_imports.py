"""NPU packages are imported lazily: on a CPU machine, importing every module
of the plugin (as vLLM's plugin loader and our CLI/proxy do) must not pull in
torch_npu, llm_datadist or vllm_ascend. Runs in a fresh interpreter so other
tests' imports (or fakes in sys.modules) cannot hide a regression."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys
    import vllm_ascend_pd
    names = sorted(
        m.name for m in pkgutil.walk_packages(vllm_ascend_pd.__path__, "vllm_ascend_pd.")
        if not m.name.endswith("__main__")
    )
    for name in names:
        importlib.import_module(name)
    npu = sorted(m for m in sys.modules
                 if m.split(".")[0] in ("torch_npu", "llm_datadist", "vllm_ascend"))
    print(len(names), "modules;", "npu:", npu)
""")


def test_no_module_imports_npu_packages_at_load():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    ).stdout.strip().splitlines()[-1]
    count = int(out.split()[0])
    assert out.endswith("npu: []"), out
    # The walk must have covered the transports, including the NPU ones.
    assert count >= 30, out


def test_the_npu_transport_module_itself_is_importable_on_cpu():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vllm_ascend_pd.transport.llmdatadist as m; "
         "print(m.LlmDataDistTransport.name, 'llm_datadist' in sys.modules)"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout.split()
    assert out[-2:] == ["llmdatadist", "False"]
