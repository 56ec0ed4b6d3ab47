"""Start and stop real vLLM OpenAI servers on loopback, 127.0.0.1 unless a
test asks for ::1 (tests, demo, benchmarks).

Each server runs in its own process group so teardown reaches its engine and
worker children; only processes started here are ever signalled.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


def free_port(avoid: set[int] | None = None, span: int = 1) -> int:
    """A free TCP port p on 127.0.0.1 with p..p+span-1 also free.

    Picked below the kernel's ephemeral range (like ``free_kv_port``, in a
    range of its own): a port taken from that range could be handed to one
    of vLLM's random internal sockets before our server binds it.
    """
    return _free_range(10000, 20000, avoid, span)


def free_kv_port(avoid: set[int] | None = None, span: int = 4) -> int:
    """A kv_port base below the kernel's ephemeral range, so ports vLLM and
    others pick at random (from that range) cannot collide with it."""
    return _free_range(20000, 32000, avoid, span)


def _free_range(lo: int, hi: int, avoid: set[int] | None, span: int) -> int:
    import random

    avoid = avoid or set()
    rnd = random.Random()
    for _ in range(500):
        p = rnd.randrange(lo, hi - span)
        if any(q in avoid for q in range(p, p + span)):
            continue
        if all(port_is_free(q) for q in range(p, p + span)):
            return p
    raise RuntimeError(f"no free range of {span} ports in {lo}-{hi}")


class PortPicker:
    """Distinct free ports for one deployment: HTTP ports and kv_port ranges."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def http(self) -> int:
        p = free_port(self.taken)
        self.taken.add(p)
        return p

    def kv(self, span: int = 4) -> int:
        p = free_kv_port(self.taken, span)
        self.taken.update(range(p, p + span))
        return p


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (containers often have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    """Free on 127.0.0.1 and, where there is IPv6 loopback, on ::1 (the
    IPv6 tests bind there)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", port))
    except OSError as e:
        return e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)  # no IPv6 loopback here
    return True


@dataclass
class VllmServer:
    name: str
    model: str
    port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"  # its HTTP address; "::1" for IPv6 loopback

    @property
    def url(self) -> str:
        from vllm_ascend_pd.net import host_port

        return f"http://{host_port(self.host, self.port)}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--host", self.host, "--port", str(self.port),
            "--served-model-name", "tiny", *self.args,
        ]

    def start(self) -> "VllmServer":
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # In-process engine: see docs/known-issues.md (mp executor hang on CPU).
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env.update(self.env)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s; log: {self.log_path}\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Hard kill (fault injection)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def start_all(servers: Sequence[VllmServer], timeout_s: float) -> None:
    """Start every server at once, then wait for all of them in parallel
    (vLLM start-up costs about a minute per instance here)."""
    for s in servers:
        s.start()
    with ThreadPoolExecutor(len(servers)) as ex:
        list(ex.map(lambda s: s.wait_ready(timeout_s), servers))


def stop_all(servers: Sequence[VllmServer]) -> None:
    for s in servers:
        s.stop()


class ProxyServer:
    """The proxy (``python -m vllm_ascend_pd.proxy``) on 127.0.0.1 in its own
    process group, so teardown, or a test, can signal all of it."""

    def __init__(self, port: int, log: Path, *args: str, env: dict[str, str] | None = None,
                 model: str = "tiny"):
        self.port, self.log, self.args, self.model = port, log, args, model
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, healthy: bool = False) -> "ProxyServer":
        """Start it and wait until /health answers: any status (503 until its
        instances are healthy), or 200 with ``healthy``."""
        env = dict(os.environ, VLLM_ASCEND_PD_PLAIN_LOGGING="1", **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_ascend_pd.proxy", "--host", "127.0.0.1",
             "--port", str(self.port), "--model", self.model, *self.args],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return self
            except urllib.error.HTTPError:
                if not healthy:
                    return self  # answering
            except OSError:
                if self.proc.poll() is not None:
                    break
            time.sleep(0.2)
        raise RuntimeError(f"proxy did not start; see {self.log}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)


def kv_config(role: str, kv_port: int, *, failure_policy: str | None = None, **extra) -> str:
    cfg = {
        "kv_connector": "AscendSimpleConnector",
        "kv_role": role,
        "kv_port": kv_port,
        "kv_connector_extra_config": {"kv_ip": "127.0.0.1", **extra},
    }
    if failure_policy:
        cfg["kv_load_failure_policy"] = failure_policy
    return json.dumps(cfg)


BASE_ARGS = ["--distributed-executor-backend", "uni", "--enforce-eager", "--block-size", "32", "--max-model-len", "4096", "--dtype", "float32", "--seed", "0"]
