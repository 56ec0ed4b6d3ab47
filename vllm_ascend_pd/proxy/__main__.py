"""``p2p-disagg-proxy`` / ``python -m vllm_ascend_pd.proxy``."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from vllm_ascend_pd.proxy import aio
from vllm_ascend_pd.proxy.config import ConfigError, build_parser, config_from_args
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.run import configure_logging, loop_factory, serve

logger = init_logger("vllm_ascend_pd.proxy")


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = config_from_args(argv)
    try:
        cfg.validate()
    except ConfigError as exc:
        build_parser().error(str(exc))  # exits with status 2
    configure_logging(cfg.log_level, "supervisor " if cfg.workers > 1 else "")
    if cfg.workers > 1:
        from vllm_ascend_pd.proxy.supervisor import Supervisor

        return Supervisor(cfg).run()
    with aio.Runner(loop_factory=loop_factory(cfg.uvloop)) as runner:
        try:
            runner.run(serve(cfg))
        except ConfigError as exc:
            logger.error("%s", exc)
            return 2
        except OSError as exc:
            logger.error("cannot start the proxy: %s (is --port %d free?)", exc, cfg.port)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
