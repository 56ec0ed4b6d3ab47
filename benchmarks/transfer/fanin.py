"""Fan-in: one consumer rank pulling a request from two producer ranks at once
(P TP2 -> D TP1, each producer rank serving half the KV heads) against pulling
the same bytes from one producer rank (TP1 -> TP1, whole blocks), in one run.

    flock /tmp/vllm-heavy.lock python -m benchmarks.transfer.fanin [--quick]

Four processes stay up for a whole case: the TP1 producer, the two TP2 producer
ranks, and the consumer (whose one ``Puller`` serves both, as a D instance
pulls from P instances of any TP size). The connector pieces and helpers are
``run.py``'s; only the sharded caches and the n-stream socket ceiling are new.

Per timed repetition, in alternating order: the TP1 pull, the TP2 pull, and
the raw-socket ceiling with one stream and with two streams into the
consumer (so a change in the machine's load hits all four alike).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import random
import secrets
import selectors
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.report import header, run_id, table
from benchmarks.transfer.run import (
    MB, NPU_ONLY, OUT_DIR, Hooks, Pair, _connect, _options, pull_until_done, raw_send, serve_until_pulled,
)
from vllm_ascend_pd.config import GROUP_PORT_OFFSET, ConnectorConfig
from vllm_ascend_pd.transport import TRANSPORTS


@dataclass(frozen=True)
class FanLayout:
    """A standard-attention model's cache: per layer (k, v), each block either
    tokens-first ``(blocks, block_size, heads, head_dim)`` (vllm-ascend: a
    head slice of a block is strided, so tcp stages it) or heads-first
    ``(blocks, heads, block_size, head_dim)`` (vLLM's logical view: a head
    slice of a block is contiguous, so tcp moves it without a copy)."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    heads_first: bool = False
    block_size: int = 128
    dtype: str = "bfloat16"

    def shape(self, nb: int, heads: int) -> tuple[int, ...]:
        if self.heads_first:
            return (nb, heads, self.block_size, self.head_dim)
        return (nb, self.block_size, heads, self.head_dim)

    def axes(self):
        from vllm_ascend_pd.kv_layout import CacheAxes

        return CacheAxes(block=0, heads=1, tokens=2) if self.heads_first else CacheAxes(block=0, tokens=1, heads=2)

    def bytes(self, nb: int) -> int:
        el = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.layers * nb * self.block_size * self.kv_heads * self.head_dim * el


LAYOUTS = {
    # Llama-3-8B: 32 layers, 8 KV heads of 128; 128 KiB per token in bf16.
    "llama3-8b": FanLayout("llama3-8b", 32, 8, 128),
    "llama3-8b-hnd": FanLayout("llama3-8b-hnd", 32, 8, 128, heads_first=True),
    # For the smoke test only.
    "tiny": FanLayout("tiny", 2, 4, 16, block_size=16),
}


def make_rank_cache(layout: FanLayout, nb: int, heads: range | None, seed: int | None):
    """One rank's filled cache holding global KV heads ``heads`` (None: all).
    Every (block, head) has its own value, the same in every rank that
    holds that head, so a consumer's blocks can be checked head by head."""
    from vllm_ascend_pd.kv_layout import PagedKVCache

    heads = heads if heads is not None else range(layout.kv_heads)
    dtype = getattr(torch, layout.dtype)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    caches = {}
    for i in range(layout.layers):
        parts = []
        for _ in range(2):  # k, v
            t = torch.empty(layout.shape(nb, len(heads)), dtype=dtype)
            if gen is None:
                t.zero_()
            else:
                vals = torch.randn(nb, layout.kv_heads, generator=gen)[:, heads.start:heads.stop]
                view = (nb, len(heads), 1, 1) if layout.heads_first else (nb, 1, len(heads), 1)
                t.copy_(vals.reshape(view).expand_as(t))
            parts.append(t)
        caches[f"model.layers.{i}.self_attn"] = tuple(parts)
    return PagedKVCache.from_vllm(caches, nb, layout.block_size, lambda *_: layout.axes(),
                                  num_kv_heads=layout.kv_heads)


