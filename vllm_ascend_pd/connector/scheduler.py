"""Scheduler side: decides what to lease (producer) and what to pull
(consumer). Pure bookkeeping, no I/O; the workers act on the metadata."""

from __future__ import annotations

import collections
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.metadata import (
    AscendConnectorMetadata,
    RecvSpec,
    ReleaseSpec,
    SendSpec,
)
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.params import InvalidParams, ProducerParams, parse_producer_params, prompt_hash

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = get_logger(__name__)

# Transfers remembered after their puller finished, for late n > 1 siblings.
_PULLED_MEMORY = 1024


@dataclass
class _Plan:
    params: ProducerParams | None
    error: str = ""
    local_computed: int = 0
    # Unusable params of this very prompt: the producer's blocks to free.
    release: ReleaseSpec | None = None


class SchedulerSide:
    def __init__(
        self,
        *,
        engine_id: str,
        is_producer: bool,
        is_consumer: bool,
        block_size: int,
        tp_size: int,
        kv_host: str,
        kv_port: int,
    ):
        self.engine_id = engine_id
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.block_size = block_size
        self.tp_size = tp_size
        self.kv_host = kv_host
        self.kv_port = kv_port
        self._plans: dict[str, _Plan] = {}
        # Consumer: requests whose KV a worker was told to pull.
        self._loading: set[str] = set()
        # Consumer: the request pulling each transfer, and transfers pulled
        # lately (bounded). vLLM turns n > 1 into child requests that all carry
        # the parent's kv_transfer_params; one pull serves them all (see
        # _sibling_pull).
        self._pullers: dict[str, "Request"] = {}
        self._pulled: collections.OrderedDict[str, str] = collections.OrderedDict()  # -> prompt hash
        self._meta = AscendConnectorMetadata()

    # -- consumer ---------------------------------------------------------
    def _plan(self, request: "Request") -> _Plan:
        plan = self._plans.get(request.request_id)
        if plan is None:
            plan = _Plan(None)
            try:
                plan.params = self._validate(request)
            except InvalidParams as e:
                plan.error = str(e)
                plan.release = self._rightful_release(request, request.kv_transfer_params)
                logger.warning(
                    "AscendSimpleConnector: request %s will be prefilled locally: %s%s",
                    request.request_id, e,
                    "; telling the producer to free its blocks" if plan.release else "",
                )
            self._plans[request.request_id] = plan
        return plan

    def _validate(self, request: "Request") -> ProducerParams:
        p = parse_producer_params(request.kv_transfer_params)
        if p.protocol != wire.PROTOCOL_VERSION:
            raise InvalidParams(
                f"producer speaks protocol {p.protocol}, this instance {wire.PROTOCOL_VERSION}: "
                "install the same vllm-ascend-pd version on both"
            )
        if p.block_size != self.block_size:
            raise InvalidParams(
                f"producer block size {p.block_size} != consumer {self.block_size}: start "
                "both with the same --block-size"
            )
        # A different producer TP size is fine if the KV heads split evenly;
        # the workers' handshake checks that (kv_layout.check_compatible).
        prompt = request.prompt_token_ids or []
        if p.num_tokens != len(prompt) or p.prompt_hash != prompt_hash(prompt):
            raise InvalidParams(
                "kv_transfer_params belong to a different prompt; send the decode "
                "instance the same prompt the prefill instance served"
            )
        return p

    def _sibling_pull(self, request: "Request", params: dict) -> str:
        """'loading' or 'done' if another request with this prompt pulls or
        pulled the transfer these params name, else ''.

        Such a request is a sibling from parallel sampling (n > 1): it waits
        for the pull, then computes the rest from the prefix cache the pull
        filled. Pulling again would be refused (the lease serves one pull) or
        race the first."""
        tid = params.get("transfer_id")
        if not isinstance(tid, str):
            return ""
        owner = self._pullers.get(tid)
        prompt = request.prompt_token_ids or []
        if owner is not None:
            if owner.request_id == request.request_id or owner.prompt_token_ids != prompt:
                return ""
            from vllm.v1.request import RequestStatus

            return "loading" if owner.status == RequestStatus.WAITING_FOR_REMOTE_KVS else "done"
        pulled = self._pulled.get(tid)
        return "done" if pulled is not None and pulled == prompt_hash(prompt) else ""

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if not (self.is_consumer and params):
            return 0, False
        sibling = self._sibling_pull(request, params)
        if sibling == "loading":
            return None, False  # vLLM asks again next step
        if sibling == "done":
            params["do_remote_prefill"] = False  # consumed: no pull, no release
            return 0, False
        if not params.get("do_remote_prefill"):
            return 0, False
        plan = self._plan(request)
        if plan.params is None:
            return 0, False
        plan.local_computed = num_computed_tokens
        count = plan.params.num_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        if not (self.is_consumer and params and params.get("do_remote_prefill")):
            return
        # One transfer per request, even if vLLM calls us again after the load.
        params["do_remote_prefill"] = False
        p = self._plan(request).params
        plan = self._plans.pop(request.request_id)
        if p is None:
            if plan.release is not None:
                self._meta.releases.append(plan.release)
            return
        if num_external_tokens <= 0:
            self._meta.releases.append(self._release_spec(request.request_id, p, p.prompt_hash))
            return
        bs = self.block_size
        first = plan.local_computed // bs
        last = -(-(plan.local_computed + num_external_tokens) // bs)
        local_ids = list(blocks.get_block_ids()[0][first:last])
        remote_ids = p.remote_block_ids[first:last]
        if len(local_ids) != len(remote_ids) or not local_ids:
            logger.error(
                "AscendSimpleConnector: request %s block plan mismatch (local %d, remote %d)",
                request.request_id, len(local_ids), len(remote_ids),
            )
        self._loading.add(request.request_id)
        self._pullers[p.transfer_id] = request
        self._meta.recvs.append(
            RecvSpec(
                request.request_id, p.remote_host, p.remote_port, p.transfer_id,
                p.remote_request_id, remote_ids, local_ids, num_external_tokens,
                remote_tp_size=p.tp_size, prompt_hash=p.prompt_hash,
            )
        )

    def _forget_puller(self, request: "Request") -> None:
        params = request.kv_transfer_params or {}
        tid = params.get("transfer_id")
        if isinstance(tid, str) and self._pullers.get(tid) is request:
            del self._pullers[tid]
            # Late siblings (still queued for memory) compute from here on.
            # The puller's params were checked against its prompt (_validate).
            self._pulled[tid] = str(params.get("prompt_hash", ""))
            while len(self._pulled) > _PULLED_MEMORY:
                self._pulled.popitem(last=False)

    def _release_spec(self, request_id: str, p: ProducerParams, bound_to: str) -> ReleaseSpec:
        return ReleaseSpec(
            request_id, p.remote_host, p.remote_port, p.transfer_id, p.remote_request_id,
            remote_tp_size=p.tp_size, prompt_hash=bound_to,
        )

    def _rightful_release(
        self, request: "Request", params: dict | None, *, rejected: bool = False
    ) -> ReleaseSpec | None:
        """A release of the blocks ``params`` name, if they were leased for
        this request's prompt; None if they cannot be read or belong to
        another prompt (a client holding someone else's transfer must not
        cancel it). The release names the prompt's hash, and the producer
        frees only the lease of that prompt (LeaseTable.release).

        ``rejected``: vLLM refused the request before admitting it and hands
        its rejection hook a stand-in with a one-token prompt, so the prompt
        cannot be checked here: the release names the params' own hash (P
        still refuses it for params rebound to another prompt)."""
        try:
            p = parse_producer_params(params)
        except InvalidParams:
            return None
        prompt = request.prompt_token_ids or []
        bound_to = prompt_hash(prompt)
        if p.num_tokens == len(prompt) and p.prompt_hash == bound_to:
            return self._release_spec(request.request_id, p, bound_to)
        if rejected and _rejection_stand_in(request):
            return self._release_spec(request.request_id, p, p.prompt_hash)
        return None

    # -- both ---------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any = None) -> AscendConnectorMetadata:
        meta, self._meta = self._meta, AscendConnectorMetadata()
        # Nothing scheduled: the runner takes its no-forward path this step.
        scheduled = getattr(scheduler_output, "total_num_scheduled_tokens", None)
        meta.no_forward = scheduled == 0
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        self._plans.pop(request.request_id, None)
        self._forget_puller(request)
        if request.request_id in self._loading:
            self._loading.discard(request.request_id)
            if request.status == RequestStatus.FINISHED_ABORTED:
                # Aborted with its pull possibly in flight: vLLM keeps the
                # blocks until the worker reports the request, so stop the
                # pull rather than finish it (a no-op if it already ended).
                self._meta.cancels.append(request.request_id)
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            params["do_remote_prefill"] = False
            if not self.is_consumer:
                # No puller here to send a release: the lease expires instead.
                logger.warning(
                    "AscendSimpleConnector: request %s carried do_remote_prefill but this "
                    "instance is kv_producer, so it prefilled locally; send decode legs to "
                    "kv_consumer or kv_both instances", request.request_id,
                )
                return False, None
            # Finished before allocation (rejected or aborted on this side):
            # the producer still holds the blocks, so tell it to free them.
            release = self._rightful_release(request, params, rejected=True)
            if release is not None:
                self._meta.releases.append(release)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if not self.is_producer:
            logger.warning(
                "AscendSimpleConnector: request %s asked for do_remote_decode but this "
                "instance is kv_consumer; send prefill legs to kv_producer or kv_both "
                "instances", request.request_id,
            )
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or errored: nothing to hand off
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        n_blocks = -(-num_tokens // self.block_size)
        if num_tokens <= 0 or len(block_ids) < n_blocks:
            return False, None
        id_bytes = len(request.request_id.encode("utf-8", "surrogatepass"))
        if id_bytes > wire.MAX_REQUEST_ID_BYTES:
            # Its pulls and releases would exceed the frame cap of P's KV
            # port, which drops the connection: D would recompute anyway,
            # after a misleading "producer closed the connection".
            logger.warning(
                "AscendSimpleConnector: request %.64s... has an id of %d bytes, more than "
                "%d: its KV is not handed off, so the decode instance prefills it; "
                "send shorter request ids (X-Request-Id or the body's request_id)",
                request.request_id, id_bytes, wire.MAX_REQUEST_ID_BYTES,
            )
            return False, None
        block_ids = list(block_ids[:n_blocks])
        transfer_id = secrets.token_urlsafe(24)
        bound_to = prompt_hash(request.prompt_token_ids or [])
        self._meta.sends.append(SendSpec(request.request_id, transfer_id, block_ids, bound_to))
        out = ProducerParams(
            remote_engine_id=self.engine_id,
            remote_host=self.kv_host,
            remote_port=self.kv_port,
            remote_block_ids=block_ids,
            remote_request_id=request.request_id,
            transfer_id=transfer_id,
            tp_size=self.tp_size,
            block_size=self.block_size,
            num_tokens=num_tokens,
            prompt_hash=bound_to,
            protocol=wire.PROTOCOL_VERSION,
        )
        return True, msgspec.structs.asdict(out)


def _rejection_stand_in(request: "Request") -> bool:
    """The request vLLM builds for a rejected request's connector hook
    (AsyncLLM.notify_kv_transfer_request_rejected): prompt [0], aborted."""
    from vllm.v1.request import RequestStatus

    return request.prompt_token_ids == [0] and request.status == RequestStatus.FINISHED_ABORTED
