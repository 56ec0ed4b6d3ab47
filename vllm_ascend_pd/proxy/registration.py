"""Dynamic registration: a ZMQ ROUTER socket receiving instance announcements.

Instances run :class:`vllm_ascend_pd.announce.Announcer`.  Every message is a
heartbeat; instances silent for longer than the TTL are evicted, and a
``leaving`` message removes an instance at once.  Runs on the proxy's event
loop (``zmq.asyncio``), so it shares the registry without locks.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

import msgspec
import zmq
import zmq.asyncio

from vllm_ascend_pd.announce import ANNOUNCE_PROTOCOL_VERSION, Announcement, decode_announcement
from vllm_ascend_pd.proxy.config import ConfigError, format_address, normalize_address
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registry import Instance, Registry, Source
from vllm_ascend_pd.proxy.zmq_tasks import cancel_tasks, close_zmq

logger = init_logger(__name__)

DEFAULT_INTERVAL = 3.0


class RegistrationListener:
    def __init__(self, registry: Registry, *, host: str, port: int,
                 ttl: Optional[float],
                 on_added: Callable[[Instance], None],
                 on_removed: Callable[[Instance], None]):
        self._registry = registry
        self.endpoint = f"tcp://{format_address(host, port)}"
        self._ipv6 = ":" in host
        self._ttl = ttl
        self._on_added = on_added
        self._on_removed = on_removed
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._sock = None
        self._tasks: list[asyncio.Task] = []
        self.received = 0
        self.rejected = 0

    def ttl_for(self, ann: Announcement) -> float:
        if self._ttl is not None:
            return self._ttl
        return 3.0 * (ann.interval if ann.interval > 0 else DEFAULT_INTERVAL)

    def handle(self, payload: bytes) -> list[Instance]:
        """Apply one announcement to the registry.  Returns touched instances."""
        try:
            ann = decode_announcement(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.rejected += 1
            logger.warning("ignoring malformed announcement: %s", exc)
            return []
        if ann.version != ANNOUNCE_PROTOCOL_VERSION:
            self.rejected += 1
            logger.warning("ignoring announcement from %s: protocol version %d, proxy "
                           "speaks %d; upgrade the older side", ann.http_address,
                           ann.version, ANNOUNCE_PROTOCOL_VERSION)
            return []
        try:
            address = normalize_address(ann.http_address, what="announced http_address")
        except ConfigError as exc:
            self.rejected += 1
            logger.warning("ignoring announcement: %s", exc)
            return []
        role = ann.role  # "both": one instance that serves either leg
        self.received += 1
        if ann.leaving:
            inst = self._registry.get(role, address)
            if inst is None or inst.source is not Source.REGISTERED:
                return []
            self._registry.remove(role, address)
            logger.info("%s instance %s left", role, address)
            self._on_removed(inst)
            return [inst]
        meta = {k: v for k, v in (("engine_id", ann.engine_id),
                                  ("kv_address", ann.kv_address),
                                  ("model", ann.model)) if v}
        inst, created = self._registry.add(role, address, Source.REGISTERED,
                                           meta=meta, ttl=self.ttl_for(ann))
        if created:
            logger.info("%s instance %s registered (engine %s)", role, address,
                        ann.engine_id or "?")
            self._on_added(inst)
        return [inst]

    def evict(self) -> list[Instance]:
        gone = self._registry.evict_expired()
        for inst in gone:
            logger.warning("%s instance %s missed its heartbeats; evicted",
                           inst.role, inst.address)
            self._on_removed(inst)
        return gone

    async def _recv_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) < 2:
                continue
            for payload in frames[1:]:
                if payload:
                    self.handle(payload)

    async def _evict_loop(self) -> None:
        period = min(0.25, (self._ttl or DEFAULT_INTERVAL) / 3)
        while True:
            await asyncio.sleep(period)
            self.evict()

    def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10000)
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            self._ctx.term()
            raise ConfigError(f"cannot bind the registration socket {self.endpoint}: "
                              f"{exc}; choose another --register-port") from exc
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._recv_loop(), name="proxy-registration"),
                       loop.create_task(self._evict_loop(), name="proxy-eviction")]
        logger.info("dynamic registration listening on %s", self.endpoint)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks, "registration")
        self._tasks = []
        close_zmq(self._ctx, self._sock)
        self._ctx = self._sock = None
