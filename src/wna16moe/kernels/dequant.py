"""Register dequantization of packed int4/int8 words by exponent tricks (NVIDIA PTX), for `moe_gemm`.

Converting an integer to bf16/fp16 with `cvt` runs on the H100 at a quarter of the ALU rate (16 per SM per
cycle): at decode that alone caps the grouped GEMM near 60% of the copy bandwidth. Instead a code is OR-ed
into the mantissa of a power of two, which gives that power plus the code exactly, and one packed fused
multiply-add subtracts the power plus the zero point:
    int4, bf16:  0x4300 | q = 128 + q        int4, fp16:  0x6400 | q = 1024 + q
    int8, fp16:  0x6400 | q = 1024 + q       int8, bf16:  0x4B000000 | q = 2^23 + q in float32, minus the
                                                          offset in float32, high half taken (exact: small ints)
Every result is an exact small integer, so these equal `(q - z).to(dtype)`.

One asm instance takes two words of the same slot position (`pack=2`: two neighbouring elements of a
thread) and returns every slot of both as packed pairs, one output tensor per slot. The interpreter cannot
run PTX: callers use the plain shift-and-convert path there and on other GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl

_ONE = {"bf16": "0x3F803F80", "f16": "0x3C003C00"}
_MAGIC16 = {"bf16": "0x43004300", "f16": "0x64006400"}
_LOP_AND_OR = "0xEA"  # lop3 truth table of (a & b) | c


def dequant_asm(bits: int, dtype: str) -> tuple[str, str]:
    """PTX and constraints for `dequant_slots`: outputs $0.. one packed pair per slot; inputs the two words and
    the negative offset pair (one packed register, or two float32 for int8 + bf16)."""
    slots = 32 // bits
    lines = [".reg .b32 lo, hi, t, one, fa, fb, ex;", f"mov.b32 one, {_ONE.get(dtype, _ONE['bf16'])};",
             "mov.b32 ex, 0x4B000000;"]
    wa, wb = f"${slots}", f"${slots + 1}"
    if bits == 8 and dtype == "bf16":
        off_a, off_b = f"${slots + 2}", f"${slots + 3}"
        for j in range(slots):
            # Byte j of each word under the float32 exponent of 2^23, offset removed in float32 (exact).
            lines += [f"prmt.b32 fa, {wa}, ex, 0x765{j};", f"prmt.b32 fb, {wb}, ex, 0x765{j};",
                      f"add.f32 fa, fa, {off_a};", f"add.f32 fb, fb, {off_b};",
                      f"prmt.b32 ${j}, fa, fb, 0x7632;"]
        inputs = "r,r,r,r"
    else:
        off = f"${slots + 2}"
        magic = _MAGIC16[dtype]
        if bits == 4:
            # lo holds the low 16 bits of both words (slots 0-3), hi the high 16 bits (slots 4-7).
            lines += [f"prmt.b32 lo, {wa}, {wb}, 0x5410;", f"prmt.b32 hi, {wa}, {wb}, 0x7632;"]
            for j in range(slots):
                src, shift = ("lo", 4 * j) if j < 4 else ("hi", 4 * (j - 4))
                if shift:
                    lines.append(f"shr.u32 t, {src}, {shift};")
                    src = "t"
                lines += [f"lop3.b32 ${j}, {src}, 0x000F000F, {magic}, {_LOP_AND_OR};",
                          f"fma.rn.{dtype}x2 ${j}, ${j}, one, {off};"]
        else:  # int8, fp16: byte j of both words into the two halves
            for j in range(slots):
                lines += [f"prmt.b32 t, {wa}, {wb}, 0x{4 + j}{4 + j}{j}{j};",
                          f"lop3.b32 ${j}, t, 0x00FF00FF, {magic}, {_LOP_AND_OR};",
                          f"fma.rn.{dtype}x2 ${j}, ${j}, one, {off};"]
        inputs = "r,r,r"
    return "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * slots) + "," + inputs


_ASM_BITS_DTYPE = {(bits, dtype): dequant_asm(bits, dtype) for bits in (4, 8) for dtype in ("bf16", "f16")}
# Kernels read module globals only as constexprs: one per variant.
_I4_BF16 = tl.constexpr(_ASM_BITS_DTYPE[4, "bf16"][0])
_I4_F16 = tl.constexpr(_ASM_BITS_DTYPE[4, "f16"][0])
_I8_BF16 = tl.constexpr(_ASM_BITS_DTYPE[8, "bf16"][0])
_I8_F16 = tl.constexpr(_ASM_BITS_DTYPE[8, "f16"][0])
_C4 = tl.constexpr(_ASM_BITS_DTYPE[4, "bf16"][1])
_C8_BF16 = tl.constexpr(_ASM_BITS_DTYPE[8, "bf16"][1])
_C8_F16 = tl.constexpr(_ASM_BITS_DTYPE[8, "f16"][1])
_BF16X8 = tl.constexpr((tl.bfloat16,) * 8)
_F16X8 = tl.constexpr((tl.float16,) * 8)
_BF16X4 = tl.constexpr((tl.bfloat16,) * 4)
_F16X4 = tl.constexpr((tl.float16,) * 4)


@triton.jit
def dequant_offset(z, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """The negative offset the asm adds: -(magic + z), in the dtype its subtraction runs in."""
    if BITS == 8 and tl.bfloat16 == DTYPE:
        offset = -(8388608.0 + z.to(tl.float32))
    elif tl.bfloat16 == DTYPE:
        offset = -(128.0 + z.to(tl.float32)).to(tl.bfloat16)
    else:
        offset = -(1024.0 + z.to(tl.float32)).to(tl.float16)
    return offset


@triton.jit
def dequant_slots(words, offset, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Every slot of `words` [R, BLOCK_N] int32 as DTYPE: a tuple of 32 // BITS tensors q_j - z, exact.

    `offset` comes from `dequant_offset`, broadcastable to `words`.
    """
    offset = tl.broadcast_to(offset, words.shape)
    if BITS == 4:
        if tl.bfloat16 == DTYPE:
            slots = tl.inline_asm_elementwise(_I4_BF16, _C4, [words, offset], _BF16X8, True, 2)
        else:
            slots = tl.inline_asm_elementwise(_I4_F16, _C4, [words, offset], _F16X8, True, 2)
    elif tl.bfloat16 == DTYPE:
        slots = tl.inline_asm_elementwise(_I8_BF16, _C8_BF16, [words, offset], _BF16X4, True, 2)
    else:
        slots = tl.inline_asm_elementwise(_I8_F16, _C8_F16, [words, offset], _F16X4, True, 2)
    return slots
