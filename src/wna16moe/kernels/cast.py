"""The float32 sums GEMM2 accumulates, cast to the activation dtype: torch's `.to()` as a kernel of ours, so that
on Hopper it launches as a programmatic dependent of GEMM2 (kernels/grid_dependence.py) instead of after a
full launch gap (~1 µs of qwen3-30b-a3b's 21 µs at one token, benchmarks/NOTES.md v28)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options
from wna16moe.kernels.launch import launch, scratch

# Elements per program and warps by size: small blocks keep a decode forward's few programs short; from
# PREFILL_NUMEL on, 4096 at 8 warps ran 0.6-0.9 µs faster up to 2^24 elements and level above, where both stream
# at the copy rate (benchmarks/bench_cast.py, NOTES.md v76).
_SMALL_TILING = (1024, 4)
_PREFILL_TILING = (4096, 8)
PREFILL_NUMEL = 1 << 20


def cast_tiling(numel: int) -> tuple[int, int]:
    """(elements per program, warps) of the cast of `numel` elements."""
    return _PREFILL_TILING if numel >= PREFILL_NUMEL else _SMALL_TILING


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
        block, warps = cast_tiling(src.numel())
        launch(_cast_kernel, (triton.cdiv(src.numel(), block),), src, dst, src.numel(), BLOCK=block, PDL=pdl,
               num_warps=warps, **launch_options(pdl))
    return dst
