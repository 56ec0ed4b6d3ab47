"""The paged KV cache as transports see it: a list of tensors, block dim first.

vLLM hands the connector one entry per attention layer: a tensor (CPU/GPU,
0.32 logical ``[B, H, N, C]`` views; older backends with the block dimension
where ``get_kv_cache_shape`` puts it) or a tuple of tensors as vllm-ascend
allocates them ((k, v), or MLA (k_nope, k_pe)). Each is normalised to a view
whose dim 0 indexes scheduler blocks, so gather/scatter is one
``index_select`` / ``index_copy_`` per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_ascend_pd.protocol import LayoutDesc, TensorDesc

# block_dim_of(layer_name, tensor) -> the dimension that indexes blocks.
BlockDimFn = Callable[[str, torch.Tensor], int]


class LayoutError(ValueError):
    pass


@dataclass
class PagedKVCache:
    names: list[str]
    tensors: list[torch.Tensor]  # dim 0 = scheduler block
    block_size: int
    is_mla: bool = False

    @classmethod
    def from_vllm(
        cls,
        kv_caches: dict[str, object],
        num_blocks: int,
        block_size: int,
        block_dim_of: BlockDimFn,
        is_mla: bool = False,
    ) -> "PagedKVCache":
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for layer, value in kv_caches.items():
            parts: Sequence[torch.Tensor]
            if isinstance(value, torch.Tensor):
                parts = [value]
                dims = [block_dim_of(layer, value)]
            elif isinstance(value, (tuple, list)):
                # vllm-ascend: each part is (num_blocks, block_size, ...); an
                # optional trailing index tensor is not block-addressed.
                parts = [t for t in value if t.dim() >= 2 and t.shape[0] == num_blocks]
                dims = [0] * len(parts)
                if not parts:
                    raise LayoutError(
                        f"layer {layer}: no part of the cache tuple has {num_blocks} "
                        f"blocks in dim 0 (shapes {[tuple(t.shape) for t in value]})"
                    )
            else:
                raise LayoutError(f"layer {layer}: unsupported cache type {type(value)}")
            for i, (t, dim) in enumerate(zip(parts, dims)):
                view = _blocks_first(layer, t, dim, num_blocks)
                # Layers sharing one cache (KV sharing) are transferred once.
                key = (view.data_ptr(), tuple(view.stride()))
                if key in seen:
                    continue
                seen.add(key)
                names.append(layer if len(parts) == 1 else f"{layer}[{i}]")
                tensors.append(view)
        if not tensors:
            raise LayoutError("no KV cache tensors were registered")
        return cls(names, tensors, block_size, is_mla)

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[0]

    def block_bytes(self, i: int) -> int:
        t = self.tensors[i]
        return t[0].numel() * t.element_size()

    def total_block_bytes(self) -> int:
        return sum(self.block_bytes(i) for i in range(len(self.tensors)))

    def describe(self, tp_size: int = 1) -> LayoutDesc:
        return LayoutDesc(
            block_size=self.block_size,
            tensors=tuple(
                TensorDesc(n, str(t.dtype).removeprefix("torch."), tuple(t.shape[1:]))
                for n, t in zip(self.names, self.tensors)
            ),
            is_mla=self.is_mla,
            tp_size=tp_size,
        )


def _blocks_first(layer: str, t: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    size = t.shape[dim]
    if size % num_blocks:
        raise LayoutError(
            f"layer {layer}: dim {dim} of shape {tuple(t.shape)} is not a multiple of "
            f"the {num_blocks} KV blocks vLLM allocated"
        )
    view = t.movedim(dim, 0)
    factor = size // num_blocks
    if factor > 1:
        # Kernel blocks smaller than scheduler blocks: group them per block.
        view = view.unflatten(0, (num_blocks, factor))
    return view


def check_compatible(local: LayoutDesc, remote: LayoutDesc) -> str | None:
    """Return why two instances cannot exchange blocks, or None."""
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
    for a, b in zip(local.tensors, remote.tensors):
        if a.dtype != b.dtype:
            return (
                f"KV dtype differs at {a.name} (local {a.dtype}, remote {b.dtype}); "
                "use the same --dtype/--kv-cache-dtype"
            )
        if a.block_shape != b.block_shape:
            return (
                f"KV head layout differs at {a.name} (local block shape {a.block_shape}, "
                f"remote {b.block_shape}); serve the same model with the same "
                "tensor-parallel size"
            )
    return None


@dataclass(frozen=True)
class Chunk:
    tensor: int
    start: int  # index into the transfer's block list
    stop: int


def plan_chunks(cache: PagedKVCache, num_blocks: int, chunk_bytes: int) -> list[Chunk]:
    """Split a transfer into wire chunks; both sides derive the same plan."""
    chunks: list[Chunk] = []
    for i in range(len(cache.tensors)):
        per = max(1, chunk_bytes // cache.block_bytes(i))
        for s in range(0, num_blocks, per):
            chunks.append(Chunk(i, s, min(num_blocks, s + per)))
    return chunks
