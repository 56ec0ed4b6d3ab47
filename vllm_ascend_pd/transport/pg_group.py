"""The pair groups of one ``gloo`` / ``hccl`` transport: formed lazily in
helper threads, cached per pair, evicted and torn down off the engine thread.

A pair is one consumer connection (one ZMQ DEALER socket, named on both ends
by its routing id, ``Link.pair_id``); its group lives under its own key
prefix on the producer rank's store. Forming a group blocks until both sides
join, so it runs in a helper thread while the engine thread polls. A group
is kept until a transfer on it fails, the transport closes, or more than
``_MAX_PAIRS`` exist (the least recently used idle one is closed).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Generator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.transport.base import Step, TransferError
from vllm_ascend_pd.transport.pg_backend import build_group, root0, shutdown

logger = get_logger(__name__)

# Groups kept per transport; each holds sockets and backend threads.
_MAX_PAIRS = 32
# Extra time a group build gets beyond the store/backend timeouts it runs under.
_SETUP_SLACK_S = 5.0
# Longest time close() waits for groups to shut down.
_CLOSE_WAIT_S = 1.0


@dataclass(eq=False)
class Pair:
    pair_id: bytes
    where: str
    backend: str
    setup: Future
    # [group], emptied by the teardown thread. Destroying a gloo group with an
    # operation still pending blocks until that operation times out, so the
    # engine thread never holds the last reference: the teardown thread does.
    box: list | None = None
    busy: bool = False
    dropped: bool = False
    last_used: float = 0.0

    def post(self, tensor: torch.Tensor):
        if not self.box:
            raise TransferError(f"the {self.backend} group with {self.where} was closed", "closed")
        return self.box[0].broadcast([tensor], root0())


class PairGroups:
    """The pairs of one transport, by pair id, least recently used first."""

    def __init__(self, backend: str, device: torch.device, local_host: str, timeout_s: float):
        self.backend = backend
        self.device = device
        self.local_host = local_host
        self.timeout_s = timeout_s
        self.pairs: collections.OrderedDict[bytes, Pair] = collections.OrderedDict()
        self.closed = False
        self._teardowns: list[Future] = []  # appended from helper threads

    def get(
        self,
        pair_id: bytes,
        rank: int,
        host: str,
        port: int,
        where: str,
        poll: Callable[[], None] | None = None,
    ) -> Generator[bool, None, Pair]:
        """The pair's group, formed on first use while the caller polls."""
        if self.closed:
            raise TransferError("the transport is closed", "closed")
        pair = self.pairs.get(pair_id)
        if pair is None:
            self._evict()
            prefix = f"ascend_pd/{pair_id.hex()}/"
            setup = _spawn(self._form, host, port, prefix, rank)
            pair = Pair(pair_id, where, self.backend, setup)
            self.pairs[pair_id] = pair
        else:
            self.pairs.move_to_end(pair_id)
        # The build runs under the store's and the backend's timeouts; this
        # only guards against a build that never returns.
        limit = 2 * self.timeout_s + _SETUP_SLACK_S
        deadline = time.monotonic() + limit
        try:
            while not pair.setup.done():
                if poll is not None:
                    poll()
                if time.monotonic() >= deadline:
                    raise TransferError(
                        f"no {self.backend} group with {where} (rendezvous {host}:{port}) "
                        f"after {limit:.0f}s",
                        cause="timeout",
                    )
                yield False
            if pair.box is None:
                try:
                    pair.box = pair.setup.result()
                except Exception as e:  # noqa: BLE001 - reported with its cause
                    raise TransferError(
                        f"could not form a {self.backend} group with {where} (rendezvous "
                        f"{host}:{port}; is the producer's group port reachable?): {e}",
                        cause="group_setup",
                    ) from None
        except BaseException:
            self.drop(pair)
            raise
        return pair

    def run(self, pair: Pair, body: Step) -> Step:
        """Run one transfer on ``pair``: one at a time per pair (a second pull on
        the same connection waits), and a failure ends the pair's group."""
        deadline = time.monotonic() + self.timeout_s
        while pair.busy:
            if pair.dropped or time.monotonic() >= deadline:
                raise TransferError(
                    f"the {self.backend} group with {pair.where} is busy or failed", "peer_stalled"
                )
            yield False
        if pair.dropped:
            raise TransferError(f"the {self.backend} group with {pair.where} failed", "peer_lost")
        pair.busy = True
        ok = False
        try:
            result = yield from body
            ok = True
            return result
        finally:
            pair.busy = False
            pair.last_used = time.monotonic()
            if not ok:
                self.drop(pair)

    def _form(self, host: str, port: int, prefix: str, rank: int):
        """Runs in a helper thread: connect to the store, build the group, and
        move one byte so both sides are fully connected (HCCL creates its
        communicator on the first operation)."""
        from torch.distributed import PrefixStore, TCPStore

        _bind_device(self.device)
        timeout = timedelta(seconds=self.timeout_s)
        store = TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        pg = build_group(
            self.backend, PrefixStore(prefix, store), rank, self.local_host, timeout
        )
        try:
            probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
            pg.broadcast([probe], root0()).wait()
        except BaseException:
            shutdown(pg)
            raise
        return [pg]  # see Pair.box

    def drop(self, pair: Pair) -> None:
        if pair.dropped:
            return
        pair.dropped = True
        if self.pairs.get(pair.pair_id) is pair:
            del self.pairs[pair.pair_id]
        # Tear down off the engine thread, once the build (if any) has ended.
        self._teardowns = [f for f in self._teardowns if not f.done()]
        pair.setup.add_done_callback(
            lambda f: self._teardowns.append(_spawn(_teardown, f, self.device))
        )

    def _evict(self) -> None:
        while len(self.pairs) >= _MAX_PAIRS:
            idle = [p for p in self.pairs.values() if not p.busy and p.setup.done()]
            if not idle:
                return
            logger.info("%s transport: closing the idle group with %s", self.backend, idle[0].where)
            self.drop(idle[0])

    def close(self) -> None:
        self.closed = True
        for pair in list(self.pairs.values()):
            self.drop(pair)
        # Give teardowns a moment, so groups are not destroyed while the
        # interpreter exits; a group with a stuck operation is left behind.
        futures.wait(list(self._teardowns), timeout=_CLOSE_WAIT_S)


def _bind_device(device: Any) -> None:
    """Threads that touch an NPU set it first, or they create a context on
    device 0 (vllm-ascend #12126)."""
    if device.type == "npu":
        torch.npu.set_device(device)


def _teardown(setup: Future, device: Any) -> None:
    """Runs in a helper thread; drops the last reference to the group here,
    where its destructor may wait out pending operations. ProcessGroupHCCL's
    shutdown synchronizes its NPU streams and destroys its communicators
    (Ascend/pytorch torch_npu/csrc/distributed/ProcessGroupHCCL.cpp), so the
    thread binds the device first."""
    if setup.exception() is not None:
        return
    box = setup.result()
    pg = box.pop() if box else None
    if pg is not None:
        _bind_device(device)
        shutdown(pg)
        del pg


def _spawn(fn: Callable[..., Any], *args: Any) -> Future:
    """Run a blocking call in a daemon thread (never delays interpreter exit);
    the caller polls the future from the engine thread."""
    fut: Future = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the poller
            fut.set_exception(e)

    threading.Thread(target=run, name="ascend-pd-pg", daemon=True).start()
    return fut
