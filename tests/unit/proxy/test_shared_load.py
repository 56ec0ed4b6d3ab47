"""Load counters shared by the workers of a multi-worker proxy: the mapping,
slot assignment, and balancing on the sum (two workers simulated in one
process here; the real processes are in test_workers.py)."""

from __future__ import annotations

import random

import pytest

from vllm_ascend_pd.proxy.balancer import make_policy
from vllm_ascend_pd.proxy.membership import (Authority, ControlRequest, Member, Snapshot,
                                               apply_snapshot)
from vllm_ascend_pd.proxy.registry import Registry, Source
from vllm_ascend_pd.proxy.shared_load import SharedLoad, SlotTable


@pytest.fixture
def load_file(tmp_path):
    path = str(tmp_path / "load")
    SharedLoad.create(path, 2)
    return path


def test_each_worker_adds_to_its_row_and_readers_see_the_sum(load_file):
    w0, w1, reader = (SharedLoad(load_file, 2, 0), SharedLoad(load_file, 2, 1),
                      SharedLoad(load_file, 2))
    w0.add(5, 1, 100)
    w0.add(5, 1, 20)
    w1.add(5, 1, 3)
    w1.add(6, 1, 1)
    assert (reader.requests(5), reader.tokens(5)) == (3, 123)
    assert (reader.requests(6), reader.tokens(6)) == (1, 1)
    assert reader.requests(7) == 0
    w0.add(5, -1, -20)
    assert (w1.requests(5), w1.tokens(5)) == (2, 103)
    # A restarted worker 0: its predecessor's requests died with it.
    SharedLoad(load_file, 2, 0).reset_row()
    assert (reader.requests(5), reader.tokens(5)) == (1, 3)
    for view in (w0, w1, reader):
        view.close()


def test_slots_are_unique_and_a_freed_one_is_reused_last():
    table = SlotTable(slots=3)
    a, b = table.slot_of("a"), table.slot_of("b")
    assert table.slot_of("a") == a and a != b
    table.keep_only({"b"})  # a left
    c = table.slot_of("c")
    assert c not in (a, b)
    assert table.slot_of("d") == a  # only the freed one is left
    assert table.slot_of("e") == -1  # full: balanced per worker


def _two_workers(load_file, role="decode", addresses=("d:1", "d:2")):
    """Two workers' registries, each given the same snapshot by the supervisor."""
    auth = Authority(Registry(health_checks=False))
    for address in addresses:
        auth.registry.add(role, address, Source.STATIC)
    snap = auth.snapshot()
    regs = []
    for row in range(2):
        reg = Registry(health_checks=False)
        reg.shared_load = SharedLoad(load_file, 2, row)
        apply_snapshot(reg, snap)
        regs.append(reg)
    return regs


@pytest.mark.parametrize("policy", ["least_requests", "least_tokens"])
def test_a_worker_balances_on_every_workers_load(load_file, policy):
    """Worker 0 has two requests on d:1. Worker 1, which has none, must send
    its next ones to d:2 (balancing its own counts alone, it chose at random)."""
    w0, w1 = _two_workers(load_file)
    busy = w0.get("decode", "d:1")
    w0.acquire(busy, 500)
    w0.acquire(busy, 500)
    pick = make_policy(policy, random.Random(1))
    for _ in range(50):
        assert pick.pick(w1.candidates("decode")).address == "d:2"
    # Worker 1 sends two there: the load is even, ties go either way.
    other = w1.get("decode", "d:2")
    w1.acquire(other, 500)
    w1.acquire(other, 500)
    assert {pick.pick(w1.candidates("decode")).address for _ in range(50)} == {"d:1", "d:2"}
    # Releases take it off again, in the row that added it.
    w0.release(busy, 500)
    w0.release(busy, 500)
    assert (busy.load_requests, busy.load_tokens) == (0, 0)
    assert w1.get("decode", "d:1").load_requests == 0
    assert {pick.pick(w0.candidates("decode")).address for _ in range(50)} == {"d:1"}


def test_prefix_affinity_bounds_on_every_workers_load(load_file):
    """A hot prefix: worker 0 sent four requests to its instance, so worker
    1's next request with that prefix spills (bound 1.25 x the fair share)."""
    w0, w1 = _two_workers(load_file)
    affinity = make_policy("prefix_affinity", random.Random(1))
    key = b"k" * 16
    first = affinity.pick(w0.candidates("decode"), key)
    for _ in range(4):
        w0.acquire(first, 1)
    assert affinity.pick(w1.candidates("decode"), key).address != first.address


def test_a_member_shared_while_busy_carries_its_requests_in_flight(load_file):
    """An instance that gets its slot while requests are in flight counts
    them there at once (the release of each takes it off that slot): under
    constant load it used to wait for an idle moment that never came."""
    reg = Registry(health_checks=False)
    inst, _ = reg.add("decode", "d:1", Source.STATIC)
    reg.acquire(inst, 10)
    reg.shared_load = SharedLoad(load_file, 2, 0)
    reader = SharedLoad(load_file, 2)
    snap = Snapshot(seq=2, members=[Member("decode", "d:1", "static", slot=3)])
    apply_snapshot(reg, snap)
    assert inst.shared is not None and inst.slot == 3
    assert (reader.requests(3), reader.tokens(3)) == (1, 10)
    reg.acquire(inst, 5)
    assert (inst.load_requests, inst.load_tokens) == (2, 15)
    reg.release(inst, 10)
    reg.release(inst, 5)
    assert (reader.requests(3), reader.tokens(3)) == (0, 0)


