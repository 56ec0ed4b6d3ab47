"""The llmdatadist transport against a fake llm_datadist, through the real
KV server and puller over loopback ZMQ.

The fake (tests/unit/fakes/fake_llm_datadist.py) records the call sequence
and really copies the pulled blocks by address, so these tests check both
the LLMDataDist calls and the bytes that land in the consumer's cache.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from tests.unit.fakes import fake_llm_datadist as fake
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.config import ConfigError
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.metadata import RecvSpec
from vllm_ascend_pd.connector.puller import Puller
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kv_layout import CacheAxes, PagedKVCache
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransferError, TransportOptions, create_transport
from vllm_ascend_pd.transport.llmdatadist import cluster_id_for

NB = 64
P_IP, D_IP, COMM_PORT = "10.20.0.1", "10.20.0.9", 26000
P_CLUSTER, D_CLUSTER = cluster_id_for(P_IP), cluster_id_for(D_IP)


@pytest.fixture(autouse=True)
def fake_datadist(monkeypatch):
    fake.FABRIC.reset()
    monkeypatch.setitem(sys.modules, "llm_datadist", fake)
    yield fake.FABRIC
    fake.FABRIC.reset()


def mha_cache(fill: float) -> PagedKVCache:
    # Three layers, one (NB, block, heads, dim) tensor each: one registration.
    caches = {
        f"layer.{i}": (torch.arange(NB * 2 * 16 * 8, dtype=torch.float32).view(NB, 2, 16, 8) * fill + i).half()
        for i in range(3)
    }
    return PagedKVCache.from_vllm(caches, NB, 16, lambda *_: CacheAxes(block=0))


def mla_cache(fill: float) -> PagedKVCache:
    # vllm-ascend's MLA tuple (k_nope, k_pe) per layer: two shapes, two registrations.
    caches = {
        f"layer.{i}": (
            torch.full((NB, 16, 1, 32), fill + i, dtype=torch.bfloat16) + torch.arange(NB).view(NB, 1, 1, 1),
            torch.full((NB, 16, 1, 8), -fill - i, dtype=torch.bfloat16) - torch.arange(NB).view(NB, 1, 1, 1),
        )
        for i in range(2)
    }
    return PagedKVCache.from_vllm(caches, NB, 16, lambda *_: CacheAxes(block=0), is_mla=True)


def options(role: str, ip: str, timeout: float = 2.0) -> TransportOptions:
    return TransportOptions(
        chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=timeout, role=role,
        device_ip=ip, comm_port=COMM_PORT if role == "producer" else 0,
    )


class Pair:
    def __init__(self, make_cache):
        self.src, self.dst = make_cache(1.0), make_cache(0.0)
        self.fresh = make_cache(0.0)
        self.leases = LeaseTable(60)
        self.port = free_port()
        self.p_transport = create_transport("llmdatadist", self.src, options("producer", P_IP))
        self.d_transport = create_transport("llmdatadist", self.dst, options("consumer", D_IP))
        self.p_stats, self.d_stats = TransferStats(), TransferStats()
        self.server = KVServer(
            bind_host="127.0.0.1", port=self.port, engine_id="P", tp_rank=0,
            layout=self.src.describe(), leases=self.leases, transport=self.p_transport,
            stats=self.p_stats, secret="", registration_grace_s=0.5,
        )
        self.puller = Puller(
            engine_id="D", tp_rank=0, layout=self.dst.describe(), transport=self.d_transport,
            stats=self.d_stats, secret="", connect_timeout_s=2,
        )

    def pull(self, tid: str, blocks: list[int], local: list[int], req: str = "req-d"):
        self.leases.register("req-p-" + tid, tid, blocks)
        self.puller.submit(RecvSpec(req, "127.0.0.1", self.port, tid, "req-p-" + tid, blocks, local, 16 * len(blocks)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.puller.pump(0.01)
            self.server.pump(0.01)
            done, failed = self.puller.take_results()
            if done:
                # Let the producer see the consumer's TransferDone.
                for _ in range(200):
                    self.server.pump(0.01)
                    if not self.server._sends.tasks:
                        break
                    time.sleep(0.005)
                return done, failed
        raise AssertionError("no result")

    def close(self):
        self.server.close()
        self.puller.close()
        self.p_transport.close()
        self.d_transport.close()


@pytest.fixture
def pair():
    p = Pair(mha_cache)
    yield p
    p.close()


@pytest.fixture
def mla_pair():
    p = Pair(mla_cache)
    yield p
    p.close()


@pytest.fixture
def make_transport():
    """Opens llmdatadist transports, closed after the test: by default a
    producer on P_IP with a filled cache, a consumer on D_IP with an empty one."""
    opened = []

    def make(role: str, cache: PagedKVCache | None = None, opts: TransportOptions | None = None):
        producer = role == "producer"
        cache = cache if cache is not None else mha_cache(1.0 if producer else 0.0)
        if opts is None:
            opts = options(role, P_IP if producer else D_IP)
        t = create_transport("llmdatadist", cache, opts)
        opened.append(t)
        return t

    yield make
    for t in opened:
        t.close()


def start_transfer(prod, cons, n: int, blocks: list[int], local: list[int]):
    """The producer's send and the consumer's recv of transfer tid(n), joined
    by an in-memory link (no KV server): pump them with run_both."""
    link = MemLink()
    return prod.send_blocks(link.a, tid(n), blocks), cons.recv_blocks(link.b, tid(n), local)


def tid(n: int) -> str:
    return f"{n:024d}"


def check_blocks(pair: Pair, blocks: list[int], local: list[int]) -> None:
    untouched = [b for b in range(NB) if b not in local]
    for s, d, f in zip(pair.src.tensors, pair.dst.tensors, pair.fresh.tensors):
        assert torch.equal(d[local], s[blocks])
        assert torch.equal(d[untouched], f[untouched])


def test_registers_links_once_and_pulls_exactly_the_blocks(pair, fake_datadist):
    blocks, local = [3, 9, 4, 40, 41], [10, 11, 12, 13, 14]
    assert pair.pull(tid(1), blocks, local) == ({"req-d"}, set())
    check_blocks(pair, blocks, local)
    assert pair.leases.take_finished() == {"req-p-" + tid(1)}

    calls = fake_datadist.calls
    inits = {c[1]: c for c in calls if c[0] == "init"}
    assert inits[P_CLUSTER][2] is fake.LLMRole.PROMPT
    assert inits[P_CLUSTER][3]["llm.listenIpInfo"] == f"{P_IP}:{COMM_PORT}"
    assert inits[P_CLUSTER][3]["llm.EnableCacheManager"] == "1"
    assert inits[P_CLUSTER][3]["llm.SyncKvCacheWaitTime"] == "2000"
    assert inits[D_CLUSTER][2] is fake.LLMRole.DECODER
    assert "llm.listenIpInfo" not in inits[D_CLUSTER][3]
    shape = (NB, 2, 16, 8)
    assert [c for c in calls if c[0] == "register_blocks_cache"] == [
        ("register_blocks_cache", P_CLUSTER, 0, 3, shape),
        ("register_blocks_cache", D_CLUSTER, 0, 3, shape),
    ]
    assert [c for c in calls if c[0] in ("link_clusters", "pull_blocks")] == [
        ("link_clusters", D_CLUSTER, P_CLUSTER, (P_IP, COMM_PORT)),
        ("pull_blocks", D_CLUSTER, P_CLUSTER, 0, blocks, local),
    ]
    # Registration happens before any link, as LLMDataDist requires.
    names = fake_datadist.names()
    assert max(i for i, n in enumerate(names) if n == "register_blocks_cache") < names.index("link_clusters")

    # A second transfer reuses the link.
    assert pair.pull(tid(2), [7], [20]) == ({"req-d"}, set())
    assert fake_datadist.names().count("link_clusters") == 1
    assert fake_datadist.calls[-1] == ("pull_blocks", D_CLUSTER, P_CLUSTER, 0, [7], [20])
    data = pair.d_stats.take()
    assert data["recv_transfers"] == 2 and data["recv_blocks"] == 6
    assert data["recv_bytes"] == 6 * pair.dst.total_block_bytes()
    assert pair.p_stats.take()["send_transfers"] == 2


def test_mla_caches_register_and_pull_per_shape(mla_pair, fake_datadist):
    blocks, local = [5, 6, 63], [0, 1, 2]
    assert mla_pair.pull(tid(3), blocks, local) == ({"req-d"}, set())
    check_blocks(mla_pair, blocks, local)
    regs = [c for c in fake_datadist.calls if c[0] == "register_blocks_cache" and c[1] == P_CLUSTER]
    assert regs == [
        ("register_blocks_cache", P_CLUSTER, 0, 2, (NB, 16, 1, 32)),
        ("register_blocks_cache", P_CLUSTER, 1, 2, (NB, 16, 1, 8)),
    ]
    pulls = [c for c in fake_datadist.calls if c[0] == "pull_blocks"]
    assert [c[3] for c in pulls] == [0, 1]


def test_link_failure_fails_both_sides_with_a_named_cause_then_recovers(pair, fake_datadist):
    fake_datadist.link_status = fake.LLMStatusCode.LLM_LINK_FAILED
    assert pair.pull(tid(4), [1, 2], [30, 31]) == ({"req-d"}, {"req-d"})
    assert "pull_blocks" not in fake_datadist.names()
    assert pair.d_stats.take()["failures"] == {"link_failed": 1}
    # The producer heard why and ended the lease instead of holding the blocks.
    assert pair.leases.take_finished() == {"req-p-" + tid(4)}
    assert pair.p_stats.take()["failures"] == {"send_consumer_error": 1}
    assert torch.equal(pair.dst.tensors[0][[30, 31]], pair.fresh.tensors[0][[30, 31]])

    # The next transfer links again and succeeds.
    fake_datadist.link_status = None
    assert pair.pull(tid(5), [1, 2], [30, 31]) == ({"req-d"}, set())
    assert fake_datadist.names().count("link_clusters") == 2
    check_blocks(pair, [1, 2], [30, 31])


def test_link_error_message_names_the_endpoint_and_the_fix(make_transport, fake_datadist):
    fake_datadist.link_status = fake.LLMStatusCode.LLM_TIMEOUT
    send, recv = start_transfer(make_transport("producer"), make_transport("consumer"), 6, [1], [2])
    with pytest.raises(TransferError) as err:
        run_both(send, recv)
    assert err.value.cause == "link_failed"
    msg = str(err.value)
    assert f"{D_IP} -> {P_IP}:{COMM_PORT}" in msg and "LLM_TIMEOUT" in msg
    assert "hccn_tool" in msg and "prefill_device_ips" in msg


def test_pull_failure_unlinks_and_the_next_transfer_relinks(pair, fake_datadist):
    assert pair.pull(tid(7), [1], [2]) == ({"req-d"}, set())
    fake_datadist.pull_error = fake.LLMStatusCode.LLM_TIMEOUT
    assert pair.pull(tid(8), [3], [4]) == ({"req-d"}, {"req-d"})
    assert pair.d_stats.take()["failures"] == {"pull_failed": 1}
    wait_for(lambda: ("unlink_clusters", D_CLUSTER, P_CLUSTER, False) in fake_datadist.calls)
    fake_datadist.pull_error = None
    assert pair.pull(tid(9), [3], [4]) == ({"req-d"}, set())
    assert fake_datadist.names().count("link_clusters") == 2
    check_blocks(pair, [1, 3], [2, 4])


def test_close_unlinks_then_unregisters_then_finalizes(mla_pair, fake_datadist):
    assert mla_pair.pull(tid(10), [1], [2]) == ({"req-d"}, set())
    mla_pair.server.close()
    mla_pair.puller.close()
    start = len(fake_datadist.calls)
    mla_pair.d_transport.close()
    consumer = [c[:2] if c[0] != "unlink_clusters" else c for c in fake_datadist.calls[start:]]
    assert consumer == [
        ("unlink_clusters", D_CLUSTER, P_CLUSTER, False),
        ("unregister_cache", D_CLUSTER),
        ("unregister_cache", D_CLUSTER),
        ("finalize", D_CLUSTER),
    ]
    start = len(fake_datadist.calls)
    mla_pair.p_transport.close()
    assert [c[:2] for c in fake_datadist.calls[start:]] == [
        ("unregister_cache", P_CLUSTER), ("unregister_cache", P_CLUSTER), ("finalize", P_CLUSTER),
    ]
    assert fake_datadist.listeners == {}
    mla_pair.d_transport.close()  # idempotent
    assert fake_datadist.names().count("finalize") == 2
    with pytest.raises(TransferError, match="closed"):
        run_both(None, mla_pair.d_transport.recv_blocks(OfferLink(tid(11)), tid(11), [1]))


def test_remote_cache_access_is_enabled_at_init(pair, fake_datadist):
    # vllm-ascend's LLMDataDistCMgrConnector enabled it too; CANN's LLMConfig
    # reference: without it A3 moves KV over RDMA only (no HCCS).
    inits = [c for c in fake_datadist.calls if c[0] == "init"]
    assert [c[3].get("llm.EnableRemoteCacheAccessible") for c in inits] == ["1", "1"]


def test_dropping_a_link_also_tears_down_the_producers_end(pair, fake_datadist):
    """A forced unlink only clears the caller's end; the consumer (the client
    of link_clusters) must send a normal unlink so the producer's end goes too."""
    producer = pair.p_transport._datadist
    assert pair.pull(tid(30), [1], [2]) == ({"req-d"}, set())
    assert producer.inbound == {D_CLUSTER}
    fake_datadist.pull_error = fake.LLMStatusCode.LLM_TIMEOUT
    assert pair.pull(tid(31), [3], [4]) == ({"req-d"}, {"req-d"})
    wait_for(lambda: "unlink_clusters" in fake_datadist.names())
    wait_for(lambda: not producer.inbound)
    assert ("unlink_clusters", D_CLUSTER, P_CLUSTER, False) in fake_datadist.calls
    fake_datadist.pull_error = None
    assert pair.pull(tid(32), [3], [4]) == ({"req-d"}, set())
    assert producer.inbound == {D_CLUSTER}
    pair.d_transport.close()
    assert producer.inbound == set()


