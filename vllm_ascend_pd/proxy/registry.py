"""Known instances and their health/load state.  Plain data, no I/O.

The registry is owned by the proxy's event loop: every mutation happens on
that loop (HTTP handlers, the health checker, the ZMQ registration listener
all run there), so no locks are needed.  Only instances present here are
ever contacted by the proxy.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    import asyncio

    from vllm_ascend_pd.proxy.shared_load import SharedLoad

PREFILL = "prefill"
DECODE = "decode"
# A kv_both instance: one instance (one set of load counters, one health
# state) that serves as P for one request and as D for another.
BOTH = "both"
ROLES = (PREFILL, DECODE, BOTH)
# Which registered roles can serve a leg of each kind.
SERVES = {PREFILL: (PREFILL, BOTH), DECODE: (DECODE, BOTH), BOTH: (BOTH,)}


class Health(str, enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Source(str, enum.Enum):
    STATIC = "static"          # --prefill / --decode
    REGISTERED = "registered"  # ZMQ announcement; evicted without heartbeats
    ADMIN = "admin"            # POST /admin/instances


@dataclass
class Instance:
    role: str
    address: str  # canonical host:port
    source: Source
    health: Health = Health.HEALTHY
    suspect_until: float = 0.0
    health_failures: int = 0
    inflight_requests: int = 0
    inflight_tokens: int = 0
    requests_total: int = 0
    failures_total: int = 0
    last_heartbeat: Optional[float] = None
    ttl: Optional[float] = None
    removed: bool = False
    meta: dict = field(default_factory=dict)  # engine_id, kv_address, model, ...
    # The health probe that puts a dynamically added instance in rotation
    # (set by the proxy state); an admin add waits for it.
    first_probe: Optional["asyncio.Task"] = field(default=None, repr=False, compare=False)
    # Multi-worker proxies: this member's counters summed over every worker
    # (proxy/shared_load.py); None: this process's alone.
    shared: Optional["SharedLoad"] = field(default=None, repr=False, compare=False)
    slot: int = -1

    @property
    def load_requests(self) -> int:
        """Requests in flight to it, over the whole proxy: what balancing weighs."""
        return self.inflight_requests if self.shared is None else self.shared.requests(self.slot)

    @property
    def load_tokens(self) -> int:
        return self.inflight_tokens if self.shared is None else self.shared.tokens(self.slot)

    def share_load(self, shared: "SharedLoad", slot: int) -> None:
        """Count through ``shared`` at ``slot`` from now on (-1: this
        process alone). The slot can change under a worker that missed a
        snapshot (the member left and came back): its requests in flight
        move along, so each release takes its request off where it is
        counted, busy or not."""
        new = (shared, slot) if slot >= 0 else (None, -1)
        if self.shared is new[0] and self.slot == new[1]:
            return
        if self.shared is not None:
            self.shared.add(self.slot, -self.inflight_requests, -self.inflight_tokens)
        self.shared, self.slot = new
        if self.shared is not None:
            self.shared.add(self.slot, self.inflight_requests, self.inflight_tokens)

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def is_suspect(self, now: float) -> bool:
        return now < self.suspect_until

    def to_status(self, now: float) -> dict:
        return {
            "role": self.role,
            "address": self.address,
            "source": self.source.value,
            "health": self.health.value,
            "suspect": self.is_suspect(now),
            "inflight_requests": self.inflight_requests,
            "inflight_tokens": self.inflight_tokens,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "heartbeat_age": (None if self.last_heartbeat is None
                              else round(now - self.last_heartbeat, 3)),
            **({"meta": self.meta} if self.meta else {}),
        }


class Registry:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 suspect_cooldown: float = 5.0, health_failures: int = 2,
                 health_checks: bool = True):
        self._clock = clock
        self._by_role: dict[str, dict[str, Instance]] = {r: {} for r in ROLES}
        self.suspect_cooldown = suspect_cooldown
        self.health_failures = health_failures
        # Without active checks, new dynamic instances are trusted at once.
        self.health_checks = health_checks
        self.version = 0  # bumped on membership change
        # Called with an instance whose health or load changed; set only by
        # multi-worker proxies, which export these numbers across processes.
        self.observer: Optional[Callable[[Instance], None]] = None
        # Multi-worker proxies: where members count their load (see Instance.shared).
        self.shared_load: Optional["SharedLoad"] = None

    # -- membership -------------------------------------------------------
    def add(self, role: str, address: str, source: Source, *,
            meta: Optional[dict] = None, ttl: Optional[float] = None
            ) -> tuple[Instance, bool]:
        """Add (or refresh) an instance.  Returns ``(instance, created)``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        now = self._clock()
        inst = self._by_role[role].get(address)
        created = inst is None
        if created:
            start = Health.HEALTHY
            if source is not Source.STATIC and self.health_checks:
                start = Health.UNKNOWN  # routable once a probe passes
            inst = Instance(role=role, address=address, source=source, health=start)
            self._by_role[role][address] = inst
            self.version += 1
        elif inst.source is Source.REGISTERED and source is not Source.REGISTERED:
            inst.source = source  # pinned by an operator: no longer evictable
        if source is Source.REGISTERED:
            inst.last_heartbeat = now
            inst.ttl = ttl
        if meta:
            inst.meta.update(meta)
        if created and self.observer is not None:
            self.observer(inst)
        return inst, created

    def remove(self, role: str, address: str) -> Optional[Instance]:
        inst = self._by_role.get(role, {}).pop(address, None)
        if inst is not None:
            inst.removed = True
            self.version += 1
        return inst

    def get(self, role: str, address: str) -> Optional[Instance]:
        return self._by_role.get(role, {}).get(address)

    def instances(self, role: Optional[str] = None) -> list[Instance]:
        """Instances that can serve ``role`` (``both`` ones serve either leg),
        or every instance once when ``role`` is None."""
        roles = SERVES[role] if role is not None else ROLES
        return [i for r in roles for i in self._by_role[r].values()]

    def addresses(self) -> set[str]:
        return {i.address for i in self.instances()}

    def is_known(self, address: str) -> bool:
        return any(address in self._by_role[r] for r in ROLES)

    def evict_expired(self) -> list[Instance]:
        """Drop registered instances whose heartbeats stopped."""
        now = self._clock()
        gone = []
        for role in ROLES:
            for inst in list(self._by_role[role].values()):
                if (inst.source is Source.REGISTERED and inst.ttl is not None
                        and inst.last_heartbeat is not None
                        and now - inst.last_heartbeat > inst.ttl):
                    self.remove(role, inst.address)
                    gone.append(inst)
        return gone

    # -- selection --------------------------------------------------------
    def candidates(self, role: str, exclude: Iterable[str] = ()) -> list[Instance]:
        """Routable instances of ``role`` not in ``exclude``.

        Healthy, non-suspect nodes first; if there are none, healthy nodes
        that recently failed a request (better one more try than a 503).
        Nodes the health checker found dead, or not yet probed, are never
        returned.
        """
        now = self._clock()
        excluded = set(exclude)
        good, suspect = [], []
        for inst in self.instances(role):
            if inst.address in excluded or inst.health is not Health.HEALTHY:
                continue
            (suspect if inst.is_suspect(now) else good).append(inst)
        return good or suspect

    # -- state changes ----------------------------------------------------
    def acquire(self, inst: Instance, tokens: int) -> None:
        inst.inflight_requests += 1
        inst.inflight_tokens += tokens
        inst.requests_total += 1
        if inst.shared is not None:
            inst.shared.add(inst.slot, 1, tokens)
        if self.observer is not None:
            self.observer(inst)

    def release(self, inst: Instance, tokens: int) -> None:
        inst.inflight_requests -= 1
        inst.inflight_tokens -= tokens
        if inst.shared is not None:
            inst.shared.add(inst.slot, -1, -tokens)
        if self.observer is not None:
            self.observer(inst)

    def mark_failure(self, inst: Instance) -> None:
        inst.failures_total += 1
        inst.suspect_until = self._clock() + self.suspect_cooldown

    def mark_success(self, inst: Instance) -> None:
        inst.suspect_until = 0.0

    def record_probe(self, inst: Instance, ok: bool) -> Optional[Health]:
        """Apply a health-probe result.  Returns the new health on a change."""
        before = inst.health
        if ok:
            inst.health_failures = 0
            inst.health = Health.HEALTHY
            inst.suspect_until = 0.0
        else:
            inst.health_failures += 1
            if inst.health is Health.UNKNOWN or inst.health_failures >= self.health_failures:
                inst.health = Health.UNHEALTHY
        if inst.health is before:
            return None
        if self.observer is not None:
            self.observer(inst)
        return inst.health

    def snapshot(self) -> dict:
        now = self._clock()
        return {role: [i.to_status(now) for i in self._by_role[role].values()]
                for role in ROLES}
