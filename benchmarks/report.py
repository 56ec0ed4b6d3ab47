"""Report pieces shared by benchmarks/{e2e,overlap,transfer}/run.py: the run's
identification (command, time, machine, load) and the Markdown table."""

from __future__ import annotations

import os
import platform
import sys
import time


def run_id(bench: str, argv: list[str] | None, machine_extra: str = "") -> dict:
    """The first keys of a results.json "meta": how it was run, when, on what."""
    return {
        "command": f"python -m benchmarks.{bench} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}{machine_extra}",
    }


def header(meta: dict) -> str:
    """The first line of a results.md: the meta's command, time, machine and load."""
    return (f"`{meta['command']}` — {meta['when']}, {meta['machine']}, "
            f"load {meta['load_before'][0]:.1f} -> {meta['load_after'][0]:.1f}")


def table(rows: list[dict], cols: list[str], two_decimals=lambda col: False) -> str:
    """A Markdown table of ``cols``: floats with one decimal, or two in the
    columns ``two_decimals`` names (ratios)."""
    def cell(col, v):
        if isinstance(v, float):
            return f"{v:.2f}" if two_decimals(col) else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
