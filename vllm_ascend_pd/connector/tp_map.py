"""Heterogeneous tensor parallelism: which producer ranks a consumer rank
pulls from, and which KV heads of each.

vLLM splits the model's ``K`` KV heads over ``T`` tensor-parallel ranks: with
``T <= K`` rank ``r`` holds heads ``[r*K/T, (r+1)*K/T)``; with ``T > K`` each
head is replicated on ``T/K`` consecutive ranks and rank ``r`` holds head
``r // (T/K)``. A consumer rank needs exactly the global heads it holds, so it
pulls one contiguous piece from each producer rank that overlaps them (one
holder per head when the producer replicates). MLA's latent cache is the same
on every rank: any one producer rank suffices.

Producer ranks that no consumer rank pulls from (MLA, or replicated heads) are
released by the consumer rank ``p % consumer_tp`` so their blocks free at once.

Plain arithmetic, no I/O: both sides compute the same map.
"""

from __future__ import annotations

from dataclasses import dataclass


class TPMapError(ValueError):
    pass


@dataclass(frozen=True)
class HeadRange:
    """KV heads ``[start, stop)`` of a rank-local cache tensor."""

    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Piece:
    """One pull: ``src`` heads of ``producer_rank`` land in the consumer's ``dst``
    heads. ``None`` ranges mean whole tensors (MLA, or both ranks hold the
    same heads), which every transport can move."""

    producer_rank: int
    src: HeadRange | None
    dst: HeadRange | None


def check_tp(num_kv_heads: int, tp_size: int) -> None:
    if num_kv_heads <= 0 or tp_size <= 0:
        raise TPMapError(f"need positive KV heads and TP size (got {num_kv_heads}, {tp_size})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise TPMapError(
            f"tensor-parallel size {tp_size} does not divide the model's {num_kv_heads} KV "
            "heads (nor the other way round): choose a TP size that does"
        )


def heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    check_tp(num_kv_heads, tp_size)
    return max(1, num_kv_heads // tp_size)


def rank_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads rank ``rank`` of ``tp_size`` holds."""
    check_tp(num_kv_heads, tp_size)
    if not 0 <= rank < tp_size:
        raise TPMapError(f"rank {rank} is outside tensor-parallel size {tp_size}")
    if tp_size <= num_kv_heads:
        n = num_kv_heads // tp_size
        return range(rank * n, (rank + 1) * n)
    h = rank // (tp_size // num_kv_heads)
    return range(h, h + 1)


def pieces_for(
    consumer_rank: int,
    consumer_tp: int,
    producer_tp: int,
    num_kv_heads: int,
    replicated: bool,
) -> list[Piece]:
    """The pulls consumer rank ``consumer_rank`` makes, in head order."""
    if replicated:
        if not 0 <= consumer_rank < consumer_tp or producer_tp <= 0:
            raise TPMapError(f"bad ranks: consumer {consumer_rank}/{consumer_tp}, producer tp {producer_tp}")
        # Spread consumer ranks over producer ranks.
        return [Piece(consumer_rank % producer_tp, None, None)]
    want = rank_heads(num_kv_heads, consumer_tp, consumer_rank)
    producers = [rank_heads(num_kv_heads, producer_tp, p) for p in range(producer_tp)]
    pieces: list[Piece] = []
    h = want.start
    while h < want.stop:
        holders = [p for p, have in enumerate(producers) if h in have]
        # Replicated on the producer: spread consumer ranks over the holders.
        p = holders[consumer_rank % len(holders)]
        have = producers[p]
        stop = min(want.stop, have.stop)
        if (h, stop) == (want.start, want.stop) == (have.start, have.stop):
            pieces.append(Piece(p, None, None))  # whole rank to whole rank
        else:
            pieces.append(
                Piece(
                    p,
                    HeadRange(h - have.start, stop - have.start),
                    HeadRange(h - want.start, stop - want.start),
                )
            )
        h = stop
    return pieces


def consumers_of(
    producer_rank: int,
    producer_tp: int,
    consumer_tp: int,
    num_kv_heads: int,
    replicated: bool,
) -> dict[int, Piece]:
    """Consumer rank -> the piece it pulls from ``producer_rank``."""
    out: dict[int, Piece] = {}
    for c in range(consumer_tp):
        for piece in pieces_for(c, consumer_tp, producer_tp, num_kv_heads, replicated):
            if piece.producer_rank == producer_rank:
                out[c] = piece
    return out


def releases_for(
    consumer_rank: int,
    consumer_tp: int,
    producer_tp: int,
    num_kv_heads: int,
    replicated: bool,
) -> list[int]:
    """Producer ranks nobody pulls from that this consumer rank must release."""
    return [
        p
        for p in range(consumer_rank, producer_tp, consumer_tp)
        if not consumers_of(p, producer_tp, consumer_tp, num_kv_heads, replicated)
    ]


def release_owner(producer_rank: int, consumer_tp: int) -> int:
    """The consumer rank that sends a producer rank's release."""
    return producer_rank % consumer_tp
