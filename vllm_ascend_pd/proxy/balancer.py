"""Load-balancing policies.  Pure functions of the candidates' counters.

Ties never favour a position in the list: round robin rotates, the
least-outstanding policies break ties at random.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from vllm_ascend_pd.proxy.codec import RequestBody
from vllm_ascend_pd.proxy.registry import Instance


class Policy:
    name = "base"

    def __init__(self, rng: Optional[random.Random] = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Instance]) -> Instance:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, rng: Optional[random.Random] = None):
        super().__init__(rng)
        # Random start so that several proxies do not march in lock step.
        self._next = self._rng.randrange(1 << 30)

    def pick(self, candidates: Sequence[Instance]) -> Instance:
        # Order by address so that the rotation is stable when the candidate
        # list is rebuilt between calls.
        ordered = sorted(candidates, key=lambda i: i.address) if len(candidates) > 1 \
            else candidates
        inst = ordered[self._next % len(ordered)]
        self._next += 1
        return inst


class _LeastOutstanding(Policy):
    attr = ""

    def pick(self, candidates: Sequence[Instance]) -> Instance:
        if len(candidates) == 1:
            return candidates[0]
        attr = self.attr
        best = min(getattr(i, attr) for i in candidates)
        ties = [i for i in candidates if getattr(i, attr) == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


class LeastRequests(_LeastOutstanding):
    name = "least_requests"
    attr = "inflight_requests"


class LeastTokens(_LeastOutstanding):
    name = "least_tokens"
    attr = "inflight_tokens"


POLICY_CLASSES = {cls.name: cls for cls in (RoundRobin, LeastRequests, LeastTokens)}


def make_policy(name: str, rng: Optional[random.Random] = None) -> Policy:
    try:
        return POLICY_CLASSES[name](rng)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of "
                         f"{', '.join(POLICY_CLASSES)}") from None


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
