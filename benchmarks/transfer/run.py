"""KV transfer between two processes with the connector's real worker-side
pieces (KVServer + LeaseTable on the producer, Puller on the consumer, the
transport under test in both), and the ceilings measured in the same run.

    flock /tmp/vllm-heavy.lock python -m benchmarks.transfer [--quick]

Per case (cache layout x prompt length x transport) it reports GB/s, the
ratio to three ceilings measured between the same two processes on the same
bytes (torch ``copy_``, one plain loopback TCP stream, ZMQ zero-copy frames of
the transport's chunk size), the time split into gather / scatter / the rest
(wire and waits), and the peak RSS the connector added in each process.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import zmq

from benchmarks.report import header, pyplot, run_id, table
from vllm_ascend_pd.config import GROUP_PORT_OFFSET, ConnectorConfig
from vllm_ascend_pd.connector.zmq_links import wait_ready
from vllm_ascend_pd.transport import TRANSPORTS

MB = 1 << 20
# Driver: between pumps that made no progress, wait for the sockets (as an
# idle engine step with idle_wait_ms does) or, with --spin, poll at once
# (as vLLM's busy engine loop does). Read by the child processes.
SPIN = os.environ.get("TRANSFER_BENCH_SPIN") == "1"
OUT_DIR = Path(__file__).resolve().parent
DOCS = OUT_DIR.parents[1] / "docs"
# Transports that need NPUs cannot run here.
NPU_ONLY = {"hccl", "llmdatadist"}


@dataclass(frozen=True)
class Layout:
    name: str
    layers: int
    parts: tuple[tuple[int, ...], ...]  # per-layer tensors, shape after (num_blocks, block_size)
    block_size: int = 128
    dtype: str = "bfloat16"
    is_mla: bool = False

    def bytes_per_token(self) -> int:
        el = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        per_layer = sum(el * _prod(p) for p in self.parts)
        return per_layer * self.layers


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# vllm-ascend allocates each layer's cache as a tuple of block-first tensors:
# (k, v) for standard attention, (k_nope, k_pe) for MLA.
LAYOUTS = {
    "llama3-8b": Layout("llama3-8b", 32, ((8, 128), (8, 128))),
    # DeepSeek-V2-Lite: 27 layers, kv_lora_rank 512, qk_rope_head_dim 64.
    "deepseek-v2-lite-mla": Layout("deepseek-v2-lite-mla", 27, ((1, 512), (1, 64)), is_mla=True),
}


# --------------------------------------------------------------------------
# Memory and timing instrumentation (per process)

def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    # Linux: writing 5 resets VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


class Hooks:
    """Cheap timers around the torch ops transports gather and scatter with.

    Wall time includes being descheduled (four busy threads share two cores
    during a transfer); thread CPU time is what the copy itself cost.
    """

    gather = scatter = gather_cpu = scatter_cpu = 0.0
    active = False

    @classmethod
    def install(cls) -> None:
        def timed(fn, slot):
            def wrapper(*a, **kw):
                if not cls.active:
                    return fn(*a, **kw)
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return fn(*a, **kw)
                finally:
                    setattr(cls, slot, getattr(cls, slot) + time.perf_counter() - t0)
                    setattr(cls, slot + "_cpu", getattr(cls, slot + "_cpu") + time.thread_time() - c0)
            return wrapper

        from vllm_ascend_pd import kv_layout

        # PagedKVCache.scatter looks scatter_runs up at call time.
        if hasattr(kv_layout, "scatter_runs"):
            kv_layout.scatter_runs = timed(kv_layout.scatter_runs, "scatter")
        torch.index_select = timed(torch.index_select, "gather")
        torch.Tensor.index_select = timed(torch.Tensor.index_select, "gather")
        torch.Tensor.index_copy_ = timed(torch.Tensor.index_copy_, "scatter")

    @classmethod
    def start(cls) -> None:
        cls.gather = cls.scatter = cls.gather_cpu = cls.scatter_cpu = 0.0
        cls.active = True

    @classmethod
    def stop(cls) -> dict[str, float]:
        cls.active = False
        return {"gather_s": cls.gather, "gather_cpu_s": cls.gather_cpu,
                "scatter_s": cls.scatter, "scatter_cpu_s": cls.scatter_cpu}


def make_cache(layout: Layout, num_blocks: int, seed: int | None):
    """A filled (so resident) paged cache in vllm-ascend's tuple layout."""
    from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache

    dtype = getattr(torch, layout.dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    caches = {}
    for i in range(layout.layers):
        parts = []
        for shape in layout.parts:
            t = torch.empty((num_blocks, layout.block_size, *shape), dtype=dtype)
            if gen is None:
                t.zero_()
            else:
                # Cheap distinct contents per block: fill per block from a seeded stream.
                vals = torch.randn(num_blocks, generator=gen, dtype=torch.float32) + i
                t.copy_(vals.view(-1, *([1] * (t.dim() - 1))).expand_as(t))
            parts.append(t)
        caches[f"model.layers.{i}.self_attn"] = tuple(parts)
    return PagedKVCache.from_vllm(caches, num_blocks, layout.block_size, lambda *_: CacheAxes(block=0), layout.is_mla)


def checksum(cache, blocks: list[int]) -> list[float]:
    idx = torch.tensor(blocks)
    return [float(t.index_select(0, idx).float().sum()) for t in cache.tensors]


# --------------------------------------------------------------------------
# The two worker processes. Commands arrive over a Pipe; replies go back.

def _options(chunk_mb: float, pool_mb: float, group_port: int):
    from vllm_ascend_pd.transport import TransportOptions

    return TransportOptions(
        chunk_bytes=int(chunk_mb * MB), pool_bytes=int(pool_mb * MB), idle_timeout_s=30.0,
        local_rank=0, group_port=group_port, host="127.0.0.1",
    )


def serve_until_pulled(server, leases, rid: str, spin: bool) -> None:
    """Pump a producer until the lease of ``rid`` ended (at most 300 s);
    between pumps wait on its sockets unless ``spin``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        blocked = server.pump(0.02)
        if rid in leases.take_finished():
            return
        if blocked and not spin:
            wait_ready([(server.socket, zmq.POLLIN), *server.transport.poll_items()], 0.02)


def pull_until_done(puller, spin: bool) -> set[str]:
    """Pump a consumer until its submitted pull reports; returns the failed ids."""
    while True:
        blocked = puller.pump(0.02)
        done, failed = puller.take_results()
        if done:
            return failed
        if blocked and not spin:
            items = [(s, zmq.POLLIN) for s in puller.sockets()] + puller.transport.poll_items()
            wait_ready(items, 0.02)


def producer_main(conn) -> None:
    from vllm_ascend_pd.connector.kv_server import KVServer
    from vllm_ascend_pd.connector.stats import TransferStats
    from vllm_ascend_pd.connector.transfers import LeaseTable
    from vllm_ascend_pd.transport import create_transport

    torch.set_num_threads(1)
    Hooks.install()
    cache = server = leases = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            return
        if cmd == "setup":
            if server is not None:
                server.close()
            server = cache = None
            gc.collect()
            layout, nb, transport, port, chunk_mb, pool_mb = arg
            cache = make_cache(layout, nb, seed=7)
            gc.collect()
            reset_peak()
            rss0 = _status("VmRSS")
            leases = LeaseTable(600)
            tr = create_transport(transport, cache, _options(chunk_mb, pool_mb, port + GROUP_PORT_OFFSET))
            server = KVServer(
                bind_host="127.0.0.1", port=port, engine_id="P", tp_rank=0, layout=cache.describe(),
                leases=leases, transport=tr, stats=TransferStats(), secret="", registration_grace_s=5.0,
            )
            conn.send(("ok", rss0))
        elif cmd == "serve":
            # Register the lease, then pump until the consumer has pulled it.
            tid, rid, blocks = arg
            leases.register(rid, tid, blocks)
            Hooks.start()
            c0 = time.process_time()
            serve_until_pulled(server, leases, rid, SPIN)
            conn.send(("ok", {**Hooks.stop(), "cpu_s": time.process_time() - c0, "hwm": _status("VmHWM")}))
        elif cmd == "checksum":
            sums = checksum(cache, arg)
            gc.collect()
            reset_peak()  # its temporaries are not the connector's
            conn.send(("ok", sums))
        elif cmd == "raw_send":
            conn.send(("ok", raw_send(cache, arg)))
        elif cmd == "iov_send":
            conn.send(("ok", iov_send(cache, *arg)))
        elif cmd == "zmq_send":
            conn.send(("ok", zmq_send(cache, *arg)))


def _limit_receive_queue(rcvhwm: int) -> None:
    """Experiment: bound the consumer's ZMQ receive queue (messages)."""
    import functools

    from vllm_ascend_pd.connector import puller, zmq_links

    puller.dealer_socket = functools.partial(zmq_links.dealer_socket, rcvhwm=rcvhwm)


def consumer_main(conn, rcvhwm: int = 0) -> None:
    from vllm_ascend_pd.connector.metadata import RecvSpec
    from vllm_ascend_pd.connector.puller import Puller
    from vllm_ascend_pd.connector.stats import TransferStats
    from vllm_ascend_pd.transport import create_transport

    torch.set_num_threads(1)
    Hooks.install()
    if rcvhwm:
        _limit_receive_queue(rcvhwm)
    cache = puller = None
    port = 0
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            return
        if cmd == "setup":
            if puller is not None:
                puller.close()
            puller = cache = None
            gc.collect()
            layout, nb, transport, port, chunk_mb, pool_mb = arg
            cache = make_cache(layout, nb, seed=None)
            gc.collect()
            reset_peak()
            rss0 = _status("VmRSS")
            # The consumer's own kv_port is port + 2 (as two instances on one host).
            tr = create_transport(transport, cache, _options(chunk_mb, pool_mb, port + 2 + GROUP_PORT_OFFSET))
            puller = Puller(engine_id="D", tp_rank=0, layout=cache.describe(), transport=tr,
                            stats=TransferStats(), secret="", connect_timeout_s=30)
            conn.send(("ok", rss0))
        elif cmd == "pull":
            tid, rid, remote, local = arg
            Hooks.start()
            c0 = time.process_time()
            t0 = time.perf_counter()
            puller.submit(RecvSpec("d-" + rid, "127.0.0.1", port, tid, rid, remote, local, 0))
            failed = pull_until_done(puller, SPIN)
            wall = time.perf_counter() - t0
            conn.send(("ok", {**Hooks.stop(), "wall_s": wall, "cpu_s": time.process_time() - c0,
                              "failed": bool(failed), "hwm": _status("VmHWM")}))
        elif cmd == "checksum":
            sums = checksum(cache, arg)
            gc.collect()
            reset_peak()  # its temporaries are not the connector's
            conn.send(("ok", sums))
        elif cmd == "raw_recv":
            conn.send(("ok", raw_recv(cache, arg)))
        elif cmd == "iov_recv":
            conn.send(("ok", iov_recv(cache, *arg)))
        elif cmd == "zmq_recv":
            conn.send(("ok", zmq_recv(cache, *arg)))
        elif cmd == "memcpy":
            conn.send(("ok", memcpy(cache)))


# --------------------------------------------------------------------------
# Ceilings, on the very tensors the transfer used

def _byte_views(cache):
    return [t.contiguous().view(torch.uint8).reshape(-1).numpy() for t in cache.tensors]


def raw_send(cache, port: int) -> float:
    views = _byte_views(cache)
    with socket.create_server(("127.0.0.1", port)) as srv:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1)  # "go"
            t0 = time.perf_counter()
            for v in views:
                conn.sendall(memoryview(v))
            conn.recv(1)  # receiver has everything
            return time.perf_counter() - t0


