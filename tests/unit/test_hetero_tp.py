"""Heterogeneous tensor parallelism with the connector's real worker pieces
(KV servers, pullers, tcp or gloo transport over loopback): every producer rank and
every consumer rank is its own object, and the result is checked byte-exactly
against heads split and concatenated by hand with torch."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_ascend_pd.connector.puller import Puller
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.tp_map import (
    HeadRange,
    Piece,
    TPMapError,
    consumers_of,
    pieces_for,
    rank_heads,
    releases_for,
)
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kv_layout import VLLM_LOGICAL_AXES, PagedKVCache, axes_from_backend
from vllm_ascend_pd.config import GROUP_PORT_OFFSET
from vllm_ascend_pd.testing.servers import free_kv_port
from vllm_ascend_pd.transport import TransportOptions, create_transport

NB, BS, HD = 16, 8, 16
TID = "h" * 24
SRC = [3, 9, 4, 12, 0]
DST = [10, 11, 1, 5, 14]
OPT = TransportOptions(chunk_bytes=2048, pool_bytes=8192, idle_timeout_s=3)


def _transport(name: str, cache: PagedKVCache, group_port: int = 0):
    """tcp, or gloo (the pair process-group transport hccl shares), for one rank."""
    if name == "tcp":
        return create_transport("tcp", cache, OPT)
    role = "producer" if group_port else "consumer"
    opt = TransportOptions(chunk_bytes=2048, pool_bytes=8192, idle_timeout_s=5, host="127.0.0.1",
                           group_port=group_port, role=role)
    return create_transport(name, cache, opt)


# -- the map itself -------------------------------------------------------------


def test_rank_heads_follow_vllm_split_and_replication():
    assert [rank_heads(4, 2, r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [rank_heads(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    with pytest.raises(TPMapError, match="does not divide"):
        rank_heads(6, 4, 0)


def test_pieces_split_and_merge():
    # P tp2 -> D tp1: both halves, in head order.
    assert pieces_for(0, 1, 2, 4, False) == [
        Piece(0, HeadRange(0, 2), HeadRange(0, 2)),
        Piece(1, HeadRange(0, 2), HeadRange(2, 4)),
    ]
    # P tp1 -> D tp2: each consumer rank its half of rank 0.
    assert pieces_for(1, 2, 1, 4, False) == [Piece(0, HeadRange(2, 4), HeadRange(0, 2))]
    # Equal TP: rank r <-> rank r, whole (any transport can do that).
    assert pieces_for(1, 2, 2, 4, False) == [Piece(1, None, None)]
    # MLA: any one producer rank, spread over consumer ranks.
    assert pieces_for(0, 1, 2, 1, True) == [Piece(0, None, None)]
    assert [pieces_for(c, 4, 2, 1, True)[0].producer_rank for c in range(4)] == [0, 1, 0, 1]
    # Producer replicates (2 heads over 4 ranks): one holder per head.
    assert [p.producer_rank for p in pieces_for(0, 1, 4, 2, False)] == [0, 2]


def test_every_producer_rank_is_pulled_or_released_exactly_once():
    for heads, ptp, ctp, mla in [(4, 2, 1, False), (4, 1, 2, False), (2, 4, 1, False), (2, 1, 4, False),
                                 (1, 2, 1, True), (1, 1, 2, True), (8, 4, 2, False), (8, 2, 8, False)]:
        for p in range(ptp):
            pullers = consumers_of(p, ptp, ctp, heads, mla)
            releasers = [c for c in range(ctp) if p in releases_for(c, ctp, ptp, heads, mla)]
            assert (len(pullers) > 0) != (len(releasers) == 1), (heads, ptp, ctp, mla, p)
        # Each consumer rank gets exactly its heads.
        if not mla:
            for c in range(ctp):
                got = []
                for pc in pieces_for(c, ctp, ptp, heads, mla):
                    have = rank_heads(heads, ptp, pc.producer_rank)
                    src = pc.src or HeadRange(0, len(have))
                    got += list(range(have.start + src.start, have.start + src.stop))
                assert got == list(rank_heads(heads, ctp, c))


def test_lease_ends_after_every_expected_rank_pulled():
    leases = LeaseTable(60)
    leases.register("r", TID, [1, 2])
    both = frozenset({0, 1})
    assert not isinstance(leases.begin_send(TID, "r", [1, 2], 0, both), str)
    assert leases.end_send(TID, 0) is False and leases.pending() == 1
    assert leases.begin_send(TID, "r", [1, 2], 0, both) == "transfer is already being pulled"
    assert "disagree" in leases.begin_send(TID, "r", [1, 2], 1, frozenset({1, 2}))
    assert not isinstance(leases.begin_send(TID, "r", [1, 2], 1, both), str)
    assert leases.end_send(TID, 1) is True and leases.take_finished() == {"r"}


# -- real producer and consumer ranks over tcp ------------------------------------


class AscendAttn:  # vllm-ascend's (k, v) layout, see test_layouts.py
    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str=""):
        return (2, num_blocks, block_size, num_kv_heads, head_size)


def make_rank(full: dict[str, torch.Tensor], heads: range | None, kind: str, is_mla: bool, num_kv_heads: int):
    """One rank's cache: ``full`` is [NB, K, BS, HD] per layer; the rank keeps
    ``heads`` (None: all). Returns (PagedKVCache, raw tensors to check)."""
    raws: dict[str, object] = {}
    for name, g in full.items():
        mine = g if heads is None else g[:, heads.start : heads.stop]
        if kind == "vllm":  # [B, H, N, C]
            raws[name] = mine.clone()
        else:  # vllm-ascend (k, v), each (blocks + spare, BS, H, HD)
            k = torch.cat([mine.transpose(1, 2), torch.full_like(mine[:2].transpose(1, 2), -1)])
            raws[name] = (k.clone(), (k * 3).clone())
    axes = (lambda *_: VLLM_LOGICAL_AXES) if kind == "vllm" else (
        lambda layer, i, t: axes_from_backend(AscendAttn, t.dim(), split_heads=not is_mla))
    cache = PagedKVCache.from_vllm(raws, NB, BS, axes, is_mla=is_mla, num_kv_heads=num_kv_heads)
    return cache, raws


def as_bhnc(raw, kind: str) -> list[torch.Tensor]:
    """A rank's layers back as [NB, H, BS, HD] (k then v for tuples)."""
    if kind == "vllm":
        return [raw]
    return [p[:NB].transpose(1, 2) for p in raw]


