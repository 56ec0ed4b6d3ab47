"""The data-plane interface every transport implements.

The control plane (handshake, pull request, release) always runs over ZMQ and
is owned by the connector; a transport only moves the bytes of a list of
blocks once both sides agreed on a transfer. ``Link`` is the established
ZMQ conversation with the peer; transports that move data elsewhere (a
process group, LLMDataDist) may use it for their own small messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vllm_ascend_pd.kv_layout import PagedKVCache


class TransferError(RuntimeError):
    """A transfer failed; the message names the cause and, where possible, the fix."""

    def __init__(self, message: str, cause: str = "transport"):
        super().__init__(message)
        self.cause = cause


class Link(Protocol):
    def send(self, frames: list[Any], *, copy: bool = True, track: bool = False) -> Any: ...

    def recv(self, timeout_s: float) -> list[Any]:
        """Next multipart message from the peer; TransferError on timeout."""
        ...


@dataclass(frozen=True)
class TransportOptions:
    chunk_bytes: int
    pool_bytes: int
    idle_timeout_s: float
    device: str = "cpu"
    # Peer-pair details a group transport needs for its rendezvous.
    local_rank: int = 0
    group_port: int = 0
    host: str = "127.0.0.1"


class Transport(ABC):
    name: ClassVar[str]

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        self.cache = cache
        self.options = options

    @abstractmethod
    def send_blocks(self, link: Link, transfer_id: str, block_ids: list[int]) -> int:
        """Producer: stream ``block_ids`` to the peer; return bytes sent."""

    @abstractmethod
    def recv_blocks(self, link: Link, transfer_id: str, block_ids: list[int]) -> int:
        """Consumer: receive into ``block_ids`` (same order as the producer's list)."""

    def close(self) -> None:
        return None
