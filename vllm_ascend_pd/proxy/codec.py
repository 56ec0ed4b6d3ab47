"""JSON encode/decode for the hot path.

msgspec (already a dependency) is used: see docs/proxy.md for the measurement
against the standard library and orjson.
"""

from __future__ import annotations

from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

DecodeError = msgspec.DecodeError


def loads(data: bytes | str) -> Any:
    return _decoder.decode(data)


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)
