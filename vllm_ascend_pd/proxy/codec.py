"""JSON on the hot path.

Client bodies are parsed only one level deep: :class:`RequestBody` keeps every
top-level value as raw JSON bytes (``msgspec.Raw``), so a 128k-token prompt is
never turned into Python objects and re-encoding the prefill and decode copies
is a byte copy.  See docs/proxy.md for the measurement against ``json``,
``orjson`` and a full msgspec parse.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import msgspec

_decoder = msgspec.json.Decoder()
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_items_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()

DecodeError = msgspec.DecodeError


def loads(data: bytes | str) -> Any:
    try:
        return _decoder.decode(data)
    except RecursionError:
        # msgspec raises RecursionError, not DecodeError, for JSON nested
        # deeper than it recurses (~1000 levels): hostile input, not a bug.
        raise DecodeError("JSON is nested too deeply") from None


def loads_items(data: bytes) -> list[msgspec.Raw]:
    """A JSON array's items, each left undecoded."""
    try:
        return _items_decoder.decode(data)
    except RecursionError:
        raise DecodeError("JSON is nested too deeply") from None


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)


class BodyError(ValueError):
    """The request body is not a JSON object."""


class RequestBody:
    """A JSON object whose top-level values stay undecoded until asked for."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, msgspec.Raw]):
        self._fields = fields

    @classmethod
    def parse(cls, raw: bytes) -> "RequestBody":
        try:
            return cls(_fields_decoder.decode(raw))
        except msgspec.ValidationError:
            raise BodyError("request body must be a JSON object") from None
        except msgspec.DecodeError as exc:
            raise BodyError(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # skipping a value recurses too (see loads)
            raise BodyError("request body is not valid JSON: nested too deeply") from None

    @classmethod
    def from_dict(cls, obj: dict) -> "RequestBody":
        return cls.parse(dumps(obj))

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._fields.get(key)
        return default if raw is None else _decoder.decode(raw)

    def raw(self, key: str) -> Optional[bytes]:
        raw = self._fields.get(key)
        return None if raw is None else bytes(raw)

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def encode(self, overrides: Optional[dict] = None, drop: Iterable[str] = ()) -> bytes:
        """Serialise with ``overrides`` replacing (or adding) keys and ``drop`` removed."""
        skip = set(drop)
        if overrides:
            skip.update(overrides)
        out: dict[str, Any] = {k: v for k, v in self._fields.items() if k not in skip}
        if overrides:
            out.update(overrides)
        return _encoder.encode(out)

    def to_dict(self) -> dict:
        return {k: _decoder.decode(v) for k, v in self._fields.items()}
