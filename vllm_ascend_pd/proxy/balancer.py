"""Load-balancing policies.  Pure functions of the candidates' counters
(and, for prefix affinity, of the request's prompt prefix).

Ties never favour a position in the list: round robin rotates, the
least-outstanding policies break ties at random, prefix affinity ranks by a
hash of (prefix, address).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Callable, Optional, Sequence

from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.registry import Instance


class Policy:
    """Every policy takes the same arguments, so that none is special to
    :func:`make_policy`; each uses those that concern it.

    ``load_factor``: prefix affinity's load bound (x the fair share).
    ``on_spill``: called for each pick that passed over the policy's own
    first choice because of its load (only prefix affinity does; a metric).
    """

    name = "base"

    def __init__(self, rng: Optional[random.Random] = None, *, load_factor: float = 1.25,
                 on_spill: Optional[Callable[[], None]] = None):
        self._rng = rng or random.Random()
        self.load_factor = load_factor
        self._on_spill = on_spill or (lambda: None)

    def pick(self, candidates: Sequence[Instance], key: bytes = b"") -> Instance:
        """``key``: the request's :func:`affinity_key` (only prefix affinity uses it)."""
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, rng: Optional[random.Random] = None, **options):
        super().__init__(rng, **options)
        # Random start so that several proxies do not march in lock step.
        self._next = self._rng.randrange(1 << 30)

    def pick(self, candidates: Sequence[Instance], key: bytes = b"") -> Instance:
        # Order by address so that the rotation is stable when the candidate
        # list is rebuilt between calls.
        ordered = sorted(candidates, key=lambda i: i.address) if len(candidates) > 1 \
            else candidates
        inst = ordered[self._next % len(ordered)]
        self._next += 1
        return inst


def loads(candidates: Sequence[Instance], tokens: bool = False) -> list[int]:
    """Each candidate's outstanding requests (or prompt tokens), read once:
    with --workers N other workers change them meanwhile (a second read
    could leave no candidate equal to the minimum). Summed over the workers
    when every candidate has a shared slot, else this worker's own for all,
    so a pick never compares one kind with the other."""
    if all(i.shared is not None for i in candidates):
        return [i.load_tokens if tokens else i.load_requests for i in candidates]
    return [i.inflight_tokens if tokens else i.inflight_requests for i in candidates]


class _LeastOutstanding(Policy):
    tokens = False

    def pick(self, candidates: Sequence[Instance], key: bytes = b"") -> Instance:
        if len(candidates) == 1:
            return candidates[0]
        counts = loads(candidates, self.tokens)
        best = min(counts)
        ties = [i for load, i in zip(counts, candidates) if load == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


class LeastRequests(_LeastOutstanding):
    name = "least_requests"


class LeastTokens(_LeastOutstanding):
    name = "least_tokens"
    tokens = True


class PrefixAffinity(Policy):
    """Requests whose prompts start alike go to the same instance, so its
    prefix cache serves the shared part (P computes less; D pulls less).

    Rendezvous hashing of the prompt prefix: every instance gets a score
    hash(key, address) and the highest wins. It needs no shared state, so
    several workers or proxies agree on the instance, and an instance that
    leaves or joins moves only the keys it wins or won. Bounded load: an
    instance already holding more than ``load_factor`` times its fair share
    of the outstanding requests is passed over for the next-ranked one, so
    one hot prefix cannot pile onto one node.
    """

    name = "prefix_affinity"

    def __init__(self, rng: Optional[random.Random] = None, **options):
        super().__init__(rng, **options)
        self._fallback = LeastRequests(self._rng)

    def pick(self, candidates: Sequence[Instance], key: bytes = b"") -> Instance:
        if len(candidates) == 1:
            return candidates[0]
        if not key:
            return self._fallback.pick(candidates)
        ranked = sorted(candidates, key=lambda i: _score(key, i.address), reverse=True)
        load = {id(i): n for i, n in zip(candidates, loads(candidates))}
        total = sum(load.values())
        # The request about to start counts, so an idle cluster never spills.
        bound = math.ceil(self.load_factor * (total + 1) / len(candidates))
        for inst in ranked:
            if load[id(inst)] < bound:
                if inst is not ranked[0]:
                    self._on_spill()
                return inst
        return ranked[0]  # unreachable: someone is at or below the mean


def _score(key: bytes, address: str) -> bytes:
    return hashlib.blake2b(address.encode(), digest_size=8, key=key).digest()


def affinity_key(body: RequestBody, prefix_bytes: int) -> bytes:
    """Digest of the first ``prefix_bytes`` of the prompt as the client sent
    it (``prompt`` or chat ``messages``, raw JSON); empty if there is none."""
    raw = body.raw("prompt") or body.raw("messages")
    if not raw:
        return b""
    return hashlib.blake2b(raw[:prefix_bytes], digest_size=16).digest()


POLICY_CLASSES = {cls.name: cls for cls in (RoundRobin, LeastRequests, LeastTokens,
                                            PrefixAffinity)}


def make_policy(name: str, rng: Optional[random.Random] = None, **options) -> Policy:
    """``options``: the keyword arguments of :class:`Policy`."""
    try:
        cls = POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of "
                         f"{', '.join(POLICY_CLASSES)}") from None
    return cls(rng, **options)


def estimate_prompt_tokens(body: RequestBody) -> int:
    """Cheap prompt-size estimate from the raw JSON, without parsing the prompt.

    A token-id list counts its ids; text counts one token per 4 bytes.
    """
    total = 0
    prompt = body.raw("prompt")
    if prompt:
        head = prompt.lstrip()[:2]
        if head[:1] == b"[" and head[1:2].isdigit():
            total += prompt.count(b",") + 1  # [1, 2, 3]
        else:
            total += len(prompt) // 4 + 1
    messages = body.raw("messages")
    if messages:
        total += len(messages) // 4 + 1
    return max(total, 1)
