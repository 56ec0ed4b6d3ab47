"""Tell a producer to free a lease without pulling it (used by the proxy when
a client leaves between prefill and decode). Idempotent: releasing an
already-freed transfer is a no-op on the producer.

The proxy runs this in the background, so it never raises: whatever goes
wrong (an unreachable producer, an answer that is not a ReleaseReply) is
logged and answered False; the lease then ends at ``lease_s``."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import zmq
import zmq.asyncio

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator
from vllm_ascend_pd.connector.zmq_links import dealer_socket, tcp_endpoint
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.params import InvalidParams, ProducerParams, parse_producer_params

logger = get_logger(__name__)


def release_transfer_sync(kv_transfer_params: dict[str, Any], *, timeout: float = 2.0, secret: str = "") -> bool:
    """``secret``: the deployment's shared secret, if the producers have one.
    True if every producer rank freed the lease."""
    try:
        p = parse_producer_params(kv_transfer_params)
    except InvalidParams:
        return False
    try:
        return _release(p, timeout, Authenticator(secret))
    except Exception as e:  # noqa: BLE001 - see the module docstring
        logger.warning(
            "could not release transfer %s on %s:%d (its lease will expire instead): %s",
            p.transfer_id, p.remote_host, p.remote_port, e,
        )
        return False


def _message(p: ProducerParams, auth: Authenticator) -> bytes:
    token = auth.sign("release", p.transfer_id, p.remote_request_id, p.prompt_hash)
    return wire.encode(wire.Release(p.transfer_id, p.remote_request_id, token, p.prompt_hash))


def _reply_ok(p: ProducerParams, rank: int, frames: list[bytes]) -> bool:
    try:
        reply = wire.decode(frames[0]) if len(frames) == 1 else None
    except wire.ProtocolError as e:
        logger.warning("producer %s:%d answered a release with garbage: %s",
                       p.remote_host, p.remote_port + rank, e)
        reply = None
    return isinstance(reply, wire.ReleaseReply) and reply.ok


def _release(p: ProducerParams, timeout: float, auth: Authenticator) -> bool:
    ctx = zmq.Context()
    ok = True
    try:
        for rank in range(p.tp_size):
            sock = dealer_socket(ctx, tcp_endpoint(p.remote_host, p.remote_port + rank))
            try:
                sock.send(_message(p, auth))
                if not sock.poll(int(timeout * 1000)):
                    ok = False
                    continue
                ok = _reply_ok(p, rank, sock.recv_multipart()) and ok
            finally:
                sock.close(0)
    finally:
        ctx.destroy(linger=0)  # also closes a socket whose connect raised
    return ok


async def release_transfer(kv_transfer_params: dict[str, Any], *, timeout: float = 2.0,
                           secret: str = "",
                           ctx: Optional[zmq.asyncio.Context] = None) -> bool:
    """The same on an asyncio loop, without a thread: every rank at once.
    ``ctx``: a long-lived context to use (one is made and closed otherwise).
    A thread per release would wait up to ``timeout`` per rank in the
    loop's default executor, which aiohttp's resolver also needs."""
    try:
        p = parse_producer_params(kv_transfer_params)
    except InvalidParams:
        return False
    auth = Authenticator(secret)
    own = ctx is None
    ctx = ctx or zmq.asyncio.Context()
    try:
        done = await asyncio.gather(*(_release_rank(ctx, p, rank, timeout, auth)
                                      for rank in range(p.tp_size)))
        return all(done)
    except Exception as e:  # noqa: BLE001 - see the module docstring
        logger.warning(
            "could not release transfer %s on %s:%d (its lease will expire instead): %s",
            p.transfer_id, p.remote_host, p.remote_port, e,
        )
        return False
    finally:
        if own:
            ctx.destroy(linger=0)


async def _release_rank(ctx: zmq.asyncio.Context, p: ProducerParams, rank: int,
                        timeout: float, auth: Authenticator) -> bool:
    sock = dealer_socket(ctx, tcp_endpoint(p.remote_host, p.remote_port + rank))
    try:
        await sock.send(_message(p, auth))
        if not await sock.poll(int(timeout * 1000)):
            return False
        return _reply_ok(p, rank, await sock.recv_multipart())
    finally:
        sock.close(0)
