"""The disaggregated request path: prefill leg, then decode leg, with failover.

1. Prefill: a copy of the body with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true}`` goes to a prefill
   instance; its answer's ``kv_transfer_params`` is kept opaque.
2. Decode: the original body plus those params goes to a decode instance;
   its answer is relayed unchanged (SSE event by event).

Failover happens only while nothing has been sent to the client, and never
retries a node already tried for the same request.  Only instances in the
registry are contacted: redirects are not followed (``allow_redirects=False``
on every backend request), an instance answering 3xx failed the attempt.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from vllm_ascend_pd.proxy import aio, codec
from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.errors import UpstreamClientError, UpstreamError
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.registry import DECODE, PREFILL, Instance
from vllm_ascend_pd.proxy.sse import SSEBuffer
from vllm_ascend_pd.proxy.state import ProxyState
from vllm_ascend_pd.proxy.timeouts import GapWatchdog

logger = init_logger(__name__)

_SSE = "text/event-stream"
# Set on the aiohttp request once the client has been sent the stream's
# terminal ``data: [DONE]`` event: a client that hangs up after it (before
# D's end of stream) got its whole answer, not a 499.
STREAM_DELIVERED = (web.RequestKey("vllm_ascend_pd_stream_delivered", bool)
                    if hasattr(web, "RequestKey")  # aiohttp >= 3.13
                    else "vllm_ascend_pd_stream_delivered")


def _server_timing(req: "PDRequest", metrics) -> str:
    """Where the time to the first byte went (ms): the prefill leg, then
    the decode leg up to D's first byte (failover included in each)."""
    decode = time.perf_counter() - req.prefill_end
    metrics.decode_first_byte.observe(decode)
    return f"prefill;dur={req.prefill_s * 1e3:.3f}, decode;dur={decode * 1e3:.3f}"


def _ends_stream(events: bytes) -> bool:
    return events.rstrip().endswith(b"data: [DONE]")


def local_prefill_reason(body: RequestBody, chat: bool) -> Optional[str]:
    """Why this request must go to D without a prefill leg, or None.

    ``prompt_logprobs``: vLLM computes such a prompt itself, whatever KV it
    is handed (``SamplingParams.skip_reading_prefix_cache``). This mirrors
    how vLLM's OpenAI server derives ``prompt_logprobs``; chat's ``echo``
    takes ``top_logprobs``, which defaults to 0.

    ``batch``: a completions request with several prompts. P would lease a
    transfer per prompt but answer with the first prompt's params only, so
    the other leases would hold P's blocks until they expire."""
    try:
        if body.get("prompt_logprobs") is not None:
            return "prompt_logprobs"
        if body.get("echo") and (body.get("top_logprobs", 0) is not None if chat
                                 else body.get("logprobs") is not None):
            return "prompt_logprobs"
        if not chat and _is_batch(body.raw("prompt")):
            return "batch"
    except (codec.DecodeError, RecursionError):
        pass  # D will refuse the body; the usual path reports it
    return None


def _is_batch(prompt: Optional[bytes]) -> bool:
    """Several prompts: a list of strings or of token lists, more than one.
    A single prompt (a string, or a list of token ids, maybe 128k long) is
    told by its first bytes and never decoded."""
    if not prompt:
        return False
    head = prompt.lstrip()
    if head[:1] != b"[" or head[1:].lstrip()[:1] not in (b'"', b"["):
        return False
    return len(codec.loads_items(head)) > 1


@dataclass
class PDRequest:
    """Per-request bookkeeping shared by both legs."""
    path: str
    body: RequestBody
    chat: bool
    stream: bool
    request_id: str
    headers: CIMultiDict  # outbound headers (auth, request id, content type), both legs
    tokens: int
    # prefix_affinity's hash of the prompt's start (empty for other policies).
    affinity: bytes = b""
    started: float = field(default_factory=time.perf_counter)
    # The prefill leg, failover included: its duration and when it ended
    # (perf_counter), for the Server-Timing header.
    prefill_s: float = 0.0
    prefill_end: float = 0.0
    kv_params: Optional[dict] = None
    # Who prefilled: a kv_both instance is not picked for this request's
    # decode leg while another decode-capable instance is available.
    prefill_address: Optional[str] = None
    # Decode output reached (or is being streamed to) the client: from here
    # on there is no failover, and the producer's KV has been consumed.
    client_started: bool = False
    # The client left during the prefill leg: finish the leg, release its
    # KV, do not start the decode leg.
    abandoned: bool = False
    # Sent to D without a prefill leg (see local_prefill_reason).
    local_prefill: bool = False


