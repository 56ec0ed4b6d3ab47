"""Consumer worker: pulls leased blocks from producer ranks.

With equal TP sizes rank r pulls everything from the producer's rank r; with
different sizes a request is one pull per producer rank holding some of this
rank's KV heads (connector/tp_map.py), and it is done when all of them are.

Jobs advance in ``pump()``, called from the engine thread every step, so the
engine keeps decoding other requests while transfers are in flight. One job
per producer endpoint runs at a time (they share a socket); different
producers are pulled concurrently. Every job ends in exactly one result, so
a request parked in WAITING_FOR_REMOTE_KVS is always released, and any
failure drops that producer's socket so a late frame can never land in
another request's blocks.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator
from dataclasses import dataclass

import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator, AuthError
from vllm_ascend_pd.config import control_port
from vllm_ascend_pd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_ascend_pd.connector.pump import Pump, Task
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.tp_map import Piece, TPMapError, pieces_for, releases_for
from vllm_ascend_pd.connector.zmq_links import DealerLink, dealer_socket, tcp_endpoint
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.protocol import LayoutDesc
from vllm_ascend_pd.transport import TransferError, Transport
from vllm_ascend_pd.transport.base import wait_recv, wait_send

logger = get_logger(__name__)

# Pull failures after which the producer is there but its blocks cannot be
# used: tell it to free them now rather than at lease_s. (A producer that is
# gone, silent or refuses our secret would not take a release either.)
_RELEASE_AFTER = frozenset({"refused", "incompatible"})


@dataclass
class _Recv:
    """A request's pulls in flight (one per producer rank)."""

    spec: RecvSpec
    remaining: int
    start: float
    nbytes: int = 0
    failed: bool = False


