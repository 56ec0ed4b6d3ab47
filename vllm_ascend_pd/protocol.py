"""Wire messages between producer and consumer workers (ZMQ control plane).

Every message is a tagged ``msgspec.Struct``; peers exchange ``Hello`` first and
refuse a different ``PROTOCOL_VERSION`` or an incompatible cache layout.

Version history:
  1: initial (Hello, Pull, Release; tcp chunk stream). Later additions that
     only a new transport uses (DataDistOffer; TransferDone from consumer to
     producer) keep 1: peers agree on the transport at the handshake.
  2: ``auth`` fields carry HMAC tokens (see auth.py) instead of the secret;
     HelloReply and PullReply are signed too.
  3: heterogeneous TP: TensorDesc.head_axis, LayoutDesc.num_kv_heads,
     PullRequest.consumer_tp/heads (a pull may carry a KV-head slice).
  4: tcp moves data over its own raw stream: HelloReply.data_port (signed),
     DataHello and DataHeader on that stream; ChunkHeader is gone.
  5: DataHello.auth: with a shared secret the data stream's preamble is
     signed like the control messages.
  6: PullRequest.prompt_hash (signed): the producer serves a transfer only
     to a pull for the prompt it leased.
  7: Release.prompt_hash (signed): the producer frees a lease only for a
     release naming the prompt it holds; a release from the consumer link
     that claimed the pull also stops that pull's send.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 7

# Decoding is bounded before anything is parsed (see MAX_CONTROL_BYTES users).
MAX_CONTROL_BYTES = 4 * 1024 * 1024

# The longest request id (UTF-8) a producer hands off: the id travels in
# every pull and release, and the producer drops a connection whose frame
# exceeds its cap (connector/kv_server.max_inbound_bytes: 64 KiB of room
# for ids and tokens). vLLM takes ids of any length from X-Request-Id or
# the body's request_id.
MAX_REQUEST_ID_BYTES = 8 * 1024


class TensorDesc(msgspec.Struct, frozen=True):
    """One cache tensor of one layer, block dimension first."""

    name: str
    dtype: str
    block_shape: tuple[int, ...]  # shape of one block (everything but dim 0)
    head_axis: int = -1  # index into block_shape of the KV heads; -1: not split by TP


class LayoutDesc(msgspec.Struct, frozen=True):
    block_size: int
    tensors: tuple[TensorDesc, ...]
    is_mla: bool = False
    tp_size: int = 1
    num_kv_heads: int = 0  # the model's KV heads over all TP ranks


class Hello(msgspec.Struct, tag="hello"):
    version: int
    engine_id: str
    tp_rank: int
    layout: LayoutDesc
    auth: str = ""


class HelloReply(msgspec.Struct, tag="hello_reply"):
    ok: bool
    error: str = ""
    engine_id: str = ""
    version: int = PROTOCOL_VERSION
    layout: LayoutDesc | None = None
    transport: str = ""
    auth: str = ""
    # The transport's data listener on the producer's host (tcp), 0: none.
    data_port: int = 0


class PullRequest(msgspec.Struct, tag="pull"):
    transfer_id: str
    request_id: str  # the producer's own request id
    block_ids: list[int]  # producer block ids, in token order
    consumer_engine_id: str = ""
    consumer_rank: int = 0
    auth: str = ""
    consumer_tp: int = 1
    # Producer-local KV heads [start, stop) to send; None: all (see tp_map.py).
    heads: tuple[int, int] | None = None
    # params.prompt_hash of the consumer's prompt; must match the lease's.
    prompt_hash: str = ""


class PullReply(msgspec.Struct, tag="pull_reply"):
    ok: bool
    transfer_id: str
    error: str = ""
    num_chunks: int = 0
    total_bytes: int = 0
    auth: str = ""


class DataHello(msgspec.Struct, tag="data_hello"):
    """tcp data stream, consumer -> producer, once: which ZMQ pair this
    stream belongs to (the consumer link's unguessable routing id)."""

    pair_id: bytes
    auth: str = ""  # token over pair_id (auth.py), with a shared secret


class DataHeader(msgspec.Struct, tag="data_header"):
    """tcp data stream, producer -> consumer: ``nbytes`` raw bytes of this
    transfer's blocks follow."""

    transfer_id: str
    nbytes: int


class TransferDone(msgspec.Struct, tag="done"):
    transfer_id: str
    ok: bool
    error: str = ""


class DataDistOffer(msgspec.Struct, tag="dd_offer"):
    """llmdatadist, producer -> consumer: where to pull ``block_ids`` from.

    The consumer answers with ``TransferDone`` once its pull ended, which
    ends the producer's lease."""

    transfer_id: str
    cluster_id: int
    device_ip: str
    port: int
    block_ids: list[int]  # producer block ids, same order as the pull request
    num_caches: int  # registrations, BlocksCacheKey model ids 0..num_caches-1
    hold_s: float  # how long after sending this the producer keeps the blocks


class Release(msgspec.Struct, tag="release"):
    transfer_id: str
    request_id: str
    auth: str = ""
    # params.prompt_hash of the releaser's prompt; must match the lease's.
    prompt_hash: str = ""


class ReleaseReply(msgspec.Struct, tag="release_reply"):
    ok: bool
    transfer_id: str
    error: str = ""


Message = (
    Hello
    | HelloReply
    | PullRequest
    | PullReply
    | DataHello
    | DataHeader
    | TransferDone
    | DataDistOffer
    | Release
    | ReleaseReply
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(ValueError):
    """A peer sent something that is not a valid message."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            f"control message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}"
        )
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        # Invalid UTF-8 in a str field surfaces as UnicodeDecodeError.
        raise ProtocolError(f"malformed control message: {e}") from None
    except RecursionError:
        # msgspec skipping a deeply nested unknown field (a few KB).
        raise ProtocolError("malformed control message: nested too deeply") from None
