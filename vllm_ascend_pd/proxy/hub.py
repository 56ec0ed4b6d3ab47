"""The supervisor's membership service (``--workers N``).

Owns the registration socket (``--register-port``) and the authoritative
registry, answers the workers' control requests (admin changes, snapshot
queries) on a ZMQ ROUTER socket, and broadcasts the membership on a PUB
socket on every change and every ``publish_interval`` seconds, so that a
worker that missed a broadcast (or started late) catches up.  Both sockets
are ``ipc://`` endpoints in the supervisor's private temp dir.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import msgspec
import zmq
import zmq.asyncio

from vllm_ascend_pd.proxy import membership
from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.membership import Authority
from vllm_ascend_pd.proxy.registration import RegistrationListener
from vllm_ascend_pd.proxy.registry import Instance, Registry
from vllm_ascend_pd.proxy.zmq_tasks import cancel_tasks, close_zmq

logger = init_logger(__name__)


class MembershipHub:
    def __init__(self, cfg: ProxyConfig, *, control: str, updates: str,
                 publish_interval: float = 1.0):
        self.control, self.updates = control, updates
        self._interval = publish_interval
        # No health checks here: the supervisor never routes.
        registry = Registry(health_checks=False)
        membership.add_static(registry, cfg)
        self.authority = Authority(registry)
        self.registration: Optional[RegistrationListener] = None
        if cfg.register_port is not None:
            self.registration = RegistrationListener(
                registry, host=cfg.register_host, port=cfg.register_port,
                ttl=cfg.heartbeat_ttl, on_added=self._changed, on_removed=self._changed,
                secret=cfg.kv_secret())
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._router = self._pub = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Bind everything; raises ConfigError if --register-port is taken."""
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.control)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.updates)
        if self.registration is not None:
            self.registration.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve(), name="proxy-hub-control"),
                       loop.create_task(self._publish_loop(), name="proxy-hub-publish")]

    def _changed(self, inst: Instance) -> None:
        self.authority.changed()
        self.publish()

    def publish(self) -> None:
        try:
            self._pub.send(membership.encode(self.authority.snapshot()), zmq.NOBLOCK)
        except zmq.Again:  # no subscriber keeps up; the next broadcast repeats it
            pass

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.publish()

    async def _serve(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                continue
            ident, payload = frames
            try:
                req = membership.decode_request(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("ignoring a malformed control request: %s", exc)
                continue
            seq = self.authority.seq
            try:
                reply = self.authority.handle(req)
            except ValueError as exc:  # e.g. an unknown role: the worker times out
                logger.warning("ignoring control request %s: %s", req, exc)
                continue
            await self._router.send_multipart([ident, membership.encode(reply)])
            if self.authority.seq != seq:
                self.publish()

    async def stop(self) -> None:
        await cancel_tasks(self._tasks, "membership hub")
        self._tasks = []
        if self.registration is not None:
            await self.registration.stop()
        close_zmq(self._ctx, self._router, self._pub)
        self._ctx = self._router = self._pub = None