def head_marks(cache, blocks: list[int]) -> list[torch.Tensor]:
    """Per tensor, per listed block and local head: (min, max) over the
    block's tokens and head dim. Exact, and a partly written block shows."""
    idx = torch.tensor(blocks)
    out = []
    for t, ax in zip(cache.tensors, cache.head_axes):
        sel = t.index_select(0, idx).float().movedim(ax, 1).flatten(2)
        out.append(torch.stack([sel.amin(2), sel.amax(2)], dim=2))
    return out


# --------------------------------------------------------------------------
# Worker processes: commands over a Pipe, as in run.py.

def producer_main(conn) -> None:
    from vllm_ascend_pd.connector.kv_server import KVServer
    from vllm_ascend_pd.connector.stats import TransferStats
    from vllm_ascend_pd.connector.transfers import LeaseTable
    from vllm_ascend_pd.connector.tp_map import rank_heads
    from vllm_ascend_pd.transport import create_transport

    torch.set_num_threads(1)
    Hooks.install()
    cache = server = leases = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            if server is not None:
                server.close()
            return
        if cmd == "setup":
            if server is not None:
                server.close()
            server = cache = None
            gc.collect()
            layout, nb, transport, kv_port, tp_size, rank, chunk_mb, pool_mb = arg
            cache = make_rank_cache(layout, nb, rank_heads(layout.kv_heads, tp_size, rank), seed=7)
            gc.collect()
            group_port = kv_port + GROUP_PORT_OFFSET + rank
            opts = replace(_options(chunk_mb, pool_mb, group_port), local_rank=rank, role="producer")
            leases = LeaseTable(600)
            server = KVServer(
                bind_host="127.0.0.1", port=kv_port + rank, engine_id="P", tp_rank=rank,
                layout=cache.describe(tp_size), leases=leases, transport=create_transport(transport, cache, opts),
                stats=TransferStats(), secret="", registration_grace_s=5.0,
            )
            conn.send(("ok", None))
        elif cmd == "serve":
            tid, rid, blocks = arg
            leases.register(rid, tid, blocks)
            c0 = time.process_time()
            serve_until_pulled(server, leases, rid, spin=False)
            conn.send(("ok", {"cpu_s": time.process_time() - c0}))
        elif cmd == "marks":
            conn.send(("ok", head_marks(cache, arg)))
        elif cmd == "raw_send":
            conn.send(("ok", raw_send(cache, arg)))


def consumer_main(conn) -> None:
    from vllm_ascend_pd.connector.metadata import RecvSpec
    from vllm_ascend_pd.connector.puller import Puller
    from vllm_ascend_pd.connector.stats import TransferStats
    from vllm_ascend_pd.transport import create_transport

    torch.set_num_threads(1)
    Hooks.install()
    cache = puller = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            if puller is not None:
                puller.close()
            return
        if cmd == "setup":
            if puller is not None:
                puller.close()
            puller = cache = None
            gc.collect()
            layout, nb, transport, chunk_mb, pool_mb = arg
            cache = make_rank_cache(layout, nb, None, seed=None)
            opts = replace(_options(chunk_mb, pool_mb, 0), role="consumer")
            puller = Puller(engine_id="D", tp_rank=0, tp_size=1, layout=cache.describe(1),
                            transport=create_transport(transport, cache, opts), stats=TransferStats(),
                            secret="", connect_timeout_s=30)
            conn.send(("ok", None))
        elif cmd == "pull":
            tid, rid, remote, local, kv_port, remote_tp = arg
            Hooks.start()
            c0 = time.process_time()
            t0 = time.perf_counter()
            puller.submit(RecvSpec("d-" + rid, "127.0.0.1", kv_port, tid, rid, remote, local,
                                   len(local) * cache.block_size, remote_tp_size=remote_tp))
            failed = pull_until_done(puller, spin=False)
            wall = time.perf_counter() - t0
            conn.send(("ok", {**Hooks.stop(), "wall_s": wall, "cpu_s": time.process_time() - c0,
                              "failed": bool(failed)}))
        elif cmd == "zero":
            for t in cache.tensors:
                t.zero_()
            conn.send(("ok", None))
        elif cmd == "marks":
            conn.send(("ok", head_marks(cache, arg)))
        elif cmd == "raw_recv":
            conn.send(("ok", raw_recv_streams(cache, arg)))


