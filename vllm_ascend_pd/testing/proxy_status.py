"""The ``/status`` of every worker of a ``--workers N`` proxy.

Used by the proxy's unit and e2e tests and by ``benchmarks/proxy``: they
need to know that every worker serves, and each worker's own view.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp


async def _status(url: str) -> dict:
    # A connection of its own: the kernel hands each new one to one worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(url + "/status") as resp:
            resp.raise_for_status()
            return json.loads(await resp.read())


async def worker_statuses(url: str, workers: int, timeout: float = 30.0,
                          batch: int = 6) -> dict[int, dict]:
    """/status of each worker, by pid: asks ``batch`` at a time until
    ``workers`` different pids answered (all that answered are returned).
    Raises TimeoutError after ``timeout`` seconds."""
    found: dict[int, dict] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for st in await asyncio.gather(*(_status(url) for _ in range(batch))):
            found[st["worker"]["pid"]] = st
        if len(found) >= workers:
            return found
        if loop.time() > deadline:
            raise TimeoutError(f"{url}: only workers {sorted(found)} of {workers} answered "
                               f"/status within {timeout:g}s")
        await asyncio.sleep(0.05)
