"""The data-plane interface every transport implements.

The control plane (handshake, pull request, release) always runs over ZMQ and
is owned by the connector; a transport only moves the bytes of a list of
blocks once both sides agreed on a transfer. ``Link`` is the established
ZMQ conversation with the peer; transports that move data elsewhere (a
process group, LLMDataDist) may use it for their own small messages.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Protocol

from vllm_ascend_pd.kv_layout import HeadRange, PagedKVCache


def poll_until(
    poll: Callable[[], Any], timeout_s: float, why: Callable[[], str]
) -> Generator[bool, None, Any]:
    """Yield until ``poll()`` returns something other than None; a
    ``timeout`` TransferError saying ``why()`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = poll()
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise TransferError(why(), cause="timeout")
        yield False


def wait_recv(link: "Link", timeout_s: float, what: str) -> Generator[bool, None, list[Any]]:
    """Yield until the peer sends a message; TransferError after ``timeout_s`` of silence."""
    return (yield from poll_until(
        link.try_recv, timeout_s,
        lambda: f"no {what} from the peer for {timeout_s:.1f}s (dead, overloaded or firewalled KV port?)",
    ))


def wait_send(link: "Link", frames: list[Any], timeout_s: float, **kw: Any) -> Generator[bool, None, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return link.send(frames, **kw)
        except WouldBlock:
            if time.monotonic() >= deadline:
                raise TransferError("the peer stopped reading", cause="peer_stalled") from None
            yield False


class TransferError(RuntimeError):
    """A transfer failed; the message names the cause and, where possible, the fix."""

    def __init__(self, message: str, cause: str = "transport"):
        super().__init__(message)
        self.cause = cause


class Link(Protocol):
    def send(self, frames: list[Any], *, copy: bool = True, track: bool = False) -> Any:
        """Queue a multipart message; raises ``WouldBlock`` if the peer is full."""
        ...

    def try_recv(self) -> list[Any] | None:
        """The next multipart message from the peer, or None if none is waiting."""
        ...

    @property
    def pair_id(self) -> bytes:
        """Names this consumer connection on both ends (the ZMQ routing id); a
        reconnect gets a new one, so per-pair state never outlives a failure."""
        ...

    # Consumer links also carry ``endpoint`` ("tcp://host:port" of the
    # producer's control socket) and ``data_port`` (from its HelloReply).


class WouldBlock(Exception):
    """The link cannot take another message right now."""


# Transfers are generators driven by the worker's engine thread: they yield
# whenever they would block, so no background thread competes for the GIL
# with vLLM's busy-polling worker loop.
# Each yield says whether the step made progress (False: blocked on the peer).
Step = Generator[bool, None, int]


@dataclass(frozen=True)
class TransportOptions:
    chunk_bytes: int
    pool_bytes: int
    idle_timeout_s: float
    device: str = "cpu"
    # Peer-pair details a group transport needs for its rendezvous.
    local_rank: int = 0
    group_port: int = 0
    host: str = "127.0.0.1"  # this instance's kv_ip: an IP address, never a name
    # llmdatadist: this rank's role, NPU device IP and listen port (producer).
    role: str = "both"  # "producer" | "consumer" | "both"
    device_ip: str = ""
    comm_port: int = 0
    # Producers bind their data or rendezvous socket here (an IP address;
    # default: host).
    bind_host: str = ""
    # The deployment's shared secret (auth.py): signs a transport's own
    # connection preambles, such as tcp's data stream.
    secret: str = field(default="", repr=False)


class Transport(ABC):
    name: ClassVar[str]
    # Whether send/recv_blocks take ``heads`` (heterogeneous TP, tp_map.py).
    head_slices: ClassVar[bool] = False
    # Whether closing a recv_blocks generator mid-transfer guarantees that
    # nothing writes into the destination blocks afterwards (so they may be
    # freed at once); False while a helper thread may still be writing.
    cancellable: ClassVar[bool] = False

    def __init__(self, cache: PagedKVCache, options: TransportOptions):
        self.cache = cache
        self.options = options

    # ``heads``: with heterogeneous tensor parallelism a transfer moves only a
    # range of KV heads (rank-local indices; both ranges have the same count;
    # tensors not split by heads move whole). ``PagedKVCache.gather/scatter``
    # and ``plan_chunks`` take the same argument.
    @abstractmethod
    def send_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        """Producer: stream ``block_ids`` to the peer; returns bytes sent."""

    @abstractmethod
    def recv_blocks(
        self, link: Link, transfer_id: str, block_ids: list[int], heads: HeadRange | None = None
    ) -> Step:
        """Consumer: receive into ``block_ids`` (same order as the producer's list)."""

    @property
    def data_port(self) -> int:
        """Port of this producer's own data listener, announced at the
        handshake (0: the transport moves data elsewhere)."""
        return 0

    def service(self, on_refused: Callable[[str, str], None] | None = None) -> None:
        """Producer housekeeping, run on every KV server pump (accepting
        data connections, say); never raises for a peer's fault.
        ``on_refused(reason, detail)`` hears of every peer turned away."""
        return None

    def poll_items(self) -> list[tuple[Any, int]]:
        """(socket, zmq.POLLIN/POLLOUT) of the transport's own data streams
        with a transfer in flight, for an event-driven wait."""
        return []

    def drop_pair(self, pair_id: bytes) -> None:
        """Consumer: the connection ``pair_id`` failed; forget its state."""
        return None

    def close(self) -> None:
        return None
