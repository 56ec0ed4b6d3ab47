"""The paged KV cache as transports see it: a list of tensors, block dim first.

vLLM hands the connector one entry per attention layer:
  * vLLM >= 0.32: one tensor, a logical ``[B, H, N, C]`` view (block, KV head,
    token in block, content) whatever its physical layout;
  * older vLLM: one tensor in the order the backend's ``get_kv_cache_shape``
    returns (its stride order only permutes memory, not the view);
  * vllm-ascend: a tuple per layer, ``(k, v)`` each ``(blocks, block_size,
    kv_heads, head_size)``, or for MLA ``(k_nope, k_pe)`` each ``(blocks,
    block_size, 1, kv_lora_rank | rope_dim)``.

Where blocks and heads live is never guessed from sizes: the caller supplies
``CacheAxes`` per tensor, derived from the attention backend
(``axes_from_backend``) or vLLM's logical layout (``VLLM_LOGICAL_AXES``).
Each tensor is normalised to a view whose dim 0 indexes scheduler blocks, so
gather/scatter is one ``index_select`` / ``index_copy_`` per tensor, optionally
restricted to a range of KV heads (heterogeneous tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_ascend_pd.connector.tp_map import HeadRange, TPMapError, check_tp, heads_per_rank
from vllm_ascend_pd.protocol import LayoutDesc, TensorDesc

__all__ = [
    "VLLM_LOGICAL_AXES", "CacheAxes", "HeadRange", "LayoutError", "PagedKVCache",
    "axes_from_backend", "check_compatible", "plan_chunks",
]


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class CacheAxes:
    """Dims of one cache tensor as vLLM hands it to the connector."""

    block: int  # indexes (kernel) blocks
    tokens: int | None = None  # tokens inside one kernel block
    heads: int | None = None  # KV heads; None when not split by TP (MLA)


# vLLM >= 0.32 (vllm/v1/kv_cache_layout.py): every per-layer view is [B, H, N, C].
VLLM_LOGICAL_AXES = CacheAxes(block=0, heads=1, tokens=2)

# axes_of(layer_name, part_index, tensor) -> CacheAxes
AxesFn = Callable[[str, int, torch.Tensor], CacheAxes]

# Sentinels for get_kv_cache_shape: distinct, and the block size a multiple of
# 16 so backends that validate it accept the call.
_S_BLOCKS, _S_BLOCK_SIZE, _S_HEADS, _S_HEAD_SIZE = 1_000_003, 16 * 1021, 1031, 1033


def axes_from_backend(backend, part_ndim: int, *, split_heads: bool = True) -> CacheAxes:
    """Axes of one cache tensor from the backend's ``get_kv_cache_shape``.

    A tensor with one dim fewer than that shape is one part of a per-layer
    tuple (vllm-ascend splits the leading K/V axis into ``(k, v)``, and MLA's
    latent dim into ``(k_nope, k_pe)`` with the same leading axes)."""
    shape = list(backend.get_kv_cache_shape(_S_BLOCKS, _S_BLOCK_SIZE, _S_HEADS, _S_HEAD_SIZE))
    if len(shape) == part_ndim + 1:
        if shape[0] in (_S_BLOCKS, _S_BLOCK_SIZE, _S_HEADS):
            raise LayoutError(
                f"{getattr(backend, '__name__', backend)}: cache shape {shape} has no leading "
                "K/V axis, yet the layer's cache is a tuple"
            )
        shape = shape[1:]
    if len(shape) != part_ndim:
        raise LayoutError(
            f"{getattr(backend, '__name__', backend)}.get_kv_cache_shape has {len(shape)} dims "
            f"but the cache tensor has {part_ndim}"
        )
    try:
        block = shape.index(_S_BLOCKS)
    except ValueError:
        raise LayoutError(f"cannot find the block dimension in {shape}") from None
    tokens = shape.index(_S_BLOCK_SIZE) if _S_BLOCK_SIZE in shape else None
    heads = shape.index(_S_HEADS) if split_heads and _S_HEADS in shape else None
    return CacheAxes(block=block, tokens=tokens, heads=heads)


@dataclass
class PagedKVCache:
    names: list[str]
    tensors: list[torch.Tensor]  # dim 0 = scheduler block
    block_size: int
    is_mla: bool = False
    # Per tensor: the KV-head dim of the normalised view, None if not split.
    head_axes: list[int | None] | None = None
    num_kv_heads: int = 0  # the model's total across TP ranks (0: unknown)

    def __post_init__(self) -> None:
        if self.head_axes is None:
            self.head_axes = [None] * len(self.tensors)

    @classmethod
    def from_vllm(
        cls,
        kv_caches: dict[str, object],
        num_blocks: int,
        block_size: int,
        axes_of: AxesFn,
        is_mla: bool = False,
        num_kv_heads: int = 0,
    ) -> "PagedKVCache":
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        head_axes: list[int | None] = []
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for layer, value in kv_caches.items():
            if isinstance(value, torch.Tensor):
                parts = [value]
            elif isinstance(value, (tuple, list)) and value:
                parts = list(value)
            else:
                raise LayoutError(f"layer {layer}: unsupported cache type {type(value)}")
            for i, t in enumerate(parts):
                axes = axes_of(layer, i, t)
                view, head_axis = _blocks_first(layer, t, axes, num_blocks, block_size)
                # Layers sharing one cache (KV sharing) are transferred once.
                key = (view.data_ptr(), tuple(view.stride()))
                if key in seen:
                    continue
                seen.add(key)
                names.append(layer if len(parts) == 1 else f"{layer}[{i}]")
                tensors.append(view)
                head_axes.append(None if is_mla else head_axis)
        if not tensors:
            raise LayoutError("no KV cache tensors were registered")
        return cls(names, tensors, block_size, is_mla, head_axes, num_kv_heads)

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[0]

    def local_heads(self) -> int | None:
        """KV heads this rank holds (None if no tensor is split by heads)."""
        for t, ax in zip(self.tensors, self.head_axes):
            if ax is not None:
                return t.shape[ax]
        return None

    def part(self, i: int, heads: HeadRange | None = None) -> torch.Tensor:
        """Tensor ``i`` restricted to ``heads`` (a view; dim 0 = block)."""
        t = self.tensors[i]
        ax = self.head_axes[i]
        if heads is None or ax is None:
            return t
        if not 0 <= heads.start < heads.stop <= t.shape[ax]:
            raise LayoutError(f"head range {heads} outside the {t.shape[ax]} local KV heads")
        return t.narrow(ax, heads.start, heads.count)

    def block_bytes(self, i: int, heads: HeadRange | None = None) -> int:
        t = self.part(i, heads)
        return t[0].numel() * t.element_size()

    def total_block_bytes(self, heads: HeadRange | None = None) -> int:
        return sum(self.block_bytes(i, heads) for i in range(len(self.tensors)))

    def gather(
        self, i: int, idx: torch.Tensor, heads: HeadRange | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks ``idx`` of tensor ``i`` (head slice), packed contiguously."""
        src = self.part(i, heads)
        shape = (len(idx), *src.shape[1:])
        if out is None:
            return torch.index_select(src, 0, idx).contiguous()
        out = out.view(src.dtype).view(shape)
        if out.device == src.device:
            torch.index_select(src, 0, idx, out=out)
        else:
            out.copy_(torch.index_select(src, 0, idx))
        return out

    def scatter(self, i: int, idx: torch.Tensor, packed: torch.Tensor, heads: HeadRange | None = None) -> None:
        """Write packed blocks (as ``gather`` made them) into blocks ``idx``."""
        dst = self.part(i, heads)
        src = packed.view(dst.dtype).view((len(idx), *dst.shape[1:]))
        if src.device != dst.device:
            dst.index_copy_(0, idx, src.to(dst.device))
            return
        scatter_runs(dst, idx.tolist(), src)

    def describe(self, tp_size: int = 1) -> LayoutDesc:
        return LayoutDesc(
            block_size=self.block_size,
            tensors=tuple(
                TensorDesc(
                    n, str(t.dtype).removeprefix("torch."), tuple(t.shape[1:]),
                    head_axis=-1 if ax is None else ax - 1,
                )
                for n, t, ax in zip(self.names, self.tensors, self.head_axes)
            ),
            is_mla=self.is_mla,
            tp_size=tp_size,
            num_kv_heads=self.num_kv_heads,
        )


