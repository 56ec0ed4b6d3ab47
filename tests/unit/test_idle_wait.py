"""Steps without a forward pass wait for the peer (event-driven) instead of
returning to vLLM's polling loop; connector copies run single-threaded."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import msgspec
import pytest
import torch

from vllm_ascend_pd.config import parse_extra_config
from vllm_ascend_pd.connector.metadata import AscendConnectorMetadata, RecvSpec, SendSpec
from vllm_ascend_pd.connector.pump import Pump, Task
from vllm_ascend_pd.connector.scheduler import SchedulerSide
from vllm_ascend_pd.connector.threads import single_threaded
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.connector.worker import WorkerSide
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions

from kv_loopback import TID, make_cache, tcp_puller, tcp_server

OPT = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=5)
BLOCKS, LOCAL = [3, 9, 4, 40], [10, 11, 12, 13]


# -- Pump.run tells "blocked on peers" from "out of budget" --------------------

def _task(gen):
    return Task("k", gen, lambda v: None, lambda e: None)


def test_pump_reports_blocked_when_no_task_can_progress():
    def waiting():
        while True:
            yield False

    p = Pump()
    assert p.run(0.05) is True  # nothing to do
    p.add(_task(waiting()))
    t0 = time.perf_counter()
    assert p.run(1.0) is True
    assert time.perf_counter() - t0 < 0.5  # returned at once, not after the budget


def test_pump_reports_ready_work_when_budget_runs_out():
    def busy():
        while True:
            time.sleep(0.002)
            yield True

    p = Pump()
    p.add(_task(busy()))
    assert p.run(0.01) is False
    assert len(p.tasks) == 1


def test_pump_finished_tasks_count_as_blocked_nothing_left():
    def two():
        yield True
        yield True
        return 7

    done = []
    p = Pump()
    p.add(Task("k", two(), done.append, lambda e: None))
    assert p.run(1.0) is True and done == [7] and not p.tasks


# -- the scheduler flags steps that run no model -------------------------------

@pytest.mark.parametrize("scheduled, flag", [(0, True), (17, False), (None, False)])
def test_metadata_flags_no_forward_steps(scheduled, flag):
    side = SchedulerSide(engine_id="e", is_producer=True, is_consumer=True, block_size=16,
                         tp_size=1, kv_host="127.0.0.1", kv_port=1)
    out = SimpleNamespace() if scheduled is None else SimpleNamespace(total_num_scheduled_tokens=scheduled)
    assert side.build_connector_meta(out).no_forward is flag
    assert side.build_connector_meta().no_forward is False


# -- single-threaded copies -------------------------------------------------------

@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch._C.set_num_threads(2)
    yield
    torch._C.set_num_threads(before)


def test_single_threaded_restores_the_thread_count(two_threads):
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with single_threaded(enabled=False):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with single_threaded():
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


class _SpyServer:
    def __init__(self):
        self.threads = []

    def pump(self, budget_s):
        self.threads.append(torch.get_num_threads())
        return True


@pytest.mark.parametrize("on_cpu, expect", [(True, 1), (False, 2)])
def test_worker_pumps_cpu_copies_with_one_thread(two_threads, on_cpu, expect):
    w = _worker(idle_wait_ms=0, producer=True)
    w.server = _SpyServer()
    w._copies_on_cpu = on_cpu
    w._pump()
    assert w.server.threads == [expect]
    assert torch.get_num_threads() == 2


# -- event-driven waits in no-forward steps ---------------------------------------

def _worker(idle_wait_ms: float, producer: bool) -> WorkerSide:
    # Waits longer than the config allows (100 ms) keep the timing asserts
    # robust on a loaded machine.
    cfg = msgspec.structs.replace(parse_extra_config({"pump_budget_ms": 20}), idle_wait_ms=idle_wait_ms)
    w = WorkerSide(None, cfg, None, engine_id="P" if producer else "D", is_producer=producer,
                   is_consumer=not producer, kv_port=0, tp_rank=0, tp_size=1)
    w._copies_on_cpu = True
    return w


def _consumer(idle_wait_ms: float):
    dst = make_cache(0.0)
    w = _worker(idle_wait_ms, producer=False)
    w.puller = tcp_puller(dst, opt=OPT, connect_timeout_s=5)
    w.transport = w.puller.transport  # one transport per worker, as in the connector
    return w, dst


class _Producer:
    """The peer instance's engine, pumping in its own thread (after ``delay_s``)."""

    def __init__(self, delay_s: float = 0.0):
        self.src = make_cache(1.0)
        self.leases = LeaseTable(60)
        self.leases.register("req-p", TID, BLOCKS)
        self.port = free_port()
        self.server = tcp_server(self.src, self.port, self.leases, opt=OPT)
        self._stop = threading.Event()
        self._delay = delay_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        if self._stop.wait(self._delay):
            return
        while not self._stop.is_set():
            self.server.pump(0.01)
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def _pull_meta(port, no_forward):
    spec = RecvSpec("req-d", "127.0.0.1", port, TID, "req-p", BLOCKS, LOCAL, 128)
    return AscendConnectorMetadata(recvs=[spec], no_forward=no_forward)


def test_no_forward_step_waits_for_the_pull_and_reports_it_in_the_same_step():
    w, dst = _consumer(idle_wait_ms=3000)
    with _Producer() as prod:
        w.start_load_kv(_pull_meta(prod.port, no_forward=True))
        t0 = time.monotonic()
        _, recving, failed = w.get_finished()
        took = time.monotonic() - t0
    w.puller.close()
    assert (recving, failed) == ({"req-d"}, set())
    assert took < 2.0  # woke on the data, did not sit out the 3 s
    for s, d in zip(prod.src.tensors, dst.tensors):
        assert torch.equal(d[LOCAL], s[BLOCKS])


