"""Register dequantization of packed int4/int8 words by exponent tricks (NVIDIA PTX), for `moe_gemm`.

Converting an integer to bf16/fp16 with `cvt` runs on the H100 at a quarter of the ALU rate (16 per SM per
cycle): at decode that alone caps the grouped GEMM near 60% of the copy bandwidth. Instead a code is OR-ed
into the mantissa of a power of two, which gives that power plus the code exactly, and one packed fused
multiply-add subtracts the power plus the zero point:
    int4, bf16:  0x4300 | q = 128 + q        int4, fp16:  0x6400 | q = 1024 + q
    int8, fp16:  0x6400 | q = 1024 + q
bf16's 7 mantissa bits cannot hold an 8-bit code, so int8 + bf16 takes it in two parts: 0x4300 | (q & 127)
= 128 + (q & 127), and bit 7 inverted under the exponent of -128, 0xC300 | (~q & 128) = -(256 - (q & 128));
their sum is q - 128, exact (one packed add), and the offset left to add is 128 - z (none without zero
points). Every result is an exact small integer, so these equal `(q - z).to(dtype)`. The scaled form then
multiplies by the scale in the activation dtype (one rounding, as a bf16/fp16 dequantization does): groups
smaller than the 128-deep tile then need no per-group partial sums.

One asm instance takes two words of the same slot position (`pack=2`: two neighbouring elements of a
thread) and returns every slot of both as packed pairs, one output tensor per slot. On Hopper words are stored
paired, the halves of each pair of word rows exchanged (`layout.exchange_halves`); the paired form takes them so,
word rows 2m and 2m + 1 of one column in one instance, and needs no byte permute to join two words' halves (int4:
one of eight integer instructions per word; int8: a byte permute per slot becomes a shift per odd slot). Only a
caller whose register layout guarantees that pairing (the Gluon kernels' mma operand layout) may use it; the
others (Triton's `tl.dot` operands) exchange the halves back first and take the unpaired form, which is
elementwise. The tile's slots are cut into four quarters of 32 reduction rows (groups are at least 32 deep, so a
quarter lies in one group): the scaled form takes one offset and one scale per quarter. The interpreter cannot
run PTX: callers use the plain shift-and-convert path there and on other GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl

QUARTERS = 4
# (bits, dtype) whose codes come out as magic + q exactly (`dequant_slots_raw`): bf16 and fp16 hold 128 + q /
# 1024 + q for int4, fp16 1024 + q for int8; int8 + bf16 comes out centred, q - 128 (magic -128).
RAW_VARIANTS = ((4, "bf16"), (4, "f16"), (8, "bf16"), (8, "f16"))
# Those whose magic is minus the midpoint 2^(bits - 1): without zero points their raw slots are the codes less
# the midpoint, with no offset to subtract, scaled or not.
CENTRED_VARIANTS = ((8, "bf16"),)
_ONE = {"bf16": "0x3F803F80", "f16": "0x3C003C00"}
_MAGIC16 = {"bf16": "0x43004300", "f16": "0x64006400"}
_LOP_AND_OR = "0xEA"  # lop3 truth table of (a & b) | c
_LOP_ANDNOT_OR = "0xAE"  # lop3 truth table of (~a & b) | c


def dequant_asm(bits: int, dtype: str, scaled: bool, offset: bool = True, paired: bool = False) -> tuple[str, str]:
    """PTX and constraints of `dequant_slots` / `dequant_slots_scaled` / `dequant_slots_raw` for `bits` and
    `dtype` ("bf16", "f16"); `paired`: words whose halves are exchanged in pairs (module docstring).

    Outputs $0..: one packed pair per slot. Inputs: the two words; the negative offset -(magic + z) (one
    packed pair for the tile, or one per quarter when scaled); when scaled, one packed scale pair per quarter.
    Without `offset` (raw) the slots are magic + q: no offset input, no subtraction; scaled, only for the
    centred variants (`CENTRED_VARIANTS`: (q - 2^(bits - 1)) * s, for codes without zero points).
    """
    if not offset and (bits, dtype) not in (CENTRED_VARIANTS if scaled else RAW_VARIANTS):
        raise ValueError(f"no {'scaled ' if scaled else ''}dequantization without an offset for int{bits} {dtype}")
    slots = 32 // bits
    offsets = (QUARTERS if scaled else 1) if offset else 0
    first_offset = slots + 2
    first_scale = first_offset + offsets

    def offset_reg(slot: int) -> str:
        return f"${first_offset + slot * offsets // slots}"

    lines = [".reg .b32 lo, hi, t, one, nz;", f"mov.b32 one, {_ONE[dtype]};", "mov.b32 nz, 0x80008000;"]
    wa, wb = f"${slots}", f"${slots + 1}"
    if bits == 4:
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
                lines.append(f"fma.rn.{dtype}x2 ${j}, ${j}, one, {offset_reg(j)};")
    else:  # int8: byte j of both words into the low bytes of the two halves
        for j in range(slots):
            if not paired:
                lines.append(f"prmt.b32 t, {wa}, {wb}, 0x{4 + j}{4 + j}{j}{j};")
                src = "t"
            elif j % 2:  # (paired: slots 0 / 1 in the first word's bytes 0, 2 / 1, 3, slots 2 / 3 in the second's)
                lines.append(f"shr.u32 t, {wb if j > 1 else wa}, 8;")
                src = "t"
            else:
                src = wb if j > 1 else wa
            if dtype == "bf16":  # 128 + (q & 127) and -(256 - (q & 128)): their sum is q - 128
                lines += [f"lop3.b32 ${j}, {src}, 0x007F007F, 0x43004300, {_LOP_AND_OR};",
                          f"lop3.b32 t, {src}, 0x00800080, 0xC300C300, {_LOP_ANDNOT_OR};",
                          f"fma.rn.bf16x2 ${j}, ${j}, one, t;"]
            else:
                lines.append(f"lop3.b32 ${j}, {src}, 0x00FF00FF, {_MAGIC16[dtype]}, {_LOP_AND_OR};")
            if offset:
                lines.append(f"fma.rn.{dtype}x2 ${j}, ${j}, one, {offset_reg(j)};")
    if scaled:
        # fma with -0.0 is the multiply sm_80 has for bf16x2 (mul.bf16x2 needs sm_90).
        lines += [f"fma.rn.{dtype}x2 ${j}, ${j}, ${first_scale + j * QUARTERS // slots}, nz;" for j in range(slots)]
    inputs = ["r"] * (2 + offsets + (QUARTERS if scaled else 0))
    return "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * slots + inputs)


# Kernels read module globals only as constexprs. Each table holds one entry per variant in _ORDER, unpaired
# then paired (the scaled raw table only int8 bf16's).
_ORDER = ((4, "bf16"), (4, "f16"), (8, "bf16"), (8, "f16"))


def _table(scaled: bool, offset: bool = True) -> tuple[tl.constexpr, tl.constexpr]:
    """(asm texts, constraints) of every variant in `_ORDER`, unpaired then paired, as constexpr tuples."""
    valid = _ORDER if offset else CENTRED_VARIANTS if scaled else RAW_VARIANTS
    entries = [dequant_asm(bits, dtype, scaled, offset, paired) if (bits, dtype) in valid else ("", "")
               for paired in (False, True) for bits, dtype in _ORDER]
    return tl.constexpr(tuple(e[0] for e in entries)), tl.constexpr(tuple(e[1] for e in entries))


_PLAIN_ASM, _PLAIN_CONSTRAINTS = _table(scaled=False)
_SCALED_ASM, _SCALED_CONSTRAINTS = _table(scaled=True)
_RAW_ASM, _RAW_CONSTRAINTS = _table(scaled=False, offset=False)
_SCALED_RAW_ASM, _SCALED_RAW_CONSTRAINTS = _table(scaled=True, offset=False)
_OUT_TYPES = tl.constexpr(((tl.bfloat16,) * 8, (tl.float16,) * 8, (tl.bfloat16,) * 4, (tl.float16,) * 4))


@triton.jit
def _run_variant(args, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr,
                 PAIRED: tl.constexpr):
    """The asm of (BITS, DTYPE, PAIRED) from one table, on `args`, two elements per instance: one tensor per
    slot."""
    KIND: tl.constexpr = (0 if BITS == 4 else 2) + (0 if DTYPE == tl.bfloat16 else 1)  # index in _ORDER
    VARIANT: tl.constexpr = KIND + (4 if PAIRED else 0)  # the paired entries follow the four unpaired
    return tl.inline_asm_elementwise(ASM[VARIANT], CONSTRAINTS[VARIANT], args, _OUT_TYPES[KIND], True, 2)


@triton.constexpr_function
def centred(bits: int, dtype: tl.dtype) -> bool:
    """Whether (bits, dtype) is one of `CENTRED_VARIANTS`: raw slots q - 2^(bits - 1)."""
    return (bits, "bf16" if dtype == tl.bfloat16 else "f16") in CENTRED_VARIANTS


@triton.jit
def dequant_magic(BITS: tl.constexpr, DTYPE: tl.constexpr):
    """The constant m in the raw slots m + q (`dequant_slots_raw`): a power of two, or minus the midpoint for the
    centred variants."""
    if centred(BITS, DTYPE):
        magic = -float(1 << (BITS - 1))
    elif DTYPE == tl.bfloat16:
        magic = 128.0
    else:
        magic = 1024.0
    return magic


@triton.jit
def dequant_offset(z, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """The negative offset the asm adds to the raw slots: -(magic + z) in DTYPE (exact)."""
    return -(dequant_magic(BITS, DTYPE) + z.to(tl.float32)).to(DTYPE)


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
def dequant_slots_raw(words, BITS: tl.constexpr, DTYPE: tl.constexpr, PAIRED: tl.constexpr):
    """Every slot of `words` as DTYPE: magic + q_j (`dequant_magic`), exact, with no subtraction; the caller
    removes magic + z from the products (one row sum of the activations per tile), or nothing for centred codes
    without zero points. PAIRED as `dequant_slots`."""
    return _run_variant([words], _RAW_ASM, _RAW_CONSTRAINTS, BITS, DTYPE, PAIRED)


@triton.jit
def dequant_slots_exact(words, z, BITS: tl.constexpr, DTYPE: tl.constexpr, HAS_ZP: tl.constexpr,
                        PAIRED: tl.constexpr):
    """Every slot of `words` as q_j - z, exact: `dequant_slots` with the offset -(magic + z) (z broadcastable to
    `words`: the zero points, else the midpoint), or for a centred variant without zero points the raw slots,
    which are q_j - z already (z unused). PAIRED as `dequant_slots`."""
    if HAS_ZP or not centred(BITS, DTYPE):
        slots = dequant_slots(words, dequant_offset(z, BITS, DTYPE), BITS, DTYPE, PAIRED)
    else:
        slots = dequant_slots_raw(words, BITS, DTYPE, PAIRED)
    return slots


@triton.jit
def dequant_slots_scaled_centred(words, s0, s1, s2, s3, BITS: tl.constexpr, DTYPE: tl.constexpr,
                                 PAIRED: tl.constexpr):
    """`dequant_slots_scaled` for codes whose zero point is the midpoint, in a centred variant (int8 + bf16):
    (q_j - 2^(BITS - 1)) * s, rounded once, with no offset to add."""
    tl.static_assert(centred(BITS, DTYPE), "a centred variant (CENTRED_VARIANTS) only")
    args = [words, tl.broadcast_to(s0, words.shape), tl.broadcast_to(s1, words.shape),
            tl.broadcast_to(s2, words.shape), tl.broadcast_to(s3, words.shape)]
    return _run_variant(args, _SCALED_RAW_ASM, _SCALED_RAW_CONSTRAINTS, BITS, DTYPE, PAIRED)