def test_an_unlink_the_producer_did_not_hear_falls_back_to_a_forced_one(pair, fake_datadist):
    assert pair.pull(tid(33), [1], [2]) == ({"req-d"}, set())
    fake_datadist.unlink_status = fake.LLMStatusCode.LLM_NOTIFY_PROMPT_UNLINK_FAILED
    pair.d_transport.close()
    unlinks = [c for c in fake_datadist.calls if c[0] == "unlink_clusters"]
    assert unlinks == [
        ("unlink_clusters", D_CLUSTER, P_CLUSTER, False),
        ("unlink_clusters", D_CLUSTER, P_CLUSTER, True),
    ]
    assert pair.d_transport._datadist.links == {}


def test_close_during_a_pull_returns_at_once_and_finalizes_after_it(make_transport, fake_datadist):
    """LLMDataDist's finalize must not run concurrently with other calls (and
    takes the package's exclusive lock): close() hands teardown to the helper
    thread, behind the pull, instead of finalizing under it."""
    fake_datadist.pull_gate = gate = threading.Event()
    prod, cons = make_transport("producer"), make_transport("consumer")
    try:
        send, recv = start_transfer(prod, cons, 34, [1], [2])
        deadline = time.monotonic() + 5
        while cons._datadist._busy == 0 or "pull_blocks" not in fake_datadist.names():
            next(send), next(recv)
            assert time.monotonic() < deadline, "the pull never started"
            time.sleep(0.001)
        start = time.monotonic()
        cons.close()
        assert time.monotonic() - start < 2.0
        assert ("finalize", D_CLUSTER) not in fake_datadist.calls
        gate.set()
        wait_for(lambda: ("finalize", D_CLUSTER) in fake_datadist.calls)
        names = fake_datadist.names()
        assert names.index("unlink_clusters") < names.index("unregister_cache")
        assert cons._datadist._manager is None, "finalize failed"
        # The pull that was running completed before the teardown: its
        # transfer still ends normally.
        run_both(send, recv)
        check = cons.cache.tensors[0][2], prod.cache.tensors[0][1]
        assert torch.equal(*check)
    finally:
        gate.set()  # before make_transport closes them: a held pull would hold the teardown


