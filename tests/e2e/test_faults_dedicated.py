"""Faults that need their own real vLLM servers: instances killed in the
middle of a transfer, a decode instance with a shorter context than its
producer, and a deployment with a shared secret.

The model here is the tiny Llama with 24 layers, and the instances use the
smallest staging chunk and pump budget (real settings, `chunk_mb` and
`pump_budget_ms`), so a 1800-token transfer takes a few seconds instead of
a fraction of one: long enough to kill or abandon it half way."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.faults import HangUpClient, ProxyProcess, counter, producer_idle, wait_idle
from tests.e2e.helpers import log_dir, metric, post, prompt_of, serve, wait_for
from tests.e2e.test_pd_e2e import completion
from vllm_ascend_pd.testing.servers import BASE_ARGS, PortPicker, VllmServer, kv_config, start_all, stop_all

pytestmark = pytest.mark.e2e

SECRET_ENV = "PD_E2E_SHARED_SECRET"
SECRET = "e2e-secret-0123456789abcdef"
# One 16 KiB block of one layer per chunk, one chunk per engine step.
SLOW = dict(chunk_mb=0.001, buffer_pool_mb=0.002, pump_budget_ms=0.001, transfer_timeout_s=5.0,
            connect_timeout_s=5.0, shared_secret_env=SECRET_ENV)
D_MAX_LEN = 2048
LONG = 1800  # tokens: a transfer of a few seconds


class Dedicated:
    def __init__(self, model: str, logs: Path):
        ports = PortPicker()
        kv = ports.kv(span=6)
        port = ports.http
        env = {SECRET_ENV: SECRET}

        # P and D also announce themselves, signed, to a registration proxy.
        self.register_port = port()
        announce = {"proxy_ip": "127.0.0.1", "proxy_port": self.register_port, "heartbeat_s": 0.5}

        def server(name, role, kv_port, *extra, policy=None, **more):
            http = port()
            if more:
                more["http_port"] = http  # what the instance announces
            return VllmServer(name, model, http, [
                *BASE_ARGS, *extra, "--kv-transfer-config",
                kv_config(role, kv_port, failure_policy=policy, **SLOW, **more)], env=env,
                log_path=logs / f"{name}.log")

        self.P = server("Pded", "kv_producer", kv, **announce)
        self.D = server("Dded", "kv_consumer", kv + 2, "--max-model-len", str(D_MAX_LEN), policy="recompute",
                        **announce)
        self.Dk = server("Dkill", "kv_consumer", kv + 4, policy="recompute")  # killed by a test
        self.proxy = ProxyProcess(port(), logs / "ded-proxy.log", "--prefill", f"127.0.0.1:{self.P.port}",
                                  "--decode", f"127.0.0.1:{self.D.port}", "--kv-secret-env", SECRET_ENV,
                                  env=env)
        self.reg_proxy = ProxyProcess(port(), logs / "ded-reg-proxy.log", "--register-port",
                                      str(self.register_port), "--kv-secret-env", SECRET_ENV, env=env)
        self.logs = logs

    @property
    def servers(self):
        return (self.P, self.D, self.Dk)

    def start(self) -> None:
        self.reg_proxy.start()  # first, so that the first heartbeats are heard
        start_all(self.servers, 900)
        self.proxy.start()

    def stop(self) -> None:
        self.proxy.stop()
        self.reg_proxy.stop()
        stop_all(self.servers)


@pytest.fixture(scope="module")
def ded(tiny_model_24, tmp_path_factory):
    yield from serve(Dedicated(tiny_model_24, log_dir(tmp_path_factory, "e2e-logs")))


def _body(prompt, max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}


def reference(server: VllmServer, prompt, max_tokens: int) -> list[int]:
    """Single-instance output; the salt keeps it out of later requests' prefix cache."""
    out = post(server.url, "/v1/completions", _body(prompt, max_tokens, cache_salt="reference"))
    return out["choices"][0]["token_ids"]


