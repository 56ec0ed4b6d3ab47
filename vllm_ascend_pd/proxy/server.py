"""Running the proxy: listen, serve, and drain on shutdown."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Optional, Sequence

from aiohttp import web

from vllm_ascend_pd.net import host_port
from vllm_ascend_pd.proxy.app import STATE_KEY, create_app
from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.state import ReleaseFn

if TYPE_CHECKING:
    from vllm_ascend_pd.proxy.worker import WorkerContext

logger = init_logger(__name__)


class ProxyServer:
    """Owns the aiohttp runner of one proxy.

    ``shutdown()`` is what SIGTERM triggers: stop accepting connections,
    answer 503 to anything still arriving, let in-flight requests finish for
    up to ``cfg.drain_timeout`` seconds, then cancel the rest and clean up.

    A worker of a multi-worker proxy passes ``socks``, the listening sockets
    its supervisor bound (one per address of ``--host``, shared by all
    workers), and its ``worker`` context.
    """

    def __init__(self, cfg: ProxyConfig, *, release_transfer: Optional[ReleaseFn] = None,
                 socks: Sequence[socket.socket] = (),
                 worker: Optional["WorkerContext"] = None):
        self.cfg = cfg
        self.app = create_app(cfg, release_transfer=release_transfer, worker=worker)
        self.state = self.app[STATE_KEY]
        self._socks = list(socks)
        self._runner: Optional[web.AppRunner] = None
        self._sites: list[web.BaseSite] = []
        self.port: Optional[int] = None

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client disconnect cancels its handler
            access_log=logger if self.cfg.access_log else None,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        if self._socks:
            self._sites = [web.SockSite(self._runner, sock, backlog=4096)
                           for sock in self._socks]
        else:  # every address cfg.host resolves to, like the supervisor
            self._sites = [web.TCPSite(self._runner, self.cfg.host, self.cfg.port,
                                       backlog=4096, reuse_address=True)]
        try:
            for site in self._sites:
                await site.start()
        except BaseException:
            # A taken port: close the backend sessions and tasks setup() made.
            self._sites = []
            await self._runner.cleanup()
            self._runner = None
            raise
        addresses = self._runner.addresses
        self.port = addresses[0][1] if addresses else self.cfg.port
        # Only now: the port can still be taken after the app has started.
        cfg = self.cfg
        logger.info("proxy ready on %s: %d prefill, %d decode, %d kv_both instances, policy %s",
                    ", ".join("http://" + host_port(*a[:2]) for a in addresses),
                    len(cfg.prefill), len(cfg.decode), len(cfg.both), cfg.policy)

    async def shutdown(self) -> None:
        state = self.state
        state.draining = True
        for site in self._sites:
            await site.stop()  # no new connections
        self._sites = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_timeout
        if state.inflight:
            logger.info("draining %d in-flight requests (up to %.0fs)", state.inflight,
                        self.cfg.drain_timeout)
            try:
                await asyncio.wait_for(state.idle.wait(), self.cfg.drain_timeout)
            except asyncio.TimeoutError:
                logger.warning("drain timeout: cancelling %d requests", state.inflight)
        # Prefills whose clients left still run: only their answers name the
        # KV to free on the producers. Cut, that KV waits for its lease.
        left = await state.settle_background(max(0.0, deadline - loop.time()))
        if left:
            logger.warning("drain timeout: cancelling %d background tasks (prefills of "
                           "departed clients, KV releases); their producers free that KV "
                           "when its lease expires", left)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        logger.info("proxy stopped")
