"""``vllm-ascend-pd``: one command for the demo, the proxy, a local xPyD
topology (``up``) and environment checks (``doctor``).

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; importing this package loads neither vLLM nor torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vllm_ascend_pd.cli import demo, doctor, proxy, up

SUBCOMMANDS = (demo, proxy, up, doctor)


def version() -> str:
    """The installed distribution's version (a stale editable install can
    leave the package's __init__ unimported, so do not rely on it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vllm-ascend-pd")
    except PackageNotFoundError:
        import vllm_ascend_pd

        return getattr(vllm_ascend_pd, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-ascend-pd",
        description="Prefill/decode disaggregation for vLLM on Ascend NPUs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The proxy owns its flags (and its --help): hand everything after
    # `proxy` to its parser untouched instead of declaring them twice.
    if argv[:1] == ["proxy"]:
        return proxy.run_argv(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