def raw_recv_streams(cache, ports: list[int]) -> float:
    """The raw-socket ceiling with ``len(ports)`` streams into one thread:
    each sender (run.raw_send) sends its whole cache; stream ``i`` lands in
    the i-th share of this cache's tensors (same total bytes)."""
    views = [t.view(torch.uint8).reshape(-1).numpy() for t in cache.tensors]
    share = len(views) // len(ports)
    socks = [_connect(p) for p in ports]
    sel = selectors.DefaultSelector()
    todo = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        todo[s] = [memoryview(v) for v in views[i * share:(i + 1) * share]]
        sel.register(s, selectors.EVENT_READ)
    t0 = time.perf_counter()
    for s in socks:
        s.send(b"g")
    while todo:
        for key, _ in sel.select(5.0):
            s = key.fileobj
            bufs = todo[s]
            try:
                n = s.recv_into(bufs[0])
            except BlockingIOError:
                continue
            if n == 0:
                raise ConnectionError("sender closed early")
            bufs[0] = bufs[0][n:]
            if not len(bufs[0]):
                bufs.pop(0)
                if not bufs:
                    sel.unregister(s)
                    del todo[s]
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.setblocking(True)
        s.sendall(b"d")
        s.close()
    sel.close()
    return elapsed


# --------------------------------------------------------------------------
# Driver

@dataclass
class Result:
    layout: str
    tokens: int
    transport: str
    bytes: int
    one_s: list[float] = field(default_factory=list)  # TP1 -> TP1 pull
    two_s: list[float] = field(default_factory=list)  # TP2 -> TP1 pull
    raw1_s: list[float] = field(default_factory=list)
    raw2_s: list[float] = field(default_factory=list)
    one_cpu_s: list[float] = field(default_factory=list)  # P + D process CPU
    two_cpu_s: list[float] = field(default_factory=list)  # P0 + P1 + D
    two_d_cpu_s: list[float] = field(default_factory=list)
    one_d_cpu_s: list[float] = field(default_factory=list)
    one_scatter_s: list[float] = field(default_factory=list)  # the consumer's staged copies
    two_scatter_s: list[float] = field(default_factory=list)
    ok: bool = True

    def gbps(self, seconds: list[float]) -> float:
        return self.bytes / statistics.median(seconds) / 1e9 if seconds else float("nan")

    def summary(self) -> dict:
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        one, two = self.gbps(self.one_s), self.gbps(self.two_s)
        r1, r2 = self.gbps(self.raw1_s), self.gbps(self.raw2_s)
        # Ratio of each repetition's pair (same minute of load), then the median.
        pairs = [a / b for a, b in zip(self.one_s, self.two_s)]
        return {
            "layout": self.layout, "tokens": self.tokens, "transport": self.transport, "MiB": self.bytes / MB,
            "TP1 ms": med(self.one_s) * 1e3, "TP2 ms": med(self.two_s) * 1e3,
            "TP1 GB/s": one, "TP2 GB/s": two, "x TP2/TP1": two / one,
            "x TP2/TP1 paired": med(pairs),
            "x TP2/TP1 min": min(pairs, default=float("nan")), "x TP2/TP1 max": max(pairs, default=float("nan")),
            "socket 1 GB/s": r1, "socket 2 GB/s": r2, "x socket 2/1": r2 / r1,
            "TP1 cpu ms": med(self.one_cpu_s) * 1e3, "TP2 cpu ms": med(self.two_cpu_s) * 1e3,
            "TP1 D cpu ms": med(self.one_d_cpu_s) * 1e3, "TP2 D cpu ms": med(self.two_d_cpu_s) * 1e3,
            "TP1 scatter ms": med(self.one_scatter_s) * 1e3, "TP2 scatter ms": med(self.two_scatter_s) * 1e3,
            "ok": self.ok,
        }


