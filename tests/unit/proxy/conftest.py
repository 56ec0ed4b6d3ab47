"""Fake OpenAI backends (aiohttp on 127.0.0.1) and a proxy factory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

# The unit suite never needs vLLM's logger (importing it loads torch).
os.environ.setdefault("VLLM_ASCEND_PD_PLAIN_LOGGING", "1")
# tests/unit's helper modules (fake_dns), also when this folder runs alone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vllm_ascend_pd.proxy.app import STATE_KEY, create_app
from vllm_ascend_pd.proxy.config import ProxyConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def registration_dealer(port: int):
    """A bare DEALER socket to a proxy's registration port, for announcements
    sent by hand."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()


def dead_address() -> str:
    """An address where nothing listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def sse_events(n: int, *, usage: bool = False, tag: str = "tok") -> list[bytes]:
    events = []
    for i in range(n):
        chunk = {"id": "cmpl-1", "object": "text_completion",
                 "choices": [{"index": 0, "text": f"{tag}{i} ", "finish_reason": None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if usage:
        events.append(b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":3,'
                      b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 3))
    events.append(b"data: [DONE]\n\n")
    return events


# vLLM reads request fields with pydantic (lax mode): "stream": "false" is False.
_VLLM_BOOL = pydantic.TypeAdapter(bool)


class FakeBackend:
    """A fake vLLM OpenAI server playing prefill or decode.

    Knobs (set them on the instance at any time):
      status          - status for generation requests (default 200)
      params          - callable(n) -> kv_transfer_params returned by prefill
      no_params       - prefill answers without kv_transfer_params
      header_delay    - seconds before answering generation requests
      events          - SSE events a streaming decode sends
      chunker         - callable(bytes) -> list of chunks to write
      event_delay     - seconds between chunks
      stall_after     - stop (hang) after this many chunks
      abort_after     - drop the TCP connection after this many chunks
      drop_unanswered - drop the connection of this many generation requests
                        without answering (a pooled connection the server closed)
      empty_body      - non-stream decode answers 200 with nothing
      healthy         - GET /health answers 200 (else 503)
      health_delay    - seconds before answering GET /health
    """

    def __init__(self, name: str):
        self.name = name
        self.status = 200
        self.no_params = False
        self.params: Callable[[int], dict] = lambda n: {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": f"engine-{name}", "remote_host": "127.0.0.1",
            "remote_port": 5600, "remote_block_ids": [1, 2, 3],
            "transfer_id": f"{name}-{n}"}
        self.header_delay = 0.0
        self.events = sse_events(5)
        self.chunker: Optional[Callable[[bytes], list[bytes]]] = None
        self.event_delay = 0.0
        self.stall_after: Optional[int] = None
        self.abort_after: Optional[int] = None  # drop the connection after N chunks
        self.drop_unanswered = 0
        self.empty_body = False
        self.healthy = True
        self.health_delay = 0.0
        self.requests: list[dict] = []  # {"path", "headers", "body"}
        self.health_probes = 0
        self.cancelled = 0  # handlers cut by the peer closing the connection
        self.completed = 0
        self.handler_started = asyncio.Event()
        self._runner: Optional[web.AppRunner] = None
        self.address = ""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def nonstream_answer(self, body: dict) -> dict:
        return {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                "choices": [{"index": 0, "text": f"answer from {self.name}",
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = len(self.requests)
        self.requests.append({"path": request.path, "headers": request.headers.copy(),
                              "body": body})
        self.handler_started.set()
        if self.drop_unanswered > 0:
            self.drop_unanswered -= 1
            request.transport.abort()
            return web.Response()  # never sent
        try:
            if self.header_delay:
                await asyncio.sleep(self.header_delay)
            if self.status != 200:
                return web.json_response({"error": {"message": f"{self.name} failed",
                                                    "code": self.status}},
                                         status=self.status)
            kv = body.get("kv_transfer_params") or {}
            if kv.get("do_remote_decode"):  # prefill request
                answer = self.nonstream_answer(body)
                if not self.no_params:
                    answer["kv_transfer_params"] = self.params(n)
                self.completed += 1
                return web.json_response(answer)
            if not _VLLM_BOOL.validate_python(body.get("stream") or False):
                if self.empty_body:
                    self.completed += 1
                    return web.Response(status=200)
                self.completed += 1
                return web.json_response(self.nonstream_answer(body))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; "
                                               "charset=utf-8"})
            await resp.prepare(request)
            data = b"".join(self.events)
            chunks = self.chunker(data) if self.chunker else list(self.events)
            for i, chunk in enumerate(chunks):
                if self.stall_after is not None and i >= self.stall_after:
                    await asyncio.sleep(3600)
                if self.abort_after is not None and i >= self.abort_after:
                    request.transport.close()
                    return resp
                await resp.write(chunk)
                if self.event_delay:
                    await asyncio.sleep(self.event_delay)
            await resp.write_eof()
            self.completed += 1
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _health(self, request: web.Request) -> web.Response:
        self.health_probes += 1
        if self.health_delay:
            await asyncio.sleep(self.health_delay)
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": f"model-of-{self.name}", "object": "model"}]})

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ReleaseRecorder:
    def __init__(self):
        self.calls: list[dict] = []
        self.called = asyncio.Event()

    async def __call__(self, params: dict, *, timeout: float = 2.0) -> bool:
        self.calls.append(params)
        self.called.set()
        return True


@pytest.fixture
async def backend():
    made: list[FakeBackend] = []

    async def make(name: str = "b") -> FakeBackend:
        b = FakeBackend(f"{name}{len(made)}")
        await b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


@pytest.fixture
def release():
    return ReleaseRecorder()


@pytest.fixture
async def proxy(release):
    clients: list[TestClient] = []

    async def make(prefill=(), decode=(), **kw) -> TestClient:
        kw.setdefault("health_interval", 0)  # tests that need probes turn them on
        cfg = ProxyConfig(prefill=[b if isinstance(b, str) else b.address for b in prefill],
                          decode=[b if isinstance(b, str) else b.address for b in decode],
                          **kw)
        app = create_app(cfg, release_transfer=release)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


def state_of(client: TestClient):
    return client.server.app[STATE_KEY]


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0, step: float = 0.01):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