def raw_recv(cache, port: int) -> float:
    views = _byte_views(cache)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with sock:
        t0 = time.perf_counter()
        sock.sendall(b"g")
        for v in views:
            mv = memoryview(v)
            while len(mv):
                n = sock.recv_into(mv)
                if n == 0:
                    raise ConnectionError("sender closed early")
                mv = mv[n:]
        elapsed = time.perf_counter() - t0
        sock.sendall(b"d")
        return elapsed


def _block_views(cache, blocks: list[int]):
    """Per-block byte views in transfer order (what a zero-copy framing sends)."""
    out = []
    for t in cache.tensors:
        flat = t.view(torch.uint8).reshape(t.shape[0], -1).numpy()
        out.extend(memoryview(flat[b]) for b in blocks)
    return out


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def iov_send(cache, port: int, blocks: list[int]) -> float:
    # The kernel gathers the blocks (sendmsg with up to 64 iovecs): no gather copy.
    views = _block_views(cache, blocks)
    with socket.create_server(("127.0.0.1", port)) as srv:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1)
            t0 = time.perf_counter()
            i = 0
            pending: list[memoryview] = []
            while i < len(views) or pending:
                while len(pending) < 64 and i < len(views):
                    pending.append(views[i])
                    i += 1
                n = conn.sendmsg(pending)
                while n:
                    if n >= len(pending[0]):
                        n -= len(pending.pop(0))
                    else:
                        pending[0] = pending[0][n:]
                        n = 0
            conn.recv(1)
            return time.perf_counter() - t0


