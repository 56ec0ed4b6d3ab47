"""1P1D on IPv6 loopback, on real vLLM: P and D serve HTTP on ::1, move KV
over ::1 and register with a proxy whose registration socket listens on ::1
(--register-host). Only the proxy's client port is on 127.0.0.1.

P's kv_ip is a host name whose only address is ::1 (D's is "::1"): P
resolves it at start-up, then binds and advertises ::1. The name is known to
P's Python resolver alone (a sitecustomize, see KV_NAME; /etc/hosts is left
alone), so had it reached ZMQ or a socket as a name, P would not start.

The expected tokens come from the session cluster's single instance S."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.faults import counter, wait_idle
from tests.e2e.helpers import log_dir, post, prompt_of, serve, wait_for
from tests.e2e.test_pd_e2e import completion
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.testing.servers import (
    BASE_ARGS, PortPicker, ProxyServer, VllmServer, ipv6_loopback, kv_config, start_all,
    stop_all,
)

pytestmark = pytest.mark.e2e

KV_NAME = "pd-p6.test"
# Python's socket.getaddrinfo answers KV_NAME with ::1; C code (libzmq, a
# socket's own bind) still asks the system, which does not know the name.
RESOLVER = f"""
import socket
_real = socket.getaddrinfo
def _getaddrinfo(host, *args, **kwargs):
    return _real("::1" if host == {KV_NAME!r} else host, *args, **kwargs)
socket.getaddrinfo = _getaddrinfo
"""


def _resolver_env(site: Path) -> dict[str, str]:
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(RESOLVER)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


class V6Pair:
    def __init__(self, model: str, logs: Path):
        ports = PortPicker()
        self.kv_port = ports.kv(span=4)
        register_port = ports.http()
        announce = {"proxy_ip": "::1", "proxy_port": register_port, "heartbeat_s": 0.5}

        def server(name: str, role: str, kv_port: int, kv_ip: str, env=None, **more) -> VllmServer:
            http = ports.http()
            return VllmServer(name, model, http, [
                *BASE_ARGS, "--kv-transfer-config",
                kv_config(role, kv_port, http_port=http, kv_ip=kv_ip, **announce, **more)],
                env=env or {}, log_path=logs / f"{name}.log", host="::1")

        self.P = server("P6", "kv_producer", self.kv_port, KV_NAME,
                        env=_resolver_env(logs / "p6-site"))
        self.D = server("D6", "kv_consumer", self.kv_port + 2, "::1", failure_policy="recompute")
        self.proxy = ProxyServer(ports.http(), logs / "v6-proxy.log", "--register-host", "::1",
                                 "--register-port", str(register_port), "--heartbeat-ttl", "3")

    def start(self) -> None:
        self.proxy.start()  # first, so that the first heartbeats are heard
        start_all((self.P, self.D), 600)

    def stop(self) -> None:
        self.proxy.stop()
        stop_all((self.P, self.D))


@pytest.fixture(scope="module")
def v6(tiny_model, tmp_path_factory):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    yield from serve(V6Pair(tiny_model, log_dir(tmp_path_factory, "e2e-logs")))


def _healthy(proxy: ProxyServer) -> dict:
    st = json.loads(urllib.request.urlopen(proxy.url + "/status", timeout=5).read())
    return {role: [i["address"] for i in st["instances"][role] if i["health"] == "healthy"]
            for role in ("prefill", "decode")}


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def _sources(server: VllmServer) -> tuple[float, float]:
    """Prompt tokens D computed itself, and those it took from P."""
    return tuple(counter(server.url, "vllm:prompt_tokens_by_source_total", source=src)
                 for src in ("local_compute", "external_kv_transfer"))


def test_pd_over_ipv6_through_the_proxy_is_token_exact(v6, cluster, tokenizer):
    # Registered over IPv6, under their IPv6 HTTP addresses.
    wait_for(lambda: _healthy(v6.proxy) == {"prefill": [f"[::1]:{v6.P.port}"],
                                            "decode": [f"[::1]:{v6.D.port}"]}, timeout=30)
    # P's KV control and data ports are not on 127.0.0.1 (only on ::1):
    # a pull that loads went over IPv6.
    assert _refused("127.0.0.1", v6.kv_port) and _refused("127.0.0.1", v6.kv_port + GROUP_PORT_OFFSET)

    prompt = prompt_of(tokenizer, 300, seed=701)
    expected = completion(cluster.S.url, prompt)
    loaded = counter(v6.D.url, "vllm:ascend_pd_loaded_tokens_total")
    local, external = _sources(v6.D)

    assert completion(v6.proxy.url, prompt) == expected
    # D loaded the whole prompt from P and computed none of it.
    wait_for(lambda: counter(v6.D.url, "vllm:ascend_pd_loaded_tokens_total") - loaded == len(prompt),
             timeout=10)
    assert _sources(v6.D) == (local, external + len(prompt))
    wait_idle([v6.P.url, v6.D.url], 10, producers=(v6.P.url,))


def test_params_name_the_ipv6_address_and_a_release_reaches_it(v6, tokenizer):
    """What the proxy does with a transfer nobody pulls: release it at the
    producer named in kv_transfer_params, here over IPv6."""
    from vllm_ascend_pd.kvclient import release_transfer_sync

    released = counter(v6.P.url, "vllm:ascend_pd_leases_released_total")
    out = post(v6.P.url, "/v1/completions", {"model": "tiny", "prompt": prompt_of(tokenizer, 64, seed=702),
                                             "max_tokens": 1, "temperature": 0,
                                             "kv_transfer_params": {"do_remote_decode": True}})
    params = out["kv_transfer_params"]
    # P's kv_ip is KV_NAME: it advertises the address it resolved, not the name.
    assert (params["remote_host"], params["remote_port"]) == ("::1", v6.kv_port)
    assert release_transfer_sync(params, timeout=5) is True
    wait_idle([v6.P.url], 10, producers=(v6.P.url,))
    assert counter(v6.P.url, "vllm:ascend_pd_leases_released_total") == released + 1
