"""Instance membership shared by the workers of a multi-worker proxy.

With ``--workers N`` the supervisor owns the authoritative set of instances:
the static ones from the configuration, the registered ones (only it can bind
``--register-port``) and the admin-added ones, less admin removals.  It
publishes the whole set as a :class:`Snapshot` on every change and
periodically; each worker makes its own registry equal to the newest
snapshot it has seen (:func:`apply_snapshot`).  Admin requests reaching a
worker travel to the supervisor as a :class:`ControlRequest`, and the
:class:`ControlReply` carries the snapshot that includes the change.

Health and suspect marks are per worker and never travel: only who is a
member does, and the slot where every worker counts its load
(proxy/shared_load.py).  Plain data and logic here, no I/O (that is
proxy/hub.py in the supervisor and proxy/link.py in a worker).
"""

from __future__ import annotations

import time
from typing import Literal, Optional

import msgspec

from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registry import BOTH, DECODE, PREFILL, Instance, Registry, Source
from vllm_ascend_pd.proxy.shared_load import SlotTable

logger = init_logger(__name__)


class Member(msgspec.Struct, frozen=True):
    role: str
    address: str
    source: str  # Source value
    meta: dict[str, str] = {}
    # Seconds since the last heartbeat of a registered instance (for /status).
    heartbeat_age: Optional[float] = None
    # Where the workers count its load (proxy/shared_load.py); -1: none.
    slot: int = -1


class Snapshot(msgspec.Struct, frozen=True):
    # Grows with every change; a worker ignores snapshots older than the one
    # it applied (a reply and a broadcast can arrive in either order).
    seq: int
    members: list[Member]


class ControlRequest(msgspec.Struct, frozen=True):
    req_id: int
    op: Literal["add", "remove", "snapshot"]
    role: str = ""
    address: str = ""


class ControlReply(msgspec.Struct, frozen=True):
    req_id: int
    snapshot: Snapshot
    # add: the instance is new; remove: it existed (else 404).
    changed: bool = False


_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)
_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_reply_decoder = msgspec.msgpack.Decoder(ControlReply)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_snapshot(data: bytes) -> Snapshot:
    return _snapshot_decoder.decode(data)


def decode_request(data: bytes) -> ControlRequest:
    return _request_decoder.decode(data)


def decode_reply(data: bytes) -> ControlReply:
    return _reply_decoder.decode(data)


def add_static(registry: Registry, cfg: ProxyConfig) -> None:
    """The instances listed on the command line."""
    for role, addresses in ((PREFILL, cfg.prefill), (DECODE, cfg.decode), (BOTH, cfg.both)):
        for address in addresses:
            registry.add(role, address, Source.STATIC)


def snapshot_of(registry: Registry, seq: int, now: Optional[float] = None,
                slots: Optional[SlotTable] = None) -> Snapshot:
    now = time.monotonic() if now is None else now
    members = registry.instances()
    if slots is not None:
        slots.keep_only({(i.role, i.address) for i in members})
    return Snapshot(seq=seq, members=[
        Member(role=i.role, address=i.address, source=i.source.value,
               meta={str(k): str(v) for k, v in i.meta.items()},
               heartbeat_age=(None if i.last_heartbeat is None
                              else round(now - i.last_heartbeat, 3)),
               slot=slots.slot_of((i.role, i.address)) if slots is not None else -1)
        for i in members])


def apply_snapshot(registry: Registry, snap: Snapshot, now: Optional[float] = None
                   ) -> tuple[list[Instance], list[Instance]]:
    """Make ``registry``'s membership equal to ``snap``.

    Returns ``(added, removed)``.  Instances present in both keep their
    health and load; their source and metadata follow the snapshot.
    """
    now = time.monotonic() if now is None else now
    wanted = {(m.role, m.address): m for m in snap.members}
    removed = [inst for inst in registry.instances()
               if (inst.role, inst.address) not in wanted]
    for inst in removed:
        registry.remove(inst.role, inst.address)
    added = []
    for (role, address), m in wanted.items():
        inst, created = registry.add(role, address, Source(m.source))
        if created:
            added.append(inst)
        inst.source = Source(m.source)
        inst.meta = dict(m.meta)
        if registry.shared_load is not None:
            inst.share_load(registry.shared_load, m.slot)
        # Eviction is the supervisor's job: a worker only shows the age.
        inst.ttl = None
        inst.last_heartbeat = None if m.heartbeat_age is None else now - m.heartbeat_age
    return added, removed


class Authority:
    """The supervisor's side: the authoritative registry and its sequence."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.seq = 1
        self.slots = SlotTable()

    def changed(self) -> None:
        self.seq += 1

    def snapshot(self) -> Snapshot:
        return snapshot_of(self.registry, self.seq, slots=self.slots)

    def handle(self, req: ControlRequest) -> ControlReply:
        """Apply one request.  The worker has validated role and address."""
        changed = False
        if req.op == "add":
            before = self.registry.get(req.role, req.address)
            old_source = before.source if before is not None else None
            inst, changed = self.registry.add(req.role, req.address, Source.ADMIN)
            if changed:
                logger.info("admin: added %s instance %s", req.role, req.address)
            if changed or inst.source is not old_source:
                self.changed()
        elif req.op == "remove":
            inst = self.registry.remove(req.role, req.address)
            changed = inst is not None
            if changed:
                logger.info("admin: removed %s instance %s", req.role, req.address)
                self.changed()
        return ControlReply(req_id=req.req_id, snapshot=self.snapshot(), changed=changed)