def test_timeouts_stay_within_llm_datadists_int32_milliseconds(make_transport, fake_datadist):
    # A very long transfer_timeout_s must not overflow sync_kv_timeout (int32
    # ms in the real package): start-up would fail with a bare ValueError.
    make_transport("producer", opts=options("producer", P_IP, timeout=1e7))
    init = [c for c in fake_datadist.calls if c[0] == "init"][0]
    assert init[3]["llm.SyncKvCacheWaitTime"] == str(2**31 - 1)


def test_a_pull_that_could_outlive_the_producers_hold_never_starts(make_transport, fake_datadist):
    cons = make_transport("consumer", opts=options("consumer", D_IP, timeout=2.0))
    fake.LLMDataDist(fake.LLMRole.PROMPT, P_CLUSTER).init(
        {"llm.EnableCacheManager": "1", "llm.listenIpInfo": f"{P_IP}:{COMM_PORT}"}
    )
    link = OfferLink(tid(12), hold_s=1.0)  # shorter than the consumer's 2 s pull timeout
    with pytest.raises(TransferError) as err:
        run_both(None, cons.recv_blocks(link, tid(12), [5]))
    assert err.value.cause == "timeout"
    assert "pull_blocks" not in fake_datadist.names()
    done = wire.decode(link.sent[-1][0])
    assert isinstance(done, wire.TransferDone) and not done.ok and "timeout" in done.error


