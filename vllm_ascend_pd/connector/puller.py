"""Consumer worker: pulls leased blocks from producer ranks in a background
thread, so the engine keeps decoding other requests meanwhile.

Each job ends in exactly one result, success or failure: a request parked in
WAITING_FOR_REMOTE_KVS is always released. Any failure drops that producer's
socket, so a late frame can never land in another request's blocks.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.zmq_links import DealerLink, dealer_socket
from vllm_ascend_pd.protocol import LayoutDesc
from vllm_ascend_pd.transport import TransferError, Transport

from vllm_ascend_pd.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class PullJob:
    request_id: str
    endpoint: str
    transfer_id: str
    remote_request_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]
    num_tokens: int


@dataclass(frozen=True)
class ReleaseJob:
    request_id: str
    endpoint: str
    transfer_id: str
    remote_request_id: str


class Puller:
    def __init__(
        self,
        *,
        engine_id: str,
        tp_rank: int,
        layout: LayoutDesc,
        transport: Transport,
        stats: TransferStats,
        secret: str,
        connect_timeout_s: float,
    ):
        self.engine_id = engine_id
        self.tp_rank = tp_rank
        self.layout = layout
        self.transport = transport
        self.stats = stats
        self.secret = secret
        self.connect_timeout_s = connect_timeout_s
        self._ctx = zmq.Context()
        self._links: dict[str, DealerLink] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"ascend-pd-puller-{tp_rank}", daemon=True
        )
        self._thread.start()

    def submit(self, job: PullJob | ReleaseJob) -> None:
        self._jobs.put(job)

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished, failed); failed ids are also in finished, as vLLM requires."""
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = set(), set()
        return done | failed, failed

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)
        for link in self._links.values():
            link.sock.close(0)
        self._links.clear()
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                continue
            try:
                if isinstance(job, PullJob):
                    self._pull(job)
                else:
                    self._release(job)
            except Exception:  # noqa: BLE001 - a job must never kill the thread
                logger.exception("AscendSimpleConnector: unexpected error in puller")
                if isinstance(job, PullJob):
                    self._finish(job.request_id, ok=False)

    def _finish(self, request_id: str, ok: bool) -> None:
        with self._lock:
            (self._done if ok else self._failed).add(request_id)

    def _link(self, endpoint: str) -> DealerLink:
        link = self._links.get(endpoint)
        if link is not None:
            return link
        link = DealerLink(dealer_socket(self._ctx, endpoint), endpoint)
        try:
            hello = wire.Hello(wire.PROTOCOL_VERSION, self.engine_id, self.tp_rank, self.layout, self.secret)
            link.send([wire.encode(hello)])
            reply = self._expect(link, wire.HelloReply, "handshake")
            if not reply.ok:
                raise TransferError(
                    f"producer {endpoint} refused the handshake: {reply.error}", "incompatible"
                )
        except BaseException:
            link.sock.close(0)
            raise
        self._links[endpoint] = link
        return link

    def _drop(self, endpoint: str) -> None:
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.sock.close(0)

    def _expect(self, link: DealerLink, kind: type, what: str):
        frames = link.recv(self.connect_timeout_s)
        try:
            msg = wire.decode(frames[0].buffer)
        except wire.ProtocolError as e:
            raise TransferError(f"bad {what} reply from {link.endpoint}: {e}", "protocol") from None
        if not isinstance(msg, kind):
            raise TransferError(f"unexpected {type(msg).__name__} during {what}", "protocol")
        return msg

    def _pull(self, job: PullJob) -> None:
        logger.info("DBG pull start %s", job.request_id)
        start = time.perf_counter()
        try:
            link = self._link(job.endpoint)
            req = wire.PullRequest(
                job.transfer_id, job.remote_request_id, job.remote_block_ids,
                self.engine_id, self.tp_rank, self.secret,
            )
            link.send([wire.encode(req)])
            logger.info("DBG pull sent")
            reply = self._expect(link, wire.PullReply, "pull")
            logger.info("DBG pull reply %s", reply)
            if not reply.ok or reply.transfer_id != job.transfer_id:
                raise TransferError(
                    f"producer {job.endpoint} refused the pull: {reply.error}", "refused"
                )
            nbytes = self.transport.recv_blocks(link, job.transfer_id, job.local_block_ids)
        except (TransferError, zmq.ZMQError, OSError) as e:
            self._drop(job.endpoint)
            cause = getattr(e, "cause", "transport")
            self.stats.record_recv_failure(cause)
            logger.warning(
                "AscendSimpleConnector: loading KV for request %s from %s failed (%s): %s",
                job.request_id, job.endpoint, cause, e,
            )
            self._finish(job.request_id, ok=False)
            return
        self.stats.record_recv(
            nbytes, len(job.local_block_ids), job.num_tokens, time.perf_counter() - start
        )
        self._finish(job.request_id, ok=True)
        logger.info("DBG pull done %s", job.request_id)

    def _release(self, job: ReleaseJob) -> None:
        try:
            link = self._link(job.endpoint)
            link.send([wire.encode(wire.Release(job.transfer_id, job.remote_request_id, self.secret))])
            reply = self._expect(link, wire.ReleaseReply, "release")
            if not reply.ok:
                logger.info(
                    "AscendSimpleConnector: producer did not release %s: %s",
                    job.remote_request_id, reply.error,
                )
        except (TransferError, zmq.ZMQError, OSError) as e:
            self._drop(job.endpoint)
            logger.warning(
                "AscendSimpleConnector: could not tell producer %s to free request %s "
                "(its lease will expire instead): %s",
                job.endpoint, job.remote_request_id, e,
            )