def test_a_worker_that_missed_a_members_new_slot_follows_it(load_file):
    """d:1 left and came back (a new slot) while worker 0 missed the snapshot
    without it (a dropped broadcast, or a newer control reply applied first):
    worker 0 kept counting in the old slot, so the others never saw its
    requests (and once the old slot went to another member, they counted
    as that member's). Its requests in flight move with it."""
    auth = Authority(Registry(health_checks=False))
    auth.registry.add("decode", "d:1", Source.STATIC)
    auth.registry.add("decode", "d:2", Source.STATIC)
    first = auth.snapshot()
    w0, w1 = Registry(health_checks=False), Registry(health_checks=False)
    w0.shared_load, w1.shared_load = SharedLoad(load_file, 2, 0), SharedLoad(load_file, 2, 1)
    apply_snapshot(w0, first)
    apply_snapshot(w1, first)
    mine = w0.get("decode", "d:1")
    w0.acquire(mine, 7)
    auth.handle(ControlRequest(req_id=1, op="remove", role="decode", address="d:1"))
    apply_snapshot(w1, auth.snapshot())
    last = auth.handle(ControlRequest(req_id=2, op="add", role="decode", address="d:1")).snapshot
    apply_snapshot(w1, last)
    apply_snapshot(w0, last)  # worker 0 never saw d:1 leave
    theirs = w1.get("decode", "d:1")
    assert mine.slot == theirs.slot
    assert (theirs.load_requests, theirs.load_tokens) == (1, 7)
    w0.acquire(mine, 1)
    assert theirs.load_requests == 2
    w0.release(mine, 7)
    w0.release(mine, 1)
    reader = SharedLoad(load_file, 2)
    assert all(reader.requests(s) == 0 and reader.tokens(s) == 0 for s in range(8))


def test_the_supervisor_gives_members_slots_and_frees_them(load_file):
    auth = Authority(Registry(health_checks=False))
    auth.registry.add("decode", "d:1", Source.STATIC)
    auth.registry.add("prefill", "d:1", Source.STATIC)  # same address, another member
    slots = {(m.role, m.address): m.slot for m in auth.snapshot().members}
    assert sorted(slots.values()) == [0, 1]
    assert {(m.role, m.address): m.slot for m in auth.snapshot().members} == slots
    auth.registry.remove("decode", "d:1")
    auth.registry.add("decode", "d:2", Source.ADMIN)
    again = {(m.role, m.address): m.slot for m in auth.snapshot().members}
    assert again[("prefill", "d:1")] == slots[("prefill", "d:1")]
    assert again[("decode", "d:2")] not in slots.values()  # the freed slot waits


class _Racing(SharedLoad):
    """A worker's view while another worker sends a request to ``slot``
    right after the first ``reads`` reads (processes interleave anywhere)."""

    def __init__(self, path, workers, row, other: SharedLoad, slot: int, reads: int):
        super().__init__(path, workers, row)
        self._other, self._slot, self._reads = other, slot, reads

    def _sum(self, offset):
        value = super()._sum(offset)
        self._reads -= 1
        if self._reads == 0:
            self._other.add(self._slot, 1, 1)
        return value


@pytest.mark.parametrize("policy", ["least_requests", "least_tokens"])
def test_a_pick_survives_another_worker_changing_the_counts_meanwhile(load_file, policy):
    """d:1 is idle, d:2 busy. Worker 1 sends a request to d:1 while worker 0
    is picking, after it read both loads: the pick read the minimum again
    and found no candidate equal to it (IndexError on the request path)."""
    w0, _ = _two_workers(load_file)
    idle, busy = w0.get("decode", "d:1"), w0.get("decode", "d:2")
    w0.acquire(busy, 5)
    racing = _Racing(load_file, 2, 0, SharedLoad(load_file, 2, 1), idle.slot, reads=2)
    idle.shared = busy.shared = racing
    assert make_policy(policy, random.Random(1)).pick(w0.candidates("decode")) is idle


def test_a_pick_never_compares_shared_with_local_counts(load_file):
    """Past SLOTS members some have no slot: comparing their worker-local
    count with others' sum over workers would favour them. Then a pick uses
    this worker's own counts for every candidate."""
    w0, w1 = _two_workers(load_file)
    shared = w1.get("decode", "d:1")
    lone, _ = w1.add("decode", "d:3", Source.STATIC)  # no slot: the table was full
    assert lone.shared is None
    for _ in range(3):
        w0.acquire(w0.get("decode", "d:1"), 1)  # worker 0's load on d:1
    w1.acquire(lone, 1)  # worker 1's own: one on d:3
    cands = [shared, lone]
    pick = make_policy("least_requests", random.Random(1))
    # Worker 1 alone sees d:1 idle and d:3 busy (summed, d:1 would look busier).
    assert {pick.pick(cands).address for _ in range(20)} == {"d:1"}