def iov_recv(cache, port: int, blocks: list[int]) -> float:
    # Straight into the destination blocks (recv_into each): no scatter copy.
    views = _block_views(cache, blocks)
    with _connect(port) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"g")
        for v in views:
            while len(v):
                n = sock.recv_into(v)
                if n == 0:
                    raise ConnectionError("sender closed early")
                v = v[n:]
        elapsed = time.perf_counter() - t0
        sock.sendall(b"d")
        return elapsed


def zmq_send(cache, port: int, chunk: int) -> float:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.bind(f"tcp://127.0.0.1:{port}")
    ack = ctx.socket(zmq.PULL)
    ack.bind(f"tcp://127.0.0.1:{port + 1}")
    ack.recv()  # "go"
    t0 = time.perf_counter()
    for v in _byte_views(cache):
        for off in range(0, len(v), chunk):
            s.send(v[off: off + chunk], copy=False)
    ack.recv()
    elapsed = time.perf_counter() - t0
    ctx.destroy(linger=0)
    return elapsed


def zmq_recv(cache, port: int, chunk: int) -> float:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.connect(f"tcp://127.0.0.1:{port}")
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"tcp://127.0.0.1:{port + 1}")
    time.sleep(0.2)  # let both connections come up before the clock starts
    total = sum(len(v) for v in _byte_views(cache))
    t0 = time.perf_counter()
    ack.send(b"g")
    got = 0
    while got < total:
        got += len(s.recv(copy=False).buffer)
    elapsed = time.perf_counter() - t0
    ack.send(b"d")
    time.sleep(0.05)
    ctx.destroy(linger=0)
    return elapsed


