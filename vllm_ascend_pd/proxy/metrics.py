"""Prometheus metrics of the proxy.

Each application gets its own ``CollectorRegistry`` (no process-global
state, several proxies can live in one test process).  When
``prometheus_client`` is not importable the metrics are no-ops and
``/metrics`` says so with a 503.

A worker of a multi-worker proxy (``--workers N``) passes
``multiprocess_dir`` instead: prometheus_client's multiprocess mode, whose
files the supervisor created (it set ``PROMETHEUS_MULTIPROC_DIR`` before the
worker imported prometheus_client).  Any worker's ``/metrics`` then reports
every worker: counters and histograms summed (also those of workers that
exited), in-flight gauges summed over live workers, and an instance counts
as healthy only if every live worker routes to it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

try:
    import prometheus_client as _prom
    from prometheus_client import multiprocess as _prom_mp
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised only without the package
    _prom = None

PREFIX = "vllm_pd_proxy_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

ERROR_KINDS = (
    "bad_request", "body_too_large", "body_timeout", "unknown_model", "overloaded",
    "draining", "loop_detected",
    "prefill_connect", "prefill_timeout", "prefill_status", "prefill_no_params",
    "prefill_protocol", "prefill_client_error", "no_prefill",
    "decode_connect", "decode_timeout", "decode_status", "decode_empty",
    "decode_protocol", "decode_client_error", "decode_midstream", "no_decode",
    "client_disconnect", "client_stalled",
)


class _Noop:
    def labels(self, *a, **k):
        return self

    def inc(self, *a, **k):
        pass

    def dec(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass

    def set(self, *a, **k):
        pass


class ProxyMetrics:
    """All metrics of one proxy application."""

    available = _prom is not None

    def __init__(self, instances_fn: Optional[Callable[[], list]] = None, *,
                 multiprocess_dir: Optional[str] = None):
        self.instance_healthy = self.instance_inflight = None
        self._files: Optional[_MultiprocessCollector] = None
        if _prom is None:
            noop = _Noop()
            self.registry = None
            self.requests = self.errors = self.failovers = self.affinity_spills = noop
            self.local_prefill = noop
            self.prefill_latency = self.decode_latency = self.ttft = noop
            self.decode_first_byte = noop
            self.inflight = noop
            return
        # In multiprocess mode the values live in files; the metric objects
        # are registered nowhere and a collector reads every worker's files.
        self.registry = _prom.CollectorRegistry(auto_describe=True)
        reg = None if multiprocess_dir else self.registry
        self.requests = _prom.Counter(
            PREFIX + "requests", "Client requests by endpoint and final status.",
            ["endpoint", "status"], registry=reg)
        self.errors = _prom.Counter(
            PREFIX + "errors", "Errors by kind (one per failed attempt).",
            ["kind"], registry=reg)
        self.failovers = _prom.Counter(
            PREFIX + "failovers", "Retries on another instance, by leg.",
            ["leg"], registry=reg)
        self.affinity_spills = _prom.Counter(
            PREFIX + "affinity_spills",
            "prefix_affinity picks that passed over the prefix's own instance because it "
            "held more than --affinity-load-factor x its share, by leg.",
            ["leg"], registry=reg)
        self.local_prefill = _prom.Counter(
            PREFIX + "local_prefill",
            "Requests sent to a decode instance without a prefill leg, by reason "
            "(prompt_logprobs: vLLM computes such a prompt itself; batch: several "
            "prompts in one completions request).",
            ["reason"], registry=reg)
        self.prefill_latency = _prom.Histogram(
            PREFIX + "prefill_latency_seconds",
            "Prefill leg: request sent to kv_transfer_params received.",
            buckets=_LATENCY_BUCKETS, registry=reg)
        self.decode_latency = _prom.Histogram(
            PREFIX + "decode_latency_seconds",
            "Decode leg: request sent to last byte relayed.",
            buckets=_LATENCY_BUCKETS, registry=reg)
        self.decode_first_byte = _prom.Histogram(
            PREFIX + "decode_first_byte_seconds",
            "Decode leg: prefill leg done to D's first byte relayed (failover included).",
            buckets=_LATENCY_BUCKETS, registry=reg)
        self.ttft = _prom.Histogram(
            PREFIX + "ttft_seconds",
            "Client request received to first byte sent to the client.",
            buckets=_LATENCY_BUCKETS, registry=reg)
        self.inflight = _prom.Gauge(
            PREFIX + "inflight_requests", "Client requests being served.",
            registry=reg, multiprocess_mode="livesum")
        for kind in ERROR_KINDS:  # export zeros so rate() works from the start
            self.errors.labels(kind)
        for leg in ("prefill", "decode"):
            self.failovers.labels(leg)
            self.affinity_spills.labels(leg)
        if multiprocess_dir:
            # Written on every change (Registry.observer -> observe()).
            self.instance_healthy = _prom.Gauge(
                PREFIX + "instance_healthy", _HEALTHY_HELP, ["role", "address"],
                registry=None, multiprocess_mode="livemin")
            self.instance_inflight = _prom.Gauge(
                PREFIX + "instance_inflight_requests", _INFLIGHT_HELP,
                ["role", "address"], registry=None, multiprocess_mode="livesum")
            self._files = _MultiprocessCollector(multiprocess_dir, instances_fn)
            self.registry.register(self._files)
        elif instances_fn is not None:
            reg.register(_InstanceCollector(instances_fn))

    def observe(self, inst) -> None:
        """Write one instance's health and load (multiprocess mode only)."""
        labels = (inst.role, inst.address)
        self.instance_healthy.labels(*labels).set(
            1.0 if inst.health.value == "healthy" else 0.0)
        self.instance_inflight.labels(*labels).set(inst.inflight_requests)

    def all_workers(self) -> Optional[dict]:
        """Multiprocess mode: the load of every live worker, from the metric
        files (``/status`` otherwise shows only the answering worker's).
        ``inflight``: client requests; per instance, requests outstanding and
        whether every live worker routes to it.  None in a single process."""
        if self._files is None:
            return None
        inflight = 0
        per_instance: dict[tuple[str, str], dict] = {}
        for family in self._files.collect():
            for smp in family.samples:
                if smp.name == PREFIX + "inflight_requests":
                    inflight += int(smp.value)
                elif family.name in _INSTANCE_FAMILIES:
                    key = (smp.labels["role"], smp.labels["address"])
                    entry = per_instance.setdefault(
                        key, {"role": key[0], "address": key[1]})
                    if family.name == PREFIX + "instance_healthy":
                        entry["healthy"] = smp.value >= 1.0
                    else:
                        entry["inflight_requests"] = int(smp.value)
        return {"inflight": inflight,
                "instances": [per_instance[k] for k in sorted(per_instance)]}

    def exposition(self) -> tuple[bytes, str]:
        if _prom is None:
            raise RuntimeError("prometheus_client is not installed")
        return _prom.generate_latest(self.registry), _prom.CONTENT_TYPE_LATEST


