"""Register dequantization of packed int4/int8 words by exponent tricks (NVIDIA PTX), for `moe_gemm`.

Converting an integer to bf16/fp16 with `cvt` runs on the H100 at a quarter of the ALU rate (16 per SM per
cycle): at decode that alone caps the grouped GEMM near 60% of the copy bandwidth. Instead a code is OR-ed
into the mantissa of a power of two, which gives that power plus the code exactly, and one packed fused
multiply-add subtracts the power plus the zero point:
    int4, bf16:  0x4300 | q = 128 + q        int4, fp16:  0x6400 | q = 1024 + q
    int8, fp16:  0x6400 | q = 1024 + q       int8, bf16:  0x4B000000 | q = 2^23 + q in float32, minus the
                                                          offset in float32, high half taken (exact: small ints)
Every result is an exact small integer, so these equal `(q - z).to(dtype)`. The scaled form then multiplies
by the scale in the activation dtype (one rounding, as a bf16/fp16 dequantization does): groups smaller than
the 128-deep tile then need no per-group partial sums.

One asm instance takes two words of the same slot position (`pack=2`: two neighbouring elements of a
thread) and returns every slot of both as packed pairs, one output tensor per slot. On Hopper int4 words are
stored paired, the halves of each pair of word rows exchanged (`layout.exchange_halves`); the paired form takes
them so, word rows 2m and 2m + 1 of one column in one instance, and needs no byte permute to join two words'
halves (one of eight integer instructions per word). Only a caller whose register layout guarantees that pairing
(the Gluon kernels' mma operand layout) may use it; the others (Triton's `tl.dot` operands) exchange the halves
back first and take the unpaired form, which is elementwise. The tile's slots are cut into four quarters of
32 reduction rows (groups are at least 32 deep, so a quarter lies in one group): the scaled form takes one
offset and one scale per quarter. The interpreter cannot run PTX: callers use the plain shift-and-convert path
there and on other GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl

QUARTERS = 4
# (bits, dtype) whose codes can come out as magic + q exactly (`dequant_slots_raw`): bf16 and fp16 hold
# 128 + q / 1024 + q for int4, fp16 1024 + q for int8.
RAW_VARIANTS = ((4, "bf16"), (4, "f16"), (8, "f16"))
_ONE = {"bf16": "0x3F803F80", "f16": "0x3C003C00"}
_MAGIC16 = {"bf16": "0x43004300", "f16": "0x64006400"}
_LOP_AND_OR = "0xEA"  # lop3 truth table of (a & b) | c


def dequant_asm(bits: int, dtype: str, scaled: bool, offset: bool = True, paired: bool = False) -> tuple[str, str]:
    """PTX and constraints of `dequant_slots` / `dequant_slots_scaled` / `dequant_slots_raw` for `bits` and
    `dtype` ("bf16", "f16"); `paired`: int4 words whose halves are exchanged in pairs (module docstring; int8
    words are never paired, and int8 ignores it).

    Outputs $0..: one packed pair per slot. Inputs: the two words; the negative offset (one for the tile, or
    one per quarter when scaled: a packed pair, or two float32 for int8 + bf16); when scaled, one packed scale
    pair per quarter. Without `offset` (raw) the slots are magic + q: no offset input, no subtraction (not for
    int8 + bf16, whose magic 2^23 has no bf16 form).
    """
    if not offset and (scaled or (bits == 8 and dtype == "bf16")):
        raise ValueError(f"no raw (offset-free) dequantization for int{bits} {dtype}{' scaled' if scaled else ''}")
    slots = 32 // bits
    offsets = (QUARTERS if scaled else 1) if offset else 0
    wide_offset = bits == 8 and dtype == "bf16"  # float32 offsets: two registers each
    regs_per_offset = 2 if wide_offset else 1
    first_offset = slots + 2
    first_scale = first_offset + offsets * regs_per_offset

    def offset_reg(slot: int, half: int) -> str:
        quarter = slot * offsets // slots
        return f"${first_offset + quarter * regs_per_offset + half}"

    lines = [".reg .b32 lo, hi, t, one, fa, fb, ex, nz;", f"mov.b32 one, {_ONE[dtype]};",
             "mov.b32 ex, 0x4B000000;", "mov.b32 nz, 0x80008000;"]
    wa, wb = f"${slots}", f"${slots + 1}"
    if wide_offset:
        for j in range(slots):
            # Byte j of each word under the float32 exponent of 2^23, offset removed in float32 (exact).
            lines += [f"prmt.b32 fa, {wa}, ex, 0x765{j};", f"prmt.b32 fb, {wb}, ex, 0x765{j};",
                      f"add.f32 fa, fa, {offset_reg(j, 0)};", f"add.f32 fb, fb, {offset_reg(j, 1)};",
                      f"prmt.b32 ${j}, fa, fb, 0x7632;"]
    elif bits == 4:
        # lo holds the low 16 bits of both words (slots 0-3), hi the high 16 bits (slots 4-7): as stored when
        # paired, else joined here.
        if paired:
            lo, hi = wa, wb
        else:
            lo, hi = "lo", "hi"
            lines += [f"prmt.b32 lo, {wa}, {wb}, 0x5410;", f"prmt.b32 hi, {wa}, {wb}, 0x7632;"]
        for j in range(slots):
            src, shift = (lo, 4 * j) if j < 4 else (hi, 4 * (j - 4))
            if shift:
                lines.append(f"shr.u32 t, {src}, {shift};")
                src = "t"
            lines.append(f"lop3.b32 ${j}, {src}, 0x000F000F, {_MAGIC16[dtype]}, {_LOP_AND_OR};")
            if offset:
                lines.append(f"fma.rn.{dtype}x2 ${j}, ${j}, one, {offset_reg(j, 0)};")
    else:  # int8, fp16: byte j of both words into the two halves
        for j in range(slots):
            lines += [f"prmt.b32 t, {wa}, {wb}, 0x{4 + j}{4 + j}{j}{j};",
                      f"lop3.b32 ${j}, t, 0x00FF00FF, {_MAGIC16[dtype]}, {_LOP_AND_OR};"]
            if offset:
                lines.append(f"fma.rn.{dtype}x2 ${j}, ${j}, one, {offset_reg(j, 0)};")
    if scaled:
        # fma with -0.0 is the multiply sm_80 has for bf16x2 (mul.bf16x2 needs sm_90).
        lines += [f"fma.rn.{dtype}x2 ${j}, ${j}, ${first_scale + j * QUARTERS // slots}, nz;" for j in range(slots)]
    inputs = ["r"] * (2 + offsets * regs_per_offset + (QUARTERS if scaled else 0))
    return "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * slots + inputs)


# Kernels read module globals only as constexprs. Each table holds one entry per variant in _ORDER, unpaired
# then paired (the raw table has no int8 bf16; int8 words are never paired, so its two entries are equal).
_ORDER = ((4, "bf16"), (4, "f16"), (8, "bf16"), (8, "f16"))


def _table(scaled: bool, offset: bool = True) -> tuple[tl.constexpr, tl.constexpr]:
    """(asm texts, constraints) of every variant in `_ORDER`, unpaired then paired, as constexpr tuples."""
    entries = [dequant_asm(bits, dtype, scaled, offset, paired) if offset or (bits, dtype) in RAW_VARIANTS
               else ("", "") for paired in (False, True) for bits, dtype in _ORDER]
    return tl.constexpr(tuple(e[0] for e in entries)), tl.constexpr(tuple(e[1] for e in entries))


_PLAIN_ASM, _PLAIN_CONSTRAINTS = _table(scaled=False)
_SCALED_ASM, _SCALED_CONSTRAINTS = _table(scaled=True)
_RAW_ASM, _RAW_CONSTRAINTS = _table(scaled=False, offset=False)
_OUT_TYPES = tl.constexpr(((tl.bfloat16,) * 8, (tl.float16,) * 8, (tl.bfloat16,) * 4, (tl.float16,) * 4))


@triton.jit
def _run_variant(args, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
                 PAIRED: tl.constexpr):
    """The asm of (BITS, DTYPE, PAIRED) from one table, on `args`, two elements per instance: one tensor per
    slot."""
    KIND: tl.constexpr = (0 if BITS == 4 else 2) + (0 if DTYPE == tl.bfloat16 else 1)  # index in _ORDER
    VARIANT: tl.constexpr = KIND + (4 if PAIRED else 0)  # the paired entries follow the four unpaired
    return tl.inline_asm_elementwise(ASM[VARIANT], CONSTRAINTS[VARIANT], args, _OUT_TYPES[KIND], True, 2)


@triton.jit
def dequant_offset(z, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """The negative offset the asm adds: -(magic + z), in the dtype its subtraction runs in."""
    if BITS == 8 and DTYPE == tl.bfloat16:
        offset = -(8388608.0 + z.to(tl.float32))
    elif DTYPE == tl.bfloat16:
        offset = -(128.0 + z.to(tl.float32)).to(tl.bfloat16)
    else:
        offset = -(1024.0 + z.to(tl.float32)).to(tl.float16)
    return offset


@triton.jit
def dequant_slots(words, offset, BITS: tl.constexpr, DTYPE: tl.constexpr, PAIRED: tl.constexpr):
    """Every slot of `words` [R, BLOCK_N] int32 as DTYPE: a tuple of 32 // BITS tensors q_j - z, exact.

    `offset` comes from `dequant_offset`, broadcastable to `words`. PAIRED: the words as stored, in a layout
    that pairs word rows 2m and 2m + 1 in one asm instance (module docstring); else elementwise.
    """
    args = [words, tl.broadcast_to(offset, words.shape)]
    return _run_variant(args, _PLAIN_ASM, _PLAIN_CONSTRAINTS, BITS, DTYPE, PAIRED)


@triton.jit
def dequant_slots_scaled(words, o0, o1, o2, o3, s0, s1, s2, s3, BITS: tl.constexpr, DTYPE: tl.constexpr,
                         PAIRED: tl.constexpr):
    """Every slot of `words` as DTYPE: (q_j - z) * s, rounded once; o_i / s_i: the offset (`dequant_offset`)
    and the scale (DTYPE) of quarter i of the tile, each broadcastable to `words`; PAIRED as `dequant_slots`."""
    args = [words, tl.broadcast_to(o0, words.shape), tl.broadcast_to(o1, words.shape),
            tl.broadcast_to(o2, words.shape), tl.broadcast_to(o3, words.shape), tl.broadcast_to(s0, words.shape),
            tl.broadcast_to(s1, words.shape), tl.broadcast_to(s2, words.shape), tl.broadcast_to(s3, words.shape)]
    return _run_variant(args, _SCALED_ASM, _SCALED_CONSTRAINTS, BITS, DTYPE, PAIRED)


@triton.jit
def dequant_magic(DTYPE: tl.constexpr):
    """The power of two that `dequant_slots_raw` adds to every code."""
    return 128.0 if DTYPE == tl.bfloat16 else 1024.0


@triton.jit
def dequant_slots_raw(words, BITS: tl.constexpr, DTYPE: tl.constexpr, PAIRED: tl.constexpr):
    """Every slot of `words` as DTYPE: magic + q_j (`dequant_magic`), exact, with no subtraction; the caller
    removes magic + z from the products (one row sum of the activations per tile). Not for int8 + bf16.
    PAIRED as `dequant_slots`."""
    tl.static_assert(not (BITS == 8 and DTYPE == tl.bfloat16), "int8 codes have no raw bf16 form")
    return _run_variant([words], _RAW_ASM, _RAW_CONSTRAINTS, BITS, DTYPE, PAIRED)
