"""Every program of a grid clears its share of a buffer: how GEMM1 zeroes GEMM2's float32 accumulator on its
way (one launch fewer), in both grouped GEMM kernels (`moe_gemm`, `moe_gemm_decode`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def zero_program_share(zero_ptr, zero_numel, offs):
    """Zero this program's contiguous share of zero_ptr[:zero_numel] (shares in program order over the 2-D
    grid, idle programs included), `offs` (0 .. BLOCK-1, in the caller's layout) at a time."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    share = tl.cdiv(zero_numel, programs)
    first = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * share
    last = tl.minimum(first + share, zero_numel)
    for start in range(first, last, offs.shape[0]):
        tl.store(zero_ptr + start + offs, 0.0, mask=start + offs < last)