class Group:
    """tp_p producer ranks and tp_c consumer ranks wired like real instances."""

    def __init__(self, tp_p, tp_c, heads, kind="vllm", is_mla=False, layers=2, producer_data=None,
                 transport="tcp"):
        self.kind = kind
        self.kv_port = free_kv_port(span=GROUP_PORT_OFFSET + max(tp_p, 1) + 1)
        g = torch.Generator().manual_seed(7)
        k_heads = 1 if is_mla else heads
        self.full = {f"layer.{i}": torch.randn(NB, k_heads, BS, HD, generator=g) for i in range(layers)}
        self.producers, self.consumers = [], []
        for p in range(tp_p):
            full = self.full if producer_data is None else producer_data(p, self.full)
            hs = None if is_mla else rank_heads(heads, tp_p, p)
            cache, raw = make_rank(full, hs, kind, is_mla, k_heads)
            leases = LeaseTable(60)
            server = KVServer(
                bind_host="127.0.0.1", port=self.kv_port + p, engine_id="P", tp_rank=p,
                layout=cache.describe(tp_p), leases=leases,
                transport=_transport(transport, cache, self.kv_port + GROUP_PORT_OFFSET + p),
                stats=TransferStats(), secret="", registration_grace_s=1.0,
            )
            self.producers.append((server, leases, raw))
        for c in range(tp_c):
            hs = None if is_mla else rank_heads(heads, tp_c, c)
            zero = {n: torch.zeros_like(t) for n, t in self.full.items()}
            cache, raw = make_rank(zero, hs, kind, is_mla, k_heads)
            stats = TransferStats()
            puller = Puller(
                engine_id="D", tp_rank=c, tp_size=tp_c, layout=cache.describe(tp_c),
                transport=_transport(transport, cache), stats=stats, secret="", connect_timeout_s=3,
            )
            self.consumers.append((puller, raw, stats))
        self.tp_p = tp_p

    def lease(self):
        for _, leases, _ in self.producers:
            leases.register("req-p", TID, SRC)

    def pull(self, request="req-d", timeout=15.0):
        for puller, _, _ in self.consumers:
            puller.submit(RecvSpec(request, "127.0.0.1", self.kv_port, TID, "req-p", SRC, DST,
                                   len(SRC) * BS, remote_tp_size=self.tp_p))
        results = [None] * len(self.consumers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (None in results or self.pending()):
            for i, (puller, _, _) in enumerate(self.consumers):
                puller.pump(0.01)
                done, failed = puller.take_results()
                if done:
                    results[i] = (done, failed)
            for server, _, _ in self.producers:
                server.pump(0.01)
        return results

    def pending(self) -> int:
        return sum(leases.pending() for _, leases, _ in self.producers)

    def close(self):
        for server, _, _ in self.producers:
            server.close()
        for puller, _, _ in self.consumers:
            puller.close()


@pytest.fixture
def group_factory():
    made = []

    def make(*a, **kw):
        g = Group(*a, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def check_all_freed(g: Group):
    assert g.pending() == 0
    for _, leases, _ in g.producers:
        assert leases.take_finished() == {"req-p"}


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
@pytest.mark.parametrize("kind", ["vllm", "ascend"])
def test_tp2_to_tp1_merges_heads(group_factory, kind, transport):
    g = group_factory(2, 1, heads=4, kind=kind, transport=transport)
    g.lease()
    assert g.pull() == [({"req-d"}, set())]
    (_, d_raw, stats), = g.consumers
    p_raw = [raw for _, _, raw in g.producers]
    for name in g.full:
        merged = [torch.cat(parts, dim=1) for parts in zip(*(as_bhnc(r[name], kind) for r in p_raw))]
        for got, want in zip(as_bhnc(d_raw[name], kind), merged):
            assert torch.equal(got[DST], want[SRC])
            assert torch.count_nonzero(got[[b for b in range(NB) if b not in DST]]) == 0
    check_all_freed(g)
    data = stats.take()
    assert data["recv_blocks"] == len(SRC) and data["loaded_tokens"] == len(SRC) * BS


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
@pytest.mark.parametrize("kind", ["vllm", "ascend"])
def test_tp1_to_tp2_splits_heads(group_factory, kind, transport):
    g = group_factory(1, 2, heads=4, kind=kind, transport=transport)
    g.lease()
    assert g.pull() == [({"req-d"}, set())] * 2
    (_, _, p_raw), = g.producers
    for c, (_, d_raw, _) in enumerate(g.consumers):
        for name in g.full:
            for got, whole in zip(as_bhnc(d_raw[name], kind), as_bhnc(p_raw[name], kind)):
                want = torch.chunk(whole, 2, dim=1)[c]
                assert torch.equal(got[DST], want[SRC])
                assert torch.count_nonzero(got[[b for b in range(NB) if b not in DST]]) == 0
    # Producer rank 0 was pulled by both consumer ranks before its lease ended.
    check_all_freed(g)


def test_tp1_to_tp2_lease_waits_for_both_consumer_ranks(group_factory):
    g = group_factory(1, 2, heads=4)
    g.lease()
    server, leases, _ = g.producers[0]
    first = g.consumers[0][0]
    first.submit(RecvSpec("req-d", "127.0.0.1", g.kv_port, TID, "req-p", SRC, DST, 40, remote_tp_size=1))
    deadline = time.monotonic() + 10
    done = set()
    while not done and time.monotonic() < deadline:
        first.pump(0.01)
        server.pump(0.01)
        done, _ = first.take_results()
    assert done == {"req-d"}
    assert leases.pending() == 1 and leases.take_finished() == set()  # rank 1 has not pulled yet


def test_abort_after_the_other_consumer_rank_pulled_still_frees_the_producer(group_factory):
    # TP1 -> TP2: consumer rank 0 pulled its half, then the request is aborted
    # before rank 1 pulled. Rank 0 reports nothing more; rank 1 must free the
    # producer's lease although it is not the rank that releases rank 0.
    g = group_factory(1, 2, heads=4)
    g.lease()
    server, leases, _ = g.producers[0]
    (first, _, _), (second, _, _) = g.consumers
    spec = RecvSpec("req-d", "127.0.0.1", g.kv_port, TID, "req-p", SRC, DST, 40, remote_tp_size=1)
    first.submit(spec)
    deadline = time.monotonic() + 10
    done: set = set()
    while not done and time.monotonic() < deadline:
        first.pump(0.01)
        server.pump(0.01)
        done, _ = first.take_results()
    assert done == {"req-d"} and leases.pending() == 1
    second.submit(spec)
    for puller in (first, second):
        puller.cancel("req-d")
    assert first.take_results() == (set(), set()) and second.take_results() == ({"req-d"}, set())
    deadline = time.monotonic() + 5
    while leases.pending() and time.monotonic() < deadline:
        second.pump(0.01)
        server.pump(0.01)
    assert leases.pending() == 0 and leases.take_finished() == {"req-p"}


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_gqa_replicated_on_consumer(group_factory, transport):
    # 2 KV heads over 4 consumer ranks: ranks 0,1 hold head 0, ranks 2,3 head 1.
    g = group_factory(1, 4, heads=2, transport=transport)
    g.lease()
    assert g.pull() == [({"req-d"}, set())] * 4
    (_, _, p_raw), = g.producers
    for c, (_, d_raw, _) in enumerate(g.consumers):
        for name in g.full:
            assert torch.equal(d_raw[name][DST], p_raw[name][SRC][:, c // 2 : c // 2 + 1])
    check_all_freed(g)


def test_gqa_replicated_on_producer_releases_unused_ranks(group_factory):
    # 2 KV heads over 4 producer ranks: D pulls head 0 from rank 0 and head 1
    # from rank 2; ranks 1 and 3 hold copies nobody needs and are released.
    g = group_factory(4, 1, heads=2)
    g.lease()
    assert g.pull() == [({"req-d"}, set())]
    (_, d_raw, _), = g.consumers
    for name in g.full:
        want = torch.cat([g.producers[0][2][name], g.producers[2][2][name]], dim=1)
        assert torch.equal(d_raw[name][DST], want[SRC])
    check_all_freed(g)


def test_mla_tp2_to_tp1_needs_one_rank_and_frees_the_other(group_factory):
    # Rank 1's latent cache is made different to prove only rank 0 is read
    # (real ranks hold identical copies).
    g = group_factory(2, 1, heads=1, is_mla=True, producer_data=lambda p, f: {n: t + p * 100 for n, t in f.items()})
    g.lease()
    assert g.pull() == [({"req-d"}, set())]
    (_, d_raw, _), = g.consumers
    for name, full in g.full.items():
        assert torch.equal(d_raw[name][DST], full[SRC])
    check_all_freed(g)  # rank 1's lease ended by the consumer's release


@pytest.mark.parametrize("kind", ["vllm", "ascend"])
def test_mla_tp1_to_tp2_replicates(group_factory, kind):
    g = group_factory(1, 2, heads=1, is_mla=True, kind=kind)
    g.lease()
    assert g.pull() == [({"req-d"}, set())] * 2
    (_, _, p_raw), = g.producers
    for _, d_raw, _ in g.consumers:
        for name in g.full:
            for got, want in zip(as_bhnc(d_raw[name], kind), as_bhnc(p_raw[name], kind)):
                assert torch.equal(got[DST], want[SRC])
    check_all_freed(g)


def test_release_reaches_every_producer_rank(group_factory):
    g = group_factory(2, 1, heads=4)
    g.lease()
    puller = g.consumers[0][0]
    puller.submit(ReleaseSpec("req-d", "127.0.0.1", g.kv_port, TID, "req-p", remote_tp_size=2))
    deadline = time.monotonic() + 10
    while g.pending() and time.monotonic() < deadline:
        puller.pump(0.01)
        for server, _, _ in g.producers:
            server.pump(0.01)
    check_all_freed(g)


def test_wrong_head_request_gets_no_data(group_factory):
    g = group_factory(1, 2, heads=4)
    g.lease()
    puller, d_raw, _ = g.consumers[1]
    # Consumer rank 1 asks for rank 0's heads: the producer refuses, sends nothing.
    puller._plan = lambda producer_tp: ([Piece(0, HeadRange(0, 2), HeadRange(0, 2))], [])
    puller.submit(RecvSpec("bad", "127.0.0.1", g.kv_port, TID, "req-p", SRC, DST, 40, remote_tp_size=1))
    deadline = time.monotonic() + 10
    res = (set(), set())
    while not res[0] and time.monotonic() < deadline:
        puller.pump(0.01)
        g.producers[0][0].pump(0.01)
        res = puller.take_results()
    assert res == ({"bad"}, {"bad"})
    assert torch.count_nonzero(d_raw["layer.0"]) == 0
    assert g.pending() == 1  # still leased for the real consumer ranks


def test_tp_that_does_not_divide_heads_fails_fast(group_factory):
    g = group_factory(1, 1, heads=4)
    puller = g.consumers[0][0]
    puller.submit(RecvSpec("x", "127.0.0.1", g.kv_port, TID, "req-p", SRC, DST, 40, remote_tp_size=3))
    assert puller.take_results() == ({"x"}, {"x"})


def test_consumer_scheduler_accepts_another_tp_size_and_passes_it_on():
    pytest.importorskip("vllm.v1.request")
    from tests.unit.test_scheduler import FakeBlocks, FakeRequest, produce, side

    prompt = list(range(10))
    _, _, params = produce(prompt)
    params = {**params, "tp_size": 2}  # a TP-2 producer; this consumer is TP 1
    c = side(consumer=True)
    req = FakeRequest("d-1", prompt, params)
    assert c.get_num_new_matched_tokens(req, 0) == (10, True)
    c.update_state_after_alloc(req, FakeBlocks([100, 101, 102]), 10)
    (r,) = c.build_connector_meta().recvs
    assert r.remote_tp_size == 2


def test_transport_without_head_slices_refuses_a_split_cleanly(group_factory, caplog):
    g = group_factory(1, 2, heads=4)
    g.lease()
    g.producers[0][0].transport.head_slices = False  # as llmdatadist declares
    with caplog.at_level("WARNING"):
        assert g.pull(timeout=8) == [({"req-d"}, {"req-d"})] * 2
    refusals = [r.getMessage() for r in caplog.records if "refused the pull" in r.getMessage()]
    assert refusals and all("use transport hccl or tcp" in m for m in refusals)
    for _, d_raw, _ in g.consumers:
        assert torch.count_nonzero(d_raw["layer.0"]) == 0
    assert g.pending() == 0  # not pulled: the consumers released it at once


def test_equal_tp_needs_no_head_slices(group_factory):
    g = group_factory(2, 2, heads=4)
    g.lease()
    for server, _, _ in g.producers:
        server.transport.head_slices = False
    for puller, _, _ in g.consumers:
        puller.transport.head_slices = False
    assert g.pull() == [({"req-d"}, set())] * 2
    for c, (_, d_raw, _) in enumerate(g.consumers):
        p_raw = g.producers[c][2]
        assert torch.equal(d_raw["layer.0"][DST], p_raw["layer.0"][SRC])
    check_all_freed(g)


def test_a_pull_naming_an_absurd_consumer_tp_is_refused_at_once(group_factory):
    """The head map costs time in the consumer's TP size; a pull claiming
    millions of consumer ranks (no lease or secret needed to send one) held
    the producer's engine thread for minutes. It is refused before the map."""
    g = group_factory(1, 1, heads=2)
    server = g.producers[0][0]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{g.kv_port}")
    for tp, rank in [(2 * 10**6, 0), (0, 0), (-1, 0), (1, -1), (2, 2)]:
        s.send(wire.encode(wire.PullRequest(TID, "req-p", SRC, consumer_rank=rank, consumer_tp=tp)))
    start = time.monotonic()
    replies = []
    while len(replies) < 5 and time.monotonic() - start < 5:
        server.pump(0.01)
        if s.poll(10):
            replies.append(wire.decode(s.recv()))
    assert time.monotonic() - start < 2
    assert [r.ok for r in replies] == [False] * 5
    assert all("port plan" in r.error for r in replies), replies
    s.close(0)
    ctx.term()
    # The lease is untouched and a real consumer still gets its blocks.
    g.lease()
    assert g.pull() == [({"req-d"}, set())]
    check_all_freed(g)
