"""Optional shared-secret authentication of the control plane.

With a secret set, every request a consumer (or the proxy) sends a producer
carries a token: HMAC-SHA256, keyed by the secret, over a domain tag, the
message kind, the fields that decide what the message does, a fresh random
nonce and a timestamp. The producer checks it in constant time, refuses a
timestamp outside ``MAX_SKEW_S`` and a nonce it already accepted inside that
window, so a captured message cannot be replayed. Its replies are signed
over the request's nonce, so a consumer never takes a handshake or a pull
answer from an instance that does not know the secret.

The tcp transport's ``DataHello`` (which names a data stream) is signed the
same way. The secret itself never travels. KV data frames are not signed
(that would cost a pass over every byte): authentication stops strangers from pulling
or releasing blocks, it does not encrypt; keep KV traffic on a private
network.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from typing import Any

import msgspec

_DOMAIN = b"vllm-ascend-pd/auth/1"
_VERSION = "a1"
# Tokens from further in the past or the future than this are refused; keep
# the instances' clocks in sync (NTP).
MAX_SKEW_S = 60.0
# Nonces remembered for replay detection (oldest forgotten first).
_MAX_NONCES = 200_000

_encode = msgspec.msgpack.Encoder().encode


class AuthError(ValueError):
    """A token is missing, malformed, stale, replayed or forged."""


class Authenticator:
    """Signs and checks tokens for one shared secret (an empty secret turns
    authentication off: every check passes and tokens are empty)."""

    def __init__(self, secret: str, clock=time.time):
        self._key = secret.encode() if secret else b""
        self._clock = clock
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def _mac(self, kind: str, nonce: str, ts: int, fields: tuple[Any, ...]) -> str:
        msg = _encode([kind, nonce, ts, list(fields)])
        return hmac.new(self._key, _DOMAIN + msg, hashlib.sha256).hexdigest()

    def sign(self, kind: str, *fields: Any) -> str:
        """Token for a new request."""
        if not self.enabled:
            return ""
        nonce = secrets.token_hex(16)
        ts = int(self._clock() * 1000)
        return f"{_VERSION}.{nonce}.{ts}.{self._mac(kind, nonce, ts, fields)}"

    def verify(self, kind: str, token: str, *fields: Any) -> None:
        """Check a request's token; raise AuthError saying why it is refused."""
        if not self.enabled:
            return
        nonce, ts = self._check(kind, token, fields)
        now = self._clock()
        if abs(now - ts / 1000) > MAX_SKEW_S:
            raise AuthError(
                f"token timestamp is {now - ts / 1000:+.0f}s off this host's clock "
                f"(more than {MAX_SKEW_S:.0f}s): sync the instances' clocks"
            )
        if nonce in self._seen:
            raise AuthError("token was already used (replayed message)")
        self._remember(nonce, now)

    def sign_reply(self, kind: str, request_token: str, *fields: Any) -> str:
        """Token for the answer to a request, bound to that request's nonce."""
        if not self.enabled:
            return ""
        nonce = request_token.split(".")[1] if request_token.count(".") == 3 else ""
        ts = int(self._clock() * 1000)
        return f"{_VERSION}.{nonce}.{ts}.{self._mac(kind, nonce, ts, fields)}"

    def verify_reply(self, kind: str, token: str, request_token: str, *fields: Any) -> None:
        if not self.enabled:
            return
        nonce, _ = self._check(kind, token, fields)
        if not hmac.compare_digest(nonce, request_token.split(".")[1]):
            raise AuthError("reply answers another request")

    def _check(self, kind: str, token: str, fields: tuple[Any, ...]) -> tuple[str, int]:
        if not token:
            raise AuthError("no authentication token (the peer has no shared secret set)")
        parts = token.split(".")
        # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
        if len(parts) != 4 or parts[0] != _VERSION or len(parts[1]) != 32 \
                or not (parts[2].isascii() and parts[2].isdigit()) or len(parts[2]) > 15:
            raise AuthError("malformed authentication token (different vllm-ascend-pd version?)")
        _, nonce, ts_text, mac = parts
        ts = int(ts_text)
        if not hmac.compare_digest(mac.encode(), self._mac(kind, nonce, ts, fields).encode()):
            raise AuthError("wrong shared secret (token signature does not match)")
        return nonce, ts

    def _remember(self, nonce: str, now: float) -> None:
        seen = self._seen
        seen[nonce] = now
        while seen and (len(seen) > _MAX_NONCES or next(iter(seen.values())) < now - 2 * MAX_SKEW_S):
            seen.popitem(last=False)