def memcpy(cache) -> float:
    # Copy every tensor onto another of the same shape (cold memory, same bytes).
    by_shape: dict = {}
    for t in cache.tensors:
        by_shape.setdefault(tuple(t.shape), []).append(t)
    def once():
        for group in by_shape.values():
            for i, t in enumerate(group):
                group[(i + 1) % len(group)].copy_(t)

    once()  # warm: first-call overheads are not the memory's speed
    t0 = time.perf_counter()
    once()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# The driver

@dataclass
class Result:
    layout: str
    tokens: int
    transport: str
    chunk_mb: float
    pool_mb: float
    bytes: int
    wall_s: list[float] = field(default_factory=list)
    gather_s: list[float] = field(default_factory=list)
    scatter_s: list[float] = field(default_factory=list)
    gather_cpu_s: list[float] = field(default_factory=list)
    scatter_cpu_s: list[float] = field(default_factory=list)
    p_cpu_s: list[float] = field(default_factory=list)
    d_cpu_s: list[float] = field(default_factory=list)
    iov_s: list[float] = field(default_factory=list)
    raw_s: list[float] = field(default_factory=list)
    zmq_s: list[float] = field(default_factory=list)
    memcpy_s: list[float] = field(default_factory=list)
    p_rss_added: int = 0
    d_rss_added: int = 0
    ok: bool = True

    def gbps(self, seconds: list[float]) -> float:
        return self.bytes / statistics.median(seconds) / 1e9 if seconds else float("nan")

    def summary(self) -> dict:
        wall = statistics.median(self.wall_s)
        g = statistics.median(self.gather_s)
        s = statistics.median(self.scatter_s)
        gc_, sc = statistics.median(self.gather_cpu_s), statistics.median(self.scatter_cpu_s)
        cpu = statistics.median(self.p_cpu_s) + statistics.median(self.d_cpu_s)
        return {
            "layout": self.layout, "tokens": self.tokens, "transport": self.transport,
            "MiB": self.bytes / MB, "GB/s": self.gbps(self.wall_s),
            "memcpy GB/s": self.gbps(self.memcpy_s), "socket GB/s": self.gbps(self.raw_s),
            "zmq GB/s": self.gbps(self.zmq_s), "iovec GB/s": self.gbps(self.iov_s),
            "x iovec": self.gbps(self.wall_s) / self.gbps(self.iov_s),
            "x memcpy": self.gbps(self.wall_s) / self.gbps(self.memcpy_s),
            "x socket": self.gbps(self.wall_s) / self.gbps(self.raw_s),
            "x zmq": self.gbps(self.wall_s) / self.gbps(self.zmq_s),
            "wall ms": wall * 1e3, "gather ms": g * 1e3, "scatter ms": s * 1e3,
            "rest ms": max(0.0, wall - g - s) * 1e3, "gather+scatter %": 100 * (g + s) / wall,
            "gather cpu ms": gc_ * 1e3, "scatter cpu ms": sc * 1e3, "P+D cpu ms": cpu * 1e3,
            "gather+scatter % of cpu": 100 * (gc_ + sc) / cpu,
            "P RSS+ MiB": self.p_rss_added / MB, "D RSS+ MiB": self.d_rss_added / MB,
            "ok": self.ok,
        }


