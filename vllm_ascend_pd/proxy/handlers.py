"""HTTP endpoints of the proxy.  Thin: validation here, the PD path in pd.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import time
import uuid
from typing import Optional

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from vllm_ascend_pd.proxy import aio, codec
from vllm_ascend_pd.proxy.codec import BodyError, RequestBody
from vllm_ascend_pd.proxy.balancer import affinity_key, estimate_prompt_tokens
from vllm_ascend_pd.proxy.config import ConfigError, normalize_address
from vllm_ascend_pd.proxy.errors import UpstreamClientError, UpstreamError, error_response
from vllm_ascend_pd.proxy.link import SupervisorUnavailable
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.pd import (STREAM_DELIVERED, ClientGone, PDForwarder, PDRequest,
                                     local_prefill_reason)
from vllm_ascend_pd.proxy.registry import DECODE, PREFILL, ROLES, Health, Source
from vllm_ascend_pd.proxy.state import ProxyState

logger = init_logger(__name__)

_PASS_HEADERS = ("Authorization", "traceparent", "tracestate")
# Set when a write to the client failed mid-answer: the handler returns the
# prepared response, but the request counts as a 499.
_CLIENT_LEFT = (web.RequestKey("vllm_ascend_pd_client_left", bool)
                if hasattr(web, "RequestKey")  # aiohttp >= 3.13
                else "vllm_ascend_pd_client_left")
_MAX_REQUEST_ID = 256
# Requests this proxy sends carry its mark in a Via header (RFC 9110 7.6.3),
# kept by proxies down the line: a request that comes back with it is in a
# routing loop (an instance address naming this proxy, or a proxy routing
# back to it), which would otherwise recurse until --max-inflight is full.
_MAX_HOPS = 8


def _via_mark(state: ProxyState) -> str:
    """This proxy's pseudonym: the same in every worker of one proxy."""
    owner = state.worker.parent_pid if state.worker is not None else state.pid
    digest = hashlib.blake2b(f"{socket.gethostname()}/{owner}".encode(), digest_size=6)
    return f"vllm-ascend-pd-{digest.hexdigest()}"


# vLLM validates requests with pydantic, whose lax mode takes these strings
# for booleans: "stream": "false" is a non-streaming request there.
_FALSE_STRINGS = frozenset(("0", "off", "f", "false", "n", "no"))


