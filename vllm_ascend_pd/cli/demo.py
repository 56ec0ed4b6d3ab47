"""``vllm-ascend-pd demo``: what ``make demo`` runs (vllm_ascend_pd/demo.py)."""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="tiny model, 1P1D + proxy on the CPU, two requests, transfer statistics",
        description="Build a tiny model, start 1P1D + proxy on the CPU, send a completion "
                    "and a chat completion, print the answers and the transfer statistics.")
    p.add_argument("--work-dir", default=None,
                   help="where the model and logs go (default: $DEMO_DIR or ./demo-work)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.work_dir:
        os.environ["DEMO_DIR"] = args.work_dir
    from vllm_ascend_pd import demo

    return demo.main([])
