"""examples/k8s: valid YAML, and the kv-transfer-config each vLLM container
starts with is accepted by vLLM's KVTransferConfig and by our validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vllm_ascend_pd.config import llmdatadist_endpoint, parse_extra_config, resolve_secret
from vllm_ascend_pd.proxy.config import config_from_args

K8S = Path(__file__).resolve().parents[2] / "examples" / "k8s"
SAMPLE = {"POD_IP": "10.244.1.17"}
SECRET_ENV = "VLLM_ASCEND_PD_SHARED_SECRET"
SECRET_REF = {"name": "vllm-pd-secret", "key": "secret"}
SAMPLE_SECRET = "0123456789abcdef0123456789abcdef"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def container_env(container: dict) -> dict[str, str]:
    """Env values with Kubernetes' $(VAR) references expanded (fieldRefs get
    SAMPLE values, the deployment's secret SAMPLE_SECRET)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "secretKeyRef" in e.get("valueFrom", {}):
            assert e["valueFrom"]["secretKeyRef"] == SECRET_REF
            env[e["name"]] = SAMPLE_SECRET
        elif "valueFrom" in e:
            env[e["name"]] = SAMPLE[e["name"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return env


def vllm_containers():
    for name, dep in by_kind("Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if "KV_TRANSFER_CONFIG" in {e["name"] for e in c.get("env", [])}:
                yield name, dep, c


def test_manifests_parse_and_have_the_expected_objects():
    assert set(by_kind("Deployment")) == {"pd-prefill", "pd-decode", "pd-proxy"}
    assert set(by_kind("Service")) == {"pd-proxy"}
    for dep in by_kind("Deployment").values():
        spec = dep["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name,role", [("pd-prefill", "kv_producer"), ("pd-decode", "kv_consumer")])
def test_kv_transfer_config_is_accepted(name, role, monkeypatch):
    from vllm.config import KVTransferConfig

    containers = {n: c for n, _, c in vllm_containers()}
    env = container_env(containers[name])
    raw = json.loads(env["KV_TRANSFER_CONFIG"])
    ktc = KVTransferConfig(**raw)  # vLLM's own validation
    assert ktc.kv_connector == "AscendSimpleConnector" and ktc.kv_role == role
    assert ktc.kv_buffer_device == "npu"
    monkeypatch.setenv(SECRET_ENV, env[SECRET_ENV])  # start-up reads it
    cfg = parse_extra_config(ktc.kv_connector_extra_config)
    assert cfg.transport == "llmdatadist" and cfg.kv_ip == SAMPLE["POD_IP"]
    # Signed KV messages and heartbeats, with the secret from the pod's env.
    assert cfg.shared_secret_env == SECRET_ENV and env[SECRET_ENV] == SAMPLE_SECRET
    assert resolve_secret(cfg) == SAMPLE_SECRET
    # The port plan holds for the TP size the pod starts with.
    args = " ".join(containers[name]["args"])
    tp = int(re.search(r"--tensor-parallel-size (\d+)", args).group(1))
    assert containers[name]["resources"]["limits"]["huawei.com/Ascend910"] == tp
    for rank in range(tp):
        assert llmdatadist_endpoint(cfg, kv_port=ktc.kv_port, rank=rank, tp_size=tp,
                                    is_producer=role == "kv_producer") == ("", 26000 + rank)
    # It registers with the proxy Service, announcing the port vLLM serves on.
    proxy = by_kind("Service")["pd-proxy"]
    assert cfg.proxy_ip == proxy["metadata"]["name"]
    assert cfg.proxy_port in {p["port"] for p in proxy["spec"]["ports"]}
    assert f"--port {cfg.http_port}" in args
    assert containers[name]["readinessProbe"]["httpGet"]["port"] == cfg.http_port
    assert '--kv-transfer-config "$KV_TRANSFER_CONFIG"' in args


def test_proxy_listens_where_the_service_and_instances_point(monkeypatch):
    proxy = by_kind("Deployment")["pd-proxy"]["spec"]["template"]["spec"]["containers"][0]
    args = proxy["args"]
    flag = dict(zip(args[::2], args[1::2]))
    service_ports = {p["name"]: p["targetPort"] for p in by_kind("Service")["pd-proxy"]["spec"]["ports"]}
    assert int(flag["--port"]) == service_ports["http"]
    assert int(flag["--register-port"]) == service_ports["register"]
    assert flag["--register-host"] == "0.0.0.0" and flag["--host"] == "0.0.0.0"
    # It counts only registrations signed with the instances' secret.
    assert flag["--kv-secret-env"] == SECRET_ENV
    assert container_env(proxy)[SECRET_ENV] == SAMPLE_SECRET
    monkeypatch.setenv(SECRET_ENV, SAMPLE_SECRET)
    assert config_from_args(args).validate().kv_secret_env == SECRET_ENV
    served = {re.search(r"--served-model-name (\S+)", " ".join(c["args"])).group(1) for _, _, c in vllm_containers()}
    assert served == {flag["--model"]}