class Procs:
    """The consumer and three producers: TP1 rank 0, TP2 ranks 0 and 1."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for target in (consumer_main, producer_main, producer_main, producer_main):
            mine, child = ctx.Pipe()
            self.conns.append(mine)
            self.procs.append(ctx.Process(target=target, args=(child,), daemon=True))
        for pr in self.procs:
            pr.start()
        self.d, self.one, self.two = self.conns[0], self.conns[1], self.conns[2:]

    @staticmethod
    def many(calls: list[tuple]) -> list:
        """Send every (conn, cmd, arg), then collect the replies in order."""
        for conn, cmd, arg in calls:
            Pair.call(conn, cmd, arg)
        return [Pair.reply(conn) for conn, _, _ in calls]

    def close(self):
        for c in self.conns:
            try:
                c.send(("quit", None))
            except OSError:
                pass
        for pr in self.procs:
            pr.join(10)
            if pr.is_alive():
                pr.terminate()


def _ports() -> tuple[int, int]:
    from vllm_ascend_pd.testing.servers import free_kv_port

    span = GROUP_PORT_OFFSET + 2  # control kv_port + r, data kv_port + 64 + r
    a = free_kv_port(span=span)
    b = free_kv_port(avoid=set(range(a, a + span)), span=span)
    return a, b


def _pull_one(pr: Procs, res: Result, rnd, nb: int, port: int, rep: int) -> bool:
    remote, local = rnd.sample(range(nb), nb), rnd.sample(range(nb), nb)
    tid, rid = secrets.token_urlsafe(24), f"one-{rep}"
    sp, sd = pr.many([(pr.one, "serve", (tid, rid, remote)), (pr.d, "pull", (tid, rid, remote, local, port, 1))])
    if sd["failed"]:
        return False
    if rep == 0:
        want, got = pr.many([(pr.one, "marks", remote), (pr.d, "marks", local)])
        return all(torch.equal(w, g) for w, g in zip(want, got))
    res.one_s.append(sd["wall_s"])
    res.one_cpu_s.append(sp["cpu_s"] + sd["cpu_s"])
    res.one_d_cpu_s.append(sd["cpu_s"])
    res.one_scatter_s.append(sd["scatter_s"])
    return True


def _pull_two(pr: Procs, res: Result, rnd, nb: int, port: int, rep: int) -> bool:
    remote, local = rnd.sample(range(nb), nb), rnd.sample(range(nb), nb)
    tid, rid = secrets.token_urlsafe(24), f"two-{rep}"
    s0, s1, sd = pr.many([(pr.two[0], "serve", (tid, rid, remote)), (pr.two[1], "serve", (tid, rid, remote)),
                          (pr.d, "pull", (tid, rid, remote, local, port, 2))])
    if sd["failed"]:
        return False
    if rep == 0:
        m0, m1, got = pr.many([(pr.two[0], "marks", remote), (pr.two[1], "marks", remote), (pr.d, "marks", local)])
        # Producer rank 0's heads then rank 1's make up the consumer's.
        return all(torch.equal(torch.cat([a, b], dim=1), g) for a, b, g in zip(m0, m1, got))
    res.two_s.append(sd["wall_s"])
    res.two_cpu_s.append(s0["cpu_s"] + s1["cpu_s"] + sd["cpu_s"])
    res.two_d_cpu_s.append(sd["cpu_s"])
    res.two_scatter_s.append(sd["scatter_s"])
    return True


def _raw(pr: Procs, res: Result, streams: int) -> None:
    from vllm_ascend_pd.testing.servers import free_port

    senders = [pr.one] if streams == 1 else pr.two
    ports = [free_port(span=1) for _ in senders]
    while len(set(ports)) < len(ports):
        ports = [free_port(span=1) for _ in senders]
    out = pr.many([*((c, "raw_send", p) for c, p in zip(senders, ports)), (pr.d, "raw_recv", ports)])
    (res.raw1_s if streams == 1 else res.raw2_s).append(out[-1])


def run_case(pr: Procs, layout: FanLayout, tokens: int, transport: str, chunk_mb: float, pool_mb: float,
             reps: int, seed: int) -> Result:
    nb = -(-tokens // layout.block_size)
    a, b = _ports()
    setups = [(pr.d, "setup", (layout, nb, transport, chunk_mb, pool_mb)),
              (pr.one, "setup", (layout, nb, transport, a, 1, 0, chunk_mb, pool_mb)),
              (pr.two[0], "setup", (layout, nb, transport, b, 2, 0, chunk_mb, pool_mb)),
              (pr.two[1], "setup", (layout, nb, transport, b, 2, 1, chunk_mb, pool_mb))]
    pr.many(setups)
    res = Result(layout.name, tokens, transport, layout.bytes(nb))
    rnd = random.Random(seed)
    for rep in range(reps + 1):  # the first pulls also set up the links and check bytes: not timed
        steps = [lambda: _pull_one(pr, res, rnd, nb, a, rep), lambda: _pull_two(pr, res, rnd, nb, b, rep)]
        if rep % 2:
            steps.reverse()  # neither goes always first
        for step in steps:
            if rep == 0:
                pr.many([(pr.d, "zero", None)])
            if not step():
                res.ok = False
                return res
        if rep:
            for streams in ((1, 2) if rep % 2 else (2, 1)):
                _raw(pr, res, streams)
    return res


COLS = ["layout", "tokens", "transport", "MiB", "TP1 ms", "TP2 ms", "TP1 GB/s", "TP2 GB/s", "x TP2/TP1",
        "x TP2/TP1 paired", "x TP2/TP1 min", "x TP2/TP1 max", "socket 1 GB/s", "socket 2 GB/s", "x socket 2/1",
        "TP1 cpu ms", "TP2 cpu ms", "TP1 D cpu ms", "TP2 D cpu ms", "TP1 scatter ms",
        "TP2 scatter ms", "ok"]


def markdown(rows: list[dict]) -> str:
    return table(rows, COLS, two_decimals=lambda c: c.startswith("x "))


def main(argv: list[str] | None = None) -> list[dict]:
    defaults = ConnectorConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4k tokens only, 2 repetitions")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--layouts", nargs="+", default=["llama3-8b", "llama3-8b-hnd"], choices=list(LAYOUTS))
    ap.add_argument("--transports", nargs="+", default=["tcp", "gloo"],
                    choices=[t for t in TRANSPORTS if t not in NPU_ONLY])
    ap.add_argument("--chunk-mb", type=float, default=defaults.chunk_mb)
    ap.add_argument("--pool-mb", type=float, default=defaults.buffer_pool_mb)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="directory for results-fanin[-TAG].{md,json}")
    ap.add_argument("--tag", default="", help="suffix for the output files (repeat runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.reps = [t for t in args.tokens if t <= 4096] or [4096], 2
    cores = len(os.sched_getaffinity(0))
    load0 = os.getloadavg()
    results: list[Result] = []
    # One set of processes for every case: each starts in about 8 s here
    # (importing vLLM), which would dominate the run.
    pr = Procs()
    try:
        for layout in args.layouts:
            for tokens in args.tokens:
                for tr in args.transports:
                    r = run_case(pr, LAYOUTS[layout], tokens, tr, args.chunk_mb, args.pool_mb, args.reps,
                                 seed=tokens)
                    results.append(r)
                    print(json.dumps(r.summary()), flush=True)
    finally:
        pr.close()
    load1 = os.getloadavg()
    rows = [r.summary() for r in results]
    meta = {
        **run_id("transfer.fanin", argv, f", torch {torch.__version__}"),
        "load_before": load0, "load_after": load1, "cores": cores,
        "chunk_mb": args.chunk_mb, "pool_mb": args.pool_mb, "reps": args.reps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "results-fanin" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "raw": [asdict(r) for r in results]}, indent=1))
    md = markdown(rows)
    (args.out / f"{stem}.md").write_text(
        f"{header(meta)}, {cores} cores for 4 processes (TP1: 2 busy, TP2: 3 busy), "
        f"chunk {args.chunk_mb} MiB, pool {args.pool_mb} MiB, median of {args.reps}\n\n{md}\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
