"""kvclient.release_transfer_sync, which the proxy runs in the background:
it reaches producers on IPv6 addresses and answers False (never raises)
whatever the producer sends back."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
import zmq.asyncio

from kv_loopback import TID, make_cache, pumped, release_params
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kvclient import release_transfer, release_transfer_sync
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions, create_transport


def _router(host: str) -> tuple[zmq.Context, zmq.Socket, int]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        port = sock.bind_to_random_port(f"tcp://[{host}]" if ":" in host else f"tcp://{host}")
    except zmq.ZMQError:
        sock.close()
        ctx.term()
        pytest.skip(f"cannot listen on {host} here")
    return ctx, sock, port


def _answer_once(sock: zmq.Socket, reply: list[bytes]) -> threading.Thread:
    def run():
        if sock.poll(10_000):
            identity = sock.recv_multipart()[0]
            sock.send_multipart([identity, *reply])

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("reply", [[b"\xc1garbage"], [b""], [b"a", b"b"]])
def test_a_garbage_reply_is_false_not_an_exception(reply):
    ctx, sock, port = _router("127.0.0.1")
    try:
        t = _answer_once(sock, reply)
        assert release_transfer_sync(release_params(port), timeout=5) is False
        t.join()
    finally:
        sock.close()
        ctx.term()


def test_an_unreachable_or_unparsable_producer_is_false():
    assert release_transfer_sync({**release_params(free_port()), "remote_host": "no such host"}, timeout=0.5) is False
    assert release_transfer_sync({"transfer_id": 3}, timeout=0.5) is False


def test_a_producer_on_an_ipv6_address_is_released():
    probe_ctx, probe, _ = _router("::1")  # skips without IPv6 loopback
    probe.close()
    probe_ctx.term()
    src = make_cache(1.0)
    port = free_port()
    leases = LeaseTable(60)
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, host="::1")
    server = KVServer(
        bind_host="::1", port=port, engine_id="P", tp_rank=0, layout=src.describe(), leases=leases,
        transport=create_transport("tcp", src, opt), stats=TransferStats(), secret="",
        registration_grace_s=0.5,
    )
    try:
        leases.register("req-p", TID, [3, 4], release_params(port)["prompt_hash"])
        with pumped(server):
            assert release_transfer_sync({**release_params(port), "remote_host": "::1"}, timeout=5) is True
        assert leases.pending() == 0
    finally:
        server.close()


def _producer(port: int, tp_ranks: int = 1):
    src = make_cache(1.0)
    leases = LeaseTable(60)
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2)
    servers = [KVServer(
        bind_host="127.0.0.1", port=port + r, engine_id="P", tp_rank=r, layout=src.describe(),
        leases=leases, transport=create_transport("tcp", src, opt), stats=TransferStats(),
        secret="", registration_grace_s=0.5) for r in range(tp_ranks)]
    return leases, servers


async def test_async_release_frees_the_lease_without_a_thread():
    port = free_port()
    leases, [server] = _producer(port)
    leases.register("req-p", TID, [3, 4], release_params(port)["prompt_hash"])
    ctx = zmq.asyncio.Context()
    try:
        with pumped(server):
            assert await release_transfer(release_params(port), timeout=5, ctx=ctx) is True
        assert leases.pending() == 0
    finally:
        server.close()
        ctx.destroy(linger=0)


async def test_async_releases_to_a_dead_producer_leave_the_default_executor_free():
    # The proxy ran each release in the loop's default executor (a few
    # threads), each waiting up to `timeout` per rank: a producer that died
    # after answering filled it, and aiohttp's resolver waits there too.
    loop = asyncio.get_running_loop()
    dead = {**release_params(free_port()), "tp_size": 2}
    releases = [asyncio.create_task(release_transfer(dead, timeout=1.0)) for _ in range(64)]
    await asyncio.sleep(0.05)
    t0 = loop.time()
    await loop.run_in_executor(None, lambda: None)
    assert loop.time() - t0 < 0.5
    t0 = loop.time()
    assert await asyncio.gather(*releases) == [False] * 64
    assert loop.time() - t0 < 3.0  # all at once, ranks too: not 64 x 2 x 1 s


async def test_async_garbage_reply_is_false():
    ctx, sock, port = _router("127.0.0.1")
    try:
        t = _answer_once(sock, [b"\xc1garbage"])
        assert await release_transfer(release_params(port), timeout=5) is False
        t.join()
        assert await release_transfer({"transfer_id": 3}, timeout=0.5) is False
        assert await release_transfer({**release_params(port), "remote_host": "no such host"},
                                      timeout=0.5) is False
    finally:
        sock.close()
        ctx.term()
