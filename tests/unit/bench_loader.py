"""Import a benchmark script (benchmarks/ is not a package) for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(relpath: str) -> Iterator[ModuleType]:
    """Generator for a fixture: yields the module, then unloads it."""
    path = BENCHMARKS / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
