"""Faults over the process-group transport (gloo here; hccl shares the code)
on real vLLM: a client that leaves while D pulls over a gloo group, and a
producer killed mid-transfer. Same slow settings and 24-layer model as
test_faults_dedicated.py, so a transfer lasts long enough to interrupt."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.faults import HangUpClient, counter, wait_idle
from tests.e2e.helpers import log_dir, metric, prompt_of, serve, wait_for
from tests.e2e.test_faults_dedicated import LONG, _body, _decode_in_background, _prefill, _recv_count, reference
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.testing.servers import BASE_ARGS, PortPicker, VllmServer, kv_config, start_all, stop_all

pytestmark = pytest.mark.e2e

SLOW = dict(transport="gloo", chunk_mb=0.001, buffer_pool_mb=0.004, pump_budget_ms=0.001,
            transfer_timeout_s=5.0, connect_timeout_s=5.0)


class GlooPair:
    def __init__(self, model: str, logs: Path):
        ports = PortPicker()
        kv_p = ports.kv(span=GROUP_PORT_OFFSET + 1)  # control and group port of rank 0
        kv_d = ports.kv(span=2)

        def server(name, role, kv_port, policy=None):
            return VllmServer(name, model, ports.http(), [
                *BASE_ARGS, "--kv-transfer-config",
                kv_config(role, kv_port, failure_policy=policy, **SLOW)], log_path=logs / f"{name}.log")

        self.P = server("Pgf", "kv_producer", kv_p)
        self.D = server("Dgf", "kv_consumer", kv_d, policy="recompute")

    def start(self) -> None:
        start_all((self.P, self.D), 900)

    def stop(self) -> None:
        stop_all((self.P, self.D))


@pytest.fixture(scope="module")
def gpair(tiny_model_24, tmp_path_factory):
    yield from serve(GlooPair(tiny_model_24, log_dir(tmp_path_factory, "e2e-logs")))


def test_client_gone_mid_pull_stops_the_gloo_pull(gpair, tokenizer):
    """D aborts the request while its KV arrives over the gloo group: the pull
    stops (chunks in flight land in forfeited staging buffers, never in the
    cache), vLLM frees D's blocks, P's lease ends, and the next pull over a
    fresh group is exact."""
    P, D = gpair.P, gpair.D
    wait_idle([P.url, D.url], 10, producers=(P.url,))
    recv = _recv_count(D)
    cancelled = counter(D.url, "vllm:ascend_pd_pulls_cancelled_total")
    prompt = prompt_of(tokenizer, LONG, seed=651)
    params = _prefill(P, prompt)
    client = HangUpClient(D.url, "/v1/completions", _body(prompt, 8, stream=True, kv_transfer_params=params))
    # Blocks allocated on D: the pull has been handed to the worker.
    wait_for(lambda: metric(D.url, "vllm:kv_cache_usage_perc") > 0, timeout=30, interval=0.02)
    time.sleep(0.5)
    assert _recv_count(D) == recv, "the transfer already ended: make it longer"
    client.hang_up()
    took = wait_idle([P.url, D.url], 30, producers=(P.url,))
    assert took < 20
    assert counter(D.url, "vllm:ascend_pd_pulls_cancelled_total") == cancelled + 1
    assert _recv_count(D) == recv, "the pull was stopped, not completed"

    again = prompt_of(tokenizer, 200, seed=652)
    out = _decode_in_background(D, again, _prefill(P, again), 8)
    out[0].join(60)
    assert out[1]["out"]["choices"][0]["token_ids"] == reference(D, again, 8)
    assert _recv_count(D) == recv + 1


def test_producer_killed_mid_gloo_transfer(gpair, tokenizer):
    """Runs last: it kills this module's producer. D's group fails (peer
    gone, or silent for transfer_timeout_s at most), D recomputes: exact
    output, D back to baseline."""
    P, D = gpair.P, gpair.D
    prompt = prompt_of(tokenizer, LONG, seed=661)
    expected = reference(D, prompt, 8)
    recv = _recv_count(D)
    failed = sum(counter(D.url, "vllm:ascend_pd_failed_transfers_total", cause=c)
                 for c in ("peer_lost", "peer_stalled", "timeout", "transport", "producer_error"))
    params = _prefill(P, prompt)
    t, result = _decode_in_background(D, prompt, params, 8)
    time.sleep(0.7)
    assert _recv_count(D) == recv, "the transfer already ended: make it longer"
    P.kill()
    killed = time.monotonic()
    t.join(60)
    assert "out" in result, result
    assert result["out"]["choices"][0]["token_ids"] == expected
    assert time.monotonic() - killed < 5 + 5  # transfer_timeout_s at most, plus the recompute
    assert sum(counter(D.url, "vllm:ascend_pd_failed_transfers_total", cause=c)
               for c in ("peer_lost", "peer_stalled", "timeout", "transport", "producer_error")) == failed + 1
    assert _recv_count(D) == recv
    wait_idle([D.url], 10)