class Puller:
    def __init__(
        self,
        *,
        engine_id: str,
        tp_rank: int,
        layout: LayoutDesc,
        tp_size: int | None = None,
        transport: Transport,
        stats: TransferStats,
        secret: str,
        connect_timeout_s: float,
    ):
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.tp_size = tp_size or layout.tp_size
        self.layout = layout
        self.transport = transport
        self.stats = stats
        self.auth = Authenticator(secret)
        self.connect_timeout_s = connect_timeout_s
        self._ctx = zmq.Context()
        self._links: dict[str, DealerLink] = {}
        # Links whose handshake is in flight (not yet usable by other jobs).
        self._opening: dict[str, DealerLink] = {}
        self._queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._pump = Pump()
        self._done: set[str] = set()
        self._failed: set[str] = set()
        self._recvs: dict[str, _Recv] = {}

    def _plan(self, producer_tp: int) -> tuple[list[Piece], list[int]]:
        """(pulls, producer ranks to release) for this rank; see tp_map.py."""
        lay = self.layout
        if producer_tp == self.tp_size and lay.num_kv_heads <= 0:
            return [Piece(self.tp_rank, None, None)], []  # heads unknown: rank r <-> rank r
        args = (self.tp_rank, self.tp_size, producer_tp, lay.num_kv_heads, lay.is_mla)
        return pieces_for(*args), releases_for(*args)

    def _queue(
        self, spec: RecvSpec | ReleaseSpec, producer_rank: int, piece: Piece | None,
        link: DealerLink | None = None,
    ) -> None:
        endpoint = tcp_endpoint(spec.remote_host, control_port(spec.remote_port, producer_rank))
        if link is None:
            self._queues[endpoint].append((endpoint, spec, piece, None))
        else:  # a cancelled pull's link: its producer may be waiting on it
            self._queues[endpoint].appendleft((endpoint, spec, piece, link))

    def submit(self, spec: RecvSpec | ReleaseSpec) -> None:
        """Queue the pulls or releases of one request (see tp_map.py)."""
        producer_tp = spec.remote_tp_size or self.tp_size
        if isinstance(spec, ReleaseSpec):
            # Each producer rank is released by exactly one consumer rank.
            for p in range(self.tp_rank, producer_tp, self.tp_size):
                self._queue(spec, p, None)
            return
        try:
            pieces, unused = self._plan(producer_tp)
        except TPMapError as e:
            logger.warning(
                "AscendSimpleConnector: cannot load KV for request %s from a TP-%d producer: %s",
                spec.request_id, producer_tp, e,
            )
            self.stats.record_recv_failure("incompatible")
            self._failed.add(spec.request_id)
            self.submit(_release_of(spec))  # nobody here will pull it
            return
        self._recvs[spec.request_id] = _Recv(spec, len(pieces), time.perf_counter())
        for piece in pieces:
            self._queue(spec, piece.producer_rank, piece)
        release = _release_of(spec)
        for p in unused:  # producer ranks nobody pulls from: free their blocks now
            self._queue(release, p, None)

    def cancel(self, request_id: str) -> None:
        """The request was aborted here while its KV was loading: stop its
        pulls instead of finishing them, report it finished (vLLM frees its
        blocks then) and tell the producer to free its lease. Nothing
        happens if its pulls already ended: each request is reported once."""
        if not self.transport.cancellable:
            return  # a helper thread may be writing its blocks: let it end
        recv = self._recvs.pop(request_id, None)
        if recv is None:
            return
        for queue in self._queues.values():
            for item in [i for i in queue if isinstance(i[1], RecvSpec) and i[1].request_id == request_id]:
                queue.remove(item)
        held: dict[str, DealerLink] = {}
        for task in self._pump.cancel(request_id):
            # Maybe mid-transfer: that link and stream are void. The link is
            # kept for one message: the producer may have granted the pull
            # and be waiting for our data stream; a release on the link that
            # claimed it ends that send at once (kv_server.py).
            link = self._links.pop(task.key, None)
            if link is not None:
                self.transport.drop_pair(link.pair_id)
                held[task.key] = link
        self.stats.record_cancelled()
        self._done.add(request_id)
        # Release every producer rank this rank pulls from, not only the ranks
        # it is the designated releaser of: another consumer rank may have
        # finished its own pull before the abort and will release nothing.
        spec = recv.spec
        release = _release_of(spec)
        pieces, _ = self._plan(spec.remote_tp_size or self.tp_size)
        for rank in sorted({p.producer_rank for p in pieces}):
            endpoint = tcp_endpoint(spec.remote_host, control_port(spec.remote_port, rank))
            self._queue(release, rank, None, held.pop(endpoint, None))
        for link in held.values():  # not expected: every cancelled task is a piece
            link.close()
        logger.info("AscendSimpleConnector: request %s aborted; its KV pull stopped", request_id)

    def pump(self, budget_s: float) -> bool:
        """Start queued jobs and advance them; True if every running job waits
        on its producer (see ``Pump.run``), so the caller may wait for
        ``sockets()``."""
        for endpoint, queue in self._queues.items():
            if queue and not self._pump.busy(endpoint):
                self._start(*queue.popleft())
        return self._pump.run(budget_s)

    def busy(self) -> bool:
        return bool(self._pump.tasks) or any(self._queues.values())

    def has_results(self) -> bool:
        return bool(self._done or self._failed)

    def sockets(self) -> list[zmq.Socket]:
        """The sockets of running jobs: a message on one lets a job progress.
        Idle links are left out, so a stray frame on one cannot keep waking
        a wait."""
        out = []
        for task in self._pump.tasks:
            link = self._links.get(task.key) or self._opening.get(task.key)
            if link is not None:
                out.append(link.sock)
        return out

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished, failed); failed ids are also in finished, as vLLM requires."""
        done, failed = self._done, self._failed
        self._done, self._failed = set(), set()
        return done | failed, failed

    def close(self) -> None:
        # Closing an unfinished job's generator closes the socket it opened.
        for task in self._pump.tasks:
            task.gen.close()
        self._pump.tasks.clear()
        self._links.clear()
        self._opening.clear()
        self._recvs.clear()
        self._ctx.destroy(linger=0)

    def _finish_piece(self, job: RecvSpec, nbytes: int, error: str | None) -> None:
        recv = self._recvs.get(job.request_id)
        if recv is None:
            return
        recv.remaining -= 1
        recv.nbytes += nbytes
        if error is not None and not recv.failed:
            recv.failed = True
            self.stats.record_recv_failure(error)
        if recv.remaining > 0:
            return
        del self._recvs[job.request_id]
        if recv.failed:
            self._failed.add(job.request_id)
        else:
            self.stats.record_recv(
                recv.nbytes, len(job.local_block_ids), job.num_tokens, time.perf_counter() - recv.start
            )
            self._done.add(job.request_id)

    def _start(
        self, endpoint: str, job: RecvSpec | ReleaseSpec, piece: Piece | None, link: DealerLink | None
    ) -> None:
        if isinstance(job, RecvSpec):
            assert piece is not None

            def done(nbytes: int) -> None:
                self._finish_piece(job, nbytes, None)

            def failed(e: BaseException) -> None:
                self._drop(endpoint)
                cause = getattr(e, "cause", "transport")
                logger.warning(
                    "AscendSimpleConnector: loading KV for request %s from %s failed (%s): %s",
                    job.request_id, endpoint, cause, e,
                )
                self._finish_piece(job, 0, cause)
                if cause in _RELEASE_AFTER:
                    self._queue(_release_of(job), piece.producer_rank, None)

            self._pump.add(Task(endpoint, self._pull(endpoint, job, piece), done, failed, job.request_id))
        else:

            def released(reply: wire.ReleaseReply) -> None:
                if not reply.ok:
                    logger.info(
                        "AscendSimpleConnector: producer %s did not free request %s: %s",
                        endpoint, job.remote_request_id, reply.error,
                    )

            def release_failed(e: BaseException) -> None:
                logger.warning(
                    "AscendSimpleConnector: could not tell producer %s to free request %s "
                    "(its lease will expire instead): %s",
                    endpoint, job.remote_request_id, e,
                )

            self._pump.add(Task(endpoint, self._release(endpoint, job, link), released, release_failed))

    def _drop(self, endpoint: str) -> None:
        link = self._links.pop(endpoint, None)
        if link is not None:
            self.transport.drop_pair(link.pair_id)
            link.close()

    def _expect(self, link: DealerLink, kind: type, what: str) -> Generator[bool, None, object]:
        frames = yield from wait_recv(link, self.connect_timeout_s, f"{what} reply")
        try:
            msg = wire.decode(frames[0].buffer)
        except wire.ProtocolError as e:
            raise TransferError(f"bad {what} reply from {link.endpoint}: {e}", "protocol") from None
        if not isinstance(msg, kind):
            raise TransferError(f"unexpected {type(msg).__name__} during {what}", "protocol")
        return msg

    def _link(self, endpoint: str) -> Generator[bool, None, DealerLink]:
        link = self._links.get(endpoint)
        if link is not None:
            if not link.disconnected_since_last_use():
                return link
            # The producer closed the connection between transfers: it
            # restarted (or the network dropped it), and ZMQ reconnected
            # silently. A new process knows neither this link nor its data
            # stream, so the pull would fail once: start over with a full
            # handshake, which checks the peer again.
            logger.info("AscendSimpleConnector: producer %s reconnected; redoing the handshake", endpoint)
            self._drop(endpoint)
        link = DealerLink(dealer_socket(self._ctx, endpoint), endpoint)
        self._opening[endpoint] = link
        try:
            token = self.auth.sign("hello", wire.PROTOCOL_VERSION, self.engine_id, self.tp_rank)
            hello = wire.Hello(wire.PROTOCOL_VERSION, self.engine_id, self.tp_rank, self.layout, token)
            yield from wait_send(link, [wire.encode(hello)], self.connect_timeout_s)
            reply = yield from self._expect(link, wire.HelloReply, "handshake")
            self._check_reply(
                "hello_reply", reply, token, endpoint, reply.ok, reply.engine_id, reply.data_port
            )
            if not reply.ok:
                raise TransferError(
                    f"producer {endpoint} refused the handshake: {reply.error}", _refusal_cause(reply.error, "incompatible")
                )
            if reply.transport and reply.transport != self.transport.name:
                raise TransferError(
                    f"producer {endpoint} moves KV over {reply.transport!r}, this instance over "
                    f"{self.transport.name!r}: set the same kv_connector_extra_config.transport "
                    "on both",
                    "incompatible",
                )
        except BaseException:
            link.close()
            raise
        finally:
            self._opening.pop(endpoint, None)
        link.data_port = reply.data_port
        self._links[endpoint] = link
        return link

    def _check_reply(self, kind: str, reply, token: str, endpoint: str, *fields) -> None:
        try:
            self.auth.verify_reply(kind, reply.auth, token, *fields)
        except AuthError as e:
            raise TransferError(
                f"producer {endpoint} failed authentication ({e}): set the same "
                "shared_secret on both instances", "auth",
            ) from None

    def _pull(self, endpoint: str, job: RecvSpec, piece: Piece) -> Generator[bool, None, int]:
        if piece.dst is not None and not self.transport.head_slices:
            raise TransferError(
                f"transport {self.transport.name} cannot move KV-head slices, which a TP-"
                f"{job.remote_tp_size} producer needs here; use transport hccl or tcp (gloo on the CPU)",
                "incompatible",
            )
        link = yield from self._link(endpoint)
        heads = None if piece.src is None else (piece.src.start, piece.src.stop)
        token = self.auth.sign(
            "pull", job.transfer_id, job.remote_request_id, job.remote_block_ids,
            self.engine_id, self.tp_rank, self.tp_size, heads, job.prompt_hash,
        )
        req = wire.PullRequest(
            job.transfer_id, job.remote_request_id, job.remote_block_ids,
            self.engine_id, self.tp_rank, token,
            consumer_tp=self.tp_size, heads=heads, prompt_hash=job.prompt_hash,
        )
        yield from wait_send(link, [wire.encode(req)], self.connect_timeout_s)
        reply = yield from self._expect(link, wire.PullReply, "pull")
        self._check_reply("pull_reply", reply, token, endpoint, reply.ok, reply.transfer_id,
                          reply.total_bytes)
        if not reply.ok or reply.transfer_id != job.transfer_id:
            raise TransferError(
                f"producer {endpoint} refused the pull: {reply.error}", _refusal_cause(reply.error, "refused")
            )
        if piece.src is None and piece.dst is None:
            return (yield from self.transport.recv_blocks(link, job.transfer_id, job.local_block_ids))
        return (yield from self.transport.recv_blocks(
            link, job.transfer_id, job.local_block_ids, heads=piece.dst
        ))

    def _release(
        self, endpoint: str, job: ReleaseSpec, held: DealerLink | None
    ) -> Generator[bool, None, wire.ReleaseReply]:
        """Tell a producer rank to free a lease, on ``held`` (then closed),
        else on the open link, else on a link of its own: a release needs no
        handshake, and the producer may refuse ours (an incompatible layout
        is a reason to release)."""
        link = held or self._links.get(endpoint)
        own = link is None or held is not None
        if link is None:
            link = DealerLink(dealer_socket(self._ctx, endpoint), endpoint)
        if own:
            self._opening[endpoint] = link  # for sockets()
        try:
            token = self.auth.sign("release", job.transfer_id, job.remote_request_id, job.prompt_hash)
            msg = wire.Release(job.transfer_id, job.remote_request_id, token, job.prompt_hash)
            yield from wait_send(link, [wire.encode(msg)], self.connect_timeout_s)
            deadline = time.monotonic() + self.connect_timeout_s
            while True:
                # A held link may still carry the cancelled pull's answers.
                frames = yield from wait_recv(link, max(0.0, deadline - time.monotonic()), "release reply")
                try:
                    reply = wire.decode(frames[0].buffer)
                except wire.ProtocolError:
                    continue
                if isinstance(reply, wire.ReleaseReply) and reply.transfer_id == job.transfer_id:
                    return reply
                if not own:
                    raise TransferError(f"unexpected {type(reply).__name__} during release", "protocol")
        except BaseException:
            if not own:
                self._drop(endpoint)
            raise
        finally:
            if own:
                self._opening.pop(endpoint, None)
                link.close()


def _release_of(spec: RecvSpec) -> ReleaseSpec:
    return ReleaseSpec(
        spec.request_id, spec.remote_host, spec.remote_port, spec.transfer_id,
        spec.remote_request_id, spec.remote_tp_size, prompt_hash=spec.prompt_hash,
    )


def _refusal_cause(error: str, default: str) -> str:
    # Producers word every authentication refusal this way (kv_server.py).
    return "auth" if error.startswith("authentication failed") else default
