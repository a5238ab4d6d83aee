"""The float32 sums GEMM2 accumulates, cast to the activation dtype, in one of two ways.

- `cast`: torch's `.to()` as a kernel of ours, so that on Hopper it launches as a programmatic dependent of GEMM2
  (kernels/grid_dependence.py) instead of after a full launch gap (~1 µs of qwen3-30b-a3b's 21 µs at one token,
  benchmarks/NOTES.md v28).
- Folded into GEMM2 (`moe_gemm(cast_out=...)`, the helpers below): each program counts, per row of its block and
  its column tile, the K tiles it added; the program whose adds complete a row's tile (`tile_finished`) casts that
  tile (`cast_tile`). No launch after GEMM2, and the sums are read back from L2 right after their last add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options
from wna16moe.kernels.launch import launch, scratch

_BLOCK = 1024


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # (it reads what GEMM2 wrote: nothing before the wait)
        await_prior_grids()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


def cast(src: torch.Tensor, dtype: torch.dtype, pdl: int = 0) -> torch.Tensor:
    """`src.to(dtype)` for a contiguous tensor; pdl: as for `moe_gemm` (not 0: launched as a programmatic
    dependent, CUDA sm90+ only)."""
    if not src.is_contiguous():
        raise ValueError(f"cast needs a contiguous tensor, got strides {src.stride()}")
    dst = scratch(src.shape, dtype, src.device)
    if src.numel():
        launch(_cast_kernel, (triton.cdiv(src.numel(), _BLOCK),), src, dst, src.numel(), BLOCK=_BLOCK, PDL=pdl,
               num_warps=4, **launch_options(pdl))
    return dst


@triton.jit
def tile_finished(tokens, row_mask, tile, tiles, part_tiles, all_tiles, counts_ptr, ids_ptr, num_experts,
                  TOP_K: tl.constexpr):
    """After GEMM2's adds of a block's rows into column tile `tile` (of `tiles`) of their tokens' float32 sums:
    whether this program's adds completed each row's tile. A row's tile is complete once every valid pair of
    its token (0 <= id < num_experts in ids[token]) has added all its K tiles (`all_tiles` each, this program
    `part_tiles`: a K split or a persistent program adds part of them); counts[token, tile] sums what was added.
    Layout-free (`tokens` and `row_mask` in any one layout), for both GEMM kernels."""
    pairs = tokens * 0
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + tokens * TOP_K + j, mask=row_mask, other=-1)
        pairs += ((expert >= 0) & (expert < num_experts)).to(tl.int32)
    # Every thread's adds are issued before any count (a CTA barrier), so the count's release covers them; its
    # acquire makes every other program's adds visible to the program that completes the tile.
    tl.debug_barrier()
    prior = tl.atomic_add(counts_ptr + tokens * tiles + tile, tokens * 0 + part_tiles, mask=row_mask, sem="acq_rel",
                          scope="gpu")
    return row_mask & (part_tiles > 0) & (prior + part_tiles == pairs * all_tiles)


@triton.jit
def cast_tile(sums_ptrs, cast_ptrs, mask):
    """The completed sums under `mask` cast into the 16-bit output (read from L2, where the adds were made)."""
    sums = tl.load(sums_ptrs, mask=mask, cache_modifier=".cg")
    tl.store(cast_ptrs, sums.to(cast_ptrs.dtype.element_ty), mask=mask)


def fold_buffers(tokens: int, n: int, block_n: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The temporaries of a GEMM2 that casts its own sums (`moe_gemm(cast_out=...)`), in one float32 allocation
    that GEMM1's programs clear: (that allocation, the float32 sums [T, N], the counts [T, ceil(N / block_n)]
    int32, the output [T, N] in `dtype`). The output comes first, where the allocation starts; the sums start
    16 bytes aligned (the wide blocks' 16-byte atomics)."""
    tiles = triton.cdiv(n, block_n)
    out_words = triton.cdiv(tokens * n * dtype.itemsize, 16) * 4
    sums_words = tokens * n
    buffer = scratch((out_words + sums_words + tokens * tiles,), torch.float32, device)
    out = buffer[: out_words].view(dtype)[: tokens * n].view(tokens, n)
    sums = buffer[out_words : out_words + sums_words].view(tokens, n)
    counts = buffer[out_words + sums_words :].view(torch.int32).view(tokens, tiles)
    return buffer, sums, counts, out
