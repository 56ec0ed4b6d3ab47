"""The asyncio features of Python 3.11 the proxy uses, on 3.10 too.

vllm-ascend supports Python 3.10, and so does this package: below 3.11 the
same API comes from ``async-timeout`` (aiohttp's own dependency there) and
``backports.asyncio.runner`` (pytest-asyncio's)."""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    from asyncio import Runner, timeout

    def uncancel(task: asyncio.Task) -> int:
        """Withdraw one cancellation request; the number still pending."""
        return task.uncancel()
else:  # pragma: no cover - exercised by the Python 3.10 CI step
    from async_timeout import timeout
    from backports.asyncio.runner import Runner

    def uncancel(task: asyncio.Task) -> int:
        # 3.10 does not count cancellations: one that lands together with
        # ours cannot be told apart, and is taken for ours.
        return 0

__all__ = ["Runner", "timeout", "uncancel"]
