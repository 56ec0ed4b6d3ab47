"""Error kinds and OpenAI-style JSON error responses."""

from __future__ import annotations

from typing import Optional

from aiohttp import web

from vllm_ascend_pd.proxy import codec

# OpenAI error "type" per status code.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    499: "ClientClosedRequest",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
    508: "LoopDetectedError",
}


def error_body(status: int, message: str, err_type: Optional[str] = None) -> bytes:
    return codec.dumps({
        "error": {
            "message": message,
            "type": err_type or _TYPES.get(
                status, "BadRequestError" if 400 <= status < 500 else "InternalServerError"),
            "code": status,
        }
    })


def error_response(status: int, message: str, *, err_type: Optional[str] = None,
                   headers: Optional[dict] = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, err_type),
                        content_type="application/json", headers=headers)


class UpstreamError(Exception):
    """One failed attempt on one backend.

    ``kind`` is the metrics label (e.g. ``prefill_connect``); ``status`` is the
    status the client gets if this is the last failure.
    """

    def __init__(self, kind: str, message: str, status: int = 502, *,
                 retry_same: bool = False):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message
        # The connection broke before the instance answered anything (a
        # pooled connection the instance was closing): worth one more try
        # on a new connection, even to the same instance.
        self.retry_same = retry_same


class UpstreamClientError(Exception):
    """A backend answered 4xx: the request itself is wrong; relay it, do not retry."""

    def __init__(self, status: int, body: bytes, content_type: str):
        super().__init__(f"backend answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
