"""The process-group transport (gloo on the CPU) under the real control plane:
exact bytes for every cache shape vLLM and vllm-ascend hand us, several
consumers on one producer rank, and dead peers failing fast."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import socket
import time

import psutil
import pytest
import torch

from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.connector.puller import Puller
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.connector.worker import resolve_transport
from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache
from vllm_ascend_pd.testing.servers import free_kv_port
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.transport import TRANSPORTS, TransferError, TransportOptions, create_transport

NB = 48
BS = 16
KINDS = ("tensor", "tensor_dim1", "kv_tuple", "mla")


def make_cache(kind: str, seed: int | None) -> PagedKVCache:
    """Synthetic paged caches; ``seed=None`` gives zeros (a fresh consumer)."""
    g = torch.Generator().manual_seed(seed or 0)

    def t(*shape, dtype=torch.float32):
        if seed is None:
            return torch.zeros(shape, dtype=dtype)
        return torch.randn(shape, generator=g).to(dtype)

    if kind == "tensor":  # one block-first tensor per layer
        caches = {f"l{i}": t(NB, 2, BS, 4, 8) for i in range(3)}
        return PagedKVCache.from_vllm(caches, NB, BS, lambda *_: CacheAxes(block=0))
    if kind == "tensor_dim1":  # (2, blocks, ...): a strided view per layer
        caches = {f"l{i}": t(2, NB, BS, 4, 8) for i in range(3)}
        return PagedKVCache.from_vllm(caches, NB, BS, lambda *_: CacheAxes(block=1))
    if kind == "kv_tuple":  # vllm-ascend: (k, v), bf16
        caches = {f"l{i}": (t(NB, BS, 4, 8, dtype=torch.bfloat16), t(NB, BS, 4, 8, dtype=torch.bfloat16))
                  for i in range(3)}
        return PagedKVCache.from_vllm(caches, NB, BS, lambda *_: CacheAxes(block=0))
    if kind == "mla":  # (k_nope, k_pe) of different widths
        caches = {f"l{i}": (t(NB, BS, 1, 32), t(NB, BS, 1, 8)) for i in range(3)}
        return PagedKVCache.from_vllm(caches, NB, BS, lambda *_: CacheAxes(block=0), is_mla=True)
    raise ValueError(kind)


def options(group_port: int, serve: bool, timeout: float = 5.0) -> TransportOptions:
    # Small chunks and a small pool: many chunks per transfer, buffers reused.
    return TransportOptions(
        chunk_bytes=4096, pool_bytes=3 * 8192, idle_timeout_s=timeout,
        host="127.0.0.1", group_port=group_port, role="producer" if serve else "consumer",
    )


class Producer:
    def __init__(self, kind: str, kv_port: int, timeout: float = 5.0):
        self.cache = make_cache(kind, seed=1)
        self.leases = LeaseTable(60)
        self.stats = TransferStats()
        self.transport = create_transport("gloo", self.cache, options(kv_port + GROUP_PORT_OFFSET, True, timeout))
        self.server = KVServer(
            bind_host="127.0.0.1", port=kv_port, engine_id="P", tp_rank=0, layout=self.cache.describe(),
            leases=self.leases, transport=self.transport, stats=self.stats, secret="", registration_grace_s=0.5,
        )

    def close(self):
        self.server.close()
        self.transport.close()


class Consumer:
    def __init__(self, kind: str, name: str, timeout: float = 5.0):
        self.cache = make_cache(kind, seed=None)
        self.stats = TransferStats()
        self.transport = create_transport("gloo", self.cache, options(0, False, timeout))
        self.puller = Puller(
            engine_id=name, tp_rank=0, layout=self.cache.describe(), transport=self.transport,
            stats=self.stats, secret="", connect_timeout_s=timeout,
        )

    def close(self):
        self.puller.close()
        self.transport.close()


def drive(pumps, consumers, want: int, timeout: float = 30.0):
    """Pump everything until ``want`` results arrived; returns (done, failed)."""
    done: set[str] = set()
    failed: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in pumps:
            p(0.005)
        for c in consumers:
            d, f = c.puller.take_results()
            done |= d
            failed |= f
        if len(done) >= want:
            return done, failed
    raise AssertionError(f"only {len(done)}/{want} results after {timeout}s")


def tid(i: int) -> str:
    return f"{i:024d}"


def check_blocks(src: PagedKVCache, dst: PagedKVCache, remote: list[int], local: list[int], kind: str):
    fresh = make_cache(kind, seed=None)
    untouched = [b for b in range(NB) if b not in local]
    for s, d, f in zip(src.tensors, dst.tensors, fresh.tensors):
        # Bytes, not values: bf16/NaN-safe and exact.
        assert torch.equal(d[local].contiguous().view(torch.uint8), s[remote].contiguous().view(torch.uint8))
        assert torch.equal(d[untouched], f[untouched])


@pytest.fixture
def kv_port():
    return free_kv_port(span=GROUP_PORT_OFFSET + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_random_block_lists_arrive_byte_exact(kind, kv_port):
    prod, cons = Producer(kind, kv_port), Consumer(kind, "D")
    try:
        g = torch.Generator().manual_seed(7)
        for i, n in enumerate((1, 5, 17)):  # several transfers over one cached group
            remote = torch.randperm(NB, generator=g)[:n].tolist()
            local = torch.randperm(NB, generator=g)[:n].tolist()
            prod.leases.register(f"p{i}", tid(i), remote)
            cons.puller.submit(RecvSpec(f"d{i}", "127.0.0.1", kv_port, tid(i), f"p{i}", remote, local, n * BS))
            assert drive([prod.server.pump, cons.puller.pump], [cons], 1) == ({f"d{i}"}, set())
            check_blocks(prod.cache, cons.cache, remote, local, kind)
            for t in cons.cache.tensors:
                t.zero_()
        assert prod.leases.take_finished() == {"p0", "p1", "p2"}
        assert len(prod.transport._groups.pairs) == 1 and len(cons.transport._groups.pairs) == 1
        # Memory stayed within the configured pool on both sides.
        for tr in (prod.transport, cons.transport):
            assert 2 <= tr._bufs.live <= tr.depth == 24576 // tr.chunk_bytes
        stats = cons.stats.take()
        assert stats["recv_blocks"] == 23 and stats["loaded_tokens"] == 23 * BS
    finally:
        prod.close()
        cons.close()


def test_two_consumers_pull_from_one_producer_concurrently(kv_port):
    prod = Producer("kv_tuple", kv_port)
    c1, c2 = Consumer("kv_tuple", "D1"), Consumer("kv_tuple", "D2")
    try:
        jobs = {c1: ([3, 9, 4, 40], [0, 1, 2, 3]), c2: ([40, 41, 7], [10, 20, 30])}
        for i, (c, (remote, local)) in enumerate(jobs.items()):
            prod.leases.register(f"p{i}", tid(i), remote)
            c.puller.submit(RecvSpec(f"d{i}", "127.0.0.1", kv_port, tid(i), f"p{i}", remote, local, 64))
        done, failed = drive([prod.server.pump, c1.puller.pump, c2.puller.pump], [c1, c2], 2)
        assert (done, failed) == ({"d0", "d1"}, set())
        for c, (remote, local) in jobs.items():
            check_blocks(prod.cache, c.cache, remote, local, "kv_tuple")
        # One group per consumer connection, both hosted by the producer's store.
        assert len(prod.transport._groups.pairs) == 2
    finally:
        for x in (c1, c2, prod):
            x.close()


def test_mismatched_block_count_is_a_protocol_error_and_drops_the_group(kv_port):
    prod, cons = Producer("tensor", kv_port), Consumer("tensor", "D")
    try:
        prod.leases.register("p", tid(1), [1, 2, 3])
        # Broken metadata: fewer local blocks than the producer sends.
        cons.puller.submit(RecvSpec("d", "127.0.0.1", kv_port, tid(1), "p", [1, 2, 3], [5, 6], 64))
        assert drive([prod.server.pump, cons.puller.pump], [cons], 1) == ({"d"}, {"d"})
        assert cons.stats.take()["failures"] == {"protocol": 1}
        assert torch.count_nonzero(cons.cache.tensors[0][[5, 6]]) == 0
        assert cons.transport._groups.pairs == {}
        # The consumer tells the producer, which stops at once (not after its
        # 5 s timeout), ends the lease and drops its side of the group.
        deadline = time.monotonic() + 2
        while prod.leases.pending() and time.monotonic() < deadline:
            prod.server.pump(0.01)
        assert prod.leases.pending() == 0
        assert prod.stats.take()["failures"] == {"send_consumer_error": 1}
        assert prod.transport._groups.pairs == {}
    finally:
        prod.close()
        cons.close()


# ---------------------------------------------------------------- dead peers


def _producer_process(kind: str, kv_port: int, blocks: list[int], die_after_chunks: int, ready) -> None:
    """A producer in its own process that serves one lease and dies (SIGKILL,
    no clean-up) after posting ``die_after_chunks`` chunks."""
    from vllm_ascend_pd.transport import pg_group

    prod = Producer(kind, kv_port)
    prod.leases.register("p", tid(1), blocks)
    posted = [0]
    real_post = pg_group.Pair.post

    def post(self, tensor):
        if tensor.numel() > 32:  # a chunk, not the header or the probe
            posted[0] += 1
            if posted[0] > die_after_chunks:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_post(self, tensor)

    pg_group.Pair.post = post
    ready.set()
    while True:
        prod.server.pump(0.01)


def test_producer_killed_mid_transfer_fails_fast(kv_port):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    blocks = list(range(40))
    proc = ctx.Process(target=_producer_process, args=("tensor", kv_port, blocks, 5, ready), daemon=True)
    proc.start()
    cons = Consumer("tensor", "D", timeout=20.0)
    try:
        assert ready.wait(240)  # a spawned child imports vLLM: slow on a busy host
        cons.puller.submit(RecvSpec("d", "127.0.0.1", kv_port, tid(1), "p", blocks, blocks, 40 * BS))
        start = time.monotonic()
        assert drive([cons.puller.pump], [cons], 1, timeout=60) == ({"d"}, {"d"})
        # Far below the 20 s idle timeout: the closed connection is the signal.
        assert time.monotonic() - start < 10
        assert cons.stats.take()["failures"] == {"peer_lost": 1}
        assert cons.transport._groups.pairs == {}
    finally:
        cons.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL


def _consumer_process(kind: str, kv_port: int, blocks: list[int], ready) -> None:
    """Pulls, then is SIGKILLed after its first chunk arrives."""
    from vllm_ascend_pd.transport import pg

    # Generous: at load 10 a 5 s pull timeout expired before the first chunk,
    # and a consumer that never gets a chunk never dies.
    cons = Consumer(kind, "D", timeout=60.0)
    real_finish = pg._finish
    seen = [0]

    def finish(pair, work):
        real_finish(pair, work)
        seen[0] += 1
        if seen[0] >= 3:  # probe, header, first chunk
            os.kill(os.getpid(), signal.SIGKILL)

    pg._finish = finish
    cons.puller.submit(RecvSpec("d", "127.0.0.1", kv_port, tid(1), "p", blocks, blocks, 40 * BS))
    ready.set()
    while True:
        cons.puller.pump(0.01)


def test_consumer_killed_mid_transfer_ends_the_send_and_frees_the_lease(kv_port):
    prod = Producer("tensor", kv_port, timeout=20.0)
    blocks = list(range(40))
    prod.leases.register("p", tid(1), blocks)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_consumer_process, args=("tensor", kv_port, blocks, ready), daemon=True)
    try:
        proc.start()
        deadline = time.monotonic() + 240  # a spawned child imports vLLM: slow on a busy host
        while not ready.is_set() and time.monotonic() < deadline:
            prod.server.pump(0.01)
        deadline = time.monotonic() + 60
        killed_at = None
        while prod.leases.pending() and time.monotonic() < deadline:
            prod.server.pump(0.01)
            if killed_at is None and proc.exitcode is not None:
                killed_at = time.monotonic()
        ended_at = time.monotonic()
        assert prod.leases.pending() == 0
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        # Not the 20 s idle timeout: the closed connection is the signal.
        assert killed_at is None or ended_at - killed_at < 10
        assert prod.stats.take()["failures"] == {"send_peer_lost": 1}
        assert prod.transport._groups.pairs == {}
    finally:
        prod.close()
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def test_no_producer_listening_fails_within_the_timeout():
    cons = Consumer("tensor", "D", timeout=1.0)
    try:
        from vllm_ascend_pd.transport.pg import _group_addr

        class DeadLink:
            endpoint = f"tcp://127.0.0.1:{free_kv_port(span=GROUP_PORT_OFFSET + 1)}"
            pair_id = b"cdeadbeef"

            def try_recv(self):
                return None

            def send(self, frames, **kw):
                return None

        gen = cons.transport.recv_blocks(DeadLink(), tid(1), [1])
        start = time.monotonic()
        with pytest.raises(TransferError) as e:
            while True:
                next(gen)
        assert time.monotonic() - start < 8
        assert e.value.cause in ("group_setup", "timeout")
        assert _group_addr("tcp://[::1]:100") == ("::1", 100 + GROUP_PORT_OFFSET)
    finally:
        cons.close()


# ---------------------------------------------------------------- start-up


def test_registry_and_auto_resolution(monkeypatch):
    assert {"tcp", "gloo", "hccl"} <= set(TRANSPORTS)
    assert resolve_transport("auto", "cpu") == "tcp"
    assert resolve_transport("gloo", "cpu") == "gloo"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "llm_datadist" else real(n, *a))
    # llm_datadist importable: llmdatadist only once that transport is registered.
    expected = "llmdatadist" if "llmdatadist" in TRANSPORTS else "hccl"
    assert resolve_transport("auto", "npu") == expected
    monkeypatch.setitem(TRANSPORTS, "llmdatadist", "x:y")
    assert resolve_transport("auto", "npu") == "llmdatadist"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_datadist" else real(n, *a))
    assert resolve_transport("auto", "npu") == "hccl"


def test_hccl_on_cpu_fails_at_start_with_the_fix():
    with pytest.raises(ValueError, match="transport 'hccl' needs .*Set kv_connector_extra_config.transport to 'gloo' or 'tcp'"):
        create_transport("hccl", make_cache("tensor", 1), options(0, False))


def test_taken_group_port_fails_at_start(kv_port):
    prod = Producer("tensor", kv_port)
    try:
        with pytest.raises(RuntimeError, match=r"kv_port \+ 64 \+ rank"):
            create_transport("gloo", make_cache("tensor", 1), options(kv_port + GROUP_PORT_OFFSET, True))
    finally:
        prod.close()


def test_a_cancelled_pull_writes_nothing_afterwards_and_the_next_is_exact(kv_port):
    """Request aborted on the consumer mid-transfer (Puller.cancel): the
    group's in-flight chunks land in forfeited staging buffers, never in the
    cache, so vLLM may free the blocks at once."""
    prod, cons = Producer("tensor", kv_port, timeout=2.0), Consumer("tensor", "D", timeout=2.0)
    try:
        remote, local = list(range(NB // 2)), list(range(NB // 2, NB))
        prod.leases.register("p", tid(1), remote)
        cons.puller.submit(RecvSpec("d", "127.0.0.1", kv_port, tid(1), "p", remote, local, len(remote) * BS))
        deadline = time.monotonic() + 20
        while not torch.count_nonzero(cons.cache.tensors[0][local]) and time.monotonic() < deadline:
            prod.server.pump(0.0005)
            cons.puller.pump(0.0005)
        assert torch.count_nonzero(cons.cache.tensors[0][local]), "the transfer never started"
        assert cons.stats.take() is None, "cancel must come before the pull ends"
        cons.puller.cancel("d")
        assert cons.puller.take_results() == ({"d"}, set())
        snapshot = [t.clone() for t in cons.cache.tensors]
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            prod.server.pump(0.005)
            cons.puller.pump(0.005)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, cons.cache.tensors))
        assert cons.puller.take_results() == (set(), set())
        deadline = time.monotonic() + 10
        while prod.leases.pending() and time.monotonic() < deadline:
            prod.server.pump(0.01)
            cons.puller.pump(0.01)
        assert prod.leases.pending() == 0
        prod.leases.register("p2", tid(2), [1, 2])
        cons.puller.submit(RecvSpec("d2", "127.0.0.1", kv_port, tid(2), "p2", [1, 2], [3, 4], 2 * BS))
        assert drive([prod.server.pump, cons.puller.pump], [cons], 1) == ({"d2"}, set())
        for s, d in zip(prod.cache.tensors, cons.cache.tensors):
            assert torch.equal(d[[3, 4]], s[[1, 2]])
    finally:
        prod.close()
        cons.close()


def test_hostile_bytes_on_the_group_port_and_gloo_listeners_do_not_hurt(kv_port):
    """Both the producer's TCPStore (kv_port + 64 + r) and the ports gloo
    itself listens on are reachable by anyone on the network: garbage sent to
    them must not crash the process nor disturb the next pull."""
    prod, cons = Producer("tensor", kv_port), Consumer("tensor", "D")
    try:
        def pull(i: int) -> None:
            for t in cons.cache.tensors:
                t.zero_()
            prod.leases.register(f"p{i}", tid(i), [1, 2, 3])
            cons.puller.submit(RecvSpec(f"d{i}", "127.0.0.1", kv_port, tid(i), f"p{i}", [1, 2, 3], [4, 5, 6], 3 * BS))
            assert drive([prod.server.pump, cons.puller.pump], [cons], 1) == ({f"d{i}"}, set())
            check_blocks(prod.cache, cons.cache, [1, 2, 3], [4, 5, 6], "tensor")

        pull(1)  # forms a group, so gloo's own listeners exist
        listening = {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        gloo_ports = listening - {kv_port, kv_port + GROUP_PORT_OFFSET}
        assert gloo_ports, "gloo should listen for its pairs"
        rng = random.Random(3)
        for port in [kv_port + GROUP_PORT_OFFSET, *sorted(gloo_ports)]:
            for i in range(40):
                payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 4, 8, 64, 4096])))
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    try:
                        s.sendall((b"\xff" * 8 if i % 5 == 0 else b"") + payload)
                    except OSError:
                        pass  # the peer may close first: fine
                prod.server.pump(0.001)
                cons.puller.pump(0.001)
        pull(2)
        assert len(prod.transport._groups.pairs) == 1  # the legitimate group survived
    finally:
        prod.close()
        cons.close()


def test_hccl_group_teardown_thread_binds_the_npu_first(monkeypatch):
    """Destroying an HCCL group (ProcessGroupHCCL.shutdown synchronizes its
    streams and destroys the communicators) from a thread that never set the
    device would create a context on NPU 0 (vllm-ascend #12126): the
    teardown thread binds this transport's NPU first, like the build thread."""
    import threading
    import types
    from concurrent.futures import Future

    from vllm_ascend_pd.transport import pg_group

    events = []

    class FakeNpu:
        @staticmethod
        def set_device(device):
            events.append(("set_device", device, threading.current_thread().name))

    class FakeGroup:
        def shutdown(self):
            events.append(("shutdown", None, threading.current_thread().name))

    monkeypatch.setattr(torch, "npu", FakeNpu, raising=False)
    device = types.SimpleNamespace(type="npu", index=3)
    groups = pg_group.PairGroups("hccl", device, "127.0.0.1", 1.0)
    setup: Future = Future()
    setup.set_result([FakeGroup()])
    pair = pg_group.Pair(b"p1", "consumer p1", "hccl", setup, box=setup.result())
    groups.pairs[b"p1"] = pair
    groups.drop(pair)
    groups.close()
    assert [e[:2] for e in events] == [("set_device", device), ("shutdown", None)]
    assert events[0][2] == events[1][2] != threading.current_thread().name