_HEALTHY_HELP = "1 if the instance is routable (by every worker)."
_INFLIGHT_HELP = "Requests outstanding on the instance (all workers)."
_INSTANCE_FAMILIES = (PREFIX + "instance_healthy", PREFIX + "instance_inflight_requests")


class _MultiprocessCollector:
    """Every worker's metrics from the multiprocess files.

    The files keep every label set a worker ever wrote, so the per-instance
    families are cut down to the instances this worker knows now (membership
    is the same in every worker, see proxy/membership.py).
    """

    def __init__(self, path: str, instances_fn: Optional[Callable[[], list]]):
        self._path = path
        self._fn = instances_fn or (lambda: [])

    def _ready_files(self) -> list[str]:
        """The metric files, less those a starting worker has created but not
        yet sized: reading one would fail the whole scrape."""
        ready = []
        for entry in os.scandir(self._path):
            try:
                if entry.name.endswith(".db") and entry.stat().st_size >= 8:
                    ready.append(entry.path)
            except FileNotFoundError:  # an exited worker's live gauges
                pass
        return ready

    def describe(self):
        return []

    def collect(self):
        known = {(i.role, i.address) for i in self._fn()}
        for family in _prom_mp.MultiProcessCollector.merge(self._ready_files(),
                                                           accumulate=True):
            if family.name in _INSTANCE_FAMILIES:
                family.samples = [
                    smp for smp in family.samples
                    if (smp.labels.get("role"), smp.labels.get("address")) in known]
            yield family


class _InstanceCollector:
    """Per-instance health and load, read from the registry at scrape time."""

    def __init__(self, instances_fn: Callable[[], list]):
        self._fn = instances_fn

    def describe(self):
        return []

    def collect(self):
        healthy = GaugeMetricFamily(PREFIX + "instance_healthy",
                                    "1 if the instance is routable.",
                                    labels=["role", "address"])
        inflight = GaugeMetricFamily(PREFIX + "instance_inflight_requests",
                                     "Requests outstanding on the instance.",
                                     labels=["role", "address"])
        for inst in self._fn():
            labels = [inst.role, inst.address]
            healthy.add_metric(labels, 1.0 if inst.health.value == "healthy" else 0.0)
            inflight.add_metric(labels, float(inst.inflight_requests))
        yield healthy
        yield inflight
