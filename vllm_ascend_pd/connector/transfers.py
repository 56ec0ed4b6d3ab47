"""Producer-side bookkeeping of leased blocks. The engine thread registers
leases and collects finished ones; the KV server validates pulls against them
and ends them. All callers hold the worker's lock (see worker.py)."""

from __future__ import annotations

import collections
import enum
import time
from dataclasses import dataclass, field


class State(enum.Enum):
    LEASED = "leased"
    SENDING = "sending"


@dataclass
class Lease:
    request_id: str
    transfer_id: str
    block_ids: list[int]
    deadline: float
    state: State = State.LEASED
    block_set: frozenset[int] = field(default_factory=frozenset)
    # Heterogeneous TP: the consumer ranks that must each pull once (fixed by
    # the first pull), those that started, and those that finished.
    expected: frozenset[int] = frozenset({0})
    claimed: set[int] = field(default_factory=set)
    pulled: set[int] = field(default_factory=set)
    # The prompt the blocks hold (params.prompt_hash); "": not checked.
    prompt_hash: str = ""


class LeaseTable:
    def __init__(self, lease_s: float, clock=time.monotonic):
        self._lease_s = lease_s
        self._clock = clock
        self._by_transfer: dict[str, Lease] = {}
        self._finished: set[str] = set()
        # Recently ended transfers, to tell a replay from a bogus id.
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()

    def register(
        self, request_id: str, transfer_id: str, block_ids: list[int], prompt_hash: str = ""
    ) -> None:
        self._by_transfer[transfer_id] = Lease(
            request_id,
            transfer_id,
            list(block_ids),
            self._clock() + self._lease_s,
            block_set=frozenset(block_ids),
            prompt_hash=prompt_hash,
        )

    def _check(self, transfer_id: str, request_id: str) -> Lease | str:
        lease = self._by_transfer.get(transfer_id)
        if lease is None:
            return self._ended.get(transfer_id) or "unknown transfer id"
        if lease.request_id != request_id:
            return "transfer id does not belong to that request"
        return lease

    def begin_send(
        self,
        transfer_id: str,
        request_id: str,
        block_ids: list[int],
        puller: int = 0,
        expected: frozenset[int] = frozenset({0}),
        prompt_hash: str = "",
    ) -> Lease | str:
        """Claim a lease for one pull by consumer rank ``puller`` out of the
        ``expected`` ranks; return it, or the reason it is refused."""
        lease = self._check(transfer_id, request_id)
        if isinstance(lease, str):
            return lease
        if lease.prompt_hash and prompt_hash != lease.prompt_hash:
            # The consumer would cache these blocks under its own prompt's
            # block hashes: another prompt's KV would poison its prefix cache.
            return "the pull names another prompt than the one this transfer holds"
        if puller not in expected:
            return "this consumer rank has nothing to pull from this producer rank"
        if lease.claimed and expected != lease.expected:
            return "pulls of one transfer disagree on the consumer's tensor-parallel size"
        if puller in lease.claimed:
            return "transfer is already being pulled"
        if not block_ids or not lease.block_set.issuperset(block_ids):
            return "block ids are not part of this transfer"
        lease.expected = expected
        lease.claimed.add(puller)
        lease.state = State.SENDING
        return lease

    def end_send(self, transfer_id: str, puller: int = 0) -> bool:
        """One pull finished; the lease ends when every expected rank pulled.
        Returns whether it ended."""
        lease = self._by_transfer.get(transfer_id)
        if lease is None:
            return False
        lease.pulled.add(puller)
        if lease.pulled >= lease.expected:
            return self.end(transfer_id, "pulled")
        if lease.pulled == lease.claimed:
            lease.state = State.LEASED  # idle until the next rank pulls (or expiry)
        return False

    def release(
        self, transfer_id: str, request_id: str, prompt_hash: str = "", *, puller: bool = False
    ) -> str | None:
        """Free a lease the consumer will not pull (or, ``puller``: stops
        pulling); return why not, or None."""
        lease = self._check(transfer_id, request_id)
        if isinstance(lease, str):
            return lease
        if lease.prompt_hash and prompt_hash != lease.prompt_hash:
            # Only the consumer of this prompt may free it: a client holding
            # someone else's transfer id must not cancel their KV.
            return "the release names another prompt than the one this transfer holds"
        if lease.state is not State.LEASED and not puller:
            return "transfer is being pulled"
        self.end(transfer_id, "released by consumer")
        return None

    def end(self, transfer_id: str, reason: str) -> bool:
        """Finish a lease (pulled, released, failed or expired); frees its blocks.

        A failed send is ended too: nothing can be retried safely, the
        consumer recomputes."""
        lease = self._by_transfer.pop(transfer_id, None)
        if lease is None:
            return False
        self._finished.add(lease.request_id)
        self._ended[transfer_id] = f"transfer already ended ({reason})"
        while len(self._ended) > 4096:
            self._ended.popitem(last=False)
        return True

    def knows(self, transfer_id: str) -> bool:
        return transfer_id in self._by_transfer or transfer_id in self._ended

    def expire(self) -> int:
        now = self._clock()
        stale = [
            t
            for t, lease in self._by_transfer.items()
            if lease.state is State.LEASED and lease.deadline <= now
        ]
        for t in stale:
            self.end(t, "lease expired")
        return len(stale)

    def has_finished(self) -> bool:
        return bool(self._finished)

    def take_finished(self) -> set[str]:
        done, self._finished = self._finished, set()
        return done

    def pending(self) -> int:
        return len(self._by_transfer)