def block_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ``ids``, first block, length) of each run of consecutive ids."""
    runs = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((start, ids[start], i - start))
            start = i
    return runs


def scatter_runs(t: torch.Tensor, ids: list[int], src: torch.Tensor) -> None:
    # On CPU, index_copy_ runs at a quarter of memcpy speed (benchmarks/transfer);
    # one copy_ per run of consecutive blocks runs at memcpy speed.
    for pos, block, n in block_runs(ids):
        t[block : block + n].copy_(src[pos : pos + n])


def _blocks_first(
    layer: str, t: torch.Tensor, axes: CacheAxes, num_blocks: int, block_size: int
) -> tuple[torch.Tensor, int | None]:
    """A view with scheduler blocks in dim 0, and where the head dim went."""
    factor = 1
    if axes.tokens is not None:
        kernel = t.shape[axes.tokens]
        if kernel <= 0 or block_size % kernel:
            raise LayoutError(
                f"layer {layer}: kernel block of {kernel} tokens does not divide the "
                f"scheduler block size {block_size}"
            )
        factor = block_size // kernel
    need = num_blocks * factor
    if t.shape[axes.block] < need:
        raise LayoutError(
            f"layer {layer}: dim {axes.block} of shape {tuple(t.shape)} holds fewer than "
            f"the {num_blocks} blocks x {factor} kernel blocks vLLM scheduled"
        )
    # The runner may allocate more blocks than the scheduler uses (vllm-ascend
    # sizes tensors per device); only the first ``need`` are addressable.
    view = t.movedim(axes.block, 0).narrow(0, 0, need)
    head = axes.heads
    if head is not None and head < axes.block:
        head += 1  # moved right by movedim
    if factor > 1:
        # Kernel blocks smaller than scheduler blocks: group them per block.
        view = view.unflatten(0, (num_blocks, factor))
        if head is not None:
            head += 1
    return view, head


def check_compatible(local: LayoutDesc, remote: LayoutDesc) -> str | None:
    """Return why two instances cannot exchange blocks, or None.

    Tensor-parallel sizes may differ if both split the same KV heads the way
    vLLM does (see connector/tp_map.py); head-split tensors then differ only
    in their head dimension."""
    if local.block_size != remote.block_size:
        return (
            f"block size differs (local {local.block_size}, remote {remote.block_size}); "
            "start both instances with the same --block-size"
        )
    if local.is_mla != remote.is_mla:
        return "one instance uses MLA and the other does not: serve the same model"
    if len(local.tensors) != len(remote.tensors):
        return (
            f"layer count differs (local {len(local.tensors)} cache tensors, remote "
            f"{len(remote.tensors)}): serve the same model on both"
        )
    hetero = local.tp_size != remote.tp_size
    if hetero:
        if local.num_kv_heads != remote.num_kv_heads or local.num_kv_heads <= 0:
            return (
                f"tensor-parallel sizes differ ({local.tp_size} vs {remote.tp_size}) and the "
                f"KV head counts are unknown or differ ({local.num_kv_heads} vs "
                f"{remote.num_kv_heads}): serve the same model on both"
            )
        for tp in (local.tp_size, remote.tp_size):
            try:
                check_tp(local.num_kv_heads, tp)
            except TPMapError as e:
                return str(e)
    for a, b in zip(local.tensors, remote.tensors):
        if a.dtype != b.dtype:
            return (
                f"KV dtype differs at {a.name} (local {a.dtype}, remote {b.dtype}); "
                "use the same --dtype/--kv-cache-dtype"
            )
        if a.head_axis != b.head_axis or len(a.block_shape) != len(b.block_shape):
            return (
                f"KV cache layout differs at {a.name} (local block shape {a.block_shape}, "
                f"remote {b.block_shape}): use the same attention backend on both"
            )
        same = a.block_shape == b.block_shape
        if hetero and a.head_axis >= 0:
            ax = a.head_axis
            same = (
                a.block_shape[:ax] == b.block_shape[:ax]
                and a.block_shape[ax + 1 :] == b.block_shape[ax + 1 :]
                and a.block_shape[ax] == _rank_heads(local)
                and b.block_shape[ax] == _rank_heads(remote)
            )
        if not same:
            return (
                f"KV head layout differs at {a.name} (local block shape {a.block_shape}, "
                f"remote {b.block_shape}); serve the same model on both"
            )
    return None


def _rank_heads(layout: LayoutDesc) -> int:
    return heads_per_rank(layout.num_kv_heads, layout.tp_size)


@dataclass(frozen=True)
class Chunk:
    tensor: int
    start: int  # index into the transfer's block list
    stop: int


def plan_chunks(
    cache: PagedKVCache, num_blocks: int, chunk_bytes: int, heads: HeadRange | None = None
) -> list[Chunk]:
    """Split a transfer into wire chunks; both sides derive the same plan
    (a head slice has the same bytes per block on both sides)."""
    chunks: list[Chunk] = []
    for i in range(len(cache.tensors)):
        per = max(1, chunk_bytes // cache.block_bytes(i, heads))
        for s in range(0, num_blocks, per):
            chunks.append(Chunk(i, s, min(num_blocks, s + per)))
    return chunks