@pytest.mark.parametrize("change,match", [
    (dict(block_ids=[1, 2]), "2 blocks"),
    (dict(num_caches=2), "same model"),
    (dict(device_ip="10.0.0.x"), "device IP"),
    (dict(cluster_id=1), "endpoint"),
    (dict(transfer_id="9" * 24), "expected an LLMDataDist offer"),
    (dict(hold_s=-1.0), "hold time"),
])
def test_consumer_rejects_bad_offers_without_pulling(make_transport, fake_datadist, change, match):
    cons = make_transport("consumer")
    link = OfferLink(tid(13), **change)
    with pytest.raises(TransferError, match=match):
        run_both(None, cons.recv_blocks(link, tid(13), [5]))
    assert "link_clusters" not in fake_datadist.names()


def test_only_the_pulling_consumer_can_end_a_send(pair, fake_datadist):
    """A TransferDone from another peer must not release blocks mid-pull."""
    import zmq

    pair.leases.register("req-p", tid(14), [1])
    ctx = zmq.Context()
    try:
        owner, other = (ctx.socket(zmq.DEALER) for _ in range(2))
        for s in (owner, other):
            s.connect(f"tcp://127.0.0.1:{pair.port}")
        owner.send(wire.encode(wire.PullRequest(tid(14), "req-p", [1])))
        deadline = time.monotonic() + 5
        got = []
        while len(got) < 2 and time.monotonic() < deadline:
            pair.server.pump(0.01)
            try:
                got.append(wire.decode(owner.recv(zmq.NOBLOCK)))
            except zmq.Again:
                time.sleep(0.005)
        assert isinstance(got[0], wire.PullReply) and got[0].ok
        assert isinstance(got[1], wire.DataDistOffer) and got[1].block_ids == [1]
        other.send(wire.encode(wire.TransferDone(tid(14), True)))
        for _ in range(20):
            pair.server.pump(0.01)
            time.sleep(0.005)
        assert pair.server._sends.tasks, "a stranger ended the send"
        assert pair.p_stats.take()["rejected"] == {"malformed": 1}
        owner.send(wire.encode(wire.TransferDone(tid(14), True)))
        wait_for(lambda: (pair.server.pump(0.01), not pair.server._sends.tasks)[1])
        assert pair.leases.take_finished() == {"req-p"}
    finally:
        ctx.destroy(linger=0)


