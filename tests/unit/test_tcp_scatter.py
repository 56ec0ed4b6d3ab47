"""The tcp transport's CPU scatter: one copy per run of consecutive blocks."""

from __future__ import annotations

import random

import torch

from vllm_ascend_pd.transport.tcp import block_runs, scatter_runs


def test_block_runs_split_at_every_gap():
    assert block_runs([]) == []
    assert block_runs([7]) == [(0, 7, 1)]
    assert block_runs([3, 4, 5, 9, 1, 2]) == [(0, 3, 3), (3, 9, 1), (4, 1, 2)]
    assert block_runs([5, 4, 3]) == [(0, 5, 1), (1, 4, 1), (2, 3, 1)]


def test_scatter_runs_matches_index_copy():
    rnd = random.Random(0)
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(20):
            nb = rnd.randint(1, 40)
            ids = rnd.sample(range(64), nb)
            if rnd.random() < 0.5:
                ids.sort()  # long runs
            src = torch.randn(nb, 4, 2, 8).to(dtype)
            want = torch.zeros(64, 4, 2, 8, dtype=dtype)
            got = want.clone()
            want.index_copy_(0, torch.tensor(ids), src)
            scatter_runs(got, ids, src)
            assert torch.equal(got, want)
