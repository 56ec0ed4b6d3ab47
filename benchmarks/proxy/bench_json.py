"""JSON libraries on the proxy's hot path: parse the client body, re-encode it
twice (prefill copy, decode copy).  Prints a Markdown table.

    python benchmarks/proxy/bench_json.py
"""

from __future__ import annotations

import json
import timeit

import msgspec

try:
    import orjson
except ImportError:  # measured only when installed
    orjson = None


def bodies() -> dict[str, bytes]:
    chat = {"model": "qwen", "stream": True, "max_tokens": 256, "temperature": 0.7,
            "messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": "Explain KV caches. " * 40}]}
    prompt = {"model": "qwen", "prompt": "lorem ipsum dolor sit amet " * 600,
              "max_tokens": 128, "stream": True}
    ids = {"model": "qwen", "prompt": list(range(32000, 32000 + 128_000)), "max_tokens": 16}
    return {name: json.dumps(b).encode() for name, b in
            (("chat 1 KB", chat), ("prompt 16 KB", prompt), ("128k token ids", ids))}


def libs():
    dec, enc = msgspec.json.Decoder(), msgspec.json.Encoder()
    raw_dec = msgspec.json.Decoder(dict[str, msgspec.Raw])
    out = {"json": (json.loads, lambda o: json.dumps(o).encode()),
           "msgspec": (dec.decode, enc.encode)}
    if orjson is not None:
        out["orjson"] = (orjson.loads, orjson.dumps)
    # What the proxy does: top-level fields only, values kept as raw bytes.
    out["msgspec Raw fields (proxy)"] = (raw_dec.decode, enc.encode)
    return out


def main() -> None:
    print("| body | size | " + " | ".join(f"{n} µs" for n in libs()) + " |")
    print("|---|---|" + "---|" * len(libs()))
    for name, raw in bodies().items():
        row = []
        for loads, dumps in libs().values():
            def work(raw=raw, loads=loads, dumps=dumps):
                body = loads(raw)
                dumps({**body, "max_tokens": 1, "kv_transfer_params": {"x": 1}})
                dumps({**body, "kv_transfer_params": {"remote_block_ids": [1, 2, 3]}})
            n, t = timeit.Timer(work).autorange()
            row.append(f"{t / n * 1e6:,.0f}")
        print(f"| {name} | {len(raw):,} B | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