def test_missing_llm_datadist_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_datadist", None)
    with pytest.raises(ConfigError, match="set_env.sh"):
        create_transport("llmdatadist", mha_cache(0.0), options("consumer", D_IP))


def test_device_ip_is_read_with_hccn_tool_when_not_configured(make_transport, monkeypatch):
    from vllm_ascend_pd import hccn

    asked = []
    monkeypatch.setattr(hccn, "device_ip", lambda dev, **kw: asked.append(dev) or "10.20.0.7")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "6,7")
    opt = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=2, role="consumer", local_rank=1)
    t = make_transport("consumer", opts=opt)
    assert asked == [7]  # logical rank 1 -> physical NPU 7
    assert t.cluster_id == cluster_id_for("10.20.0.7")


def test_unreadable_device_ip_names_the_key_to_set(monkeypatch):
    from vllm_ascend_pd import hccn

    def fail(dev, **kw):
        raise hccn.HccnError("hccn_tool not found")

    monkeypatch.setattr(hccn, "device_ip", fail)
    with pytest.raises(ConfigError, match="hccn_tool not found.*set decode_device_ips"):
        create_transport("llmdatadist", mha_cache(0.0), options("consumer", ""))


def test_non_contiguous_cache_is_refused_at_start():
    t = torch.zeros(8, NB, 4, dtype=torch.float16)
    cache = PagedKVCache.from_vllm({"l": t}, NB, 4, lambda *_: CacheAxes(block=1))
    with pytest.raises(ConfigError, match="contiguous"):
        create_transport("llmdatadist", cache, options("consumer", D_IP))


