"""Everything one proxy application owns, in one object."""

from __future__ import annotations

import asyncio
import os
import random
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

import zmq.asyncio

from vllm_ascend_pd.proxy.balancer import Policy, make_policy
from vllm_ascend_pd.proxy.clients import BackendClients
from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.membership import add_static
from vllm_ascend_pd.proxy.metrics import ProxyMetrics
from vllm_ascend_pd.proxy.registry import DECODE, PREFILL, Instance, Registry
from vllm_ascend_pd.proxy.shared_load import SharedLoad

if TYPE_CHECKING:
    from vllm_ascend_pd.proxy.link import SupervisorLink
    from vllm_ascend_pd.proxy.worker import WorkerContext

logger = init_logger(__name__)

ReleaseFn = Callable[..., Awaitable[bool]]


async def default_release_transfer(kv_transfer_params: dict, *, timeout: float = 2.0,
                                   secret: str = "", ctx=None) -> bool:
    """Ask the producer to free the KV blocks of an abandoned transfer."""
    try:
        from vllm_ascend_pd.kvclient import release_transfer
    except ImportError:
        logger.warning("vllm_ascend_pd.kvclient is not available; the producer keeps "
                       "the KV blocks of an abandoned request until its own timeout")
        return False
    return await release_transfer(kv_transfer_params, timeout=timeout, secret=secret,
                                  ctx=ctx)


class ProxyState:
    def __init__(self, cfg: ProxyConfig, *, release_transfer: Optional[ReleaseFn] = None,
                 rng: Optional[random.Random] = None,
                 worker: Optional["WorkerContext"] = None):
        self.cfg = cfg
        # One worker of several (proxy/worker.py), or None: the only process.
        self.worker = worker
        self.pid = os.getpid()
        # Admission limit of this process: its share of --max-inflight.
        self.max_inflight = (cfg.inflight_share(worker.index) if worker is not None
                             else cfg.max_inflight)
        self.registry = Registry(suspect_cooldown=cfg.suspect_cooldown,
                                 health_failures=cfg.health_failures,
                                 health_checks=cfg.health_interval > 0)
        self.clients = BackendClients(cfg)
        self.metrics = ProxyMetrics(
            self.registry.instances,
            multiprocess_dir=worker.metrics_dir if worker is not None else None)
        rng = rng or random.Random()
        self.policies: dict[str, Policy] = {
            role: make_policy(cfg.policy, random.Random(rng.random()),
                              load_factor=cfg.affinity_load_factor,
                              on_spill=self.metrics.affinity_spills.labels(role).inc)
            for role in (PREFILL, DECODE)
        }
        if self.metrics.instance_healthy is not None:  # multiprocess mode
            self.registry.observer = self.metrics.observe
        if worker is not None and worker.load_path:
            self.registry.shared_load = SharedLoad(worker.load_path, worker.count, worker.index)
            self.registry.shared_load.reset_row()
        # One ZMQ context for every release (closed with the app), made on
        # the first one: most proxies never release anything.
        self._release_ctx: Optional[zmq.asyncio.Context] = None
        self._secret = cfg.kv_secret()
        self.release_transfer: ReleaseFn = release_transfer or self._default_release
        self.inflight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._background: set[asyncio.Task] = set()
        self.health = None        # HealthChecker, set by the app
        self.registration = None  # RegistrationListener, set by the app
        self.link: Optional["SupervisorLink"] = None  # workers only, set by the app
        add_static(self.registry, cfg)

    # -- admission --------------------------------------------------------
    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()
        self.metrics.inflight.inc()

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()
        if self.inflight == 0:
            self.idle.set()

    # -- instance lifecycle -----------------------------------------------
    def release_instance(self, inst: Instance, tokens: int) -> None:
        self.registry.release(inst, tokens)
        if inst.removed and inst.inflight_requests == 0:
            self.close_if_unused(inst.address)

    def on_instance_removed(self, inst: Instance) -> None:
        if inst.inflight_requests == 0:
            self.close_if_unused(inst.address)

    def on_instance_added(self, inst: Instance) -> None:
        if self.health is not None and self.registry.health_checks:
            inst.first_probe = self.spawn(self.health.probe(inst))

    async def first_probe(self, inst: Instance) -> None:
        """Wait for the probe :meth:`on_instance_added` started for ``inst``
        (none without health checks or once it was removed) instead of
        probing again: a worker learns the instance it adds from the
        supervisor's answer, which runs on_instance_added.  Shielded: a
        client leaving does not cancel the probe the instance needs to enter
        rotation."""
        if inst.first_probe is not None and not inst.removed:
            await asyncio.shield(inst.first_probe)

    def close_if_unused(self, address: str) -> None:
        if not self.registry.is_known(address):
            self.clients.close_later(address)

    # -- background work --------------------------------------------------
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def adopt(self, task: asyncio.Task) -> None:
        """Keep a running task (one whose client left) until it ends, and
        let shutdown wait for it like spawned work."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def release_kv(self, kv_transfer_params: dict, reason: str) -> asyncio.Task:
        """Tell the producer to free blocks nobody will pull (not awaited)."""
        return self.spawn(self._release(kv_transfer_params, reason))

    async def _release(self, params: dict, reason: str) -> None:
        try:
            ok = await self.release_transfer(params, timeout=self.cfg.release_timeout)
        except Exception:
            logger.exception("release_transfer failed (%s)", reason)
            return
        logger.info("released KV of transfer %s (%s): %s",
                    params.get("transfer_id", "?"), reason, "ok" if ok else "not confirmed")

    async def settle_background(self, timeout: float) -> int:
        """Let background work finish, including what it starts meanwhile
        (an adopted prefill ends in a release); returns how many are left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._background:
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait(list(self._background), timeout=left)
        return len(self._background)

    async def _default_release(self, kv_transfer_params: dict, *, timeout: float) -> bool:
        if self._release_ctx is None:
            self._release_ctx = zmq.asyncio.Context()
        return await default_release_transfer(kv_transfer_params, timeout=timeout,
                                              secret=self._secret,
                                              ctx=self._release_ctx)

    def close_release_context(self) -> None:
        if self._release_ctx is not None:
            self._release_ctx.destroy(linger=0)
            self._release_ctx = None

    async def close_background(self, timeout: float = 3.0) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)
            for t in list(self._background):
                t.cancel()
