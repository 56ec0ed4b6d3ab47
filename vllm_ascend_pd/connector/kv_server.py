"""Producer worker: serves this rank's leased blocks to consumers.

Driven by ``pump()`` from the engine thread every step, or from the
worker's idle servicer between steps (see pump.py and worker.py). It
answers handshakes, validates every pull against the lease table (transfer
id, request id, block ids), streams the blocks through the transport and ends
the lease. Nothing a peer sends can raise out of ``pump()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator, AuthError
from vllm_ascend_pd.config import MAX_RANKS
from vllm_ascend_pd.connector.pump import Pump, Task
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.connector.zmq_links import RouterLink, router_socket
from vllm_ascend_pd.connector.tp_map import HeadRange, TPMapError, consumers_of
from vllm_ascend_pd.kv_layout import check_compatible
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.log_throttle import LogThrottle
from vllm_ascend_pd.protocol import LayoutDesc
from vllm_ascend_pd.transport import Transport

logger = get_logger(__name__)

# Pulls parked while their lease is not yet registered (bounded: peers are untrusted).
_MAX_WAITING = 1024
# Memory all parked messages may hold together (estimated, see _weight): a
# 4 MiB pull decodes to 4M block ids (~35 MB), a 4 MiB id to a 4 MB string,
# and 1024 of them would exhaust memory.
_MAX_WAITING_BYTES = 32 << 20
# Messages read per pump, so a flood cannot monopolise the engine thread.
_MAX_MESSAGES = 256
# At most one "refused: authentication" log line per this many seconds.
_AUTH_LOG_EVERY_S = 10.0


def max_inbound_bytes(layout: LayoutDesc, num_blocks: int) -> int:
    """The largest message a consumer has cause to send this rank: a Hello
    with a layout like ours, or a pull naming every block of the cache (9
    bytes per id at most in msgpack), plus room for ids and tokens (a
    producer hands off no request whose id exceeds
    ``wire.MAX_REQUEST_ID_BYTES``). A larger frame never reaches the
    decoder, so a flood of maximal ones costs neither decode time nor
    memory."""
    return 64 * 1024 + 2 * len(wire.encode(layout)) + 9 * num_blocks


@dataclass
class _Waiting:
    identity: bytes
    req: wire.PullRequest | wire.Release
    deadline: float


class KVServer:
    def __init__(
        self,
        *,
        bind_host: str,
        port: int,
        engine_id: str,
        tp_rank: int,
        layout: LayoutDesc,
        leases: LeaseTable,
        transport: Transport,
        stats: TransferStats,
        secret: str,
        registration_grace_s: float,
    ):
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.layout = layout
        self.leases = leases
        self.transport = transport
        self.stats = stats
        self.auth = Authenticator(secret)
        self._auth_log = LogThrottle(_AUTH_LOG_EVERY_S)
        self.grace_s = registration_grace_s
        self.port = port
        self._ctx = zmq.Context()
        self._sock = router_socket(
            self._ctx, bind_host, port, f"producer rank {tp_rank}",
            max_message_bytes=max_inbound_bytes(layout, transport.cache.num_blocks),
        )
        self._waiting: list[_Waiting] = []
        self._sends = Pump()
        # Links of sends in progress, for the consumer's replies (llmdatadist).
        self._inbound: dict[tuple[bytes, str], RouterLink] = {}

    def close(self) -> None:
        for task in self._sends.tasks:
            task.gen.close()
        self._sends.tasks.clear()
        self._inbound.clear()
        self._ctx.destroy(linger=0)

    def pump(self, budget_s: float) -> bool:
        """Answer peers and advance sends; True if all that is left waits on
        peers (see ``Pump.run``), so the caller may wait for ``socket``."""
        drained = False
        # A maximal message takes ~0.1-0.3 s to decode: bound the reading
        # by time too, or a flood of them holds the engine thread for minutes.
        stop_reading = time.perf_counter() + budget_s
        for _ in range(_MAX_MESSAGES):
            if time.perf_counter() >= stop_reading:
                break
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                drained = True
                break
            try:
                self._handle(frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop the rest
                self.stats.record_rejected("malformed")
                logger.exception("AscendSimpleConnector KV server: error handling a message")
        try:
            self.transport.service(self._data_refused)
            self._retry_waiting()
            blocked = self._sends.run(budget_s)
            self.stats.record_expired(self.leases.expire())
        except Exception:  # noqa: BLE001 - the engine must keep running
            logger.exception("AscendSimpleConnector KV server: unexpected error")
            blocked = True
        return drained and blocked

    @property
    def socket(self) -> zmq.Socket:
        """Where every peer message arrives (for an event-driven wait)."""
        return self._sock

    def sending(self) -> bool:
        return bool(self._sends.tasks)

    def has_parked(self) -> bool:
        """Pulls or releases wait for the engine to register their lease."""
        return bool(self._waiting)

    def _handle(self, frames) -> None:
        if len(frames) != 2:
            self.stats.record_rejected("malformed")
            return  # no reply: a well-formed peer never sends this
        identity = frames[0].bytes
        try:
            msg = wire.decode(frames[1].buffer)
        except wire.ProtocolError as e:
            self.stats.record_rejected("malformed")
            logger.warning("KV server rank %d: dropped a bad message: %s", self.tp_rank, e)
            return
        if isinstance(msg, wire.Hello):
            self._reply(identity, self._hello(msg))
        elif isinstance(msg, wire.PullRequest):
            self._pull(identity, msg, time.monotonic() + self.grace_s)
        elif isinstance(msg, wire.Release):
            self._release(identity, msg, time.monotonic() + self.grace_s)
        elif isinstance(msg, wire.TransferDone):
            # Only the consumer that made the pull can end it.
            link = self._inbound.get((identity, msg.transfer_id))
            if link is None or not link.deliver([frames[1]]):
                self.stats.record_rejected("malformed")
        else:
            self.stats.record_rejected("malformed")

    def _authorized(self, msg, kind: str, *fields) -> bool:
        try:
            self.auth.verify(kind, msg.auth, *fields)
            return True
        except AuthError as e:
            self.stats.record_rejected("auth")
            self._auth_failed(kind, str(e))
            return False

    def _auth_failed(self, kind: str, why: str) -> None:
        refused = self._auth_log.hit()
        if refused:
            logger.warning(
                "KV server rank %d: refused %d unauthenticated message(s), last a %s: %s. "
                "Every instance of a deployment needs the same shared_secret "
                "(or shared_secret_env).",
                self.tp_rank, refused, kind, why,
            )

    def _data_refused(self, reason: str, detail: str) -> None:
        """A connection to the transport's data port was turned away."""
        self.stats.record_rejected(f"data_{reason}")
        if reason == "auth":
            self._auth_failed("data stream preamble", detail)

    def _hello(self, msg: wire.Hello) -> wire.HelloReply:
        reply = self._hello_checked(msg)
        reply.auth = self.auth.sign_reply(
            "hello_reply", msg.auth, reply.ok, reply.engine_id, reply.data_port
        )
        return reply

    def _hello_checked(self, msg: wire.Hello) -> wire.HelloReply:
        if not self._authorized(msg, "hello", msg.version, msg.engine_id, msg.tp_rank):
            return wire.HelloReply(False, "authentication failed: set the same shared_secret on both instances")
        if msg.version != wire.PROTOCOL_VERSION:
            return wire.HelloReply(
                False,
                f"protocol version mismatch (producer {wire.PROTOCOL_VERSION}, consumer "
                f"{msg.version}): install the same vllm-ascend-pd version on both",
            )
        why = check_compatible(self.layout, msg.layout)
        if why:
            return wire.HelloReply(False, why, self.engine_id, layout=self.layout)
        return wire.HelloReply(
            True, "", self.engine_id, layout=self.layout, transport=self.transport.name,
            data_port=self.transport.data_port,
        )

    def _pull(self, identity: bytes, req: wire.PullRequest, deadline: float) -> None:
        if not self._authorized(req, "pull", req.transfer_id, req.request_id, req.block_ids,
                                req.consumer_engine_id, req.consumer_rank, req.consumer_tp, req.heads,
                                req.prompt_hash):
            self._reply(identity, self._signed_pull_reply(req, False, "authentication failed"))
            return
        self._claim(identity, req, deadline)

    def _signed_pull_reply(self, req: wire.PullRequest, ok: bool, error: str = "",
                           total_bytes: int = 0) -> wire.PullReply:
        reply = wire.PullReply(ok, req.transfer_id, error, total_bytes=total_bytes)
        reply.auth = self.auth.sign_reply("pull_reply", req.auth, ok, req.transfer_id, total_bytes)
        return reply

    def _claim(self, identity: bytes, req: wire.PullRequest, deadline: float) -> None:
        plan = self._tp_plan(req)
        heads = None
        num_blocks = self.transport.cache.num_blocks
        if len(req.block_ids) > num_blocks:
            plan = f"the pull names {len(req.block_ids)} blocks, more than this instance's {num_blocks}"
        if isinstance(plan, str):
            claim: object = plan
        else:
            expected, heads = plan
            claim = self.leases.begin_send(
                req.transfer_id, req.request_id, req.block_ids, req.consumer_rank, expected,
                prompt_hash=req.prompt_hash,
            )
        if isinstance(claim, str):
            if (
                claim == "unknown transfer id"
                and time.monotonic() < deadline
                and len(self._waiting) < _MAX_WAITING
                and self._parked_bytes() + _weight(req) <= _MAX_WAITING_BYTES
            ):
                # The pull may race ahead of the engine registering the lease.
                self._waiting.append(_Waiting(identity, req, deadline))
                return
            self.stats.record_rejected("unknown_transfer" if "unknown" in claim else "refused")
            logger.warning(
                "KV server rank %d: refused pull for request %s: %s",
                self.tp_rank, req.request_id, claim,
            )
            self._reply(identity, self._signed_pull_reply(req, False, claim))
            return
        plan_bytes = len(req.block_ids) * self.transport.cache.total_block_bytes(heads)
        self._reply(identity, self._signed_pull_reply(req, True, total_bytes=plan_bytes))
        link = RouterLink(self._sock, identity)
        key = (identity, req.transfer_id)
        self._inbound[key] = link
        start = time.perf_counter()

        def done(nbytes: int) -> None:
            self._inbound.pop(key, None)
            self.leases.end_send(req.transfer_id, req.consumer_rank)
            self.stats.record_send(nbytes, len(req.block_ids), time.perf_counter() - start)

        def failed(e: BaseException) -> None:
            self._inbound.pop(key, None)
            cause = getattr(e, "cause", "transport")
            self.stats.record_send_failure(cause)
            logger.warning(
                "KV server rank %d: sending request %s failed: %s", self.tp_rank, req.request_id, e
            )
            self.leases.end(req.transfer_id, f"send failed: {e}")

        if heads is None:
            gen = self.transport.send_blocks(link, req.transfer_id, req.block_ids)
        else:
            gen = self.transport.send_blocks(link, req.transfer_id, req.block_ids, heads=heads)
        self._sends.add(Task(req.transfer_id, gen, done, failed, owner=req.transfer_id))

    def _tp_plan(self, req: wire.PullRequest) -> tuple[frozenset[int], HeadRange | None] | str:
        """The consumer ranks that pull from this rank, and the heads this
        consumer rank must ask for (see tp_map.py); a reason if it asks wrong."""
        lay = self.layout
        if not 0 <= req.consumer_rank < req.consumer_tp <= MAX_RANKS:
            # Checked before the map, whose cost grows with consumer_tp.
            return (
                f"consumer rank {req.consumer_rank}/{req.consumer_tp} is outside the "
                f"{MAX_RANKS}-rank port plan"
            )
        if lay.tp_size == req.consumer_tp and lay.num_kv_heads <= 0:
            # Same TP and heads unknown: rank r serves rank r whole.
            if req.consumer_rank != self.tp_rank or req.heads is not None:
                return "consumer rank does not match this producer rank"
            return frozenset({req.consumer_rank}), None
        try:
            by_rank = consumers_of(
                self.tp_rank, lay.tp_size, req.consumer_tp, lay.num_kv_heads, lay.is_mla
            )
        except TPMapError as e:
            return str(e)
        piece = by_rank.get(req.consumer_rank)
        wanted = None if piece is None or piece.src is None else (piece.src.start, piece.src.stop)
        if piece is None or req.heads != wanted:
            return f"consumer rank {req.consumer_rank}/{req.consumer_tp} asked for the wrong KV heads"
        if piece.src is not None and not self.transport.head_slices:
            return (
                f"transport {self.transport.name} cannot move KV-head slices, which TP "
                f"{lay.tp_size} -> {req.consumer_tp} needs; use transport hccl or tcp (gloo on the CPU)"
            )
        return frozenset(by_rank), piece.src

    def _parked_bytes(self) -> int:
        return sum(_weight(w.req) for w in self._waiting)

    def _release(self, identity: bytes, msg: wire.Release, deadline: float) -> None:
        if not self._authorized(msg, "release", msg.transfer_id, msg.request_id, msg.prompt_hash):
            self._reply(identity, wire.ReleaseReply(False, msg.transfer_id, "authentication failed"))
            return
        self._free(identity, msg, deadline)

    def _free(self, identity: bytes, msg: wire.Release, deadline: float) -> None:
        # The consumer link that claimed the pull may end it before its data
        # flows (it was cancelled there): no send then waits for it until
        # transfer_timeout_s. Only that link: the routing id is unguessable.
        puller = (identity, msg.transfer_id) in self._inbound
        why = self.leases.release(msg.transfer_id, msg.request_id, msg.prompt_hash, puller=puller)
        if why is None and puller:
            self._stop_sends(msg.transfer_id)
        if (
            why == "unknown transfer id"
            and time.monotonic() < deadline
            and len(self._waiting) < _MAX_WAITING
            and self._parked_bytes() + _weight(msg) <= _MAX_WAITING_BYTES
        ):
            # Like a pull, a release can race ahead of the engine registering
            # the lease (the proxy releases as soon as P's answer arrives);
            # refusing it would leave the blocks leased until lease_s.
            self._waiting.append(_Waiting(identity, msg, deadline))
            return
        if why is None:
            self.stats.record_release()
        self._reply(identity, wire.ReleaseReply(why is None, msg.transfer_id, why or ""))

    def _stop_sends(self, transfer_id: str) -> None:
        """End the sends of a released transfer (its lease already ended;
        counted as released, not as a failed send)."""
        self._sends.cancel(transfer_id)
        for key in [k for k in self._inbound if k[1] == transfer_id]:
            del self._inbound[key]
        logger.info("KV server rank %d: consumer stopped pulling transfer %s", self.tp_rank, transfer_id)

    def _retry_waiting(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        now = time.monotonic()
        for w in waiting:
            if self.leases.knows(w.req.transfer_id) or now >= w.deadline:
                if isinstance(w.req, wire.Release):
                    self._free(w.identity, w.req, deadline=0.0)
                else:
                    self._claim(w.identity, w.req, deadline=0.0)
            else:
                self._waiting.append(w)

    def _reply(self, identity: bytes, msg) -> None:
        try:
            self._sock.send_multipart([identity, wire.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("KV server rank %d: could not reply %s: %s", self.tp_rank, type(msg).__name__, e)


def _weight(msg: wire.PullRequest | wire.Release) -> int:
    """Roughly the memory a parked message holds (a block id: 8 bytes)."""
    n = len(msg.transfer_id) + len(msg.request_id) + len(msg.auth)
    if isinstance(msg, wire.PullRequest):
        n += 8 * len(msg.block_ids) + len(msg.consumer_engine_id) + len(msg.prompt_hash)
    return n
