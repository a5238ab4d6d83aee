"""PTX dequantization (kernels/dequant.py) against integer arithmetic in torch, bit for bit, on the GPU.

CPU CI compiles it through ptxas (tests/test_kernels_compile.py); the interpreter cannot run PTX.
"""

import pytest
import torch
import triton
import triton.language as tl
from triton_env import HAS_CUDA

from wna16moe.kernels.dequant import QUARTERS, dequant_offset, dequant_slots, dequant_slots_scaled

R, BLOCK_N = 16, 64


@triton.jit
def _slots_kernel(words_ptr, zeros_ptr, out_ptr, BITS: tl.constexpr, R_: tl.constexpr, N_: tl.constexpr):
    rows = tl.arange(0, R_)[:, None]
    cols = tl.arange(0, N_)[None, :]
    words = tl.load(words_ptr + rows * N_ + cols)
    offset = dequant_offset(tl.load(zeros_ptr + cols).to(tl.int32), BITS, out_ptr.dtype.element_ty)
    slots = dequant_slots(words, offset, BITS, out_ptr.dtype.element_ty)
    for j in tl.static_range(32 // BITS):
        tl.store(out_ptr + j * R_ * N_ + rows * N_ + cols, slots[j])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [False, True])
def test_slots_equal_integer_codes(bits: int, dtype: torch.dtype, zero_point: bool) -> None:
    pack, mask = 32 // bits, (1 << bits) - 1
    words = torch.randint(-(2**31), 2**31, (R, BLOCK_N), dtype=torch.int64).to(torch.int32).cuda()
    if zero_point:
        zeros = torch.randint(0, mask + 1, (BLOCK_N,), dtype=torch.uint8).cuda()
    else:
        zeros = torch.full((BLOCK_N,), 1 << (bits - 1), dtype=torch.uint8).cuda()
    out = torch.full((pack, R, BLOCK_N), float("nan"), dtype=dtype).cuda()
    _slots_kernel[(1,)](words, zeros, out, BITS=bits, R_=R, N_=BLOCK_N)
    shifts = (torch.arange(pack, device="cuda") * bits).view(pack, 1, 1)
    codes = (words.long()[None] >> shifts) & mask
    expected = (codes - zeros.long()[None, None, :]).to(dtype)
    assert torch.equal(out, expected)


@triton.jit
def _scaled_kernel(words_ptr, zeros_ptr, scales_ptr, out_ptr, BITS: tl.constexpr, R_: tl.constexpr,
                   N_: tl.constexpr):
    rows = tl.arange(0, R_)[:, None]
    cols = tl.arange(0, N_)[None, :]
    words = tl.load(words_ptr + rows * N_ + cols)
    dtype = out_ptr.dtype.element_ty
    o0 = dequant_offset(tl.load(zeros_ptr + cols).to(tl.int32), BITS, dtype)
    o1 = dequant_offset(tl.load(zeros_ptr + N_ + cols).to(tl.int32), BITS, dtype)
    o2 = dequant_offset(tl.load(zeros_ptr + 2 * N_ + cols).to(tl.int32), BITS, dtype)
    o3 = dequant_offset(tl.load(zeros_ptr + 3 * N_ + cols).to(tl.int32), BITS, dtype)
    s0 = tl.load(scales_ptr + cols)
    s1 = tl.load(scales_ptr + N_ + cols)
    s2 = tl.load(scales_ptr + 2 * N_ + cols)
    s3 = tl.load(scales_ptr + 3 * N_ + cols)
    slots = dequant_slots_scaled(words, o0, o1, o2, o3, s0, s1, s2, s3, BITS, dtype)
    for j in tl.static_range(32 // BITS):
        tl.store(out_ptr + j * R_ * N_ + rows * N_ + cols, slots[j])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_slots_round_once(bits: int, dtype: torch.dtype) -> None:
    """(q - z) * s with one offset and scale per quarter of the slots: (q - z) * s is exact in float32, so the
    asm's single rounding to dtype matches torch's float32 product rounded once."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words = torch.randint(-(2**31), 2**31, (R, BLOCK_N), dtype=torch.int64).to(torch.int32).cuda()
    zeros = torch.randint(0, mask + 1, (QUARTERS, BLOCK_N), dtype=torch.uint8).cuda()
    scales = (torch.rand(QUARTERS, BLOCK_N) * 0.02 + 0.001).to(dtype).cuda()
    out = torch.full((pack, R, BLOCK_N), float("nan"), dtype=dtype).cuda()
    _scaled_kernel[(1,)](words, zeros, scales, out, BITS=bits, R_=R, N_=BLOCK_N)
    shifts = (torch.arange(pack, device="cuda") * bits).view(pack, 1, 1)
    codes = (words.long()[None] >> shifts) & mask
    quarter = torch.arange(pack, device="cuda") * QUARTERS // pack  # the quarter of each slot
    exact = (codes - zeros.long()[quarter][:, None, :]).float() * scales.float()[quarter][:, None, :]
    assert torch.equal(out, exact.to(dtype))
