"""``p2p-disagg-proxy`` / ``python -m vllm_ascend_pd.proxy``."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Optional, Sequence

from vllm_ascend_pd.proxy.config import ConfigError, build_parser, config_from_args
from vllm_ascend_pd.proxy.log import init_logger

logger = init_logger("vllm_ascend_pd.proxy")


async def serve(cfg) -> None:
    from vllm_ascend_pd.proxy.server import ProxyServer

    server = ProxyServer(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await server.start()
    # The relay allocates fast and nearly everything dies with its request,
    # so the default collector thresholds run it thousands of times a second
    # (4.5% of the proxy's CPU at 64 streams, 1.2% with these settings;
    # docs/proxy-benchmark.md). What exists now lives as long as the process
    # (with vLLM's logger, torch's objects too): keep it out of every scan.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        await stop.wait()
        logger.info("shutdown requested")
    finally:
        await server.shutdown()


def _loop_factory(use_uvloop: bool):
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = config_from_args(argv)
    try:
        cfg.validate()
    except ConfigError as exc:
        build_parser().error(str(exc))  # exits with status 2
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=cfg.log_level.upper(),
            format="%(levelname)s %(asctime)s [%(name)s] %(message)s")
    logging.getLogger("vllm_ascend_pd").setLevel(cfg.log_level.upper())
    with asyncio.Runner(loop_factory=_loop_factory(cfg.uvloop)) as runner:
        try:
            runner.run(serve(cfg))
        except ConfigError as exc:
            logger.error("%s", exc)
            return 2
        except OSError as exc:
            logger.error("cannot start the proxy: %s", exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