def _is_stream(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_STRINGS and bool(value.strip())
    return bool(value)


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("X-Request-Id")
    if rid and len(rid) <= _MAX_REQUEST_ID and rid.isprintable():
        return rid
    return uuid.uuid4().hex


def _relayed_client_error(err: UpstreamClientError, rid: str) -> web.Response:
    """A backend's 4xx for the client: its JSON error object as is; anything
    else (an empty body, the HTML of a server in front of vLLM) becomes a
    JSON error with the same status, so clients can always parse it."""
    try:
        is_object = isinstance(codec.loads(err.body), dict)
    except codec.DecodeError:
        is_object = False
    if is_object:
        return web.Response(status=err.status, body=err.body, content_type="application/json",
                            headers={"X-Request-Id": rid})
    text = err.body[:200].decode("utf-8", "replace")
    return error_response(err.status, f"an instance answered {err.status} without a JSON "
                          f"error: {text!r}", headers={"X-Request-Id": rid})


class Handlers:
    def __init__(self, state: ProxyState):
        self.s = state
        self.cfg = state.cfg
        self.pd = PDForwarder(state)
        self._started = time.time()
        self._via_mark = _via_mark(state)

    # ------------------------------------------------------------ completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False, endpoint="completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True, endpoint="chat_completions")

    async def _generate(self, request: web.Request, *, chat: bool,
                        endpoint: str) -> web.StreamResponse:
        s = self.s
        status = 499
        try:
            resp = await self._admit_and_run(request, chat)
            status = resp.status
            return resp
        finally:
            if request.get(_CLIENT_LEFT):
                status = 499
            elif status == 499 and request.get(STREAM_DELIVERED):
                status = 200
            s.metrics.requests.labels(endpoint, str(status)).inc()

    async def _admit_and_run(self, request: web.Request, chat: bool) -> web.StreamResponse:
        s, cfg = self.s, self.cfg
        rid = _request_id(request)
        rid_hdr = {"X-Request-Id": rid}
        if s.draining:
            s.metrics.errors.labels("draining").inc()
            return error_response(503, "the proxy is shutting down; retry on another "
                                  "replica", headers={"Retry-After": str(cfg.retry_after),
                                                      **rid_hdr})
        looped = self._looped(request, rid_hdr)
        if looped is not None:
            return looped
        if s.inflight >= s.max_inflight:
            s.metrics.errors.labels("overloaded").inc()
            return error_response(
                503, f"too many requests in flight ({s.max_inflight}); retry later",
                headers={"Retry-After": str(cfg.retry_after), **rid_hdr})
        s.enter()
        try:
            return await self._run(request, chat, rid)
        finally:
            s.leave()

    def _via(self, request: web.Request) -> str:
        """The Via header of a request this proxy sends on ``request``'s behalf."""
        via = ", ".join(request.headers.getall("Via", ()))
        return f"{via}, 1.1 {self._via_mark}" if via else f"1.1 {self._via_mark}"

    def _looped(self, request: web.Request, headers: Optional[dict] = None):
        """A 508 response if ``request`` is in a routing loop, else None."""
        via = ", ".join(request.headers.getall("Via", ()))
        if not via or (self._via_mark not in via and via.count(",") < _MAX_HOPS):
            return None
        self.s.metrics.errors.labels("loop_detected").inc()
        return error_response(
            508, f"routing loop: this request already passed through this proxy (or "
            f"{_MAX_HOPS} proxies); an instance address names the proxy itself or a "
            "proxy that routes back to it", headers=headers)

    async def _read_body(self, request: web.Request, rid: str):
        """Returns the parsed body dict or an error response."""
        cfg = self.cfg
        hdr = {"X-Request-Id": rid}
        if request.content_length is not None and request.content_length > cfg.max_body_bytes:
            self.s.metrics.errors.labels("body_too_large").inc()
            return error_response(413, f"request body exceeds {cfg.max_body_bytes} bytes",
                                  headers=hdr)
        try:
            # Admitted requests count against --max-inflight: a client that
            # trickles its body must not hold a slot for ever.
            async with aio.timeout(cfg.body_timeout):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.s.metrics.errors.labels("body_too_large").inc()
            return error_response(413, f"request body exceeds {cfg.max_body_bytes} bytes",
                                  headers=hdr)
        except asyncio.TimeoutError:  # TimeoutError itself only from 3.11
            self.s.metrics.errors.labels("body_timeout").inc()
            resp = error_response(408, f"request body not received within "
                                  f"{cfg.body_timeout:g} s (--body-timeout)", headers=hdr)
            resp.force_close()  # the rest of the body may still be on its way
            return resp
        try:
            body = RequestBody.parse(raw)
        except BodyError as exc:
            self.s.metrics.errors.labels("bad_request").inc()
            return error_response(400, str(exc), headers=hdr)
        model = body.get("model")
        if cfg.model is not None and model is not None and model != cfg.model:
            self.s.metrics.errors.labels("unknown_model").inc()
            return error_response(404, f"The model `{model}` does not exist.", headers=hdr)
        return body

    async def _run(self, request: web.Request, chat: bool, rid: str) -> web.StreamResponse:
        s = self.s
        try:
            body = await self._read_body(request, rid)
        except asyncio.CancelledError:  # the client left while sending its body
            s.metrics.errors.labels("client_disconnect").inc()
            raise
        if isinstance(body, web.StreamResponse):
            return body
        # Built once for both legs (aiohttp would convert a dict per leg).
        headers = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": rid})
        for name in _PASS_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        headers["Via"] = self._via(request)
        # Client-supplied kv_transfer_params are never honoured: both legs
        # overwrite the key (see PDForwarder.prefill_body/decode_body).
        req = PDRequest(path=request.path, body=body, chat=chat,
                        stream=_is_stream(body.get("stream")), request_id=rid, headers=headers,
                        tokens=estimate_prompt_tokens(body))
        reason = local_prefill_reason(body, chat)
        if reason is not None:
            # P's KV would go unused or be leaked: D prefills.
            req.local_prefill = True
            s.metrics.local_prefill.labels(reason).inc()
        if self.cfg.policy == "prefix_affinity":
            req.affinity = affinity_key(body, self.cfg.affinity_prefix_bytes)
        # Both legs run in one task of their own, which the handler awaits
        # through a shield: a client that leaves during the prefill leg must
        # not cancel it (see _serve). Shielding the whole request instead of
        # the prefill leg alone keeps the prefill -> decode step inside one
        # task: under load every task hand-off waits a loop iteration, and the
        # hand-offs of a shielded prefill task (three per request, before the
        # decode leg could start) were part of the added TTFT
        # (docs/proxy-benchmark.md).
        work = asyncio.ensure_future(self._serve(req, request))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                # It ended before this handler resumed (the client hung up
                # right after the end): a streamed answer went out in full,
                # any other is never sent.
                if not work.cancelled() and work.exception() is None:
                    if work.result().prepared:
                        request[STREAM_DELIVERED] = True
                    else:
                        s.metrics.errors.labels("client_disconnect").inc()
                raise
            if req.kv_params is None and not req.local_prefill:
                # Prefill in flight: _serve lets it finish, releases its KV
                # and does not start the decode leg.
                req.abandoned = True
                s.metrics.errors.labels("client_disconnect").inc()
                logger.info("request %s: client left during prefill; letting it finish "
                            "to release its KV", rid)
                s.adopt(work)
            else:
                work.cancel()  # the decode leg: _serve counts and logs it
                # Let it unwind before the request is counted: how it ended
                # decides the status (a client that left after [DONE] got
                # its whole answer).
                await asyncio.wait([work], timeout=5.0)
            raise

    async def _serve(self, req: PDRequest, request: web.Request) -> web.StreamResponse:
        """Prefill then decode, with the error mapping; the body of :meth:`_run`.

        If the client leaves during the prefill leg (``req.abandoned``), the
        leg is not cancelled: P may have finished it already, and then only
        its answer names the lease to free. Cancelling would orphan those
        blocks until the lease expires (``lease_s``, 120 s by default). A
        prefill is one forward pass, so finishing it costs little; a leaked
        lease holds KV memory."""
        s, rid = self.s, req.request_id
        try:
            if req.local_prefill:
                req.prefill_end = time.perf_counter()
                return await self.pd.decode(req, request)
            req.kv_params = await self.pd.prefill(req)
            if req.abandoned:
                return web.Response(status=499)  # nobody reads it
            return await self.pd.decode(req, request)
        except UpstreamClientError as err:
            return _relayed_client_error(err, rid)
        except UpstreamError as err:
            if req.abandoned:
                logger.info("request %s (client gone) failed: %s", rid, err.message)
            else:
                logger.error("request %s failed: %s", rid, err.message)
            return error_response(err.status, err.message, headers={"X-Request-Id": rid})
        except ClientGone as gone:
            request[_CLIENT_LEFT] = True
            s.metrics.errors.labels(gone.kind).inc()
            logger.info("request %s: %s; decode leg cancelled", rid, gone)
            return gone.response
        except asyncio.CancelledError:
            if request.get(STREAM_DELIVERED):
                logger.debug("request %s: client left after [DONE]", rid)
            else:
                s.metrics.errors.labels("client_disconnect").inc()
                logger.info("request %s: client disconnected; in-flight leg cancelled", rid)
            raise
        finally:
            if req.kv_params is not None and not req.client_started:
                # Nobody will pull these blocks: free them on the producer now.
                s.release_kv(req.kv_params, "client left during prefill" if req.abandoned
                             else "request ended before decode output")

    # ------------------------------------------------------------ models
    async def models(self, request: web.Request) -> web.Response:
        s = self.s
        looped = self._looped(request)
        if looped is not None:
            return looped
        headers = {"Via": self._via(request)}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        for role in (DECODE, PREFILL):
            for inst in s.registry.candidates(role):
                try:
                    sess = s.clients.session(inst.address)
                    async with aio.timeout(self.cfg.health_timeout + 1):
                        async with sess.get("/v1/models", headers=headers,
                                            allow_redirects=False) as resp:
                            data = await resp.read()
                            if resp.status == 200 or 400 <= resp.status < 500:
                                return web.Response(status=resp.status, body=data,
                                                    content_type=resp.content_type)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError,
                        RuntimeError) as exc:
                    logger.debug("GET /v1/models on %s failed: %r", inst.address, exc)
        if self.cfg.model:
            return web.json_response({"object": "list", "data": [{
                "id": self.cfg.model, "object": "model", "created": int(self._started),
                "owned_by": "vllm-ascend-pd"}]}, dumps=lambda o: codec.dumps(o).decode())
        return error_response(503, "no healthy instance answered /v1/models; set --model "
                              "to serve a static model list")

    # ------------------------------------------------------------ health/status
    def _healthy_counts(self) -> dict:
        return {role: sum(1 for i in self.s.registry.instances(role)
                          if i.health is Health.HEALTHY) for role in ROLES}

    async def health(self, request: web.Request) -> web.Response:
        counts = self._healthy_counts()  # prefill/decode include kv_both instances
        ok = not self.s.draining and bool(counts[PREFILL]) and bool(counts[DECODE])
        body = {"status": "ok" if ok else ("draining" if self.s.draining else "degraded"),
                **counts}
        return web.Response(status=200 if ok else 503, body=codec.dumps(body),
                            content_type="application/json")

    async def status(self, request: web.Request) -> web.Response:
        s = self.s
        body = {
            "policy": self.cfg.policy,
            "model": self.cfg.model,
            "inflight": s.inflight,  # of this worker
            "max_inflight": s.max_inflight,  # this worker's share
            "draining": s.draining,
            "uptime": round(time.time() - self._started, 3),
            "healthy": self._healthy_counts(),
            "instances": s.registry.snapshot(),
            "registration": (s.registration.endpoint if s.registration
                             else s.worker.registration if s.worker else None),
            "worker": {"index": s.worker.index if s.worker else 0, "pid": s.pid,
                       "count": s.worker.count if s.worker else 1},
        }
        if s.worker is not None and s.metrics.available:
            body["all_workers"] = s.metrics.all_workers()
        return web.Response(body=codec.dumps(body), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.s.metrics.available:
            return error_response(503, "metrics need prometheus_client: pip install "
                                  "prometheus_client")
        data, ctype = self.s.metrics.exposition()
        resp = web.Response(body=data)
        resp.headers["Content-Type"] = ctype
        return resp

    # ------------------------------------------------------------ admin
    def _admin_denied(self, request: web.Request):
        token = self.cfg.admin_token
        if not token:
            return error_response(403, "the admin API is disabled; start the proxy with "
                                  "--admin-token to enable it")
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        # surrogateescape: aiohttp keeps a header's non-UTF-8 bytes as lone
        # surrogates, which plain .encode() refuses (a 500, not a 401); so
        # does Python with argv (--admin-token).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"),
                token.encode("utf-8", "surrogateescape")):
            return error_response(401, "missing or wrong admin bearer token",
                                  headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _admin_target(self, request: web.Request):
        """(role, address) of an authorised admin request, or the error response."""
        denied = self._admin_denied(request)
        if denied is not None:
            return denied
        try:
            body = codec.loads(await request.read())
        except (codec.DecodeError, web.HTTPRequestEntityTooLarge):
            return error_response(400, "body must be JSON: {\"role\": \"prefill\"|\"decode\""
                                  "|\"both\", \"address\": \"host:port\"}")
        if not isinstance(body, dict) or body.get("role") not in ROLES \
                or not isinstance(body.get("address"), str):
            return error_response(400, "body must be {\"role\": \"prefill\"|\"decode\"|"
                                  "\"both\", \"address\": \"host:port\"}")
        try:
            address = normalize_address(body["address"])
        except ConfigError as exc:
            return error_response(400, str(exc))
        return body["role"], address

    async def admin_add(self, request: web.Request) -> web.Response:
        target = await self._admin_target(request)
        if isinstance(target, web.Response):
            return target
        role, address = target
        s = self.s
        if s.link is not None:  # a worker: the supervisor owns membership
            reply = await self._forward("add", role, address)
            if isinstance(reply, web.Response):
                return reply
            created = reply.changed
            inst = s.registry.get(role, address)
            if inst is None:  # removed again before this worker caught up
                return error_response(409, f"{role} instance {address} was removed "
                                      "concurrently; retry")
        else:
            inst, created = s.registry.add(role, address, Source.ADMIN)
            if created:
                logger.info("admin: added %s instance %s", role, address)
                s.on_instance_added(inst)
        if created:  # answer with its health: the one probe joining started
            await s.first_probe(inst)
        return web.Response(status=201 if created else 200, content_type="application/json",
                            body=codec.dumps({"added": created,
                                              "instance": inst.to_status(time.monotonic())}))

    async def _forward(self, op: str, role: str, address: str):
        """Have the supervisor apply an admin change; returns its reply once
        this worker applied the resulting membership, or an error response."""
        try:
            reply = await self.s.link.request(op, role, address)
        except SupervisorUnavailable as exc:
            return error_response(503, f"{exc}; retry", headers={"Retry-After": "1"})
        self.s.link.apply(reply.snapshot)
        return reply

    async def admin_remove(self, request: web.Request) -> web.Response:
        target = await self._admin_target(request)
        if isinstance(target, web.Response):
            return target
        role, address = target
        if self.s.link is not None:  # a worker: the supervisor owns membership
            inst = self.s.registry.get(role, address)  # its load in this worker
            reply = await self._forward("remove", role, address)
            if isinstance(reply, web.Response):
                return reply
            if not reply.changed:
                return error_response(404, f"no {role} instance {address}")
            # Applying the membership ran on_instance_removed already.
            return web.Response(content_type="application/json", body=codec.dumps(
                {"removed": True,
                 "inflight_requests": inst.inflight_requests if inst is not None else 0}))
        inst = self.s.registry.remove(role, address)
        if inst is None:
            return error_response(404, f"no {role} instance {address}")
        logger.info("admin: removed %s instance %s (%d requests still finishing)", role,
                    address, inst.inflight_requests)
        self.s.on_instance_removed(inst)
        return web.Response(content_type="application/json", body=codec.dumps(
            {"removed": True, "inflight_requests": inst.inflight_requests}))