def test_forward_step_never_waits():
    w, _ = _consumer(idle_wait_ms=3000)
    with _Producer(delay_s=10) as prod:  # the peer does not answer meanwhile
        w.start_load_kv(_pull_meta(prod.port, no_forward=False))
        t0 = time.monotonic()
        _, recving, _ = w.get_finished()
        assert time.monotonic() - t0 < 0.2
    w.puller.close()
    assert recving == set()


def test_wait_is_bounded_by_idle_wait_ms_when_the_peer_is_silent():
    w, _ = _consumer(idle_wait_ms=150)
    with _Producer(delay_s=10) as prod:
        w.start_load_kv(_pull_meta(prod.port, no_forward=True))
        t0 = time.monotonic()
        _, recving, _ = w.get_finished()
        took = time.monotonic() - t0
    w.puller.close()
    assert recving == set()
    assert 0.12 <= took < 0.6


def test_nothing_in_flight_means_no_wait():
    w, _ = _consumer(idle_wait_ms=3000)
    w.start_load_kv(AscendConnectorMetadata(no_forward=True))
    t0 = time.monotonic()
    assert w.get_finished() == (set(), set(), set())
    assert time.monotonic() - t0 < 0.2
    w.puller.close()


def test_idle_wait_zero_turns_waiting_off():
    w, _ = _consumer(idle_wait_ms=0)
    with _Producer(delay_s=10) as prod:
        w.start_load_kv(_pull_meta(prod.port, no_forward=True))
        t0 = time.monotonic()
        w.get_finished()
        assert time.monotonic() - t0 < 0.2
    w.puller.close()


def _producer_worker(idle_wait_ms: float):
    src = make_cache(1.0)
    w = _worker(idle_wait_ms, producer=True)
    port = free_port()
    w.server = tcp_server(src, port, w.leases, opt=OPT)
    w.transport = w.server.transport  # one transport per worker, as in the connector
    return w, src, port


class _Consumer:
    """A consumer pulling from ``port`` in its own thread after ``delay_s``."""

    def __init__(self, port, delay_s):
        self.dst = make_cache(0.0)
        self.puller = tcp_puller(self.dst, opt=OPT, connect_timeout_s=5)
        self.port, self.delay = port, delay_s
        self.result = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        time.sleep(self.delay)
        self.puller.submit(RecvSpec("req-d", "127.0.0.1", self.port, TID, "req-p", BLOCKS, LOCAL, 128))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.puller.pump(0.01)
            done, failed = self.puller.take_results()
            if done:
                self.result = (done, failed)
                break
            time.sleep(0.0005)
        self.puller.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._thread.join(15)


def test_producer_waits_for_the_pull_and_frees_the_lease_in_the_same_step():
    w, src, port = _producer_worker(idle_wait_ms=3000)
    w.start_load_kv(AscendConnectorMetadata(sends=[SendSpec("req-p", TID, BLOCKS)], no_forward=True))
    with _Consumer(port, delay_s=0.2) as cons:
        t0 = time.monotonic()
        sending, _, _ = w.get_finished()
        took = time.monotonic() - t0
    w.server.close()
    assert sending == {"req-p"} and w.leases.pending() == 0
    assert took < 2.5
    assert cons.result == ({"req-d"}, set())
    for s, d in zip(src.tensors, cons.dst.tensors):
        assert torch.equal(d[LOCAL], s[BLOCKS])


def test_producer_does_not_wait_with_a_pull_parked_for_its_lease():
    w, _, port = _producer_worker(idle_wait_ms=3000)
    with _Consumer(port, delay_s=0.0):
        deadline = time.monotonic() + 5
        while not w.server.has_parked() and time.monotonic() < deadline:
            w.server.pump(0.01)
            time.sleep(0.001)
        assert w.server.has_parked()
        # The lease would register in the next step's start_load_kv; a wait
        # here would only delay that step.
        w._no_forward = True
        t0 = time.monotonic()
        w.get_finished()
        assert time.monotonic() - t0 < 0.2
        w.start_load_kv(AscendConnectorMetadata(sends=[SendSpec("req-p", TID, BLOCKS)], no_forward=True))
        sending, _, _ = w.get_finished()
    w.server.close()
    assert sending == {"req-p"}


def test_other_transports_never_wait():
    w, _, _ = _producer_worker(idle_wait_ms=3000)
    w.leases.register("req-p", TID, BLOCKS)
    w.transport = SimpleNamespace(name="gloo")
    w._no_forward = True
    t0 = time.monotonic()
    w.get_finished()
    assert time.monotonic() - t0 < 0.2
    w.server.close()


class _BusyServer:
    """A producer whose send always has more to move: never blocked."""

    def __init__(self):
        self.pumps = 0

    def pump(self, budget_s):
        self.pumps += 1
        return False

    def has_parked(self):
        return False

    def sending(self):
        return True


def test_wait_never_moves_more_than_one_pump_budget_per_step():
    # The fault tests slow transfers down with a tiny pump budget; a
    # no-forward step must keep that bound rather than pump until idle_wait.
    w = _worker(idle_wait_ms=3000, producer=True)
    w.server = _BusyServer()
    w.transport = SimpleNamespace(name="tcp", poll_items=lambda: [])
    w._no_forward = True
    t0 = time.monotonic()
    w.get_finished()
    assert w.server.pumps == 1
    assert time.monotonic() - t0 < 0.2
