"""A producer (KVServer) and a consumer (Puller) over the tcp transport in one
process on loopback, shared by the unit tests that move real KV blocks.

tests/unit has no __init__.py: pytest puts this folder on sys.path, so test
modules import it as ``kv_loopback``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.puller import Puller
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache
from vllm_ascend_pd.params import prompt_hash
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions, create_transport

NB = 64
TID = "t" * 24
OPT = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2)


def make_cache(fill: float, dtype=torch.float32) -> PagedKVCache:
    caches = {
        f"layer.{i}": (torch.arange(NB * 2 * 32 * 8, dtype=torch.float32).view(NB, 2, 32, 8) * fill + i).to(dtype)
        for i in range(3)
    }
    return PagedKVCache.from_vllm(caches, NB, 32, lambda n, i, t: CacheAxes(block=0))


def tcp_server(src: PagedKVCache, port: int, leases: LeaseTable, *, opt: TransportOptions = OPT,
               stats: TransferStats | None = None, secret: str = "", grace_s: float = 0.5) -> KVServer:
    """The producer "P", rank 0, serving ``src`` on 127.0.0.1:``port``."""
    return KVServer(
        bind_host="127.0.0.1", port=port, engine_id="P", tp_rank=0, layout=src.describe(),
        leases=leases, transport=create_transport("tcp", src, opt),
        stats=TransferStats() if stats is None else stats, secret=secret, registration_grace_s=grace_s,
    )


def tcp_puller(dst: PagedKVCache, *, opt: TransportOptions = OPT, stats: TransferStats | None = None,
               secret: str = "", connect_timeout_s: float = 2, engine_id: str = "D") -> Puller:
    """A consumer, rank 0, pulling into ``dst``."""
    return Puller(
        engine_id=engine_id, tp_rank=0, layout=dst.describe(), transport=create_transport("tcp", dst, opt),
        stats=TransferStats() if stats is None else stats, secret=secret, connect_timeout_s=connect_timeout_s,
    )


@pytest.fixture
def pair():
    src, dst = make_cache(1.0), make_cache(0.0)
    leases = LeaseTable(60)
    port = free_port()
    server = tcp_server(src, port, leases)
    stats = TransferStats()
    puller = tcp_puller(dst, stats=stats)
    yield src, dst, leases, server, puller, port, stats
    server.close()
    puller.close()


def drive(server, puller, timeout=10.0):
    """Pump both sides until the puller reports a result: (done, failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        puller.pump(0.01)
        server.pump(0.01)
        done, failed = puller.take_results()
        if done:
            return done, failed
    raise AssertionError("no result")


def pump_for(server, seconds: float, puller=None) -> None:
    """Keep serving (and pulling) for a while: delivery is asynchronous and
    pump() returns as soon as nothing is waiting."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        server.pump(0.01)
        if puller is not None:
            puller.pump(0.01)
        time.sleep(0.001)


def assert_copied(src: PagedKVCache, dst: PagedKVCache, remote: list[int], local: list[int]) -> None:
    """Every layer's ``local`` blocks of ``dst`` equal its ``remote`` blocks of ``src``."""
    for s, d in zip(src.tensors, dst.tensors):
        assert torch.equal(d[local], s[remote])


@contextmanager
def pumped(server, each_step=lambda: None):
    """The producer's engine loop in a thread (``each_step`` first, then a
    pump), for clients that block, such as release_transfer_sync."""
    stop = threading.Event()

    def engine():
        while not stop.is_set():
            each_step()
            server.pump(0.01)
            time.sleep(0.005)

    t = threading.Thread(target=engine)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def release_params(port: int) -> dict:
    """kv_transfer_params naming transfer TID of request "req-p" (blocks 3, 4)
    on the producer at ``port``, as the proxy passes them to a release."""
    return {"remote_engine_id": "P", "remote_host": "127.0.0.1", "remote_port": port,
            "remote_block_ids": [3, 4], "remote_request_id": "req-p", "transfer_id": TID,
            "tp_size": 1, "block_size": 32, "num_tokens": 40, "prompt_hash": prompt_hash([1]),
            "protocol": wire.PROTOCOL_VERSION}


def only_on_ipv6(port: int) -> None:
    """This process listens on ::1 ``port``, and not on 127.0.0.1: for an
    IPv4-only query glibc answers a name of ::1 with 127.0.0.1, which is where
    a name handed to ZMQ without its IPV6 option, or to an AF_INET socket,
    used to be bound. Read from this process's own sockets (ZMQ's included):
    on a shared host another program may well listen on 127.0.0.1 ``port``."""
    import socket

    import psutil

    socket.create_connection(("::1", port), timeout=2).close()
    listening = {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"::1"}, listening


def ipv6_only_pull(kv_ip: str) -> None:
    """A producer with ``kv_ip`` (an address or a name of ::1 alone) binds and
    advertises ::1, nothing on 127.0.0.1, and serves an exact pull, its
    addresses resolved as the scheduler and worker resolve them."""
    from vllm_ascend_pd.config import parse_extra_config, resolve_bind_host, resolve_kv_ip
    from vllm_ascend_pd.connector.metadata import RecvSpec

    cfg = parse_extra_config({"kv_ip": kv_ip})
    host, bind = resolve_kv_ip(cfg), resolve_bind_host(cfg)
    assert (host, bind) == ("::1", "::1"), (host, bind)
    src, dst = make_cache(1.0), make_cache(0.0)
    leases, port = LeaseTable(60), free_port()
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, host=host,
                           bind_host=bind, role="producer")
    transport = create_transport("tcp", src, opt)
    server = KVServer(bind_host=bind, port=port, engine_id="P", tp_rank=0, layout=src.describe(),
                      leases=leases, transport=transport, stats=TransferStats(), secret="",
                      registration_grace_s=0.5)
    puller = tcp_puller(dst)
    try:
        only_on_ipv6(port)
        only_on_ipv6(transport.data_port)
        leases.register("req-p", TID, [1, 2])
        puller.submit(RecvSpec("a", host, port, TID, "req-p", [1, 2], [5, 6], 64))
        assert drive(server, puller) == ({"a"}, set())
        assert_copied(src, dst, [1, 2], [5, 6])
    finally:
        server.close()
        puller.close()