def _classify(exc: BaseException, leg: str, addr: str, phase: str,
              answered: bool = True) -> UpstreamError:
    """Map a client-side exception of one attempt to an UpstreamError.
    ``answered``: the instance's response headers had arrived."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return UpstreamError(f"{leg}_connect", f"cannot connect to {leg} instance {addr}: "
                             f"{exc}", 502)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamError(f"{leg}_timeout", f"{leg} instance {addr} timed out {phase}", 504)
    return UpstreamError(f"{leg}_protocol", f"{leg} instance {addr} failed {phase}: "
                         f"{type(exc).__name__}: {exc}", 502,
                         retry_same=not answered and isinstance(exc, _CONNECTION_LOST))


_UPSTREAM_EXC = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
# aiohttp's "Can not write request body" and "Server disconnected" on a
# connection from the pool (ClientConnectorError, a subclass, is caught first).
_CONNECTION_LOST = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class ClientGone(Exception):
    """Writing to the client failed: it disconnected (``kind``
    ``client_disconnect``) or stopped reading (``client_stalled``)."""

    def __init__(self, response: web.StreamResponse, kind: str = "client_disconnect"):
        super().__init__("client disconnected" if kind == "client_disconnect"
                         else "client stopped reading")
        self.response = response
        self.kind = kind


_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


async def _send(out: web.StreamResponse, data: Optional[bytes],
                request: Optional[web.Request] = None, *, eof: bool = False) -> None:
    """Write to the client; a failed write becomes :class:`ClientGone`."""
    try:
        if request is not None:
            await out.prepare(request)
        elif eof:
            await out.write_eof()
        else:
            await out.write(data)
    except _CLIENT_GONE as exc:
        raise ClientGone(out) from exc


class PDForwarder:
    def __init__(self, state: ProxyState):
        self.s = state
        self.cfg = state.cfg

    # ------------------------------------------------------------------ prefill
    def prefill_body(self, req: PDRequest) -> bytes:
        overrides = {
            "stream": False,
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        }
        if req.chat:
            overrides["max_completion_tokens"] = 1
        if "n" in req.body:
            # One prefill serves every choice: with n > 1, P would lease one
            # transfer per choice and D would pull only one (the rest would
            # hold P's blocks until lease_s).
            overrides["n"] = 1
        # min_tokens would contradict max_tokens=1.
        return req.body.encode(overrides, drop=("stream_options", "min_tokens"))

    async def prefill(self, req: PDRequest) -> dict:
        """Run the prefill leg with failover; returns P's kv_transfer_params."""
        payload = self.prefill_body(req)
        t0 = time.perf_counter()
        params = await self._with_failover(PREFILL, self.cfg.prefill_attempts,
                                           lambda i: self._prefill_once(i, req, payload),
                                           key=req.affinity)
        req.prefill_end = time.perf_counter()
        req.prefill_s = req.prefill_end - t0
        return params

    async def _prefill_once(self, inst: Instance, req: PDRequest, payload: bytes) -> dict:
        s = self.s
        sess = s.clients.session(inst.address)
        s.registry.acquire(inst, req.tokens)
        t0 = time.perf_counter()
        answered = False
        try:
            async with aio.timeout(self.cfg.first_byte_timeout):
                async with sess.post(s.clients.url(inst.address, req.path), data=payload,
                                     headers=req.headers, allow_redirects=False) as resp:
                    answered = True
                    data = await resp.read()
                    status = resp.status
                    ctype = resp.content_type
        except _UPSTREAM_EXC as exc:
            raise _classify(exc, "prefill", inst.address, "before answering",
                            answered) from exc
        finally:
            s.release_instance(inst, req.tokens)
        if not (200 <= status < 300 or 400 <= status < 500):
            raise UpstreamError("prefill_status", f"prefill instance {inst.address} "
                                f"answered {status}: {data[:200]!r}", 502)
        if status >= 400:
            raise UpstreamClientError(status, data, ctype)
        try:
            answer = codec.loads(data)
        except codec.DecodeError:
            raise UpstreamError("prefill_protocol", f"prefill instance {inst.address} "
                                "answered invalid JSON", 502) from None
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict) or not params:
            raise UpstreamError(
                "prefill_no_params", f"prefill instance {inst.address} returned no "
                "kv_transfer_params; is it started with --kv-transfer-config "
                "kv_role=kv_producer/kv_both?", 502)
        s.metrics.prefill_latency.observe(time.perf_counter() - t0)
        req.prefill_address = inst.address
        return params

    # ------------------------------------------------------------------ decode
    def decode_body(self, req: PDRequest) -> bytes:
        # Any client-supplied kv_transfer_params is replaced, never honoured.
        return req.body.encode({"kv_transfer_params": req.kv_params})

    async def decode(self, req: PDRequest, request: web.Request) -> web.StreamResponse:
        payload = self.decode_body(req)
        avoid = (req.prefill_address,) if req.prefill_address else ()
        return await self._with_failover(
            DECODE, self.cfg.decode_attempts,
            lambda i: self._decode_once(i, req, payload, request), avoid=avoid,
            key=req.affinity)

    async def _decode_once(self, inst: Instance, req: PDRequest, payload: bytes,
                           request: web.Request) -> web.StreamResponse:
        s = self.s
        sess = s.clients.session(inst.address)
        s.registry.acquire(inst, req.tokens)
        t0 = time.perf_counter()
        resp: Optional[aiohttp.ClientResponse] = None
        clean = False
        try:
            streaming = req.stream
            first_byte = self.cfg.first_byte_timeout if streaming else \
                (self.cfg.nonstream_timeout or None)
            try:
                async with aio.timeout(first_byte):
                    resp = await sess.post(s.clients.url(inst.address, req.path),
                                           data=payload, headers=req.headers,
                                           allow_redirects=False)
                    if not 200 <= resp.status < 300:
                        data = await resp.read()
                        if not 400 <= resp.status < 500:
                            raise UpstreamError(
                                "decode_status", f"decode instance {inst.address} answered "
                                f"{resp.status}: {data[:200]!r}", 502)
                        raise UpstreamClientError(resp.status, data, resp.content_type)
                    sse = streaming and resp.content_type == _SSE
                    if sse:
                        buf = SSEBuffer()
                        first, eof = await self._first_events(resp, buf, inst)
                    else:
                        data = await resp.read()
                        if not data:
                            raise UpstreamError("decode_empty", f"decode instance "
                                                f"{inst.address} answered an empty body", 502)
            except _UPSTREAM_EXC as exc:
                raise _classify(exc, "decode", inst.address,
                                "before its first byte", resp is not None) from exc
            if not sse:
                req.client_started = True
                out = web.Response(status=resp.status, body=data,
                                   content_type=resp.content_type,
                                   headers={"X-Request-Id": req.request_id,
                                            "Server-Timing": _server_timing(req, s.metrics)})
                s.metrics.ttft.observe(time.perf_counter() - req.started)
                s.metrics.decode_latency.observe(time.perf_counter() - t0)
                clean = True
                return out
            out = await self._relay(request, req, resp, buf, first, eof, inst)
            s.metrics.decode_latency.observe(time.perf_counter() - t0)
            clean = True
            return out
        finally:
            if resp is not None:
                if clean:
                    resp.release()
                else:
                    resp.close()  # aborts the request on the decode instance
            s.release_instance(inst, req.tokens)

    async def _first_events(self, resp: aiohttp.ClientResponse, buf: SSEBuffer,
                            inst: Instance) -> tuple[bytes, bool]:
        """Read until at least one complete event; returns (events, eof)."""
        content = resp.content
        while True:
            chunk = await content.readany()
            if not chunk:
                rest = buf.flush()
                if rest is None:
                    raise UpstreamError("decode_empty", f"decode instance {inst.address} "
                                        "closed the stream before its first event", 502)
                return rest, True
            events = buf.take(chunk)
            if events:
                return events, False

    async def _relay(self, request: web.Request, req: PDRequest,
                     resp: aiohttp.ClientResponse, buf: SSEBuffer, first: bytes,
                     eof: bool, inst: Instance) -> web.StreamResponse:
        """Start the client response with the first event(s) and relay the rest.

        The loop is the proxy's hot path: per read it does one boundary
        search (:meth:`SSEBuffer.take`) and one client write of every
        complete event that read finished; metrics and timers are per
        request, not per event."""
        s = self.s
        out = web.StreamResponse(status=resp.status, headers={
            "Content-Type": resp.headers.get("Content-Type", _SSE),
            "Cache-Control": "no-cache",
            "X-Request-Id": req.request_id,
            "Server-Timing": _server_timing(req, s.metrics),
        })
        req.client_started = True
        await _send(out, None, request)
        await _send(out, first)
        s.metrics.ttft.observe(time.perf_counter() - req.started)
        if eof:
            await _send(out, b"", eof=True)
            return out
        watchdog = GapWatchdog(self.cfg.event_gap_timeout, self.cfg.client_write_timeout)
        readany = resp.content.readany
        take = buf.take
        write = out.write
        last = first  # the last events the client was sent in full
        try:
            while True:
                chunk = await readany()
                if not chunk:
                    rest = buf.flush()
                    if rest is not None:
                        await _send(out, rest)
                    break
                events = take(chunk)
                if events:
                    # The client's own pace must not count as backend silence.
                    watchdog.pause()
                    try:
                        await write(events)
                    except _CLIENT_GONE as exc:
                        raise ClientGone(out) from exc
                    last = events
                    watchdog.resume()
        except asyncio.CancelledError:
            if not watchdog.claim():
                if _ends_stream(last):
                    request[STREAM_DELIVERED] = True
                raise
            if watchdog.client_stalled:
                logger.warning("request %s: a write to the client waited %gs for it to read "
                               "(--client-write-timeout); closing its connection and "
                               "aborting the decode stream", req.request_id,
                               self.cfg.client_write_timeout)
                # Its buffers are full: nothing more can be sent, not even an
                # error event.
                transport = request.transport
                if transport is not None:
                    transport.abort()
                raise ClientGone(out, "client_stalled") from None
            await self._midstream_failure(out, req, inst, asyncio.TimeoutError())
            return out
        except _UPSTREAM_EXC as exc:
            await self._midstream_failure(out, req, inst, exc)
            return out
        finally:
            watchdog.close()
        try:
            await _send(out, b"", eof=True)
        except ClientGone:
            if not _ends_stream(last):
                raise
            request[STREAM_DELIVERED] = True
        return out

    async def _midstream_failure(self, out: web.StreamResponse, req: PDRequest,
                                 inst: Instance, exc: BaseException) -> None:
        """The stream already started: end it with an SSE error event."""
        timeout = isinstance(exc, asyncio.TimeoutError)
        what = "went silent longer than --event-gap-timeout" if timeout \
            else f"failed ({type(exc).__name__}: {exc})"
        logger.warning("request %s: decode instance %s %s after the stream started; "
                       "ending the stream with an error event", req.request_id,
                       inst.address, what)
        self.s.metrics.errors.labels("decode_midstream").inc()
        self.s.registry.mark_failure(inst)
        status = 504 if timeout else 502
        event = b"data: " + codec.dumps({"error": {
            "message": f"decode instance {what} mid-stream",
            "type": "GatewayTimeoutError" if timeout else "BadGatewayError",
            "code": status}}) + b"\n\n"
        await _send(out, event)
        await _send(out, b"", eof=True)

    # ------------------------------------------------------------------ failover
    async def _with_failover(self, role: str, attempts: int, attempt_fn,
                             avoid: tuple[str, ...] = (), key: bytes = b""):
        """``avoid``: used only when no other candidate is left. ``key``: the
        request's affinity key, for the policy."""
        s = self.s
        tried: list[str] = []
        last: Optional[UpstreamError] = None
        policy = s.policies[role]
        again: Optional[Instance] = None  # the same instance, on a new connection
        retried = False
        for n in range(attempts):
            if again is not None:
                inst, again = again, None
            else:
                cands = (avoid and s.registry.candidates(role, exclude=[*tried, *avoid])) \
                    or s.registry.candidates(role, exclude=tried)
                if not cands:
                    break
                inst = policy.pick(cands, key)
                tried.append(inst.address)
            if n:
                s.metrics.failovers.labels(role).inc()
            try:
                result = await attempt_fn(inst)
            except UpstreamError as err:
                s.metrics.errors.labels(err.kind).inc()
                if err.retry_same and not retried:
                    # aiohttp dropped the broken connection; one more try is
                    # not a sign that the instance is down.
                    retried, again, last = True, inst, err
                    logger.warning("%s attempt %d failed: %s; retrying on a new connection",
                                   role, n + 1, err.message)
                    continue
                s.registry.mark_failure(inst)
                logger.warning("%s attempt %d failed: %s", role, n + 1, err.message)
                last = err
                continue
            except UpstreamClientError:
                s.metrics.errors.labels(f"{role}_client_error").inc()
                raise
            s.registry.mark_success(inst)
            return result
        if last is None:
            s.metrics.errors.labels(f"no_{role}").inc()
            raise UpstreamError(f"no_{role}", f"no healthy {role} instance available", 503)
        raise last
