"""``kv_transfer_params``: what the producer hands the consumer via the proxy.

The dict travels through HTTP clients we do not control, so the consumer
validates it strictly and treats anything malformed as "prefill locally".
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from vllm_ascend_pd.config import MAX_RANKS, ConfigError, group_port
from vllm_ascend_pd.net import is_ip


class ProducerParams(msgspec.Struct, forbid_unknown_fields=False):
    """Returned by the producer in ``request_finished``; read by the consumer."""

    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: list[int]
    remote_request_id: str
    transfer_id: str
    tp_size: int
    block_size: int
    num_tokens: int
    prompt_hash: str
    protocol: int
    do_remote_prefill: bool = True
    do_remote_decode: bool = False


class InvalidParams(ValueError):
    pass


def prompt_hash(token_ids: list[int] | None) -> str:
    """Binds a transfer to its prompt so KV is never applied to another one."""
    h = hashlib.blake2b(digest_size=16)
    if token_ids:
        h.update(msgspec.msgpack.encode(list(token_ids)))
    return h.hexdigest()


def parse_producer_params(raw: Any) -> ProducerParams:
    """Validate a consumer request's ``kv_transfer_params``; raise InvalidParams."""
    if not isinstance(raw, dict):
        raise InvalidParams(f"kv_transfer_params must be an object, got {type(raw).__name__}")
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        p = msgspec.convert(fields, ProducerParams, strict=True)
    except msgspec.ValidationError as e:
        raise InvalidParams(
            f"kv_transfer_params is missing or has a bad field ({e}); pass the dict "
            "returned by the prefill instance unchanged"
        ) from None
    if not is_ip(p.remote_host):
        # Producers advertise the address they resolved at start-up. A name
        # here would be resolved on the consumer's engine thread (or the
        # proxy's event loop, releasing it), blocking for as long as DNS takes.
        raise InvalidParams(
            f"remote_host {p.remote_host!r} is not an IP address; pass the dict returned "
            "by the prefill instance unchanged"
        )
    if not 0 < p.remote_port < 65536:
        raise InvalidParams(f"remote_port {p.remote_port} is out of range")
    if p.block_size <= 0 or p.tp_size <= 0 or p.num_tokens <= 0:
        raise InvalidParams("block_size, tp_size and num_tokens must be positive")
    if p.tp_size > MAX_RANKS:
        raise InvalidParams(f"tp_size {p.tp_size} exceeds the {MAX_RANKS}-rank port plan")
    try:  # every producer rank's ports exist (a producer cannot start otherwise)
        group_port(p.remote_port, p.tp_size - 1)
    except ConfigError as e:
        raise InvalidParams(f"remote_port {p.remote_port} with tp_size {p.tp_size}: {e}") from None
    expected = -(-p.num_tokens // p.block_size)
    if len(p.remote_block_ids) != expected:
        raise InvalidParams(
            f"remote_block_ids has {len(p.remote_block_ids)} blocks but "
            f"{p.num_tokens} tokens need {expected}"
        )
    if any(b < 0 for b in p.remote_block_ids):
        raise InvalidParams("remote_block_ids must be non-negative")
    if len(p.transfer_id) < 16:
        raise InvalidParams("transfer_id is too short")
    return p
