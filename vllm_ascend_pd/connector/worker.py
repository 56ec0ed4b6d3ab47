"""Worker side: owns the paged-cache view, the transport, and per role the
KV server (producer) and the puller (consumer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm_ascend_pd.log import get_logger

from vllm_ascend_pd.config import (
    ConnectorConfig,
    control_port,
    group_port,
    llmdatadist_endpoint,
    resolve_bind_host,
    resolve_kv_ip,
    resolve_secret,
)
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.metadata import AscendConnectorMetadata
from vllm_ascend_pd.connector.puller import Puller
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.threads import single_threaded
from vllm_ascend_pd.connector.transfers import LeaseTable
import zmq

from vllm_ascend_pd.connector.zmq_links import wait_ready
from vllm_ascend_pd.kv_layout import VLLM_LOGICAL_AXES, CacheAxes, PagedKVCache, axes_from_backend
from vllm_ascend_pd.transport import TRANSPORTS, Transport, TransportOptions, create_transport

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = get_logger(__name__)

_MB = 1024 * 1024
# How long the engine may go without pumping before the idle servicer does.
_IDLE_PUMP_S = 0.05


def resolve_transport(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "npu":
        usable = "llmdatadist" in TRANSPORTS and importlib.util.find_spec("llm_datadist")
        return "llmdatadist" if usable else "hccl"
    return "tcp"


def open_transport(
    cfg: ConnectorConfig, name: str, cache: PagedKVCache, options: TransportOptions,
    *, kv_port: int, tp_size: int,
) -> tuple[str, Transport]:
    """Create the transport; with ``transport: auto``, fall back to tcp (and
    say why) when the NPU transport cannot start here."""
    try:
        if name == "llmdatadist":
            device_ip, comm_port = llmdatadist_endpoint(
                cfg, kv_port=kv_port, rank=options.local_rank, tp_size=tp_size,
                is_producer=options.role != "consumer",
            )
            options = dataclasses.replace(options, device_ip=device_ip, comm_port=comm_port)
        return name, create_transport(name, cache, options)
    except ValueError as e:  # ConfigError, or a transport missing from this build
        if cfg.transport != "auto" or name == "tcp":
            raise
        logger.warning(
            "AscendSimpleConnector: transport auto chose %s, which cannot start here (%s); "
            "using tcp. Set transport explicitly on both instances to make this an error.",
            name, e,
        )
        return "tcp", create_transport("tcp", cache, options)


class WorkerSide:
    def __init__(
        self,
        vllm_config: "VllmConfig",
        cfg: ConnectorConfig,
        kv_cache_config: Any,
        *,
        engine_id: str,
        is_producer: bool,
        is_consumer: bool,
        kv_port: int,
        tp_rank: int,
        tp_size: int,
    ):
        self.vllm_config = vllm_config
        self.cfg = cfg
        self.kv_cache_config = kv_cache_config
        self.engine_id = engine_id
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.kv_port = kv_port
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.stats = TransferStats()
        self.leases = LeaseTable(cfg.lease_s)
        self.server: KVServer | None = None
        self.puller: Puller | None = None
        self.cache: PagedKVCache | None = None
        self.transport = None
        self._last_pending = 0
        # Serialises the engine thread and the idle servicer.
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._last_pump = 0.0
        self._no_forward = False
        self._copies_on_cpu = False
        self._tuple_layers: dict[str, bool] = {}

    def _axes(self, layer: str, part: int, tensor: torch.Tensor) -> CacheAxes:
        """Where blocks and heads live, from vLLM's layout contract or the
        layer's attention backend; never from tensor sizes."""
        logical = importlib.util.find_spec("vllm.v1.kv_cache_layout") is not None
        if logical and not self._tuple_layers.get(layer, False):
            # vLLM >= 0.32 hands every layer out as a logical [B, H, N, C] view.
            return VLLM_LOGICAL_AXES
        # Older vLLM, and vllm-ascend's per-layer (k, v) / (k_nope, k_pe)
        # tuples: the order get_kv_cache_shape returns (stride order only
        # permutes memory; the view keeps this order).
        ctx = self.vllm_config.compilation_config.static_forward_context[layer]
        return axes_from_backend(ctx.get_attn_backend(), tensor.dim())

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        cache_cfg = self.vllm_config.cache_config
        model_cfg = self.vllm_config.model_config
        is_mla = bool(getattr(model_cfg, "use_mla", False))
        self._tuple_layers = {k: isinstance(v, (tuple, list)) for k, v in kv_caches.items()}
        self.cache = PagedKVCache.from_vllm(
            kv_caches,
            num_blocks=self.kv_cache_config.num_blocks,
            block_size=cache_cfg.block_size,
            axes_of=self._axes,
            is_mla=is_mla,
            num_kv_heads=1 if is_mla else model_cfg.get_total_num_kv_heads(),
        )
        device = self.cache.tensors[0].device.type
        self._copies_on_cpu = device == "cpu"
        name = resolve_transport(self.cfg.transport, device)
        # IP addresses from here on: names are resolved once, at start-up.
        host = resolve_kv_ip(self.cfg)
        bind_host = resolve_bind_host(self.cfg) if self.is_producer else host
        role = {(True, False): "producer", (False, True): "consumer"}.get(
            (self.is_producer, self.is_consumer), "both"
        )
        options = TransportOptions(
            chunk_bytes=int(self.cfg.chunk_mb * _MB),
            pool_bytes=int(self.cfg.buffer_pool_mb * _MB),
            idle_timeout_s=self.cfg.transfer_timeout_s,
            device=device,
            local_rank=self.tp_rank,
            # Only a producer listens there; a consumer's kv_port may sit higher.
            group_port=group_port(self.kv_port, self.tp_rank) if self.is_producer else 0,
            host=host,
            role=role,
            bind_host=bind_host,
            secret=resolve_secret(self.cfg),
        )
        name, transport = open_transport(
            self.cfg, name, self.cache, options, kv_port=self.kv_port, tp_size=self.tp_size
        )
        self.transport = transport
        layout = self.cache.describe(self.tp_size)
        logger.info(
            "AscendSimpleConnector rank %d/%d: %d cache tensors (first %s %s), %d blocks of "
            "%d bytes, %d KV heads, MLA %s, transport %s",
            self.tp_rank, self.tp_size, len(self.cache.tensors), self.cache.names[0],
            tuple(self.cache.tensors[0].shape), self.cache.num_blocks,
            self.cache.total_block_bytes(), self.cache.num_kv_heads, is_mla, name,
        )
        secret = options.secret
        if self.is_producer:
            port = control_port(self.kv_port, self.tp_rank)
            self.server = KVServer(
                bind_host=bind_host,
                port=port,
                engine_id=self.engine_id,
                tp_rank=self.tp_rank,
                layout=layout,
                leases=self.leases,
                transport=transport,
                stats=self.stats,
                secret=secret,
                registration_grace_s=self.cfg.registration_grace_s,
            )
        if self.is_consumer:
            self.puller = Puller(
                engine_id=self.engine_id,
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
                layout=layout,
                transport=transport,
                stats=self.stats,
                secret=secret,
                connect_timeout_s=self.cfg.connect_timeout_s,
            )

        self._idle_thread = threading.Thread(
            target=self._serve_when_idle, name=f"ascend-pd-idle-{self.tp_rank}", daemon=True
        )
        self._idle_thread.start()

    def start_load_kv(self, meta: AscendConnectorMetadata) -> None:
        with self._lock:
            for s in meta.sends:
                self.leases.register(s.request_id, s.transfer_id, s.block_ids, s.prompt_hash)
            if self.puller is not None:
                for spec in (*meta.recvs, *meta.releases):
                    self.puller.submit(spec)
                for request_id in meta.cancels:
                    self.puller.cancel(request_id)
            elif meta.recvs or meta.releases:
                logger.error("AscendSimpleConnector: consumer work on a non-consumer instance")
            self._no_forward = meta.no_forward
            self._pump()

    def _pump(self, budget_s: float | None = None) -> bool:
        """Advance transfers; True if all that is left waits on peers.
        Caller holds ``_lock``."""
        budget = self.cfg.pump_budget_ms / 1e3 if budget_s is None else budget_s
        blocked = True
        # CPU copies in one thread: see threads.py for the measurement.
        with single_threaded(self._copies_on_cpu):
            if self.server is not None:
                blocked = self.server.pump(budget) and blocked
            if self.puller is not None:
                blocked = self.puller.pump(budget) and blocked
        self._last_pump = time.monotonic()
        return blocked

    def _wait_sockets(self) -> list | None:
        """(socket, events) whose readiness advances a transfer in flight;
        None if nothing is in flight, or if waiting cannot help."""
        if getattr(self.transport, "name", "") != "tcp":
            return None  # other data planes complete outside these sockets
        items: list = []
        if self.server is not None:
            if self.server.has_parked():
                return None  # their leases register next step: do not delay it
            if self.server.sending() or self.leases.pending():
                items.append((self.server.socket, zmq.POLLIN))
        if self.puller is not None and self.puller.busy():
            items += [(s, zmq.POLLIN) for s in self.puller.sockets()]
        if items:
            items += self.transport.poll_items()
        return items or None

    def _await_peers(self, blocked: bool) -> None:
        """In a step without a forward pass, wait up to ``idle_wait_ms`` for
        the peers' messages and advance the transfers the moment one
        arrives, instead of returning to vLLM's loop, which sleeps 1 ms and
        steps again before it looks. No request is running in such a step,
        so nobody's decode waits. Returns as soon as there is a result for
        the scheduler, and as soon as a pump ends with work still ready: it
        only waits, it never moves more data per wake-up than
        ``pump_budget_ms`` allows. Caller holds ``_lock``."""
        wait_s = self.cfg.idle_wait_ms / 1e3
        if wait_s <= 0:
            return
        deadline = time.monotonic() + wait_s
        budget = self.cfg.pump_budget_ms / 1e3
        while blocked and not self._has_results():
            sockets = self._wait_sockets()
            left = deadline - time.monotonic()
            if sockets is None or left <= 0 or not wait_ready(sockets, left):
                return
            blocked = self._pump(budget)

    def _has_results(self) -> bool:
        return self.leases.has_finished() or (self.puller is not None and self.puller.has_results())

    def _serve_when_idle(self) -> None:
        # The engine thread pumps on every step. Between steps (an idle
        # engine) this thread answers peers instead, e.g. a late or replayed
        # pull, a handshake or a release; it only gets the GIL then anyway.
        while not self._closed.wait(_IDLE_PUMP_S):
            if time.monotonic() - self._last_pump < _IDLE_PUMP_S:
                continue
            with self._lock:
                if not self._closed.is_set():
                    self._pump()

    def get_finished(self) -> tuple[set[str], set[str], set[str]]:
        with self._lock:
            blocked = self._pump()
            if self._no_forward:
                self._no_forward = False
                self._await_peers(blocked)
            sending = self.leases.take_finished()
            recving: set[str] = set()
            failed: set[str] = set()
            if self.puller is not None:
                recving, failed = self.puller.take_results()
            return sending, recving, failed

    def get_stats(self) -> dict[str, Any] | None:
        with self._lock:
            if self.is_producer:
                pending = self.leases.pending()
                if pending != self._last_pending:  # a gauge: report changes only
                    self._last_pending = pending
                    self.stats.set_pending(pending)
            return self.stats.take()

    def shutdown(self) -> None:
        self._closed.set()
        with self._lock:
            self._close_endpoints()

    def _close_endpoints(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.puller is not None:
            self.puller.close()
            self.puller = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
