"""Scheduler -> worker messages for one engine step (plain, picklable data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class SendSpec:
    """Producer: lease these blocks under ``transfer_id``."""

    request_id: str
    transfer_id: str
    block_ids: list[int]
    prompt_hash: str = ""  # params.prompt_hash: pulls must name the same prompt


@dataclass(frozen=True)
class RecvSpec:
    """Consumer: pull ``remote_block_ids`` into ``local_block_ids``."""

    request_id: str
    remote_host: str
    remote_port: int
    transfer_id: str
    remote_request_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]
    num_tokens: int
    remote_tp_size: int = 0  # 0: same as this instance
    prompt_hash: str = ""  # of this request's prompt, checked by the producer


@dataclass(frozen=True)
class ReleaseSpec:
    """Consumer: tell the producer to free a lease it will never pull."""

    request_id: str
    remote_host: str
    remote_port: int
    transfer_id: str
    remote_request_id: str
    remote_tp_size: int = 0  # 0: same as this instance
    prompt_hash: str = ""  # of this request's prompt, checked by the producer


@dataclass
class AscendConnectorMetadata(KVConnectorMetadata):
    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)
    # Consumer: requests aborted here whose pulls should stop.
    cancels: list[str] = field(default_factory=list)
    # The engine runs no model this step (nothing scheduled): the worker may
    # wait for its peers instead of returning at once (config idle_wait_ms).
    no_forward: bool = False
