"""The class vLLM instantiates. A thin facade: every call goes to the
scheduler side or the worker side, chosen by role."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm_ascend_pd.log import get_logger

from vllm_ascend_pd.compat import init_connector_base
from vllm_ascend_pd.config import (
    ConfigError, ConnectorConfig, check_proxy_ip, parse_extra_config, resolve_kv_ip,
    resolve_secret,
)
from vllm_ascend_pd.connector.metadata import AscendConnectorMetadata
from vllm_ascend_pd.connector.scheduler import SchedulerSide
from vllm_ascend_pd.connector.stats import AscendPDPromMetrics, AscendPDStats
from vllm_ascend_pd.connector.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

logger = get_logger(__name__)


class AscendSimpleConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        init_connector_base(self, KVConnectorBase_V1, vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.cfg = parse_extra_config(ktc.kv_connector_extra_config)
        pc = vllm_config.parallel_config
        if pc.pipeline_parallel_size > 1:
            raise ConfigError(
                "AscendSimpleConnector does not support pipeline parallelism yet; "
                "use --pipeline-parallel-size 1"
            )
        self.engine_id = ktc.engine_id or "engine"
        self.is_producer = bool(ktc.is_kv_producer)
        self.is_consumer = bool(ktc.is_kv_consumer)
        tp_size = pc.tensor_parallel_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._announcer = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                engine_id=self.engine_id,
                is_producer=self.is_producer,
                is_consumer=self.is_consumer,
                block_size=vllm_config.cache_config.block_size,
                tp_size=tp_size,
                kv_host=resolve_kv_ip(self.cfg),
                kv_port=ktc.kv_port,
            )
            if self.cfg.proxy_ip:
                check_proxy_ip(self.cfg)
                self._announcer = self._start_announcer(vllm_config)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(
                vllm_config,
                self.cfg,
                self._kv_cache_config,
                engine_id=self.engine_id,
                is_producer=self.is_producer,
                is_consumer=self.is_consumer,
                kv_port=ktc.kv_port,
                tp_rank=get_tensor_model_parallel_rank(),
                tp_size=tp_size,
            )

    def _start_announcer(self, vllm_config: "VllmConfig"):
        from vllm_ascend_pd.announce import Announcer

        announcer = Announcer(
            proxy_address=f"{self.cfg.proxy_ip}:{self.cfg.proxy_port}",
            announcement=announcement_for(
                self.cfg, vllm_config, engine_id=self.engine_id,
                is_producer=self.is_producer, is_consumer=self.is_consumer,
            ),
            interval=self.cfg.heartbeat_s,
            secret=resolve_secret(self.cfg),
        )
        announcer.start()
        return announcer

    # ---------------- scheduler side ----------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int):
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> AscendConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]):
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        # A P/D hand-off restores the request's own blocks in every group.
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    # ---------------- worker side ----------------
    def register_kv_caches(self, kv_caches):
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, AscendConnectorMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete before the request is scheduled

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None  # producers serve pulls straight from the paged cache

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]):
        assert self._worker is not None
        sending, recving, _ = self._worker.get_finished()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]):
        # vLLM >= 0.32 only; older runners call get_finished().
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_kv_connector_stats(self):
        if self._worker is None:
            return None
        data = self._worker.get_stats()
        return AscendPDStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return AscendPDStats(data=data) if data is not None else AscendPDStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return AscendPDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._announcer is not None:
            self._announcer.stop()
            self._announcer = None
        if self._worker is not None:
            self._worker.shutdown()


def announcement_for(cfg: ConnectorConfig, vllm_config: "VllmConfig", *, engine_id: str,
                     is_producer: bool, is_consumer: bool):
    """What this instance tells the proxy: its role and where to reach it
    (kv_ip with the HTTP port and the kv_port)."""
    from vllm_ascend_pd.announce import Announcement
    from vllm_ascend_pd.net import host_port

    host = resolve_kv_ip(cfg)
    model = vllm_config.model_config.served_model_name or ""
    if isinstance(model, list):
        model = model[0] if model else ""
    role = {(True, False): "prefill", (False, True): "decode"}.get(
        (is_producer, is_consumer), "both"
    )
    return Announcement(
        role=role,
        http_address=host_port(host, cfg.http_port),
        kv_address=host_port(host, vllm_config.kv_transfer_config.kv_port),
        engine_id=engine_id,
        model=model,
    )
