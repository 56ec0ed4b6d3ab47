"""RequestBody: one-level parse, overrides without duplicate keys."""

from __future__ import annotations

import json

import pytest

from vllm_ascend_pd.proxy.codec import BodyError, RequestBody


def test_overrides_replace_keys_without_duplicates():
    raw = json.dumps({"prompt": [1, 2, 3], "stream": True, "min_tokens": 4,
                      "kv_transfer_params": {"remote_host": "evil"}}).encode()
    body = RequestBody.parse(raw)
    out = body.encode({"stream": False, "kv_transfer_params": {"ok": 1}},
                      drop=("min_tokens",))
    assert out.count(b'"kv_transfer_params"') == 1 and out.count(b'"stream"') == 1
    assert json.loads(out) == {"prompt": [1, 2, 3], "stream": False,
                               "kv_transfer_params": {"ok": 1}}


def test_nested_values_are_kept_verbatim():
    raw = b'{"prompt": "caf\\u00e9 \\"q\\"", "x": 1.50, "ids": [1,2 ,3]}'
    out = RequestBody.parse(raw).encode({"y": 2})
    # Untouched values are copied byte for byte (no float or escape rewriting).
    assert b'"prompt":"caf\\u00e9 \\"q\\""' in out
    assert b'"x":1.50' in out and b'"ids":[1,2 ,3]' in out


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"s"', b'{"a": [1,}'])
def test_invalid_bodies(raw):
    with pytest.raises(BodyError):
        RequestBody.parse(raw)


def test_get_decodes_one_field():
    body = RequestBody.parse(b'{"model": "m", "stream": true}')
    assert body.get("model") == "m" and body.get("stream") is True
    assert body.get("missing", 5) == 5 and "model" in body
