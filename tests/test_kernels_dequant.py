"""PTX dequantization (kernels/dequant.py) against integer arithmetic in torch, bit for bit, on the GPU.

CPU CI compiles it through ptxas (tests/test_kernels_compile.py) and runs the generated PTX through an emulator
of its few instructions (tests/ptx_emulator.py); the Triton interpreter cannot run PTX.
"""

import pytest
import torch
import triton
import triton.language as tl
from ptx_emulator import run
from triton_env import HAS_CUDA

from wna16moe.kernels.dequant import (
    CENTRED_VARIANTS,
    QUARTERS,
    RAW_VARIANTS,
    dequant_asm,
    dequant_offset,
    dequant_slots,
    dequant_slots_raw,
    dequant_slots_scaled,
    dequant_slots_scaled_centred,
)
from wna16moe.kernels.layout import exchange_halves

R, BLOCK_N = 16, 64
TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def _magic(bits: int, dtype: str) -> float:
    """The raw slots' constant (`dequant_magic`), spelled out: centred variants subtract the midpoint."""
    if (bits, dtype) in CENTRED_VARIANTS:
        return -float(1 << (bits - 1))
    return 128.0 if dtype == "bf16" else 1024.0


def _random_words() -> torch.Tensor:
    """[R, BLOCK_N] packed words with every bit pattern possible, on the GPU."""
    return torch.randint(-(2**31), 2**31, (R, BLOCK_N), dtype=torch.int64).to(torch.int32).cuda()


