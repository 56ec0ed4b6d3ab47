"""Our stats inside vLLM's MultiConnector: rebuilt by class name from the
serialised dict (what crosses processes), aggregated and reduced per member."""

from __future__ import annotations

import msgspec
import pytest

pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.multi_connector")

from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import (  # noqa: E402
    MultiConnector,
    MultiKVConnectorStats,
)

from vllm_ascend_pd.connector.stats import AscendPDStats, TransferStats  # noqa: E402
from vllm_ascend_pd.plugin import register  # noqa: E402


def _data(nbytes: int) -> dict:
    t = TransferStats()
    t.record_recv(nbytes, 2, 64, 0.01)
    t.record_send(nbytes, 2, 0.02)
    t.set_pending(1)
    return t.take()


def test_stats_rebuilt_by_name_and_aggregated():
    register()
    first = MultiKVConnectorStats(data={"AscendSimpleConnector": AscendPDStats(data=_data(1000))})
    # As it arrives after serialisation: plain dicts keyed by class name.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(first.to_dict()))
    second = MultiConnector.build_kv_connector_stats(data=wire)
    assert isinstance(second, MultiKVConnectorStats)
    assert isinstance(second["AscendSimpleConnector"], AscendPDStats)
    total = first.aggregate(second)
    reduced = total.reduce()["AscendSimpleConnector"]
    assert reduced["pulls"] == 2 and reduced["sends"] == 2 and reduced["loaded_tokens"] == 128
    assert reduced["recv_MB"] == 0.002 and reduced["leases_pending"] == 1
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()


def test_vllm_logging_path_with_multiconnector():
    """What vLLM's stat logger does with a MultiConnector's serialised stats."""
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    register()
    ktc = KVTransferConfig(kv_connector="MultiConnector", kv_role="kv_both",
                           kv_connector_extra_config={"connectors": []})
    logging_ = KVConnectorLogging(ktc)
    for n in (1000, 3000):
        logging_.observe({"AscendSimpleConnector": _data(n)})
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    (line,) = lines
    assert line.startswith("KV Transfer metrics: AscendSimpleConnector=")
    assert "'pulls': 2" in line and "'loaded_tokens': 128" in line and "'recv_MB': 0.004" in line
