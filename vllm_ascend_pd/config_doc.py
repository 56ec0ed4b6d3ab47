"""Render docs/configuration.md from ConnectorConfig (single source of truth)."""

from __future__ import annotations

import sys
import typing

import msgspec

from vllm_ascend_pd.config import ConnectorConfig


def render() -> str:
    info = msgspec.inspect.type_info(ConnectorConfig)
    lines = [
        "# Configuration reference",
        "",
        "Keys of `kv_connector_extra_config` for AscendSimpleConnector. Generated from",
        "`vllm_ascend_pd/config.py` by `python -m vllm_ascend_pd.config_doc`; unknown keys",
        "are rejected at start-up.",
        "",
        "Standard `KVTransferConfig` fields used: `kv_role` (`kv_producer`, `kv_consumer`),",
        "`kv_port` (producer rank r listens on `kv_port + r` for control and on",
        "`kv_port + 64 + r` for data: `tcp`'s stream or the `gloo`/`hccl` rendezvous), `engine_id`,",
        "`kv_load_failure_policy` (`fail` or `recompute`), `kv_buffer_device` (`npu` on",
        "Ascend, as in older examples; accepted, the transports use the device the KV",
        "cache lives on). Port plan and Ascend deployment: [ascend.md](ascend.md).",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    defaults = ConnectorConfig()
    hints = typing.get_type_hints(ConnectorConfig, include_extras=True)
    for f in info.fields:
        t = f.type
        while isinstance(t, msgspec.inspect.Metadata):
            t = t.type
        tname = type(t).__name__.replace("Type", "").lower()
        if hasattr(t, "values"):
            tname = " \\| ".join(f"`{v}`" for v in t.values)
        desc = hints[f.name].__metadata__[0].description
        default = getattr(defaults, f.name)
        lines.append(f"| `{f.name}` | {tname} | `{default!r}` | {desc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