def _prefill(server: VllmServer, prompt) -> dict:
    out = post(server.url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1,
                                               "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}})
    return out["kv_transfer_params"]


def _recv_count(server: VllmServer) -> float:
    return counter(server.url, "vllm:ascend_pd_transfers_total", direction="recv")


def test_secret_deployment_is_exact_and_strangers_are_refused(ded, tokenizer, cluster):
    prompt = prompt_of(tokenizer, 300, seed=601)
    expected = reference(ded.D, prompt, 8)
    recv = _recv_count(ded.D)
    assert completion(ded.proxy.url, prompt, 8) == expected
    assert _recv_count(ded.D) == recv + 1  # pulled, with signed messages

    # A consumer without the secret (the shared cluster's D) is refused at the
    # handshake, recomputes, and P keeps serving and keeps the lease.
    refused = counter(ded.P.url, "vllm:ascend_pd_rejected_messages_total", kind="auth")
    params = _prefill(ded.P, prompt_of(tokenizer, 100, seed=602))
    other = prompt_of(tokenizer, 100, seed=602)
    out = post(cluster.D.url, "/v1/completions", _body(other, 6, kv_transfer_params=params))
    assert out["choices"][0]["token_ids"] == completion(cluster.S.url, other, 6)
    wait_for(lambda: counter(ded.P.url, "vllm:ascend_pd_rejected_messages_total", kind="auth") == refused + 1,
             timeout=10)
    assert metric(ded.P.url, "vllm:ascend_pd_leases_pending") == 1
    assert "unauthenticated" in ded.P.log_path.read_text()

    from vllm_ascend_pd.kvclient import release_transfer_sync

    assert release_transfer_sync(params, timeout=5) is False  # unsigned: refused
    assert release_transfer_sync(params, timeout=5, secret=SECRET) is True
    wait_idle([ded.P.url], 10, producers=(ded.P.url,))


def test_signed_registration_serves_token_exact(ded, tokenizer):
    """The instances sign their heartbeats with the deployment's secret; the
    proxy that knows it registers them and serves through them."""
    def registered():
        st = json.loads(urllib.request.urlopen(ded.reg_proxy.url + "/status", timeout=5).read())
        return {role: [i["address"] for i in st["instances"][role] if i["health"] == "healthy"]
                for role in ("prefill", "decode")}

    wait_for(lambda: registered() == {"prefill": [f"127.0.0.1:{ded.P.port}"],
                                      "decode": [f"127.0.0.1:{ded.D.port}"]}, timeout=30)
    assert "refusing announcement" not in ded.reg_proxy.log.read_text()
    prompt = prompt_of(tokenizer, 120, seed=611)
    assert completion(ded.reg_proxy.url, prompt, 6) == reference(ded.D, prompt, 6)


def test_decode_rejects_prompt_too_long_for_it(ded, tokenizer):
    """P (4096 tokens) accepts what D (2048) refuses: the client gets D's 400
    at once and the proxy frees P's lease."""
    wait_idle([ded.P.url, ded.D.url], 10, producers=(ded.P.url,))
    released = counter(ded.P.url, "vllm:ascend_pd_leases_released_total")
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as err:
        post(ded.proxy.url, "/v1/completions", _body(prompt_of(tokenizer, 3000, seed=611), 8))
    took = time.monotonic() - t0
    assert err.value.code == 400
    assert "maximum context length" in err.value.read().decode()
    assert took < 15
    wait_idle([ded.P.url, ded.D.url], 5, producers=(ded.P.url,))
    assert counter(ded.P.url, "vllm:ascend_pd_leases_released_total") == released + 1


def test_client_abort_during_the_transfer(ded, tokenizer):
    """The proxy closes D's stream while D is still pulling: D aborts the
    request and stops the pull at once (tcp never writes a block outside its
    own recv calls), so vLLM frees D's blocks; P's lease ends."""
    wait_idle([ded.P.url, ded.D.url], 10, producers=(ded.P.url,))
    recv = _recv_count(ded.D)
    cancelled = counter(ded.D.url, "vllm:ascend_pd_pulls_cancelled_total")
    ok_before = counter(ded.D.url, "vllm:request_success_total")
    client = HangUpClient(ded.proxy.url, "/v1/completions", _body(prompt_of(tokenizer, LONG, seed=621), 8, stream=True))
    wait_for(lambda: metric(ded.P.url, "vllm:ascend_pd_leases_pending") == 1, timeout=30, interval=0.02)
    time.sleep(0.5)
    assert _recv_count(ded.D) == recv, "the transfer already ended: make it longer"
    t0 = time.monotonic()
    client.hang_up()
    took = wait_idle([ded.P.url, ded.D.url], 30, producers=(ded.P.url,))
    assert took < 20
    assert counter(ded.D.url, "vllm:request_success_total") == ok_before
    assert counter(ded.D.url, "vllm:ascend_pd_pulls_cancelled_total") == cancelled + 1
    assert _recv_count(ded.D) == recv, "the pull was stopped, not completed"
    # Nothing stuck: the next request is exact.
    prompt = prompt_of(tokenizer, 200, seed=622)
    assert completion(ded.proxy.url, prompt, 8) == reference(ded.D, prompt, 8)
    assert time.monotonic() - t0 < 60


def _decode_in_background(server: VllmServer, prompt, params, max_tokens: int):
    result: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            result["out"] = post(server.url, "/v1/completions", _body(prompt, max_tokens, kv_transfer_params=params))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
        result["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def test_consumer_killed_mid_transfer(ded, tokenizer):
    """P's send fails (the consumer's connection is gone) or times out after
    transfer_timeout_s; either way the lease ends and P frees the blocks."""
    wait_idle([ded.P.url], 10, producers=(ded.P.url,))
    prompt = prompt_of(tokenizer, LONG, seed=641)
    params = _prefill(ded.P, prompt)
    t, result = _decode_in_background(ded.Dk, prompt, params, 8)
    time.sleep(0.7)
    assert metric(ded.P.url, "vllm:ascend_pd_leases_pending") == 1
    ded.Dk.kill()
    t0 = time.monotonic()
    t.join(10)
    assert "error" in result, result  # the client's connection died with D
    took = wait_idle([ded.P.url], 20, producers=(ded.P.url,))
    assert time.monotonic() - t0 < 5 + 10
    sends_failed = sum(counter(ded.P.url, "vllm:ascend_pd_failed_transfers_total", cause=c)
                       for c in ("send_peer_lost", "send_peer_stalled", "send_timeout", "send_transport"))
    assert sends_failed >= 1, "P's send should have failed, not completed"
    assert took < 15


def test_first_pull_after_a_producer_restart_is_exact(ded, tokenizer):
    """P restarted on the same address between two transfers: D's link to
    it saw the disconnect and ZMQ reconnected silently, but the new process
    knows neither that link nor its data stream. The first pull after the
    restart failed and D recomputed; D now redoes the handshake: the pull
    succeeds, exact, and no failure is counted."""
    def failures() -> float:
        return sum(counter(ded.D.url, "vllm:ascend_pd_failed_transfers_total", cause=c)
                   for c in ("peer_lost", "peer_stalled", "timeout", "transport", "producer_error", "refused"))

    short = prompt_of(tokenizer, 200, seed=641)
    recv = _recv_count(ded.D)
    out = post(ded.D.url, "/v1/completions", _body(short, 8, kv_transfer_params=_prefill(ded.P, short)))
    assert out["choices"][0]["token_ids"] == reference(ded.D, short, 8)
    assert _recv_count(ded.D) == recv + 1  # D now holds a link (and a data stream) to this P
    failed = failures()
    ded.P.kill()
    ded.P.start()
    ded.P.wait_ready(600)
    prompt = prompt_of(tokenizer, 300, seed=642)
    out = post(ded.D.url, "/v1/completions", _body(prompt, 8, kv_transfer_params=_prefill(ded.P, prompt)))
    assert out["choices"][0]["token_ids"] == reference(ded.D, prompt, 8)
    assert _recv_count(ded.D) == recv + 2, "the first pull after the restart must load, not recompute"
    assert failures() == failed
    wait_idle([ded.P.url, ded.D.url], 10, producers=(ded.P.url,))


def test_producer_killed_mid_transfer(ded, tokenizer):
    """Runs last: it kills this module's producer.

    D sees the connection close and fails the pull at once (well before
    transfer_timeout_s, 5 s here), then recomputes (policy `recompute`):
    exact output, D back to baseline."""
    prompt = prompt_of(tokenizer, LONG, seed=631)
    expected = reference(ded.D, prompt, 8)
    lost = counter(ded.D.url, "vllm:ascend_pd_failed_transfers_total", cause="peer_lost")
    recv = _recv_count(ded.D)
    params = _prefill(ded.P, prompt)
    t, result = _decode_in_background(ded.D, prompt, params, 8)
    time.sleep(0.7)
    assert _recv_count(ded.D) == recv, "the transfer already ended: make it longer"
    ded.P.kill()
    killed = time.monotonic()
    t.join(60)
    assert "out" in result, result
    assert result["out"]["choices"][0]["token_ids"] == expected
    assert time.monotonic() - killed < 5
    assert counter(ded.D.url, "vllm:ascend_pd_failed_transfers_total", cause="peer_lost") == lost + 1
    assert "closed the connection" in ded.D.log_path.read_text()
    wait_idle([ded.D.url], 10)
