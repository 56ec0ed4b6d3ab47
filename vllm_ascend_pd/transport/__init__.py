"""Data-plane transports, created by name. NPU transports import lazily."""

from __future__ import annotations

import importlib

from vllm_ascend_pd.kv_layout import PagedKVCache
from vllm_ascend_pd.transport.base import (
    Link,
    TransferError,
    Transport,
    TransportOptions,
)

# name -> "module:Class"; the registry is the only module-level state here.
TRANSPORTS: dict[str, str] = {
    "tcp": "vllm_ascend_pd.transport.tcp:TcpTransport",
    "llmdatadist": "vllm_ascend_pd.transport.llmdatadist:LlmDataDistTransport",
    "gloo": "vllm_ascend_pd.transport.pg:GlooTransport",
    "hccl": "vllm_ascend_pd.transport.pg:HcclTransport",
}


def create_transport(name: str, cache: PagedKVCache, options: TransportOptions) -> Transport:
    try:
        target = TRANSPORTS[name]
    except KeyError:
        raise ValueError(
            f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)} "
            "in kv_connector_extra_config.transport"
        ) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(cache, options)


__all__ = [
    "Link",
    "TRANSPORTS",
    "TransferError",
    "Transport",
    "TransportOptions",
    "create_transport",
]