class Pair:
    def __init__(self, rcvhwm: int = 0):
        ctx = mp.get_context("spawn")
        self.p, p_child = ctx.Pipe()
        self.d, d_child = ctx.Pipe()
        self.procs = [ctx.Process(target=producer_main, args=(p_child,), daemon=True),
                      ctx.Process(target=consumer_main, args=(d_child, rcvhwm), daemon=True)]
        for pr in self.procs:
            pr.start()

    @staticmethod
    def call(conn, cmd, arg=None):
        conn.send((cmd, arg))
        return conn

    @staticmethod
    def reply(conn):
        status, value = conn.recv()
        assert status == "ok", value
        return value

    def both(self, pcmd, parg, dcmd, darg):
        self.call(self.p, pcmd, parg)
        self.call(self.d, dcmd, darg)
        return self.reply(self.p), self.reply(self.d)

    def close(self):
        for c in (self.p, self.d):
            c.send(("quit", None))
        for pr in self.procs:
            pr.join(10)
            if pr.is_alive():
                pr.terminate()


def start_profiles(pair: "Pair", out: Path, tag: str) -> list:
    """py-spy on both worker processes (collapsed stacks, native frames off)."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([spy, "record", "--pid", str(pr.pid), "--rate", "250", "--format", "raw",
                              "--threads", "-o", str(out / f"{tag}-{role}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for role, pr in zip(("P", "D"), pair.procs)]


def stop_profiles(procs: list) -> None:
    import signal

    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except Exception:  # noqa: BLE001 - a profile is optional
            p.kill()


def run_case(pair: Pair, layout: Layout, tokens: int, transport: str, chunk_mb: float,
             pool_mb: float, reps: int, seed: int, profile: Path | None = None) -> Result:
    from vllm_ascend_pd.testing.servers import free_kv_port, free_port, port_is_free

    nb = -(-tokens // layout.block_size)
    while True:  # control ports and the group transport's rendezvous ports, all free
        port = free_kv_port(span=3)
        if port_is_free(port + GROUP_PORT_OFFSET) and port_is_free(port + 2 + GROUP_PORT_OFFSET):
            break
    rss_p, rss_d = pair.both("setup", (layout, nb, transport, port, chunk_mb, pool_mb),
                             "setup", (layout, nb, transport, port, chunk_mb, pool_mb))
    import random

    rnd = random.Random(seed)
    res = Result(layout.name, tokens, transport, chunk_mb, pool_mb, nb * layout.bytes_per_token() * layout.block_size)
    hwm_p = hwm_d = 0
    spies: list = []
    for rep in range(reps + 1):  # the first pull also sets up the link: not timed
        if rep == 1 and profile is not None:
            spies = start_profiles(pair, profile, f"{layout.name}-{tokens}-{transport}")
            time.sleep(1.0)  # py-spy attaches
        remote = rnd.sample(range(nb), nb)
        local = rnd.sample(range(nb), nb)
        tid, rid = secrets.token_urlsafe(24), f"req-{rep}"
        sp, sd = pair.both("serve", (tid, rid, remote), "pull", (tid, rid, remote, local))
        hwm_p, hwm_d = max(hwm_p, sp["hwm"]), max(hwm_d, sd["hwm"])
        if sd["failed"]:
            res.ok = False
            break
        if rep == 0:
            # Exactness: the same blocks arrived where the consumer asked.
            cp, cd = pair.both("checksum", remote, "checksum", local)
            if cp != cd:
                res.ok = False
            continue
        res.wall_s.append(sd["wall_s"])
        res.gather_s.append(sp["gather_s"])
        res.scatter_s.append(sd["scatter_s"])
        res.gather_cpu_s.append(sp["gather_cpu_s"])
        res.scatter_cpu_s.append(sd["scatter_cpu_s"])
        res.p_cpu_s.append(sp["cpu_s"])
        res.d_cpu_s.append(sd["cpu_s"])
        # Ceilings right after each timed pull, so load changes hit both alike.
        _ceilings(pair, res, nb, int(max(chunk_mb * MB, 1)), rnd)
    if spies:
        stop_profiles(spies)
    res.p_rss_added, res.d_rss_added = hwm_p - rss_p, hwm_d - rss_d
    return res


def _ceilings(pair: Pair, res: Result, nb: int, chunk: int, rnd) -> None:
    from vllm_ascend_pd.testing.servers import free_port

    p = free_port(span=2)
    _, raw_d = pair.both("raw_send", p, "raw_recv", p)
    res.raw_s.append(raw_d)
    p = free_port(span=2)
    blocks = rnd.sample(range(nb), nb)
    _, iov = pair.both("iov_send", (p, blocks), "iov_recv", (p, rnd.sample(range(nb), nb)))
    res.iov_s.append(iov)
    p = free_port(span=2)
    _, z = pair.both("zmq_send", (p, chunk), "zmq_recv", (p, chunk))
    res.zmq_s.append(z)
    res.memcpy_s.append(pair.reply(pair.call(pair.d, "memcpy")))


def markdown(rows: list[dict]) -> str:
    cols = ["layout", "tokens", "transport", "MiB", "GB/s", "x socket", "x zmq", "x iovec", "x memcpy",
            "socket GB/s", "zmq GB/s", "iovec GB/s", "memcpy GB/s", "wall ms", "gather ms", "scatter ms",
            "rest ms", "gather+scatter %", "gather cpu ms", "scatter cpu ms", "P+D cpu ms",
            "gather+scatter % of cpu", "P RSS+ MiB", "D RSS+ MiB", "ok"]
    return table(rows, cols, two_decimals=lambda c: c.startswith("x "))


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    labels = [f"{r['layout'].split('-')[0]}\n{r['tokens'] // 1024}k\n{r['transport']}" for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(2, 1, figsize=(min(16, max(8, 1.1 * len(rows))), 8))
    w = 0.16
    for k, (key, name) in enumerate([("GB/s", "transfer"), ("socket GB/s", "raw socket"),
                                     ("iovec GB/s", "socket, block iovecs"),
                                     ("zmq GB/s", "zmq frames"), ("memcpy GB/s", "memcpy")]):
        a.bar([i + (k - 2) * w for i in x], [r[key] for r in rows], w, label=name)
    a.set_xticks(list(x), labels, fontsize=7)
    a.set_ylabel("GB/s")
    a.set_title("throughput vs ceilings (same run)")
    a.legend(fontsize=7)
    bottom = [0.0] * len(rows)
    for r in rows:
        r["other cpu ms"] = max(0.0, r["P+D cpu ms"] - r["gather cpu ms"] - r["scatter cpu ms"])
    for key, color in [("gather cpu ms", "tab:orange"), ("scatter cpu ms", "tab:green"),
                       ("other cpu ms", "tab:gray")]:
        vals = [100 * r[key] / r["P+D cpu ms"] for r in rows]
        b.bar(list(x), vals, 0.6, bottom=bottom, label=key.replace(" ms", ""), color=color)
        bottom = [p + v for p, v in zip(bottom, vals)]
    b.axhline(15, color="red", lw=0.8, ls="--", label="15% target (gather+scatter)")
    b.set_xticks(list(x), labels, fontsize=7)
    b.set_ylabel("% of P+D process CPU time during the transfer")
    b.set_title("CPU split (other: ZMQ, kernel socket copies, Python)")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(results: Path, png: Path) -> None:
    """Redraw a figure from a results JSON (no measurement)."""
    data = json.loads(results.read_text())
    m = data["meta"]
    plot(data["rows"], png, f"{m['command']} ({m['when']}; chunk {m['chunk_mb']} MiB, pool {m['pool_mb']} MiB)")


def main(argv: list[str] | None = None) -> None:
    defaults = ConnectorConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k and 4k tokens, 2 repetitions")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--transports", nargs="+", default=[t for t in TRANSPORTS if t not in NPU_ONLY])
    ap.add_argument("--chunk-mb", type=float, default=defaults.chunk_mb)
    ap.add_argument("--pool-mb", type=float, default=defaults.buffer_pool_mb)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--spin", action="store_true",
                    help="poll without waiting between pumps that made no progress")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy both processes during the timed pulls of the largest case into this directory")
    ap.add_argument("--rcvhwm", type=int, default=0,
                    help="experiment: cap the consumer's ZMQ receive queue at this many messages")
    ap.add_argument("--tag", default="", help="suffix for the output files (before/after runs)")
    args = ap.parse_args(argv)
    if args.spin:
        os.environ["TRANSFER_BENCH_SPIN"] = "1"
    if args.quick:
        args.tokens, args.reps = [t for t in args.tokens if t <= 4096], 2
    load0 = os.getloadavg()
    results: list[Result] = []
    for layout in args.layouts:
        for tokens in args.tokens:
            for tr in args.transports:
                # Fresh processes per case, so RSS figures do not inherit freed heap.
                pair = Pair(args.rcvhwm)
                try:
                    prof = args.profile if args.profile and tokens == max(args.tokens) else None
                    r = run_case(pair, LAYOUTS[layout], tokens, tr, args.chunk_mb, args.pool_mb, args.reps,
                                 seed=tokens, profile=prof)
                finally:
                    pair.close()
                results.append(r)
                print(json.dumps(r.summary()), flush=True)
    load1 = os.getloadavg()
    rows = [r.summary() for r in results]
    tag = f"-{args.tag}" if args.tag else ""
    meta = {
        **run_id("transfer", argv, f", torch {torch.__version__}"),
        "load_before": load0, "load_after": load1,
        "chunk_mb": args.chunk_mb, "pool_mb": args.pool_mb, "reps": args.reps,
    }
    (OUT_DIR / f"results{tag}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "raw": [asdict(r) for r in results]}, indent=1))
    md = markdown(rows)
    (OUT_DIR / f"results{tag}.md").write_text(
        f"{header(meta)}, "
        f"chunk {args.chunk_mb} MiB, pool {args.pool_mb} MiB, median of {args.reps}, driver {'spin' if args.spin else 'wait'}\n\n{md}\n")
    plot(rows, DOCS / f"benchmarks-transfer{tag}.png",
         f"{meta['command']} ({meta['when']}; chunk {args.chunk_mb} MiB, pool {args.pool_mb} MiB)")
    print(md)


if __name__ == "__main__":
    main()
