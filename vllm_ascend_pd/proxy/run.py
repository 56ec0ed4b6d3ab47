"""Running one serving process: event loop, logging, signals, shutdown.

Used by the single-process proxy (``__main__``) and by each worker of a
multi-worker one (``worker.py``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Optional, Sequence

from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger

if TYPE_CHECKING:
    from vllm_ascend_pd.proxy.worker import WorkerContext

logger = init_logger(__name__)

# How often a worker checks that its supervisor is still alive.
_PARENT_POLL_S = 1.0


def configure_logging(level: str, tag: str = "") -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level.upper(),
            format=f"%(levelname)s %(asctime)s {tag}[%(name)s] %(message)s")
    logging.getLogger("vllm_ascend_pd").setLevel(level.upper())


def loop_factory(use_uvloop: bool):
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(_PARENT_POLL_S)
    logger.warning("the proxy supervisor (pid %d) is gone; shutting down", parent_pid)
    stop.set()


async def serve(cfg: ProxyConfig, *, socks: Sequence[socket.socket] = (),
                worker: Optional["WorkerContext"] = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain (``ProxyServer.shutdown``)."""
    from vllm_ascend_pd.proxy.server import ProxyServer

    server = ProxyServer(cfg, socks=socks, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await server.start()
    watcher = None
    if worker is not None:
        watcher = loop.create_task(_watch_parent(worker.parent_pid, stop))
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
        if watcher is not None:
            watcher.cancel()
        await server.shutdown()
