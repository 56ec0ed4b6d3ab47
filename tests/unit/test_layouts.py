"""Cache layouts the connector must move byte-exactly: vLLM >= 0.32 logical
views (CPU attention and CPU MLA), older vLLM backend-ordered tensors, and
vllm-ascend's per-layer (k, v) and MLA (k_nope, k_pe) tuples.

Axes come from the backend (fakes below mirror the real get_kv_cache_shape
of vllm-ascend's AscendAttentionBackend / AscendMLABackend and vLLM's flash
attention), never from tensor sizes. Each round trip gathers blocks from a
source cache into packed bytes, scatters them into other blocks of a fresh
cache, and checks the result against plain indexing of the original tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_ascend_pd.connector.worker import WorkerSide
from vllm_ascend_pd.kv_layout import (
    VLLM_LOGICAL_AXES,
    CacheAxes,
    HeadRange,
    LayoutError,
    PagedKVCache,
    axes_from_backend,
    check_compatible,
    plan_chunks,
)

NB, BS = 12, 16
SRC = [3, 0, 11, 7]
DST = [5, 9, 1, 2]


class AscendAttn:  # vllm_ascend/attention/attention_v1.py
    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str=""):
        return (2, num_blocks, block_size, num_kv_heads, head_size)


class AscendMLA:  # vllm_ascend/attention/mla_v1.py
    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_type=""):
        return (num_blocks, block_size, num_kv_heads, head_size)


class FlashAttn:  # vllm (pre-0.32) flash_attn.py; stride order only permutes memory
    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        if block_size % 16 != 0:
            raise ValueError("Block size must be a multiple of 16.")
        return (2, num_blocks, block_size, num_kv_heads, head_size)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def backend_axes(backend, is_mla=False):
    return lambda layer, i, t: axes_from_backend(backend, t.dim(), split_heads=not is_mla)


def round_trip(src: PagedKVCache, dst: PagedKVCache, heads_src=None, heads_dst=None, chunk=1024):
    """Ship SRC blocks of ``src`` into DST blocks of ``dst`` through bytes."""
    si, di = torch.tensor(SRC), torch.tensor(DST)
    for ch in plan_chunks(src, len(SRC), chunk, heads_src):
        packed = src.gather(ch.tensor, si[ch.start : ch.stop], heads_src)
        wire = bytes(packed.contiguous().view(torch.uint8).numpy())  # what a transport moves
        assert len(wire) == (ch.stop - ch.start) * src.block_bytes(ch.tensor, heads_src)
        dst.scatter(ch.tensor, di[ch.start : ch.stop], torch.frombuffer(bytearray(wire), dtype=torch.uint8), heads_dst)


def blocks(t: torch.Tensor, dim: int, ids: list[int], factor: int = 1) -> torch.Tensor:
    """Reference: scheduler blocks ``ids`` of a raw tensor, by plain indexing."""
    kernel = [b * factor + j for b in ids for j in range(factor)]
    return t.index_select(dim, torch.tensor(kernel))


def untouched(t: torch.Tensor, dim: int, n_blocks: int, factor: int = 1) -> list[int]:
    return [k for k in range(n_blocks * factor) if k // factor not in DST]


# -- vLLM >= 0.32: logical [B, H, N, C] views ---------------------------------


@pytest.mark.parametrize("physical", ["BHNC", "BNHC"])
def test_vllm_logical_view_round_trip(physical):
    H, C = 4, 2 * 32  # CPU attention packs K and V into C
    if physical == "BHNC":
        raw = rand(NB, H, BS, C)
        a = rand(NB, H, BS, C, seed=1)
    else:  # another physical order behind the same logical view
        raw = rand(NB, BS, H, C).permute(0, 2, 1, 3)
        a = rand(NB, BS, H, C, seed=1).permute(0, 2, 1, 3)
    b = a.clone()
    src = PagedKVCache.from_vllm({"l0": raw, "l1": raw * 2}, NB, BS, lambda *_: VLLM_LOGICAL_AXES, num_kv_heads=H)
    dst = PagedKVCache.from_vllm({"l0": a, "l1": a * 0 + b}, NB, BS, lambda *_: VLLM_LOGICAL_AXES, num_kv_heads=H)
    before = a.clone()
    round_trip(src, dst)
    assert torch.equal(blocks(a, 0, DST), blocks(raw, 0, SRC))
    keep = untouched(a, 0, NB)
    assert torch.equal(a[keep], before[keep])
    assert src.describe().tensors[0].head_axis == 0


def test_vllm_cpu_mla_view_is_not_split_by_heads():
    lat = rand(NB, 1, BS, 576)
    cache = PagedKVCache.from_vllm({"l0": lat}, NB, BS, lambda *_: VLLM_LOGICAL_AXES, is_mla=True, num_kv_heads=1)
    assert cache.head_axes == [None] and cache.describe().tensors[0].head_axis == -1
    dst_raw = torch.zeros_like(lat)
    dst = PagedKVCache.from_vllm({"l0": dst_raw}, NB, BS, lambda *_: VLLM_LOGICAL_AXES, is_mla=True, num_kv_heads=1)
    round_trip(cache, dst, chunk=576 * 4 * BS)  # one block per chunk
    assert torch.equal(dst_raw[DST], lat[SRC])
    assert torch.count_nonzero(dst_raw[[k for k in range(NB) if k not in DST]]) == 0


def test_kernel_blocks_smaller_than_scheduler_blocks():
    # vLLM splits a 32-token scheduler block into two 16-token kernel blocks.
    raw = rand(NB * 2, 2, BS, 8)
    dst_raw = torch.zeros_like(raw)
    axes = lambda *_: VLLM_LOGICAL_AXES  # noqa: E731
    src = PagedKVCache.from_vllm({"l": raw}, NB, 2 * BS, axes, num_kv_heads=2)
    dst = PagedKVCache.from_vllm({"l": dst_raw}, NB, 2 * BS, axes, num_kv_heads=2)
    assert src.tensors[0].shape == (NB, 2, 2, BS, 8) and src.head_axes == [2]
    round_trip(src, dst)
    assert torch.equal(blocks(dst_raw, 0, DST, 2), blocks(raw, 0, SRC, 2))
    keep = untouched(dst_raw, 0, NB, 2)
    assert torch.count_nonzero(dst_raw[keep]) == 0
    # Head slices work through the extra kernel-block dim too.
    dst_raw.zero_()
    round_trip(src, dst, HeadRange(1, 2), HeadRange(0, 1))
    assert torch.equal(blocks(dst_raw, 0, DST, 2)[:, 0], blocks(raw, 0, SRC, 2)[:, 1])
    assert torch.count_nonzero(dst_raw[:, 1]) == 0


# -- older vLLM: the backend's logical order, strided memory ------------------


def test_old_vllm_kv_stacked_first_uses_backend_block_dim():
    # (2, num_blocks, block_size, heads, head) viewed through a stride-order
    # permutation, as vLLM < 0.32 handed it out: block dim is 1, not 0.
    phys = rand(NB, 2, BS, 4, 32)  # memory: blocks outermost
    raw = phys.permute(1, 0, 2, 3, 4)
    dst_phys = torch.zeros_like(phys)
    dst_raw = dst_phys.permute(1, 0, 2, 3, 4)
    axes = backend_axes(FlashAttn)
    assert axes("l", 0, raw) == CacheAxes(block=1, tokens=2, heads=3)
    src = PagedKVCache.from_vllm({"l": raw}, NB, BS, axes, num_kv_heads=4)
    dst = PagedKVCache.from_vllm({"l": dst_raw}, NB, BS, axes, num_kv_heads=4)
    round_trip(src, dst)
    assert torch.equal(dst_raw[:, DST], raw[:, SRC])
    assert torch.count_nonzero(dst_raw[:, [k for k in range(NB) if k not in DST]]) == 0


# -- vllm-ascend: per-layer tuples --------------------------------------------


def ascend_kv(seed: int, heads=4, head=32, extra_blocks=3, factor=1):
    """(k, v) as vllm-ascend's model runner reshapes them: each
    (blocks * factor [+ spare], block_size / factor, heads, head)."""
    n = NB * factor + extra_blocks
    return (rand(n, BS // factor, heads, head, seed=seed), rand(n, BS // factor, heads, head, seed=seed + 1))


@pytest.mark.parametrize("factor", [1, 2])
def test_ascend_kv_tuple_round_trip(factor):
    axes = backend_axes(AscendAttn)
    src_t = {f"model.layers.{i}.self_attn.attn": ascend_kv(10 * i, factor=factor) for i in range(3)}
    dst_t = {k: tuple(torch.zeros_like(p) for p in v) for k, v in src_t.items()}
    # The runner allocated spare blocks beyond the scheduler's: they are not
    # addressable, and dim 0 is still the block dim (no size guessing).
    src = PagedKVCache.from_vllm(src_t, NB, BS, axes, num_kv_heads=4)
    dst = PagedKVCache.from_vllm(dst_t, NB, BS, axes, num_kv_heads=4)
    assert len(src.tensors) == 6 and src.names[1] == "model.layers.0.self_attn.attn[1]"
    assert all(t.shape[0] == NB for t in src.tensors)
    round_trip(src, dst)
    for name in src_t:
        for s, d in zip(src_t[name], dst_t[name]):
            assert torch.equal(blocks(d, 0, DST, factor), blocks(s, 0, SRC, factor))
            assert torch.count_nonzero(d[untouched(d, 0, NB, factor)]) == 0


def test_ascend_mla_tuple_round_trip():
    # MLA: (k_nope (.., 1, kv_lora_rank), k_pe (.., 1, rope_dim)), same leading axes.
    axes = backend_axes(AscendMLA, is_mla=True)
    src_t = {f"l{i}": (rand(NB + 1, BS, 1, 512, seed=i), rand(NB + 1, BS, 1, 64, seed=i + 7)) for i in range(2)}
    dst_t = {k: tuple(torch.zeros_like(p) for p in v) for k, v in src_t.items()}
    src = PagedKVCache.from_vllm(src_t, NB, BS, axes, is_mla=True, num_kv_heads=1)
    dst = PagedKVCache.from_vllm(dst_t, NB, BS, axes, is_mla=True, num_kv_heads=1)
    desc = src.describe(tp_size=2)
    assert [t.block_shape for t in desc.tensors] == [(BS, 1, 512), (BS, 1, 64)] * 2
    assert all(t.head_axis == -1 for t in desc.tensors) and desc.is_mla
    round_trip(src, dst, chunk=BS * 64 * 4 * 2)
    for name in src_t:
        for s, d in zip(src_t[name], dst_t[name]):
            assert torch.equal(d[DST], s[SRC])
            assert torch.count_nonzero(d[[k for k in range(NB + 1) if k not in DST]]) == 0


def test_ascend_bf16_head_slice_round_trip():
    axes = backend_axes(AscendAttn)
    src_t = {"l": tuple(p.to(torch.bfloat16) for p in ascend_kv(1, heads=4))}
    dst_t = {"l": tuple(torch.zeros(NB, BS, 2, 32, dtype=torch.bfloat16) for _ in range(2))}
    src = PagedKVCache.from_vllm(src_t, NB, BS, axes, num_kv_heads=4)
    dst = PagedKVCache.from_vllm(dst_t, NB, BS, axes, num_kv_heads=4)
    round_trip(src, dst, HeadRange(2, 4), HeadRange(0, 2))
    for s, d in zip(src_t["l"], dst_t["l"]):
        assert torch.equal(d[DST].view(torch.int16), s[SRC][:, :, 2:4].view(torch.int16))


def test_shared_layers_are_sent_once():
    kv = ascend_kv(0)
    cache = PagedKVCache.from_vllm({"a": kv, "b": kv}, NB, BS, backend_axes(AscendAttn))
    assert cache.names == ["a[0]", "a[1]"]


# -- errors name the problem ---------------------------------------------------


def test_too_few_blocks_is_an_error():
    with pytest.raises(LayoutError, match="fewer than"):
        PagedKVCache.from_vllm({"l": rand(NB - 1, 2, BS, 8)}, NB, BS, lambda *_: VLLM_LOGICAL_AXES)


def test_kernel_block_must_divide_scheduler_block():
    with pytest.raises(LayoutError, match="does not divide"):
        PagedKVCache.from_vllm({"l": rand(NB * 2, 2, 24, 8)}, NB, 32, lambda *_: VLLM_LOGICAL_AXES)


def test_backend_shape_must_match_tensor():
    with pytest.raises(LayoutError, match="dims"):
        axes_from_backend(AscendMLA, 6)


def test_head_range_outside_local_heads():
    cache = PagedKVCache.from_vllm({"l": rand(NB, 2, BS, 8)}, NB, BS, lambda *_: VLLM_LOGICAL_AXES)
    with pytest.raises(LayoutError, match="outside"):
        cache.part(0, HeadRange(1, 3))


# -- the worker derives axes from vLLM, not from sizes ---------------------------


def _worker(backends: dict[str, type]) -> WorkerSide:
    ctx = {name: SimpleNamespace(get_attn_backend=lambda b=b: b) for name, b in backends.items()}
    w = WorkerSide.__new__(WorkerSide)
    w.vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=ctx))
    return w


def test_worker_asks_the_backend_for_tuples_and_vllm_contract_for_views():
    w = _worker({"ascend": AscendAttn, "mla": AscendMLA})
    w._tuple_layers = {"ascend": True, "mla": True, "cpu": False}
    k = torch.empty(NB, BS, 4, 32)
    assert w._axes("ascend", 0, k) == CacheAxes(block=0, tokens=1, heads=2)
    assert w._axes("mla", 1, torch.empty(NB, BS, 1, 64)) == CacheAxes(block=0, tokens=1, heads=2)
    # vLLM 0.32 (this venv) hands plain tensors out as [B, H, N, C].
    assert w._axes("cpu", 0, torch.empty(NB, 4, BS, 64)) == VLLM_LOGICAL_AXES


# -- handshake compatibility -----------------------------------------------------


def _desc(tp, heads_total=4, is_mla=False, dtype=torch.float32):
    local = heads_total if is_mla else max(1, heads_total // tp)
    raw = rand(NB, local, BS, 16).to(dtype)
    cache = PagedKVCache.from_vllm({"l": raw}, NB, BS, lambda *_: VLLM_LOGICAL_AXES, is_mla=is_mla,
                                   num_kv_heads=heads_total)
    return cache.describe(tp_size=tp)


def test_compatible_across_tp_when_heads_divide():
    assert check_compatible(_desc(1), _desc(2)) is None
    assert check_compatible(_desc(2), _desc(1)) is None
    assert check_compatible(_desc(4), _desc(8)) is None  # 8 ranks replicate 4 heads
    assert check_compatible(_desc(1, 1, is_mla=True), _desc(2, 1, is_mla=True)) is None


def test_incompatible_tp_or_shapes_are_refused_with_the_fix():
    assert "does not divide" in check_compatible(_desc(1, 6), _desc(4, 6))
    assert "MLA" in check_compatible(_desc(1, 1, is_mla=True), _desc(1, 1))
    assert "dtype" in check_compatible(_desc(1), _desc(1, dtype=torch.float16))
    bad = _desc(2)
    wrong = bad.__class__(**{**{f: getattr(bad, f) for f in bad.__struct_fields__}, "num_kv_heads": 8})
    assert "head" in check_compatible(_desc(1), wrong)
