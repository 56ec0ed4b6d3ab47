"""Fault-injection tools for the end-to-end tests: a client that hangs up at
a chosen moment, a TCP port that accepts and then says nothing, a proxy
process we can kill (testing.servers.ProxyServer, as ProxyProcess), and the
"back to baseline" checks on /metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.e2e.helpers import metric
from vllm_ascend_pd.testing.servers import ProxyServer as ProxyProcess  # noqa: F401 - re-exported


def _metric_or(url: str, name: str, default: float = 0.0, **labels: str) -> float:
    try:
        return metric(url, name, **labels)
    except KeyError:
        return default


def counter(url: str, name: str, **labels: str) -> float:
    """A counter that may not exist yet (prometheus adds labelled series lazily)."""
    return _metric_or(url, name, 0.0, **labels)


def engine_idle(url: str) -> bool:
    """No request running or waiting and every KV block free."""
    return (
        metric(url, "vllm:kv_cache_usage_perc") == 0.0
        and metric(url, "vllm:num_requests_running") == 0
        and metric(url, "vllm:num_requests_waiting") == 0
    )


def producer_idle(url: str) -> bool:
    return engine_idle(url) and _metric_or(url, "vllm:ascend_pd_leases_pending") == 0


def wait_idle(urls: list[str], timeout: float, *, producers: tuple[str, ...] = ()) -> float:
    """Seconds until every instance is idle; AssertionError after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    state: dict[str, bool] = {}
    while True:
        state = {u: (producer_idle(u) if u in producers else engine_idle(u)) for u in urls}
        if all(state.values()):
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"not back to baseline within {timeout}s: {state}")
        time.sleep(0.1)


class HangUpClient:
    """A raw HTTP/1.1 client so the test decides exactly when the connection
    drops (urllib cannot abandon a request half way)."""

    def __init__(self, url: str, path: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + data)
        self.received = b""

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        self.sock.settimeout(timeout)
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return self.received

    def read_events(self, n: int, timeout: float = 60) -> None:
        """Read until ``n`` SSE events arrived."""
        self.sock.settimeout(timeout)
        while self.received.count(b"data: ") < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"stream ended early: {self.received[-300:]!r}")
            self.received += chunk

    def read_all(self, timeout: float = 120) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.received
            self.received += chunk

    def hang_up(self) -> None:
        # RST rather than FIN: the server sees the client gone at once.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()


class SilentPort:
    """Accepts TCP connections and never sends a byte (a hung or firewalled
    peer that still completes the TCP handshake)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for c in self.accepted:
            c.close()
        self.sock.close()
