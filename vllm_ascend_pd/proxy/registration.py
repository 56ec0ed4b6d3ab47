"""Dynamic registration: a ZMQ ROUTER socket receiving instance announcements.

Instances run :class:`vllm_ascend_pd.announce.Announcer`.  Every message is a
heartbeat; instances silent for longer than the TTL are evicted, and a
``leaving`` message removes an instance at once.  With the deployment's shared
secret (``--kv-secret-env``), only announcements signed with it count: anyone
who reaches the port could otherwise put an address of theirs into rotation
and receive clients' prompts and ``Authorization`` headers.  Runs on the proxy's event
loop (``zmq.asyncio``), so it shares the registry without locks.
"""

from __future__ import annotations

import asyncio
import math
from typing import Callable, Optional

import msgspec
import zmq
import zmq.asyncio

from vllm_ascend_pd import net
from vllm_ascend_pd.announce import (ANNOUNCE_AUTH_KIND, ANNOUNCE_PROTOCOL_VERSION,
                                     Announcement, decode_announcement, signed_fields)
from vllm_ascend_pd.auth import AuthError, Authenticator
from vllm_ascend_pd.log_throttle import LogThrottle
from vllm_ascend_pd.proxy.config import ConfigError, normalize_address
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registry import Instance, Registry, Source
from vllm_ascend_pd.proxy.zmq_tasks import cancel_tasks, close_zmq

logger = init_logger(__name__)

DEFAULT_INTERVAL = 3.0
# A sender of bad announcements must not flood the log: one warning per kind
# of refusal per this many seconds, with the count of those left out.
WARN_EVERY_S = 10.0
# An announcement is a few hundred bytes. ZMQ drops the connection of a peer
# sending a larger frame before buffering it (memory, unauthenticated).
MAX_FRAME_BYTES = 64 * 1024


class RegistrationListener:
    def __init__(self, registry: Registry, *, host: str, port: int,
                 ttl: Optional[float],
                 on_added: Callable[[Instance], None],
                 on_removed: Callable[[Instance], None],
                 secret: str = ""):
        self._registry = registry
        self._auth = Authenticator(secret)
        self._warned_unverified = False
        self._warn_log = LogThrottle(WARN_EVERY_S)
        self._host, self._port = host, port
        self.endpoint = f"tcp://{net.host_port(host, port)}"  # resolved by start()
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
        # isfinite: an interval of inf (or nan) would never expire.
        ok = 0 < ann.interval and math.isfinite(ann.interval)
        return 3.0 * (ann.interval if ok else DEFAULT_INTERVAL)

    def handle(self, payload: bytes) -> list[Instance]:
        """Apply one announcement to the registry.  Returns touched instances."""
        try:
            ann = decode_announcement(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.rejected += 1
            self._warn("malformed", "ignoring malformed announcement: %s", exc)
            return []
        if ann.version != ANNOUNCE_PROTOCOL_VERSION:
            self.rejected += 1
            self._warn("version", "ignoring announcement from %r: protocol version %d, "
                       "proxy speaks %d; upgrade the older side", ann.http_address[:100],
                       ann.version, ANNOUNCE_PROTOCOL_VERSION)
            return []
        if not self._authentic(ann):
            self.rejected += 1
            return []
        try:
            address = normalize_address(ann.http_address, what="announced http_address")
        except ConfigError as exc:
            self.rejected += 1
            self._warn("address", "ignoring announcement: %s", exc)
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

    def _authentic(self, ann: Announcement) -> bool:
        if not self._auth.enabled:
            if ann.token and not self._warned_unverified:
                self._warned_unverified = True
                logger.warning("instances sign their announcements but this proxy cannot "
                               "check them: pass --kv-secret-env naming the variable that "
                               "holds their shared secret")
            return True
        try:
            self._auth.verify(ANNOUNCE_AUTH_KIND, ann.token, *signed_fields(ann))
        except AuthError as exc:
            self._warn("auth", "refusing announcement of %s instance %r: %s; every "
                       "instance needs the shared secret the proxy's --kv-secret-env "
                       "names", ann.role, ann.http_address[:100], exc)
            return False
        return True

    def _warn(self, kind: str, msg: str, *args) -> None:
        seen = self._warn_log.hit(kind)
        if seen > 1:
            msg += f" ({seen - 1} more like it since the last such line)"
        if seen:
            logger.warning(msg, *args)

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
                    try:
                        self.handle(payload)
                    except Exception as exc:  # noqa: BLE001
                        # Ending this task would end registration for good
                        # (and evict every registered instance at its TTL).
                        self.rejected += 1
                        self._warn("error", "error handling an announcement: %r", exc)

    async def _evict_loop(self) -> None:
        period = min(0.25, (self._ttl or DEFAULT_INTERVAL) / 3)
        while True:
            await asyncio.sleep(period)
            self.evict()

    def _bind_address(self) -> str:
        """--register-host as an IP address ("*" is ZMQ's every interface).
        ZMQ would resolve a name for IPv4 only, so it is resolved here."""
        host = net.unbracket(self._host)
        if host == "*":
            return host
        try:
            return net.resolve(host, "--register-host")[0]
        except net.HostError as exc:
            raise ConfigError(str(exc)) from None

    def start(self) -> None:
        host = self._bind_address()
        self.endpoint = f"tcp://{net.host_port(host, self._port)}"
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if ":" in host:
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
