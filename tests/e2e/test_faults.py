"""Fault injection on the shared 1P1D cluster (real vLLM on the CPU).

Every fault must end with exact output or a clean error within a bounded
time, and with both instances back to baseline: no request running or
waiting, every KV block free, no producer lease pending."""

from __future__ import annotations

import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.faults import HangUpClient, ProxyProcess, SilentPort, counter, wait_idle
from tests.e2e.helpers import metric, post, prompt_of, wait_for
from tests.e2e.test_pd_e2e import completion
from vllm_ascend_pd.testing.servers import free_port

pytestmark = pytest.mark.e2e


def _body(prompt, max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}


def _baseline(cluster, timeout: float) -> float:
    return wait_idle([cluster.P.url, cluster.D.url], timeout, producers=(cluster.P.url,))


def _healthy_after(cluster, tokenizer, seed: int) -> None:
    prompt = prompt_of(tokenizer, 64, seed=seed)
    assert completion(cluster.proxy_url, prompt, 6) == completion(cluster.S.url, prompt, 6)
    _baseline(cluster, 10)


def test_client_abort_before_prefill_completes(cluster, tokenizer):
    """The proxy lets the prefill leg finish (cancelling it could orphan a
    lease P already granted) and releases the KV; D never sees the request."""
    _baseline(cluster, 10)
    released = counter(cluster.P.url, "vllm:ascend_pd_leases_released_total")
    d_prompts = metric(cluster.D.url, "vllm:prompt_tokens_total")
    prompt = prompt_of(tokenizer, 4000, seed=501)
    client = HangUpClient(cluster.proxy_url, "/v1/completions", _body(prompt, 16))
    wait_for(lambda: metric(cluster.P.url, "vllm:num_requests_running")
             + metric(cluster.P.url, "vllm:num_requests_waiting") >= 1, timeout=10, interval=0.01)
    client.hang_up()
    took = _baseline(cluster, 14)
    # Below LEASE_S (15 s): the release freed it. The prefill must finish
    # first, and a freshly started P took 4.8 s for this one in CI.
    assert took < 12
    # The abort landed before prefill finished: D never saw the request.
    assert metric(cluster.D.url, "vllm:prompt_tokens_total") == d_prompts
    assert counter(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released + 1
    _healthy_after(cluster, tokenizer, 502)


def test_client_abort_between_prefill_and_decode(cluster, tokenizer, tmp_path):
    """D accepts the connection but never answers, so the request sits after
    prefill: a hang-up there makes the proxy release P's lease at once, and
    without a hang-up the client gets a 504 after --nonstream-timeout
    (--first-byte-timeout for streams)."""
    silent = SilentPort()
    proxy = ProxyProcess(free_port(), tmp_path / "proxy.log",
                         "--prefill", f"127.0.0.1:{cluster.P.port}",
                         "--decode", f"127.0.0.1:{silent.port}",
                         "--health-interval", "0", "--first-byte-timeout", "4",
                         "--nonstream-timeout", "4")
    try:
        proxy.start()
        _baseline(cluster, 10)
        released = counter(cluster.P.url, "vllm:ascend_pd_leases_released_total")
        client = HangUpClient(proxy.url, "/v1/completions",
                              _body(prompt_of(tokenizer, 300, seed=511), 8))
        wait_for(lambda: metric(cluster.P.url, "vllm:ascend_pd_leases_pending") == 1, timeout=10,
                 interval=0.02)
        t0 = time.monotonic()
        client.hang_up()
        wait_idle([cluster.P.url], 5, producers=(cluster.P.url,))
        assert time.monotonic() - t0 < 5
        assert counter(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released + 1

        # No hang-up: a clean 504 naming the decode instance, and P freed.
        t0 = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            post(proxy.url, "/v1/completions", _body(prompt_of(tokenizer, 300, seed=512), 8))
        took = time.monotonic() - t0
        assert err.value.code == 504
        assert "timed out" in err.value.read().decode()
        assert 4 <= took < 10
        wait_idle([cluster.P.url], 5, producers=(cluster.P.url,))
        assert counter(cluster.P.url, "vllm:ascend_pd_leases_released_total") == released + 2
    finally:
        proxy.stop()
        silent.close()


def test_client_abort_during_decode(cluster, tokenizer):
    """The proxy closes its decode connection; D aborts and frees the blocks."""
    _baseline(cluster, 10)
    ok_before = counter(cluster.D.url, "vllm:request_success_total")
    client = HangUpClient(cluster.proxy_url, "/v1/completions",
                          _body(prompt_of(tokenizer, 200, seed=521), 3500, stream=True))
    client.read_events(5, timeout=60)
    assert metric(cluster.D.url, "vllm:num_requests_running") == 1
    client.hang_up()
    took = _baseline(cluster, 10)
    assert took < 5
    assert counter(cluster.D.url, "vllm:request_success_total") == ok_before
    _healthy_after(cluster, tokenizer, 522)


def test_client_aborts_at_every_point_of_the_request(cluster, tokenizer):
    """Hang-ups spread over a request's whole life (prefill, hand-off,
    transfer, decode): whatever phase each lands in, nothing leaks."""
    _baseline(cluster, 10)
    prompt = prompt_of(tokenizer, 2500, seed=531)
    t0 = time.monotonic()
    post(cluster.proxy_url, "/v1/completions", _body(prompt, 32))
    full = time.monotonic() - t0
    delays = [full * i / 12 for i in range(12)]

    def one(delay: float) -> None:
        client = HangUpClient(cluster.proxy_url, "/v1/completions",
                              _body(prompt_of(tokenizer, 2500, seed=540 + round(delay * 1000)), 32))
        time.sleep(delay)
        client.hang_up()

    for d in delays:  # one at a time, so each lands where it was aimed
        one(d)
    took = _baseline(cluster, 15)
    assert took < 10
    _healthy_after(cluster, tokenizer, 533)


def test_silent_kv_port_fails_within_connect_timeout_and_recomputes(cluster, tokenizer):
    """P's HTTP answered but its KV port accepts and never replies: D gives up
    after connect_timeout_s (10 s, the default) and recomputes exactly."""
    from vllm_ascend_pd.kvclient import release_transfer_sync

    prompt = prompt_of(tokenizer, 150, seed=551)
    pre = post(cluster.P.url, "/v1/completions",
               {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"do_remote_decode": True}})
    real = pre["kv_transfer_params"]
    silent = SilentPort()
    timeouts = counter(cluster.D.url, "vllm:ascend_pd_failed_transfers_total", cause="timeout")
    try:
        t0 = time.monotonic()
        out = post(cluster.D.url, "/v1/completions",
                   _body(prompt, 8, kv_transfer_params={**real, "remote_port": silent.port}))
        took = time.monotonic() - t0
        assert silent.accepted, "D never connected to the silent port"
    finally:
        silent.close()
        assert release_transfer_sync(real, timeout=5)
    assert out["choices"][0]["token_ids"] == completion(cluster.S.url, prompt, 8)
    assert 10 <= took < 20
    assert counter(cluster.D.url, "vllm:ascend_pd_failed_transfers_total", cause="timeout") == timeouts + 1
    _baseline(cluster, 10)


def _stream_started(url: str, prompt, max_tokens: int) -> HangUpClient:
    client = HangUpClient(url, "/v1/completions", _body(prompt, max_tokens, stream=True))
    client.read_until(b"data: ", timeout=60)
    return client


def test_proxy_killed_with_requests_in_flight_then_restarted(cluster, tokenizer, tmp_path):
    """SIGKILL: every client gets a closed connection at once; D aborts the
    streams, P frees its blocks (released, pulled or expired); a restarted
    proxy on the same port serves exactly."""
    from tests.e2e.conftest import LEASE_S

    port = free_port()
    args = ("--prefill", f"127.0.0.1:{cluster.P.port}", "--decode", f"127.0.0.1:{cluster.D.port}")
    proxy = ProxyProcess(port, tmp_path / "proxy.log", *args).start()
    try:
        _baseline(cluster, 10)
        streams = [_stream_started(proxy.url, prompt_of(tokenizer, 100 + i, seed=560 + i), 3000)
                   for i in range(4)]
        # Two more still in prefill when the proxy dies.
        late = [HangUpClient(proxy.url, "/v1/completions",
                             _body(prompt_of(tokenizer, 3000 + i, seed=570 + i), 16)) for i in range(2)]
        time.sleep(0.1)
        proxy.signal(9)
        proxy.wait(10)
        t0 = time.monotonic()
        for c in streams + late:
            try:
                c.read_all(timeout=5)  # returns at EOF; times out if a client hangs
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 5
    finally:
        proxy.stop()
    took = _baseline(cluster, LEASE_S + 10)
    assert took < LEASE_S + 5
    proxy = ProxyProcess(port, tmp_path / "proxy2.log", *args).start()
    try:
        prompt = prompt_of(tokenizer, 90, seed=580)
        assert completion(proxy.url, prompt, 8) == completion(cluster.S.url, prompt, 8)
    finally:
        proxy.stop()
    _baseline(cluster, 10)


def test_proxy_sigterm_drains_in_flight_requests_exactly(cluster, tokenizer, tmp_path):
    proxy = ProxyProcess(free_port(), tmp_path / "proxy.log",
                         "--prefill", f"127.0.0.1:{cluster.P.port}",
                         "--decode", f"127.0.0.1:{cluster.D.port}").start()
    prompts = [prompt_of(tokenizer, 200 + 50 * i, seed=590 + i) for i in range(4)]
    try:
        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(completion, proxy.url, p, 200) for p in prompts]
            wait_for(lambda: metric(cluster.D.url, "vllm:num_requests_running") >= 1, timeout=30,
                     interval=0.05)
            proxy.signal(15)
            got = [f.result(timeout=120) for f in futures]
        assert proxy.wait(30) == 0
    finally:
        proxy.stop()
    with ThreadPoolExecutor(4) as ex:
        expected = list(ex.map(lambda p: completion(cluster.S.url, p, 200), prompts))
    assert got == expected
    _baseline(cluster, 10)
