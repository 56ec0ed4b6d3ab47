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
