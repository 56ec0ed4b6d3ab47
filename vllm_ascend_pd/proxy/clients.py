"""One long-lived aiohttp ``ClientSession`` per backend instance.

Sessions are opened when an instance becomes known (start-up, registration,
admin API) and closed when it is removed - after its last in-flight request
has finished, so removal never cuts a running stream and never waits for
unrelated traffic.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import aiohttp
from yarl import URL

from vllm_ascend_pd.proxy.config import ProxyConfig
from vllm_ascend_pd.proxy.log import init_logger

logger = init_logger(__name__)


class BackendClients:
    def __init__(self, cfg: ProxyConfig):
        self._cfg = cfg
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._closing: set[asyncio.Task] = set()
        self._closed = False
        # Absolute URL per (address, path): joining base_url per request
        # costs more than the lookup.
        self._urls: dict[tuple[str, str], URL] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=cfg.connect_timeout, sock_read=None)

    def session(self, address: str) -> aiohttp.ClientSession:
        """The session of ``address``; created on first use (on the loop)."""
        sess = self._sessions.get(address)
        if sess is None or sess.closed:
            if self._closed:
                raise RuntimeError("backend clients are closed")
            connector = aiohttp.TCPConnector(
                limit=self._cfg.backend_connections, limit_per_host=0,
                ttl_dns_cache=300, keepalive_timeout=self._cfg.backend_keepalive,
                enable_cleanup_closed=False)
            sess = aiohttp.ClientSession(
                base_url=f"http://{address}",
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                # A router must not replay one client's backend cookies to
                # another client (and the jar costs time per request).
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                raise_for_status=False,
            )
            self._sessions[address] = sess
        return sess

    def url(self, address: str, path: str) -> URL:
        """``http://address/path``, cached (the proxy serves a handful of paths)."""
        key = (address, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL.build(scheme="http", authority=address, path=path)
        return url

    def close_later(self, address: str) -> None:
        """Close the session of a removed instance (not awaited by the caller)."""
        for key in [k for k in self._urls if k[0] == address]:
            del self._urls[key]
        sess = self._sessions.pop(address, None)
        if sess is not None and not sess.closed:
            task = asyncio.get_running_loop().create_task(sess.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def __contains__(self, address: str) -> bool:
        return address in self._sessions

    def get(self, address: str) -> Optional[aiohttp.ClientSession]:
        return self._sessions.get(address)