def _codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of every slot of `words`, [32 // bits, R, BLOCK_N] int64: slot j holds bits [j * bits, ...)."""
    pack = 32 // bits
    shifts = (torch.arange(pack, device=words.device) * bits).view(pack, 1, 1)
    return (words.long()[None] >> shifts) & ((1 << bits) - 1)

def _run(kernel, words: torch.Tensor, *inputs: torch.Tensor, bits: int, dtype: torch.dtype,
         **constexprs: bool) -> torch.Tensor:
    """The slots `kernel` stores for `words` (and its other inputs), [32 // bits, R, BLOCK_N] in dtype; NaN
    wherever it stores nothing."""
    out = torch.full((32 // bits, R, BLOCK_N), float("nan"), dtype=dtype).cuda()
    kernel[(1,)](words, *inputs, out, BITS=bits, R_=R, N_=BLOCK_N, **constexprs)
    return out



@triton.jit
def _slots_kernel(words_ptr, zeros_ptr, out_ptr, BITS: tl.constexpr, R_: tl.constexpr, N_: tl.constexpr):
    rows = tl.arange(0, R_)[:, None]
    cols = tl.arange(0, N_)[None, :]
    words = tl.load(words_ptr + rows * N_ + cols)
    offset = dequant_offset(tl.load(zeros_ptr + cols).to(tl.int32), BITS, out_ptr.dtype.element_ty)
    slots = dequant_slots(words, offset, BITS, out_ptr.dtype.element_ty, False)
    for j in tl.static_range(32 // BITS):
        tl.store(out_ptr + j * R_ * N_ + rows * N_ + cols, slots[j])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_point", [False, True])
def test_slots_equal_integer_codes(bits: int, dtype: torch.dtype, zero_point: bool) -> None:
    mask = (1 << bits) - 1
    words = _random_words()
    if zero_point:
        zeros = torch.randint(0, mask + 1, (BLOCK_N,), dtype=torch.uint8).cuda()
    else:
        zeros = torch.full((BLOCK_N,), 1 << (bits - 1), dtype=torch.uint8).cuda()
    out = _run(_slots_kernel, words, zeros, bits=bits, dtype=dtype)
    codes = _codes(words, bits)
    expected = (codes - zeros.long()[None, None, :]).to(dtype)
    assert torch.equal(out, expected)


@triton.jit
def _scaled_kernel(words_ptr, zeros_ptr, scales_ptr, out_ptr, BITS: tl.constexpr, R_: tl.constexpr,
                   N_: tl.constexpr, CENTRED: tl.constexpr):
    rows = tl.arange(0, R_)[:, None]
    cols = tl.arange(0, N_)[None, :]
    words = tl.load(words_ptr + rows * N_ + cols)
    dtype = out_ptr.dtype.element_ty
    s0 = tl.load(scales_ptr + cols)
    s1 = tl.load(scales_ptr + N_ + cols)
    s2 = tl.load(scales_ptr + 2 * N_ + cols)
    s3 = tl.load(scales_ptr + 3 * N_ + cols)
    if CENTRED:  # (the zero points are the midpoint; none is read)
        slots = dequant_slots_scaled_centred(words, s0, s1, s2, s3, BITS, dtype, False)
    else:
        o0 = dequant_offset(tl.load(zeros_ptr + cols).to(tl.int32), BITS, dtype)
        o1 = dequant_offset(tl.load(zeros_ptr + N_ + cols).to(tl.int32), BITS, dtype)
        o2 = dequant_offset(tl.load(zeros_ptr + 2 * N_ + cols).to(tl.int32), BITS, dtype)
        o3 = dequant_offset(tl.load(zeros_ptr + 3 * N_ + cols).to(tl.int32), BITS, dtype)
        slots = dequant_slots_scaled(words, o0, o1, o2, o3, s0, s1, s2, s3, BITS, dtype, False)
    for j in tl.static_range(32 // BITS):
        tl.store(out_ptr + j * R_ * N_ + rows * N_ + cols, slots[j])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("bits", "dtype", "centred"),
                         [(bits, dtype, False) for bits in (4, 8) for dtype in TORCH_DTYPES]
                         + [(*variant, True) for variant in CENTRED_VARIANTS])
def test_scaled_slots_round_once(bits: int, dtype: str, centred: bool) -> None:
    """(q - z) * s with one offset and scale per quarter of the slots: (q - z) * s is exact in float32, so the
    asm's single rounding to dtype matches torch's float32 product rounded once. `centred`: the form with no
    offset (`dequant_slots_scaled_centred`), z the midpoint."""
    torch_dtype = TORCH_DTYPES[dtype]
    pack, mask = 32 // bits, (1 << bits) - 1
    words = _random_words()
    if centred:
        zeros = torch.full((QUARTERS, BLOCK_N), 1 << (bits - 1), dtype=torch.uint8).cuda()
    else:
        zeros = torch.randint(0, mask + 1, (QUARTERS, BLOCK_N), dtype=torch.uint8).cuda()
    scales = (torch.rand(QUARTERS, BLOCK_N) * 0.02 + 0.001).to(torch_dtype).cuda()
    out = _run(_scaled_kernel, words, zeros, scales, bits=bits, dtype=torch_dtype, CENTRED=centred)
    codes = _codes(words, bits)
    quarter = torch.arange(pack, device="cuda") * QUARTERS // pack  # the quarter of each slot
    exact = (codes - zeros.long()[quarter][:, None, :]).float() * scales.float()[quarter][:, None, :]
    assert torch.equal(out, exact.to(torch_dtype))


@triton.jit
def _raw_kernel(words_ptr, out_ptr, BITS: tl.constexpr, R_: tl.constexpr, N_: tl.constexpr):
    rows = tl.arange(0, R_)[:, None]
    cols = tl.arange(0, N_)[None, :]
    slots = dequant_slots_raw(tl.load(words_ptr + rows * N_ + cols), BITS, out_ptr.dtype.element_ty, False)
    for j in tl.static_range(32 // BITS):
        tl.store(out_ptr + j * R_ * N_ + rows * N_ + cols, slots[j])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("bits", "dtype"), RAW_VARIANTS)
def test_raw_slots_are_magic_plus_codes(bits: int, dtype: str) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    words = _random_words()
    out = _run(_raw_kernel, words, bits=bits, dtype=torch_dtype)
    codes = _codes(words, bits)
    assert torch.equal(out, (codes + _magic(bits, dtype)).to(torch_dtype))


# ----- CPU: the generated PTX through an emulator of the instructions it uses (tests/ptx_emulator.py) -----

def _random_pair(bits: int, paired: bool) -> tuple[list[int], list[int]]:
    """Two random words (a pair of neighbouring elements) and the two the asm takes: paired as stored, their
    halves exchanged (`layout.exchange_halves`)."""
    words = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    stored = exchange_halves(words.to(torch.int32)).long() & 0xFFFFFFFF if paired else words
    return [int(w) for w in words], [int(w) for w in stored]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("paired", [False, True])
def test_generated_ptx_computes_the_codes(bits: int, dtype: str, scaled: bool, paired: bool) -> None:
    """One asm instance on two words (a pair of neighbouring elements), every slot against integer arithmetic,
    bit for bit, with random codes, zero points per quarter and scales: catches a wrong selector, mask, shift,
    magic constant or operand index in `dequant_asm` without a GPU."""
    torch_dtype = TORCH_DTYPES[dtype]
    slots, mask = 32 // bits, (1 << bits) - 1
    asm, constraints = dequant_asm(bits, dtype, scaled, paired=paired)
    assert ("prmt.b32" in asm) == (not paired)
    num_outputs = constraints.count("=r")
    quarters = QUARTERS if scaled else 1
    for _ in range(20):
        words, stored = _random_pair(bits, paired)
        zeros = torch.randint(0, mask + 1, (quarters, 2))
        scales = (torch.rand(quarters, 2) * 0.02 + 0.001).to(torch_dtype)
        operands = [0] * num_outputs + stored
        for q in range(quarters):
            operands.append(_pack_pair(-(_magic(bits, dtype) + zeros[q].double()), torch_dtype))
        if scaled:
            operands += [_pack_pair(scales[q].double(), torch_dtype) for q in range(quarters)]
        assert len(operands) == len(constraints.split(","))
        result = run(asm, operands)
        for j in range(slots):
            q = j * quarters // slots
            codes = torch.tensor([(w >> (bits * j)) & mask for w in words], dtype=torch.float64)
            expected = codes - zeros[q].double()
            if scaled:
                expected = expected * scales[q].double()
            assert result[j] == _pack_pair(expected, torch_dtype), (j, words, zeros[q].tolist())


@pytest.mark.parametrize(("bits", "dtype"), RAW_VARIANTS)
@pytest.mark.parametrize("paired", [False, True])
def test_raw_ptx_is_magic_plus_the_code(bits: int, dtype: str, paired: bool) -> None:
    torch_dtype = TORCH_DTYPES[dtype]
    asm, constraints = dequant_asm(bits, dtype, scaled=False, offset=False, paired=paired)
    assert constraints.count("=r") == 32 // bits and len(constraints.split(",")) == 32 // bits + 2
    for _ in range(20):
        words, stored = _random_pair(bits, paired)
        result = run(asm, [0] * (32 // bits) + stored)
        for j in range(32 // bits):
            codes = torch.tensor([(w >> (bits * j)) & ((1 << bits) - 1) for w in words], dtype=torch.float64)
            assert result[j] == _pack_pair(codes + _magic(bits, dtype), torch_dtype), (j, words)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("paired", [False, True])
def test_int8_bf16_ptx_takes_every_code(scaled: bool, paired: bool) -> None:
    """All 256 codes in every slot, with random zero points per quarter (and scales): int8 + bf16 splits each
    code at bit 7, so each of its halves must come out right."""
    asm, constraints = dequant_asm(8, "bf16", scaled, paired=paired)
    quarters = QUARTERS if scaled else 1
    for code in range(256):
        other = int(torch.randint(0, 256, ()))
        zeros = torch.randint(0, 256, (quarters, 2))
        scales = (torch.rand(quarters, 2) * 0.02 + 0.001).to(torch.bfloat16)
        words = torch.tensor([code * 0x01010101, other * 0x01010101], dtype=torch.int64)
        stored = exchange_halves(words.to(torch.int32)).long() & 0xFFFFFFFF if paired else words
        operands = [0] * 4 + [int(w) for w in stored]
        operands += [_pack_pair(128.0 - zeros[q].double(), torch.bfloat16) for q in range(quarters)]
        if scaled:
            operands += [_pack_pair(scales[q].double(), torch.bfloat16) for q in range(quarters)]
        assert len(operands) == len(constraints.split(","))
        result = run(asm, operands)
        for j in range(4):
            q = j * quarters // 4
            expected = torch.tensor([code, other], dtype=torch.float64) - zeros[q].double()
            if scaled:
                expected = expected * scales[q].double()
            assert result[j] == _pack_pair(expected, torch.bfloat16), (j, code, other, zeros[q].tolist())


@pytest.mark.parametrize(("bits", "dtype"), CENTRED_VARIANTS)
def test_scaled_centred_ptx_has_no_offset(bits: int, dtype: str) -> None:
    """Every code (all 256 bytes in each slot, random scales) as (q - 2^(bits - 1)) * s rounded once."""
    torch_dtype = TORCH_DTYPES[dtype]
    asm, constraints = dequant_asm(bits, dtype, scaled=True, offset=False)
    assert len(constraints.split(",")) == 32 // bits + 2 + QUARTERS
    slots = 32 // bits
    for code in range(256):
        other = int(torch.randint(0, 256, ()))
        words = [code * 0x01010101, other * 0x01010101]
        scales = (torch.rand(QUARTERS, 2) * 0.02 + 0.001).to(torch_dtype)
        result = run(asm, [0] * slots + words + [_pack_pair(scales[q].double(), torch_dtype) for q in range(QUARTERS)])
        for j in range(slots):
            q = j * QUARTERS // slots
            expected = (torch.tensor([code, other], dtype=torch.float64) - (1 << (bits - 1))) * scales[q].double()
            assert result[j] == _pack_pair(expected, torch_dtype), (j, code, other)


@pytest.mark.parametrize(("bits", "dtype"), [(4, "bf16"), (4, "f16"), (8, "f16")])
def test_only_centred_variants_scale_without_an_offset(bits: int, dtype: str) -> None:
    with pytest.raises(ValueError, match=f"int{bits} {dtype}"):
        dequant_asm(bits, dtype, scaled=True, offset=False)


def _pack_pair(values: torch.Tensor, dtype: torch.dtype) -> int:
    bits = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0]) | (int(bits[1]) << 16)

