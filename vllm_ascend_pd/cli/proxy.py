"""``vllm-ascend-pd proxy ...``: the xPyD proxy, same flags as ``p2p-disagg-proxy``.

The flags are defined once, in ``vllm_ascend_pd.proxy.config.build_parser``;
``main`` forwards the raw arguments here, so ``proxy --help`` shows them.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def add_parser(sub) -> None:
    # Listed for the top-level --help only; main() dispatches `proxy` itself.
    p = sub.add_parser("proxy", add_help=False,
                       help="run the prefill/decode proxy (see `vllm-ascend-pd proxy --help`)")
    p.set_defaults(run=lambda args: run_argv([]))


def run_argv(argv: Sequence[str]) -> int:
    from vllm_ascend_pd.proxy.__main__ import main

    return main(list(argv))


def run(args: argparse.Namespace) -> int:  # pragma: no cover - main() dispatches
    return run_argv([])
