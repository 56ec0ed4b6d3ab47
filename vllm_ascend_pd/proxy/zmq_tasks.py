"""Stopping the ZMQ services of the proxy (registration listener, the
supervisor's membership hub, a worker's link): their background tasks, then
their sockets and context."""

from __future__ import annotations

import asyncio
from typing import Iterable, Optional

import zmq.asyncio

from vllm_ascend_pd.proxy.log import init_logger

logger = init_logger(__name__)


async def cancel_tasks(tasks: Iterable[asyncio.Task], what: str) -> None:
    """Cancel ``tasks`` and wait for them; a task that had failed is logged."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("%s task failed", what)


def close_zmq(ctx: Optional[zmq.asyncio.Context], *socks) -> None:
    """Close ``socks`` without lingering, then terminate ``ctx``."""
    for sock in socks:
        if sock is not None:
            sock.close(linger=0)
    if ctx is not None:
        ctx.term()
