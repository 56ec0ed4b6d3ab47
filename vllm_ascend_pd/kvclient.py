"""Tell a producer to free a lease without pulling it (used by the proxy when
a client leaves between prefill and decode). Idempotent: releasing an
already-freed transfer is a no-op on the producer."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator
from vllm_ascend_pd.params import InvalidParams, parse_producer_params


def release_transfer_sync(kv_transfer_params: dict[str, Any], *, timeout: float = 2.0, secret: str = "") -> bool:
    """``secret``: the deployment's shared secret, if the producers have one."""
    auth = Authenticator(secret)
    try:
        p = parse_producer_params(kv_transfer_params)
    except InvalidParams:
        return False
    ctx = zmq.Context()
    ok = True
    try:
        for rank in range(p.tp_size):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(f"tcp://{p.remote_host}:{p.remote_port + rank}")
                token = auth.sign("release", p.transfer_id, p.remote_request_id)
                sock.send(wire.encode(wire.Release(p.transfer_id, p.remote_request_id, token)))
                if not sock.poll(int(timeout * 1000)):
                    ok = False
                    continue
                reply = wire.decode(sock.recv())
                ok = ok and isinstance(reply, wire.ReleaseReply) and reply.ok
            finally:
                sock.close(0)
    finally:
        ctx.term()
    return ok


async def release_transfer(kv_transfer_params: dict[str, Any], *, timeout: float = 2.0, secret: str = "") -> bool:
    return await asyncio.to_thread(release_transfer_sync, kv_transfer_params, timeout=timeout, secret=secret)
