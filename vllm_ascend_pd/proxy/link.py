"""A worker's connection to its supervisor (``--workers N``).

Receives membership snapshots (SUB) and applies them to the worker's
registry; sends admin changes and snapshot queries (DEALER) and waits for
the answer.  Runs on the worker's event loop, like everything that touches
the registry.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Callable, Optional, TypeVar

import msgspec
import zmq
import zmq.asyncio

from vllm_ascend_pd.proxy import membership
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.membership import ControlReply, ControlRequest, Snapshot
from vllm_ascend_pd.proxy.registry import Instance, Registry
from vllm_ascend_pd.proxy.zmq_tasks import cancel_tasks, close_zmq

logger = init_logger(__name__)

T = TypeVar("T")


class SupervisorUnavailable(RuntimeError):
    """The supervisor did not answer a control request in time."""


async def _receive(sock: zmq.asyncio.Socket, decode: Callable[[bytes], T], what: str,
                   handle: Callable[[T], object]) -> None:
    """Hand each message of ``sock`` to ``handle``, decoded; a malformed one is
    logged and skipped (a bad peer must not stop the link)."""
    while True:
        data = await sock.recv()
        try:
            msg = decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring a malformed %s: %s", what, exc)
            continue
        handle(msg)


class SupervisorLink:
    def __init__(self, registry: Registry, *, control: str, updates: str,
                 on_added: Callable[[Instance], None],
                 on_removed: Callable[[Instance], None], timeout: float = 5.0):
        self._registry = registry
        self._control, self._updates = control, updates
        self._on_added, self._on_removed = on_added, on_removed
        self.timeout = timeout
        self.seq = 0  # of the newest snapshot applied
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._dealer = self._sub = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect and apply the current membership before serving."""
        self._ctx = zmq.asyncio.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(self._control)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(self._updates)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(_receive(self._dealer, membership.decode_reply, "control reply",
                                      self._answer), name="proxy-link-replies"),
            loop.create_task(_receive(self._sub, membership.decode_snapshot,
                                      "membership snapshot", self.apply),
                             name="proxy-link-updates"),
        ]
        reply = await self.request("snapshot")
        self.apply(reply.snapshot)

    def apply(self, snap: Snapshot) -> bool:
        """Apply ``snap`` unless a newer one was applied.  Equal sequence
        numbers are applied again: the periodic broadcast refreshes
        heartbeat ages and metadata without a change of membership."""
        if snap.seq < self.seq:
            return False
        self.seq = snap.seq
        added, removed = membership.apply_snapshot(self._registry, snap)
        for inst in removed:
            logger.info("%s instance %s left the membership", inst.role, inst.address)
            self._on_removed(inst)
        for inst in added:
            logger.info("%s instance %s joined the membership (%s)", inst.role,
                        inst.address, inst.source.value)
            self._on_added(inst)
        return True

    async def request(self, op: str, role: str = "", address: str = "") -> ControlReply:
        """Send one control request; raises SupervisorUnavailable on timeout."""
        req = ControlRequest(req_id=next(self._ids), op=op, role=role, address=address)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req.req_id] = fut
        try:
            await self._dealer.send(membership.encode(req))
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            raise SupervisorUnavailable(
                f"the proxy supervisor did not answer within {self.timeout:.0f}s") from None
        finally:
            self._pending.pop(req.req_id, None)

    def _answer(self, reply: ControlReply) -> None:
        fut = self._pending.get(reply.req_id)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks, "supervisor link")
        self._tasks = []
        close_zmq(self._ctx, self._dealer, self._sub)
        self._ctx = self._dealer = self._sub = None
