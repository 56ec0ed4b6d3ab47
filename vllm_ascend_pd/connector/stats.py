"""Transfer statistics: collected in the workers and the scheduler, carried by
vLLM's KVConnectorStats, logged by vLLM and exported on each instance's
``/metrics`` under ``vllm:ascend_pd_*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

_COUNTERS = (
    "recv_transfers",  # completed pulls (consumer)
    "recv_bytes",
    "recv_blocks",
    "loaded_tokens",  # prompt tokens the consumer did not have to compute
    "send_transfers",  # completed sends (producer)
    "send_bytes",
    "send_blocks",
    "leases_expired",
    "releases",  # producer told to free without a pull
    "cancelled_pulls",  # consumer: pulls stopped because the request was aborted
)
_BY_CAUSE = ("failures", "rejected")
_SERIES = ("recv_seconds", "send_seconds")


def empty_data() -> dict[str, Any]:
    data: dict[str, Any] = {k: 0 for k in _COUNTERS}
    data.update({k: {} for k in _BY_CAUSE})
    data.update({k: [] for k in _SERIES})
    data["leases_pending"] = None  # gauge: last value wins
    return data


class TransferStats:
    """Accumulator filled under the worker's lock, drained once per step."""

    def __init__(self) -> None:
        self._data = empty_data()

    def _bump(self, key: str, n: int = 1) -> None:
        self._data[key] += n

    def _cause(self, key: str, cause: str) -> None:
        d = self._data[key]
        d[cause] = d.get(cause, 0) + 1

    def record_recv(self, nbytes: int, blocks: int, tokens: int, seconds: float) -> None:
        d = self._data
        d["recv_transfers"] += 1
        d["recv_bytes"] += nbytes
        d["recv_blocks"] += blocks
        d["loaded_tokens"] += tokens
        d["recv_seconds"].append(seconds)

    def record_send(self, nbytes: int, blocks: int, seconds: float) -> None:
        d = self._data
        d["send_transfers"] += 1
        d["send_bytes"] += nbytes
        d["send_blocks"] += blocks
        d["send_seconds"].append(seconds)

    def record_recv_failure(self, cause: str) -> None:
        self._cause("failures", cause)

    def record_send_failure(self, cause: str) -> None:
        self._cause("failures", f"send_{cause}")

    def record_rejected(self, kind: str) -> None:
        self._cause("rejected", kind)

    def record_expired(self, n: int) -> None:
        if n:
            self._bump("leases_expired", n)

    def record_release(self) -> None:
        self._bump("releases")

    def record_cancelled(self) -> None:
        self._bump("cancelled_pulls")

    def set_pending(self, n: int) -> None:
        self._data["leases_pending"] = n

    def take(self) -> dict[str, Any] | None:
        data, self._data = self._data, empty_data()
        return None if _is_empty(data) else data


def _is_empty(d: dict[str, Any]) -> bool:
    return (
        not any(d[k] for k in _COUNTERS)
        and not any(d[k] for k in _BY_CAUSE)
        and not any(d[k] for k in _SERIES)
        and d.get("leases_pending") is None
    )


@dataclass
class AscendPDStats(KVConnectorStats):
    def __post_init__(self) -> None:
        base = empty_data()
        base.update(self.data or {})
        self.data = base

    def reset(self) -> None:
        self.data = empty_data()

    def is_empty(self) -> bool:
        return _is_empty(self.data)

    def aggregate(self, other: KVConnectorStats) -> "AscendPDStats":
        o = other.data
        for k in _COUNTERS:
            self.data[k] += o.get(k, 0)
        for k in _BY_CAUSE:
            for cause, n in o.get(k, {}).items():
                self.data[k][cause] = self.data[k].get(cause, 0) + n
        for k in _SERIES:
            self.data[k].extend(o.get(k, []))
        if o.get("leases_pending") is not None:
            self.data["leases_pending"] = o["leases_pending"]
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        secs = d["recv_seconds"]
        out: dict[str, int | float] = {
            "pulls": d["recv_transfers"],
            "loaded_tokens": d["loaded_tokens"],
            "recv_MB": round(d["recv_bytes"] / 1e6, 3),
            "sends": d["send_transfers"],
            "sent_MB": round(d["send_bytes"] / 1e6, 3),
            "leases_expired": d["leases_expired"],
        }
        if secs:
            out["avg_pull_ms"] = round(1e3 * sum(secs) / len(secs), 3)
            total = sum(secs)
            if total > 0:
                out["pull_MB_per_s"] = round(d["recv_bytes"] / 1e6 / total, 1)
        for cause, n in d["failures"].items():
            out[f"failed_{cause}"] = n
        if d["leases_pending"] is not None:
            out["leases_pending"] = d["leases_pending"]
        return out


class AscendPDPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        def per_engine(metric):
            return create_metric_per_engine(metric, self.per_engine_labelvalues)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()):
            return self._counter_cls(name=name, documentation=doc, labelnames=[*labelnames, *extra])

        self._bytes = counter(
            "vllm:ascend_pd_bytes_transferred", "KV bytes moved by AscendSimpleConnector.", ("direction",)
        )
        self._blocks = counter(
            "vllm:ascend_pd_blocks_transferred", "KV blocks moved by AscendSimpleConnector.", ("direction",)
        )
        self._transfers = counter(
            "vllm:ascend_pd_transfers", "Completed KV transfers.", ("direction",)
        )
        self._tokens = per_engine(counter(
            "vllm:ascend_pd_loaded_tokens", "Prompt tokens loaded from a producer instead of computed."
        ))
        self._failures = counter(
            "vllm:ascend_pd_failed_transfers", "Failed KV transfers by cause.", ("cause",)
        )
        self._rejected = counter(
            "vllm:ascend_pd_rejected_messages", "KV server messages refused, by kind.", ("kind",)
        )
        self._expired = per_engine(counter(
            "vllm:ascend_pd_leases_expired", "Producer leases that expired before a pull."
        ))
        self._releases = per_engine(counter(
            "vllm:ascend_pd_leases_released", "Producer leases freed by the consumer without a pull."
        ))
        self._cancelled = per_engine(counter(
            "vllm:ascend_pd_pulls_cancelled",
            "Consumer pulls stopped because the request was aborted while its KV was loading.",
        ))
        self._pending = per_engine(self._gauge_cls(
            name="vllm:ascend_pd_leases_pending",
            documentation="Producer leases waiting for a consumer to pull.",
            labelnames=labelnames,
            multiprocess_mode="mostrecent",
        ))
        buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
        self._seconds = self._histogram_cls(
            name="vllm:ascend_pd_xfer_time_seconds",
            documentation="Duration of one KV transfer.",
            buckets=buckets,
            labelnames=[*labelnames, "direction"],
        )

    def observe(self, data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for direction in ("recv", "send"):
            if data.get(f"{direction}_bytes"):
                self._bytes.labels(*labels, direction).inc(data[f"{direction}_bytes"])
                self._blocks.labels(*labels, direction).inc(data[f"{direction}_blocks"])
            if data.get(f"{direction}_transfers"):
                self._transfers.labels(*labels, direction).inc(data[f"{direction}_transfers"])
            for s in data.get(f"{direction}_seconds", []):
                self._seconds.labels(*labels, direction).observe(s)
        if data.get("loaded_tokens"):
            self._tokens[engine_idx].inc(data["loaded_tokens"])
        for cause, n in data.get("failures", {}).items():
            self._failures.labels(*labels, cause).inc(n)
        for kind, n in data.get("rejected", {}).items():
            self._rejected.labels(*labels, kind).inc(n)
        if data.get("leases_expired"):
            self._expired[engine_idx].inc(data["leases_expired"])
        if data.get("releases"):
            self._releases[engine_idx].inc(data["releases"])
        if data.get("cancelled_pulls"):
            self._cancelled[engine_idx].inc(data["cancelled_pulls"])
        if data.get("leases_pending") is not None:
            self._pending[engine_idx].set(data["leases_pending"])
