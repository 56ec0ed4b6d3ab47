"""``create_app(cfg)``: the proxy as an aiohttp ``web.Application``."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

from aiohttp import web

from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.handlers import Handlers
from vllm_ascend_pd.proxy.health import HealthChecker
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registration import RegistrationListener
from vllm_ascend_pd.proxy.state import ProxyState, ReleaseFn

if TYPE_CHECKING:
    from vllm_ascend_pd.proxy.worker import WorkerContext

logger = init_logger(__name__)

STATE_KEY = web.AppKey("pd_proxy_state", ProxyState)


def create_app(cfg: ProxyConfig, *, release_transfer: Optional[ReleaseFn] = None,
               rng: Optional[random.Random] = None,
               worker: Optional["WorkerContext"] = None) -> web.Application:
    """Build the proxy application.

    ``release_transfer`` replaces ``vllm_ascend_pd.kvclient.release_transfer``
    (tests inject a fake); ``rng`` seeds the tie-breaking of the balancer.
    Background work (health checks, registration) starts in ``on_startup``
    and stops in ``on_cleanup``.  ``worker``: this app is one worker of a
    multi-worker proxy (proxy/worker.py); membership then comes from the
    supervisor instead of a registration socket of its own.
    """
    cfg.validate()
    state = ProxyState(cfg, release_transfer=release_transfer, rng=rng, worker=worker)
    handlers = Handlers(state)
    # Body limit enforced by the handler with a JSON 413; aiohttp's own limit
    # sits just above it so that chunked bodies cannot grow without bound.
    app = web.Application(client_max_size=cfg.max_body_bytes + 1)
    app[STATE_KEY] = state
    r = app.router
    r.add_post("/v1/completions", handlers.completions)
    r.add_post("/v1/chat/completions", handlers.chat_completions)
    r.add_get("/v1/models", handlers.models)
    r.add_get("/health", handlers.health)
    r.add_get("/status", handlers.status)
    r.add_get("/metrics", handlers.metrics)
    r.add_post("/admin/instances", handlers.admin_add)
    r.add_delete("/admin/instances", handlers.admin_remove)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _on_startup(app: web.Application) -> None:
    try:
        await _start(app)
    except BaseException:
        # aiohttp runs on_cleanup only after a startup that succeeded: close
        # the sessions and tasks opened so far (a taken --register-port).
        await _on_cleanup(app)
        raise


async def _start(app: web.Application) -> None:
    state = app[STATE_KEY]
    cfg = state.cfg
    for inst in state.registry.instances():
        state.clients.session(inst.address)  # open the long-lived sessions now
    health = HealthChecker(state.registry, state.clients,
                           interval=cfg.health_interval, timeout=cfg.health_timeout)
    if state.worker is not None:
        from vllm_ascend_pd.proxy.link import SupervisorLink

        # state.health is still None: the first snapshot's instances are not
        # probed one by one as they are added, but in the round below.
        state.link = SupervisorLink(
            state.registry, control=state.worker.control, updates=state.worker.updates,
            on_added=state.on_instance_added, on_removed=state.on_instance_removed)
        await state.link.start()
        state.health = health
        # A worker that (re)starts learns registered and admin-added instances
        # unprobed: run the first round before accepting, or it would answer
        # 503 where its siblings route.
        if state.registry.health_checks:
            await health.check_all()
        health.start(checked=state.registry.health_checks)
    else:
        state.health = health
        health.start()
    if cfg.register_port is not None and state.worker is None:
        state.registration = RegistrationListener(
            state.registry, host=cfg.register_host, port=cfg.register_port,
            ttl=cfg.heartbeat_ttl, on_added=state.on_instance_added,
            on_removed=state.on_instance_removed, secret=cfg.kv_secret())
        state.registration.start()


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE_KEY]
    if state.link is not None:
        await state.link.stop()
    if state.registration is not None:
        await state.registration.stop()
    if state.health is not None:
        await state.health.stop()
    await state.close_background()
    state.close_release_context()
    await state.clients.close()