# ---------------- helpers ----------------
class _End:
    def __init__(self, inbox, outbox):
        self.inbox, self.outbox = inbox, outbox

    def send(self, frames, *, copy=True, track=False):
        self.outbox.append([bytes(f) for f in frames])

    def try_recv(self):
        return self.inbox.pop(0) if self.inbox else None


class MemLink:
    """Two in-memory Link ends."""

    def __init__(self):
        ab, ba = [], []
        self.a, self.b = _End(ba, ab), _End(ab, ba)


class OfferLink(_End):
    """A consumer-side Link whose producer sent one DataDistOffer; what the
    consumer sends back lands in ``sent``."""

    def __init__(self, tid_: str, **change):
        fields = dict(transfer_id=tid_, cluster_id=P_CLUSTER, device_ip=P_IP, port=COMM_PORT,
                      block_ids=[1], num_caches=1, hold_s=30.0)
        fields.update(change)
        self.sent: list[list[bytes]] = []
        super().__init__([[wire.encode(wire.DataDistOffer(**fields))]], self.sent)


def run_both(send, recv, timeout=10.0):
    """Pump two transfer generators; raise the first error."""
    gens = [g for g in (send, recv) if g is not None]
    deadline = time.monotonic() + timeout
    while gens:
        for g in list(gens):
            try:
                next(g)
            except StopIteration:
                gens.remove(g)
        if time.monotonic() > deadline:
            raise AssertionError("transfer did not finish")
        time.sleep(0.001)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        time.sleep(0.01)
