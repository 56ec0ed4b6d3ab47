"""Active health checks: GET /health on every instance every N seconds."""

from __future__ import annotations

import asyncio

import aiohttp

from vllm_ascend_pd.proxy.clients import BackendClients
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registry import Health, Instance, Registry

logger = init_logger(__name__)


class HealthChecker:
    def __init__(self, registry: Registry, clients: BackendClients, *,
                 interval: float, timeout: float):
        self._registry = registry
        self._clients = clients
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._task: asyncio.Task | None = None

    async def probe(self, inst: Instance) -> bool:
        """Probe one instance and record the result.  Never raises."""
        try:
            sess = self._clients.session(inst.address)
            async with sess.get("/health", timeout=self._timeout,
                                allow_redirects=False) as resp:
                await resp.read()
                ok = resp.status == 200
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - check_all's gather must not fail:
            # that would end the health loop for every instance.
            logger.debug("health probe of %s failed: %r", inst.address, exc)
            ok = False
        if inst.removed:
            return ok
        change = self._registry.record_probe(inst, ok)
        if change is Health.UNHEALTHY:
            logger.warning("%s instance %s failed its health check; taken out of rotation",
                           inst.role, inst.address)
        elif change is Health.HEALTHY:
            logger.info("%s instance %s is healthy; in rotation", inst.role, inst.address)
        return ok

    async def check_all(self) -> None:
        insts = self._registry.instances()
        if insts:
            await asyncio.gather(*(self.probe(i) for i in insts))

    async def _run(self, checked: bool) -> None:
        while True:
            if not checked:
                await self.check_all()
            checked = False
            await asyncio.sleep(self.interval)

    def start(self, *, checked: bool = False) -> None:
        """Probe every ``interval`` seconds, starting now (or, if the caller
        has just run :meth:`check_all`, one interval from now)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(checked),
                                                                name="proxy-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
