"""Grouped MoE GEMM for few rows per expert (decode and mid M), in Gluon: register layouts chosen, not inferred.

Same operands, outputs and fusions as `kernels/moe_gemm.py`, whose `moe_gemm(..., decode=True)` launches it
(read its docstring for the layouts, GEMM1's activation or K-split partial sums, GEMM2's atomic top-k
reduction), computed as out^T = W^T a^T with
mma.sync m16n8k16: the dequantized weights are the A operand (16 output features x 16 reduction rows), the
block's BLOCK_M rows (8 to 64) its N. One mma then covers 256 weights however few of the 8 rows are real
(the `moe_gemm` decode tile wastes 15 of 16 rows at one token and needs twice the mmas).

Why Gluon: in the tile-interleaved layout, slot j of word row r holds reduction index j * R + r. Loaded into
the A-operand register layout of a [BLOCK_N, R] tile, a thread holds word rows r and r + 1 (r even) of one
column as neighbouring registers, so the pair the dequantization asm returns for slot j, (j * R + r,
j * R + r + 1), is exactly the packed pair an mma register holds, and slot j of the tile is the A operand of
reduction rows [j * R, (j + 1) * R) as it comes out of the asm: the weights keep the layout `moe_gemm` reads.
That pairing also lets the asm take int4 words as stored, halves exchanged (`layout.py`), with no byte permute; and
since a thread's word rows 2q, 2q + 1, 2q + 8, 2q + 9 are stored side by side (fragment tiles), it reads them
with one 16-byte load (`_load_words`). Triton's
`tl.dot` picks its own operand layouts and its M blocks start at 16 rows.

Blocks of 8 and 16 rows dequantize in the offset-free form (`dequant_slots_raw`: magic + q exactly); each
group's partial sums are corrected with the activations' sums over the group, from one more mma against ones,
and scaled: acc += s * (sum_k a (magic + q) - (magic + z) * sum_k a); int8 with bfloat16 activations comes out
centred (magic -128), so without zero points it needs no sums. Wide blocks (32 and 64 rows), where mma issue
outweighs dequantization, and groups of 32 (corrections and scale rows per group, four per tile) take the
weights scaled in the asm instead (`dequant_slots_scaled`): one chain of mmas, no group sums (kimi-k2, same
tiles: 7-13% faster at M = 8-128, 8% slower at one token, where the table keeps `moe_gemm`; NOTES.md v27).
On Hopper's warpgroup mmas (`WGMMA`) a wide block's 8- and 16-row loops with one group per tile multiply the
exact codes q - z (`dequant_slots`) into a fresh accumulator per tile and half and scale it once in float32:
one multiply per accumulator element instead of one per weight pair (NOTES.md v34, v35).

Bytes in flight decide decode speed here (benchmarks/NOTES.md v26), so the words come through a STAGES-deep
cp.async ring in shared memory (int4 as the fragment tiles it is stored in, `layout.py`, a thread's words of
a column one 16-byte read; int8 XOR-swizzled so that the A-operand reads are conflict-free; loaded straight
into registers one tile ahead they were slower), and so do the tile's scale and zero-point rows, read where
used (one tile ahead in registers, 16-bit values that ptxas packed in pairs, they stalled the loop on a load
still in flight: kimi-k2 13-18% slower at M = 8-128; NOTES.md v30). The activation tiles come through a ring
of their own, slot for slot with the words, and are read as MMA operands with ldmatrix (one tile ahead in
registers they stalled the same way: GEMM1 3-9% slower at M = 1-128, NOTES.md v31); act-order columns,
gathered element by element, are stored into that ring from registers one tile ahead. As a programmatic
dependent, GEMM2 copies its first tiles' words before it waits for GEMM1 and their activations, GEMM1's
output, after.

Every stage of a narrow block's ring (and each half of it) is a shared-memory buffer of its own and its loop
is unrolled by the ring's depth: the compiler cannot tell two slots of one buffer apart and put a CTA barrier
between the refill's copies and the tile's reads, and between the gate and up halves' copies, where the ring
needs one per tile (GEMM1 3 -> 1, GEMM2 2 -> 1; qwen3-30b-a3b M = 8 / 32 -2.6 to -4.7%, M = 1 on the big
experts -1 to -1.5%, NOTES.md v36). A wide block of 32 or 64 rows keeps rings indexed at run time, two
barriers per tile: its loops, one per row count, outgrew the instruction cache unrolled. A 128-row int4 block
(prefill) is unrolled like a narrow one; an int8 one, whose unrolled loops spilled, is not.

PERSISTENT narrow blocks: the grid is a few programs per SM, each taking an equal share of the (row block,
column tile) items' K tiles, in order (stream-K), and keeping one ring through all of them; its refills run into
the next item while the current one's last tiles multiply, and each item's epilogue comes between its last tile
and the next item's first. Shares end inside items, so no program waits on a last few long items (qwen3-30b-a3b
M = 32: every third item per program left some with two items and some with one; -2.7%, NOTES.md v67). An item
split between two programs: GEMM2 adds both parts into its output, GEMM1's later part parks its sums in a
workspace under a flag, and the earlier program, whose part comes last in its share, finishes the item.

A wide block multiplies only its first 8, 16, 32, 64 or 128 rows, the fewest that hold its real ones (padding
rows come last): the loop is compiled once per row count and the program picks one at run time, so an expert's
last, mostly padded block costs the mmas of its real rows (32-row blocks at M = 512: deepseek-v3 and
qwen3-30b-a3b 8-11% faster than before; NOTES.md v27).

NVIDIA sm80+ only (mma.sync, PTX); there is no interpreter for Gluon, so tests run on a GPU.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from wna16moe.kernels.activation import gated_activation
from wna16moe.kernels.dequant import (
    QUARTERS,
    centred,
    dequant_magic,
    dequant_offset,
    dequant_slots_exact,
    dequant_slots_raw,
    dequant_slots_scaled,
    dequant_slots_scaled_centred,
)
from wna16moe.kernels.grid_dependence import enter_dependent, leave_main_loop
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K
from wna16moe.kernels.token_blocks import token_block_rows
from wna16moe.kernels.zero_share import zero_program_share

_TILE_K = gl.constexpr(TILE_K)
_QUARTERS = gl.constexpr(QUARTERS)
# Rows of a block: the N of mma.sync is 8; 16 and more are several of them. 48, 96 and 144 only on warpgroup mmas
# (whose N is any multiple of 8), as 32 + 16, 64 + 32 and 128 + 16 rows in two accumulators (`_block_gemm`'s HI_ROWS;
# 128 + 32 and 128 + 64 ran out of registers on the CPU compile: spills, or mmas serialized).
BLOCK_MS = (8, 16, 32, 48, 64, 96, 128, 144)
SPLIT_BLOCK_MS = (48, 96, 144)
# The deepest cp.async ring (the wait-and-fence asm has one text per depth; 5 is the deepest ever measured).
MAX_STAGES = 8
# The most warpgroup mmas a GEMM2 tile may leave in flight (`_tile_step_scaled`): an int8 tile has 4 slots.
MAX_CARRY = 4


# The ring's word slots: fragment tiles (layout.py) as stored, [BLOCK_N, 16] per int4 tile, [2 x BLOCK_N, 16] per
# int8 tile (its two halves), unswizzled: a warp's 16-byte reads of a half cover 512 contiguous bytes.
FRAGMENT_SMEM = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
# Words of one column in a half tile of fragment tiles (layout.FRAGMENT_WORDS): the step from a column to the next.
COLUMN_STEP = gl.constexpr(FRAGMENT_WORDS)


@triton.constexpr_function
def half_tiles(bits: int) -> int:
    """Half tiles of 16 word rows per K tile (layout.py): 1 for int4, 2 for int8. (R spelled out: a constexpr
    function may not call layout.words_per_tile, a plain function, when the JIT hashes it.)"""
    return TILE_K * bits // 32 // FRAGMENT_WORDS


@triton.constexpr_function
def word_slot_shape(bits: int, block_n: int) -> list[int]:
    """A tile's words in a ring slot: its half tiles [BLOCK_N, 16] stacked."""
    return [half_tiles(bits) * block_n, FRAGMENT_WORDS]


def tiling_error(block_m: int, block_n: int, num_warps: int, num_stages: int) -> str | None:
    """Why this kernel cannot run a tiling, or None: its block rows, its warps' 16-row mma tiles across
    block_n, the depth of its cp.async ring."""
    if block_m not in BLOCK_MS:
        return f"block_m must be one of {BLOCK_MS} (rows per mma N; {SPLIT_BLOCK_MS} on wgmma), got {block_m}"
    if not 2 <= num_stages <= MAX_STAGES:
        return f"num_stages must be 2 to {MAX_STAGES} (the depth of the cp.async ring), got {num_stages}"
    if block_n % (16 * num_warps):
        return f"block_n={block_n} must be a multiple of 16 x num_warps={16 * num_warps}"
    return None


def ring_bytes(bits: int, gated: bool, has_zp: bool, group_in_tile: int, block_m: int, block_n: int,
               num_stages: int) -> int:
    """Shared memory of the kernel's cp.async ring, all the kernel allocates: per stage each half's words, its
    16-bit scale rows and 8-bit zero-point rows, and the block's [block_m, TILE_K] 16-bit activations (for 48, 96
    or 144 rows in two buffers; `test_kernels_compile.py` checks it against the compiler's figure)."""
    halves = 2 if gated else 1
    group_rows = halves * (TILE_K // group_in_tile) * block_n
    words = halves * (TILE_K * bits // 32) * block_n * 4
    return num_stages * (words + group_rows * (3 if has_zp else 2) + block_m * TILE_K * 2)


# From this many rows on a block is wide: it multiplies only the rows it needs, and the weights are scaled in
# the asm, where mma issue outweighs dequantization (module docstring).
_WIDE_M = gl.constexpr(32)


# cp.async.wait_group N, then fence.proxy.async, for N = the ring's depth - 2.
_WAIT_AND_FENCE = gl.constexpr(tuple(f"cp.async.wait_group {n}; fence.proxy.async.shared::cta; mov.b32 $0, 0;"
                                     for n in range(MAX_STAGES - 1)))


@gluon.jit
def _wait_and_fence(PENDING: gl.constexpr):
    """Wait until at most PENDING of this thread's cp.async groups are in flight, then make its shared-memory
    writes visible to the warpgroup mmas' reads (fence.proxy.async), before the ring's barrier. As one asm, not
    `async_copy.wait_group` and `fence_async_shared`: the compiler puts a CTA barrier right after a
    `wait_group` unless one follows at once, and the fence must come between (one barrier more per tile)."""
    gl.inline_asm_elementwise(_WAIT_AND_FENCE[PENDING], "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _copy_group_rows(buf, ptr, offs, n0, k, k_end, N, group_size, stride_sg, BLOCK_N: gl.constexpr,
                     GROUP_IN_TILE: gl.constexpr, ASYNC: gl.constexpr, live):
    """cp.async of the scale (or zero-point) rows of the groups of the tile at reduction row k into a stage's
    `buf` [HALVES * NG * BLOCK_N]: row h * NG + g holds group g of half h (the up half's columns
    start at N) for the block's columns from n0. `ptr`: the expert's row 0; `offs`: arange(HALVES * NG *
    BLOCK_N) in the copy's layout. Rows past k_end read the last group (never used: their activations are
    zero); columns past N are zero-filled; unless `live` (a refill past the block's end) nothing is read. Without
    ASYNC (rows not in whole 16-byte pieces: cp.async moves 4, 8 or 16 bytes) they go through registers, waiting
    for the load, `live` or not (masking there cost the 128-row gated loop a spill)."""
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    r = offs // BLOCK_N
    n = n0 + offs % BLOCK_N
    group = gl.minimum(k + (r % NG) * GROUP_IN_TILE, k_end - 1) // group_size
    ptrs = ptr + group * stride_sg + (r // NG) * N + n
    if ASYNC:
        async_copy.async_copy_global_to_shared(buf, ptrs, mask=(n < N) & live)
    else:
        buf.store(gl.load(ptrs, mask=n < N, other=0))


@gluon.jit
def _group_rows(buf, half, NG: gl.constexpr, BLOCK_N: gl.constexpr, LAYOUT: gl.constexpr):
    """The NG rows of `half` in a stage's buffer that `_copy_group_rows` filled, as [BLOCK_N] tensors."""
    rows = ()
    for g in gl.static_range(NG):
        rows = rows + (buf.slice((half * NG + g) * BLOCK_N, BLOCK_N).load(LAYOUT),)
    return rows


@gluon.jit
def _activation_tile(a_row_ptrs, perm_ptr, offs_k, k, k_end, HAS_PERM: gl.constexpr, EVEN_K: gl.constexpr,
                     COPY_A: gl.constexpr):
    """The activations [BLOCK_M, TILE_K] of the tile at reduction row k (rows `a_row_ptrs`, one pointer tensor per
    activation buffer; columns through the act-order permutation when HAS_PERM, zero past k_end), one tile per
    buffer, to be stored in the activation ring (`_store_tiles`); none when cp.async copies them (COPY_A: no
    permutation, rows in whole 16-byte pieces)."""
    tiles = ()
    if not COPY_A:
        offs = k + offs_k
        if EVEN_K:
            cols = gl.load(perm_ptr + offs) if HAS_PERM else offs
            for i in gl.static_range(len(a_row_ptrs)):
                tiles = tiles + (gl.load(a_row_ptrs[i] + cols[None, :]),)
        else:
            k_mask = offs < k_end
            cols = gl.load(perm_ptr + offs, mask=k_mask, other=0) if HAS_PERM else offs
            for i in gl.static_range(len(a_row_ptrs)):
                tiles = tiles + (gl.load(a_row_ptrs[i] + cols[None, :], mask=k_mask[None, :], other=0.0),)
    return tiles


@gluon.jit
def _store_tiles(a_bufs, tiles):
    """`_activation_tile`'s tiles into a stage's activation buffers."""
    for i in gl.static_range(len(tiles)):
        a_bufs[i].store(tiles[i])


@gluon.jit
def _tile_mma(acc, words, b_tiles, ones, s_rows, z_rows, shared_sums, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
              GROUP_IN_TILE: gl.constexpr, SUMS_IN: gl.constexpr):
    """acc + W^T a^T over one tile, group by group (module docstring); returns it with the activations' sums
    over each group, computed here unless SUMS_IN (then `shared_sums`: GEMM1's up half reuses the gate's).

    The slots hold m + q exactly (m = `dequant_magic`), so a group's sum is part - (m + z) * sum(a); centred
    codes (m = -2^(bits - 1), int8 + bf16) without zero points need no sums.
    """
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    SLOTS_PER_GROUP: gl.constexpr = GROUP_IN_TILE // R
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    DTYPE: gl.constexpr = b_tiles[0].dtype
    MID: gl.constexpr = 1 << (BITS - 1)
    NEED_SUMS: gl.constexpr = HAS_ZP or not centred(BITS, DTYPE)
    slots = dequant_slots_raw(words, BITS, DTYPE, True)
    m = dequant_magic(BITS, DTYPE)
    sums = ()
    for g in gl.static_range(NG):
        part = gl.zeros_like(acc)
        group_sum = gl.zeros_like(acc)
        for jj in gl.static_range(SLOTS_PER_GROUP):
            part = mma_v2(slots[g * SLOTS_PER_GROUP + jj], b_tiles[g * SLOTS_PER_GROUP + jj], part)
            if NEED_SUMS and not SUMS_IN:
                group_sum = mma_v2(ones, b_tiles[g * SLOTS_PER_GROUP + jj], group_sum)
        if NEED_SUMS:
            if SUMS_IN:
                group_sum = shared_sums[g]
            else:
                sums = sums + (group_sum,)
            if HAS_ZP:
                part = part - (z_rows[g].to(gl.float32) + m)[:, None] * group_sum
            else:
                part = part - (m + MID) * group_sum
        acc = acc + s_rows[g].to(gl.float32)[:, None] * part
    return acc, sums


@gluon.jit
def _scaled_slots(words, s_rows, z_rows, BITS: gl.constexpr, HAS_ZP: gl.constexpr, GROUP_IN_TILE: gl.constexpr,
                  DTYPE: gl.constexpr):
    """Every slot of `words` as (q - z) * s in DTYPE, each quarter of the tile with its group's scale and zero
    point (the rows in the words' layout)."""
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    MID: gl.constexpr = 1 << (BITS - 1)
    CENTRED: gl.constexpr = not HAS_ZP and centred(BITS, DTYPE)  # (no offset to add)
    offsets = ()
    scales = ()
    for q in gl.static_range(_QUARTERS):
        if not CENTRED:
            z = z_rows[q * NG // _QUARTERS].to(gl.int32) if HAS_ZP else gl.full_like(s_rows[0], MID, dtype=gl.int32)
            offsets = offsets + (dequant_offset(z, BITS, DTYPE)[:, None],)
        scales = scales + (s_rows[q * NG // _QUARTERS].to(DTYPE)[:, None],)
    if CENTRED:
        slots = dequant_slots_scaled_centred(words, scales[0], scales[1], scales[2], scales[3], BITS, DTYPE, True)
    else:
        slots = dequant_slots_scaled(words, offsets[0], offsets[1], offsets[2], offsets[3], scales[0], scales[1],
                                     scales[2], scales[3], BITS, DTYPE, True)
    return slots


@gluon.jit
def _tile_step_scaled(acc, acc_up, acc_hi, acc_up_hi, carried, words, words_up, scales, scales_up, a_tiles,
                      BITS: gl.constexpr, HAS_ZP: gl.constexpr, GROUP_IN_TILE: gl.constexpr, GATED: gl.constexpr,
                      DTYPE: gl.constexpr, B_OP: gl.constexpr, WGMMA: gl.constexpr, CARRY: gl.constexpr,
                      HI_ROWS: gl.constexpr):
    """Both accumulators past one tile with the weights scaled in the asm: one mma per slot and half, each
    activation operand read from `a_tiles[0]` in shared memory where it multiplies, used by both. With WGMMA the
    mmas are Hopper's warpgroup ones (the slots as register A operands, the activations read by the tensor
    cores from shared memory), all in flight until the tile's end; with CARRY (GEMM2) the last CARRY stay in
    flight past it, `carried` holding their slots' registers until the next tile has waited for them. That wait
    comes before the next dequantization: ptxas serializes every wgmma of a kernel where other instructions
    write an mma's operands while an mma is in flight (C7513), and, with GEMM1's two accumulators, also where
    they pass through a wait (C7515). With HI_ROWS (WGMMA, no CARRY) the block's last HI_ROWS rows, in an
    activation buffer of their own (`a_tiles[1]`), multiply the same slots into accumulators of their own, `acc_hi`
    and `acc_up_hi` [BLOCK_N, HI_ROWS]: one dequantization for a block of 48, 96 or 144 rows."""
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    if CARRY:  # (one value comes back bare)
        carried = warpgroup_mma_wait(0, deps=carried)
        if CARRY == 1:
            carried = (carried,)
    slots = _scaled_slots(words, scales[0], scales[1], BITS, HAS_ZP, GROUP_IN_TILE, DTYPE)
    slots_up = ()
    if GATED:
        slots_up = _scaled_slots(words_up, scales_up[0], scales_up[1], BITS, HAS_ZP, GROUP_IN_TILE, DTYPE)
    slots_hi = ()  # (the same registers in the layout the second accumulators' mmas name: no moves in the SASS)
    slots_up_hi = ()
    if HI_ROWS:
        A_HI: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_hi.type.layout, k_width=2)
        for j in gl.static_range(PACK):
            slots_hi = slots_hi + (gl.convert_layout(slots[j], A_HI),)
            if GATED:
                slots_up_hi = slots_up_hi + (gl.convert_layout(slots_up[j], A_HI),)
    for j in gl.static_range(PACK):
        b_tile = a_tiles[0].slice(j * R, R, dim=1).permute([1, 0])
        if WGMMA:
            acc = warpgroup_mma(slots[j], b_tile, acc, is_async=True)
            if GATED:
                acc_up = warpgroup_mma(slots_up[j], b_tile, acc_up, is_async=True)
            if HI_ROWS:
                b_hi = a_tiles[1].slice(j * R, R, dim=1).permute([1, 0])
                acc_hi = warpgroup_mma(slots_hi[j], b_hi, acc_hi, is_async=True)
                if GATED:
                    acc_up_hi = warpgroup_mma(slots_up_hi[j], b_hi, acc_up_hi, is_async=True)
        else:
            b = b_tile.load(B_OP)
            acc = mma_v2(slots[j], b, acc)
            if GATED:
                acc_up = mma_v2(slots_up[j], b, acc_up)
    if WGMMA:  # (the slots' registers stay live until the mmas reading them are done)
        if CARRY:
            kept = ()
            for j in gl.static_range(PACK - CARRY, PACK):
                kept = kept + (slots[j],)
            done = warpgroup_mma_wait(CARRY, deps=(acc,) + kept)
            acc = done[0]
            carried = ()
            for j in gl.static_range(CARRY):
                carried = carried + (done[1 + j],)
        elif HI_ROWS and GATED:
            done = warpgroup_mma_wait(0, deps=(acc, acc_up, acc_hi, acc_up_hi) + slots + slots_up + slots_hi
                                      + slots_up_hi)
            acc, acc_up, acc_hi, acc_up_hi = done[0], done[1], done[2], done[3]
        elif HI_ROWS:
            done = warpgroup_mma_wait(0, deps=(acc, acc_hi) + slots + slots_hi)
            acc, acc_hi = done[0], done[1]
        elif GATED:
            done = warpgroup_mma_wait(0, deps=(acc, acc_up) + slots + slots_up)
            acc, acc_up = done[0], done[1]
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,) + slots)[0]
    return acc, acc_up, acc_hi, acc_up_hi, carried


@gluon.jit
def _exact_slots(words, z_rows, BITS: gl.constexpr, HAS_ZP: gl.constexpr, DTYPE: gl.constexpr):
    """Every slot of `words` (one group) as q - z in DTYPE, exact (z: the row in the words' layout, else the
    midpoint)."""
    if HAS_ZP:
        z = z_rows[0].to(gl.int32)[:, None]
    else:
        z = gl.full_like(words, 1 << (BITS - 1))
    return dequant_slots_exact(words, z, BITS, DTYPE, HAS_ZP, True)


@gluon.jit
def _post_scaled_half(acc, words, s_rows, z_rows, a_tile, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
                      DTYPE: gl.constexpr):
    """acc + s * (W^T a^T) over one tile of one group and one half on Hopper's warpgroup mmas: the exact codes
    q - z multiply into a fresh accumulator, all in flight until the half's end, which is then scaled in
    float32 (one multiply per accumulator element instead of one per weight pair in the asm)."""
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    slots = _exact_slots(words, z_rows, BITS, HAS_ZP, DTYPE)
    part = acc  # (not read: the first mma starts from zero)
    for j in gl.static_range(PACK):
        part = warpgroup_mma(slots[j], a_tile.slice(j * R, R, dim=1).permute([1, 0]), part, use_acc=j > 0,
                             is_async=True)
    part = warpgroup_mma_wait(0, deps=(part,) + slots)[0]
    return acc + s_rows[0].to(gl.float32)[:, None] * part


@gluon.jit
def _tile_step_post_scaled(acc, acc_up, words, words_up, scales, scales_up, a_tile, BITS: gl.constexpr,
                           HAS_ZP: gl.constexpr, GATED: gl.constexpr, DTYPE: gl.constexpr):
    """Both accumulators past one tile of one group, half after half (`_post_scaled_half`; `scales`: the
    scale rows in the accumulator's layout, then the zero-point rows in the words')."""
    acc = _post_scaled_half(acc, words, scales[0], scales[1], a_tile, BITS, HAS_ZP, DTYPE)
    if GATED:
        acc_up = _post_scaled_half(acc_up, words_up, scales_up[0], scales_up[1], a_tile, BITS, HAS_ZP, DTYPE)
    return acc, acc_up


@gluon.jit
def _side(s_buf, z_buf, HAS_ZP: gl.constexpr, GROUP_IN_TILE: gl.constexpr, GATED: gl.constexpr,
          BLOCK_N: gl.constexpr, LAYOUT: gl.constexpr, Z_LAYOUT: gl.constexpr):
    """The scale and zero-point rows (an empty tuple without zero points) of the tile in a stage's buffers: of
    the gate (or only) half and of the up half (GEMM1; else the first again), the scales in LAYOUT and the
    zero points in Z_LAYOUT."""
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    HALVES: gl.constexpr = 2 if GATED else 1
    scales = (_group_rows(s_buf, 0, NG, BLOCK_N, LAYOUT),
              _group_rows(z_buf, 0, NG, BLOCK_N, Z_LAYOUT) if HAS_ZP else ())
    if GATED:
        scales_up = (_group_rows(s_buf, HALVES - 1, NG, BLOCK_N, LAYOUT),
                     _group_rows(z_buf, HALVES - 1, NG, BLOCK_N, Z_LAYOUT) if HAS_ZP else ())
    else:
        scales_up = scales
    return scales, scales_up


@gluon.jit
def _copy_activations(a_bufs, a_row_ptrs, offs_k, k, k_end, EVEN_K: gl.constexpr, live):
    """cp.async of the activations [BLOCK_M, TILE_K] of the tile at reduction row k into a stage's activation
    buffers `a_bufs` (rows `a_row_ptrs`, one pointer tensor per buffer), zero-filled past k_end; nothing read unless
    `live` (no commit)."""
    for i in gl.static_range(len(a_bufs)):
        if EVEN_K:
            async_copy.async_copy_global_to_shared(a_bufs[i], a_row_ptrs[i] + (k + offs_k)[None, :],
                                                   mask=((offs_k < _TILE_K) & live)[None, :])
        else:
            async_copy.async_copy_global_to_shared(a_bufs[i], a_row_ptrs[i] + (k + offs_k)[None, :],
                                                   mask=((k + offs_k < k_end) & live)[None, :])


@gluon.jit
def _copy_tile(stage, w_ptrs, w_mask, s_ptr, z_ptr, offs_s, offs_z, n0, a_row_ptrs,
               offs_k, k, k_first, k_end, N, stride_wk, group_size, stride_sg, PACK: gl.constexpr,
               GATED: gl.constexpr, COPY_A: gl.constexpr, EVEN_K: gl.constexpr, HAS_ZP: gl.constexpr,
               GROUP_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr, ALIGNED: gl.constexpr):
    """cp.async of the tile at reduction row k into the buffers of one pipeline stage (`_block_gemm`): its words
    (gate, then up), its groups' scale and zero-point rows (`_copy_group_rows`), and with COPY_A its activations
    [BLOCK_M, TILE_K] (`_copy_activations`), as one commit group. Past k_end (the refills after a block's last
    tile) every cp.async is masked off: nothing is read (the addresses fall back on the tile at k_first), the group
    is still committed (the ring's waits count groups). A branch instead would serialize the wgmma loops' mmas."""
    w_gate, w_up, s_buf, z_buf, a_buf = stage
    live = k < k_end
    k = gl.where(live, k, k_first)
    _copy_group_rows(s_buf, s_ptr, offs_s, n0, k, k_end, N, group_size, stride_sg, BLOCK_N, GROUP_IN_TILE,
                     ALIGNED, live)
    if HAS_ZP:
        _copy_group_rows(z_buf, z_ptr, offs_z, n0, k, k_end, N, group_size, stride_sg, BLOCK_N, GROUP_IN_TILE,
                         ALIGNED, live)
    if COPY_A:
        _copy_activations(a_buf, a_row_ptrs, offs_k, k, k_end, EVEN_K, live)
    async_copy.async_copy_global_to_shared(w_gate, w_ptrs + (k // PACK) * stride_wk, mask=w_mask & live)
    if GATED:  # (the up columns start N columns on)
        async_copy.async_copy_global_to_shared(w_up, w_ptrs + (k // PACK) * stride_wk + N * COLUMN_STEP,
                                               mask=w_mask & live)
    async_copy.commit_group()


@gluon.jit
def _word_copy_offsets(stride_wk, BITS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr):
    """A tile's word offsets from its first column's, in the layout its cp.async copies take (16 bytes per thread
    and copy), and its column indices, broadcastable against them: its half tiles (layout.py) stacked as its ring
    slot holds them (`word_slot_shape`), each column's 16 words contiguous, half h 16 word rows (16 x stride_wk
    words) after half h - 1."""
    SLOT: gl.constexpr = word_slot_shape(BITS, BLOCK_N)
    COPY: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NUM_WARPS, 1], [1, 0])
    rows = gl.arange(0, SLOT[0], layout=gl.SliceLayout(1, COPY))[:, None]
    cols = rows % BLOCK_N
    words = gl.arange(0, COLUMN_STEP, layout=gl.SliceLayout(0, COPY))[None, :]
    offs = (rows // BLOCK_N) * COLUMN_STEP * stride_wk + cols * COLUMN_STEP + words
    return offs, cols


@gluon.jit
def _load_words(slot, BITS: gl.constexpr, A_OP: gl.constexpr):
    """A tile's words [BLOCK_N, R] from its ring slot, in the A-operand layout. A thread's words of one column in
    a half tile, rows 16b + 2q, + 1, + 8, + 9 (b: the half, int8's second one holding rows 16-31), are 16
    contiguous bytes of the fragment tiles (layout.py): read as [BLOCK_N, halves, 4, 2, 2] (b, q, h, l) in the
    operand's own registers, one 16-byte load each, then viewed as rows 16b + 8h + 2q + l, which moves no data."""
    HALVES: gl.constexpr = half_tiles(BITS)
    BLOCK_N: gl.constexpr = slot.shape[0] // HALVES
    R: gl.constexpr = COLUMN_STEP * HALVES
    QUADS: gl.constexpr = gl.full([BLOCK_N, R], 0, gl.int32, A_OP).reshape([BLOCK_N, HALVES, 2, 4, 2]).permute(
        (0, 1, 3, 2, 4)).type.layout
    quads = slot.reshape([HALVES, BLOCK_N, 4, 2, 2]).permute((1, 0, 2, 3, 4)).load(QUADS)
    return gl.convert_layout(quads.permute((0, 1, 3, 2, 4)).reshape([BLOCK_N, R]), A_OP)


@gluon.jit
def _ring_operands(a_tile, PACK: gl.constexpr, B_OP: gl.constexpr):
    """The PACK B operands [R, BLOCK_M] of an activation tile [BLOCK_M, TILE_K] in shared memory."""
    R: gl.constexpr = _TILE_K // PACK
    operands = ()
    for j in gl.static_range(PACK):
        operands = operands + (a_tile.slice(j * R, R, dim=1).permute([1, 0]).load(B_OP),)
    return operands


@gluon.jit
def _tile_step(acc, acc_up, words, words_up, scales, scales_up, b_tiles, ones, BITS: gl.constexpr,
               HAS_ZP: gl.constexpr, GROUP_IN_TILE: gl.constexpr, GATED: gl.constexpr):
    """Both accumulators past one tile: its words, scale rows (`_side`) and activation operands."""
    acc, sums = _tile_mma(acc, words, b_tiles, ones, scales[0], scales[1], (), BITS, HAS_ZP, GROUP_IN_TILE, False)
    if GATED:
        acc_up, sums = _tile_mma(acc_up, words_up, b_tiles, ones, scales_up[0], scales_up[1], sums, BITS, HAS_ZP,
                                 GROUP_IN_TILE, True)
    return acc, acc_up


@gluon.jit
def _stage(buffers, slot, UNROLL: gl.constexpr):
    """The buffers (gate words, up words, scale rows, zero-point rows, activation buffers) of ring stage `slot`: its own
    (UNROLL: `buffers` holds one tuple per stage, `slot` a constant) or the slot's part of each ring."""
    if UNROLL:
        stage = buffers[slot]
    else:
        w_gate, w_up, s_ring, z_ring, a_rings = buffers[0]
        stage = (w_gate.index(slot), w_up.index(slot), s_ring.index(slot), z_ring.index(slot))
        a_stage = ()
        for i in gl.static_range(len(a_rings)):
            a_stage = a_stage + (a_rings[i].index(slot),)
        stage = stage + (a_stage,)
    return stage


@gluon.jit
def _ring_tile(acc, acc_up, acc_hi, acc_up_hi, carried, stage, refill, next_a_buf, k, k_refill, k_step, k_first, k_end,
               c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0, a_row_ptrs, perm_ptr, offs_k, ones, N, stride_wk,
               group_size, stride_sg, PACK: gl.constexpr, GATED: gl.constexpr, COPY_A: gl.constexpr,
               EVEN_K: gl.constexpr, HAS_ZP: gl.constexpr, HAS_PERM: gl.constexpr, GROUP_IN_TILE: gl.constexpr,
               BLOCK_N: gl.constexpr, ALIGNED: gl.constexpr, STAGES: gl.constexpr, BITS: gl.constexpr,
               SCALED: gl.constexpr, POST_SCALED: gl.constexpr, USE_WGMMA: gl.constexpr, DTYPE: gl.constexpr,
               A_OP: gl.constexpr, B_OP: gl.constexpr, S_ROWS: gl.constexpr, Z_ROWS: gl.constexpr,
               AHEAD: gl.constexpr, CARRY: gl.constexpr, HI_ROWS: gl.constexpr):
    """One K tile of `_block_gemm`'s loop: wait for the tile in `stage`, refill `refill` with the tile AHEAD
    tiles ahead (at reduction row k_refill of the block `c_ptrs` ... `a_row_ptrs` point at), multiply (`carried`,
    `acc_hi`, `acc_up_hi`, HI_ROWS: `_tile_step_scaled`'s); activations that go through registers are stored into
    `next_a_buf` one tile ahead."""
    w_gate, w_up, s_buf, z_buf, a_buf = stage
    if USE_WGMMA:  # (each thread's copies and stores visible to the tensor cores: before the barrier)
        _wait_and_fence(AHEAD - 1)
    else:
        async_copy.wait_group(AHEAD - 1)
    gl.thread_barrier()  # every thread's copies of this tile landed; every warp is done with the last
    _copy_tile(refill, c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0, a_row_ptrs, offs_k,
               k_refill, k_first, k_end, N, stride_wk, group_size, stride_sg, PACK, GATED, COPY_A,
               EVEN_K, HAS_ZP, GROUP_IN_TILE, BLOCK_N, ALIGNED)
    k_next = gl.where(k + k_step < k_end, k + k_step, k_first)
    a_next = _activation_tile(a_row_ptrs, perm_ptr, offs_k, k_next, k_end, HAS_PERM, EVEN_K, COPY_A)
    # (the scaled step reads each operand from the ring where it multiplies)
    b_tiles = () if SCALED else _ring_operands(a_buf[0], PACK, B_OP)
    scales, scales_up = _side(s_buf, z_buf, HAS_ZP, GROUP_IN_TILE, GATED, BLOCK_N, S_ROWS, Z_ROWS)
    words = _load_words(w_gate, BITS, A_OP)
    words_up = _load_words(w_up, BITS, A_OP)
    if POST_SCALED:
        acc, acc_up = _tile_step_post_scaled(acc, acc_up, words, words_up, scales, scales_up, a_buf[0], BITS, HAS_ZP,
                                             GATED, DTYPE)
    elif SCALED:
        acc, acc_up, acc_hi, acc_up_hi, carried = _tile_step_scaled(
            acc, acc_up, acc_hi, acc_up_hi, carried, words, words_up, scales, scales_up, a_buf, BITS, HAS_ZP,
            GROUP_IN_TILE, GATED, DTYPE, B_OP, USE_WGMMA, CARRY, HI_ROWS)
    else:
        acc, acc_up = _tile_step(acc, acc_up, words, words_up, scales, scales_up, b_tiles, ones, BITS, HAS_ZP,
                                 GROUP_IN_TILE, GATED)
    if not COPY_A:  # (its stage's last reader finished before this tile's barrier)
        _store_tiles(next_a_buf, a_next)
    return acc, acc_up, acc_hi, acc_up_hi, carried


@gluon.jit
def _store_layout(x, rows, n0, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr):
    """A wide block's result [BLOCK_N, ROWS] and its rows, out of the mma layout (a thread's elements 8 columns
    apart: one 2- or 4-byte store or atomic each) into 16 bytes along N per thread; its columns n0 + [0, BLOCK_N)
    in that layout. The conversion's scratch may share the ring's buffers: every copy still in flight (the refills
    past the block's last tile) lands, and every warp is out of the loop, first."""
    async_copy.wait_group(0)
    gl.thread_barrier()
    VEC: gl.constexpr = 128 // x.dtype.primitive_bitwidth
    LANES_N: gl.constexpr = min(32, BLOCK_N // VEC)
    OUT: gl.constexpr = gl.BlockedLayout([VEC, 1], [LANES_N, 32 // LANES_N], [1, NUM_WARPS], [0, 1])
    offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT))
    return gl.convert_layout(x, OUT), gl.convert_layout(rows, gl.SliceLayout(0, OUT)), offs


@gluon.jit
def _program_block(num_m_blocks, N, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """The (row block, column tile) of this program. GROUP_M = 1: row blocks fastest, so that a wave spans
    every expert's blocks at a few column tiles (decode: each weight tile read once, at once). GROUP_M > 1:
    GROUP_M row blocks at a time through all column tiles, so that their activations stay in L2 while each is
    reused by every column tile (prefill: row blocks fastest re-read them from DRAM once per column tile)."""
    pid = gl.program_id(0)
    if GROUP_M == 1:
        pid_m = pid % num_m_blocks
        pid_n = pid // num_m_blocks
    else:
        per_group = GROUP_M * gl.cdiv(N, BLOCK_N)
        first = pid // per_group * GROUP_M
        size = gl.minimum(num_m_blocks - first, GROUP_M)
        pid_m = first + pid % per_group % size
        pid_n = pid % per_group // size
    return pid_m, pid_n


# The program timeline `moe_gemm(trace=...)` records (benchmarks/program_timeline.py): per program, the global
# timer (ns) as it starts, once it has waited for the previous grid, after its main loop and as it ends, and its SM.
# (constexpr objects, read inside the kernels; `.value` from Python)
TRACE_START, TRACE_WAITED, TRACE_LOOP_END, TRACE_END, TRACE_SM = (gl.constexpr(field) for field in range(5))
TRACE_FIELDS = gl.constexpr(8)  # (rows of 64 bytes)


@gluon.jit
def _stamp(trace_ptr, FIELD: gl.constexpr):
    """Field FIELD of this program's timeline row: the global timer, or for TRACE_SM its SM."""
    if FIELD == TRACE_SM:
        value = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False,
                                          pack=1).to(gl.int64)
    else:
        value = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                          pack=1)
    program = gl.program_id(0) + gl.program_id(1) * gl.num_programs(0)
    gl.store(trace_ptr + program * TRACE_FIELDS + FIELD, value)


@gluon.jit
def _activation_rows(rows_b, a_ptr, P, stride_am, TOP_K: gl.constexpr, GATED: gl.constexpr):
    """Pointers [ROWS, 1] to the activation rows of a block's pairs `rows_b` (GEMM1: their tokens' hidden
    states). Padding rows (P) read pair 0's activations instead of masking every load; their results are
    dropped."""
    a_rows = gl.where(rows_b < P, rows_b, 0)
    if GATED:
        a_rows = a_rows // TOP_K
    return a_ptr + a_rows.to(gl.int64)[:, None] * stride_am


@gluon.jit
def _block_gemm(
    a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
    stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts, flags_ptr, part_ptr,
    TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr,
    HAS_ZP: gl.constexpr, HAS_PERM: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr,
    GROUP_IN_TILE: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    EVEN_K: gl.constexpr, ALIGNED: gl.constexpr, ID_BLOCKS: gl.constexpr, NUM_WARPS: gl.constexpr,
    STAGES: gl.constexpr, ROWS: gl.constexpr, HI_ROWS: gl.constexpr, PDL: gl.constexpr, PREFETCH: gl.constexpr,
    ZERO_OUT: gl.constexpr, WGMMA: gl.constexpr, GROUP_M: gl.constexpr, PERSISTENT: gl.constexpr,
    CARRY: gl.constexpr, TRACE: gl.constexpr,
):
    """The program's part of the grouped GEMM (`_moe_gemm_decode_kernel`) over the first ROWS rows of its
    BLOCK_M-row block; with HI_ROWS (wgmma, a 48-, 96- or 144-row block), over ROWS / 2 + HI_ROWS = BLOCK_M rows in
    two accumulators (`_tile_step_scaled`), from two activation buffers of ROWS / 2 and HI_ROWS rows."""
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    WIDE: gl.constexpr = BLOCK_M >= _WIDE_M  # (a wide block stays wide when it multiplies fewer rows)
    # Hopper's warpgroup mmas for a wide block's loops: m64nROWSk16 with the weights in registers as A
    # (the same per-warp register layout as mma.sync's A operand), the activations read from the ring.
    USE_WGMMA: gl.constexpr = WGMMA and WIDE
    LO_ROWS: gl.constexpr = ROWS // 2 if HI_ROWS else ROWS  # (the first accumulators' rows)
    MMA: gl.constexpr = (gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                   instr_shape=[16, LO_ROWS, 16]) if USE_WGMMA else
                         gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 8]))
    MMA_HI: gl.constexpr = (gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, HI_ROWS, 16]) if HI_ROWS else MMA)
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty
    SCALED: gl.constexpr = WIDE or GROUP_IN_TILE <= 32  # (measured at 32; 64 is not)
    # A wide block's activation tile [ROWS, TILE_K], 16 bytes per thread and load.
    A_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NUM_WARPS, 1], [1, 0])

    if PERSISTENT:  # (row block, column tile) items in `_program_block`'s decode order, K tile by K tile
        blocks = gl.maximum(gl.cdiv(gl.load(num_padded_ptr), BLOCK_M), 1)
        items = blocks * gl.cdiv(N, BLOCK_N)
        tiles = gl.cdiv(KD, _TILE_K)  # (again below for every block: hoisted, it moved other kernels' SASS)
        # Shares of at least an item and STAGES - 2 tiles: no item is split more than once (`_share_start`).
        sharing = gl.maximum(gl.minimum(gl.num_programs(0), items * tiles // (tiles + STAGES - 2)), 1)
        share_begin = _share_start(gl.program_id(0), items * tiles, sharing, tiles, STAGES - 1)
        share_end = _share_start(gl.program_id(0) + 1, items * tiles, sharing, tiles, STAGES - 1)
        item = share_begin // tiles
        pid_m = item % blocks
        pid_n = item // blocks
    else:
        pid_m, pid_n = _program_block(num_m_blocks, N, BLOCK_N, GROUP_M)
    pid_k = gl.program_id(1)
    if ZERO_OUT:  # (see `_moe_gemm_decode_kernel`: one launch fewer)
        FLAT: gl.constexpr = gl.BlockedLayout([4], [32], [NUM_WARPS], [0])
        zero_program_share(zero_ptr, zero_numel, gl.arange(0, 4 * 32 * NUM_WARPS, layout=FLAT))

    # The block's rows, once for the activation tiles' rows and once for the epilogue (accumulator).
    m_b = gl.arange(0, LO_ROWS, layout=gl.SliceLayout(1, A_LOAD))
    m_acc = gl.arange(0, LO_ROWS, layout=gl.SliceLayout(0, MMA))
    m_hi = LO_ROWS + gl.arange(0, HI_ROWS if HI_ROWS else 1, layout=gl.SliceLayout(0, MMA_HI))
    if ID_BLOCKS:  # no alignment pass: blocks straight from topk_ids (kernels/token_blocks.py)
        expert = gl.load(expert_ids_ptr + pid_m).to(gl.int64)
        if (expert < 0) | (expert >= num_experts):  # (-1: left out; a caller's bad id is too)
            return
        if ID_BLOCKS == 1:  # one token: block b holds pair b alone
            rows_b = gl.where(m_b == 0, pid_m, P)
            rows = gl.where(m_acc == 0, pid_m, P)
        else:
            rows_b, first = token_block_rows(expert_ids_ptr, pid_m, expert, P, m_b, TOP_K)
            if HI_ROWS:  # (an earlier token in the last rows may hold the expert too: then this block idles)
                rows_b_hi, first_hi = token_block_rows(expert_ids_ptr, pid_m, expert, P, LO_ROWS + gl.arange(
                    0, HI_ROWS, layout=gl.SliceLayout(1, A_LOAD)), TOP_K)
                first = first & first_hi
            if not first:
                return
            rows = token_block_rows(expert_ids_ptr, pid_m, expert, P, m_acc, TOP_K)[0]
            if HI_ROWS:
                rows_hi = token_block_rows(expert_ids_ptr, pid_m, expert, P, m_hi, TOP_K)[0]
    else:
        if PERSISTENT:
            if gl.program_id(0) >= sharing:
                return
        elif pid_m * BLOCK_M >= gl.load(num_padded_ptr):
            return
        expert = gl.load(expert_ids_ptr + pid_m).to(gl.int64)
        rows_b = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + m_b)
        rows = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + m_acc)
        if HI_ROWS:
            rows_hi = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + m_hi)
            rows_b_hi = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + LO_ROWS
                                + gl.arange(0, HI_ROWS, layout=gl.SliceLayout(1, A_LOAD)))
    # One pointer tensor per activation buffer: a block of 48, 96 or 144 rows holds its last HI_ROWS in one of
    # their own, so that its ring holds the block's rows and no more (a power-of-two tile of 64, 128 or 256 rows
    # took 148 KB at 144 rows: one program per SM, NOTES.md v80).
    a_row_ptrs = (_activation_rows(rows_b, a_ptr, P, stride_am, TOP_K, GATED),)
    if HI_ROWS:
        a_row_ptrs = a_row_ptrs + (_activation_rows(rows_b_hi, a_ptr, P, stride_am, TOP_K, GATED),)
    perm_ptr = a_perm_ptr + expert * KD

    tiles = gl.cdiv(KD, _TILE_K)
    tiles_per_split = gl.cdiv(tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * _TILE_K
    if PERSISTENT:  # (the share may begin inside its first item)
        k_begin = share_begin % tiles * _TILE_K
    k_end = gl.minimum(KD, k_begin + tiles_per_split * _TILE_K)
    # What the loads ahead of the loop fall back on: the split's first tile, or for an idle split (past KD: its
    # loop is empty) the last one, so that they stay in bounds (a gathered column index read past the
    # permutation's end would send the activation loads anywhere).
    k_first = gl.minimum(k_begin, (tiles - 1) * _TILE_K)

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    n_mask = offs_n < N
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    HALVES: gl.constexpr = 2 if GATED else 1
    # On wgmma a tile of one group can multiply the exact codes and scale the products once
    # (`_tile_step_post_scaled`): one float32 multiply per accumulator element for one bf16 pair multiply per two
    # weights. At 32 rows the wait per half cost more than that saved (mixtral M = 128 +5%, NOTES.md v34): a wide
    # block's 8- and 16-row loops only. The fresh accumulator, the running ones and a half's slots (registers per
    # thread) must fit beside the rest: at 256 ptxas spilled (GEMM2 32 x 256).
    POST_REGS: gl.constexpr = ((HALVES + 1) * ROWS + _TILE_K // 2) * BLOCK_N // (32 * NUM_WARPS)
    POST_SCALED: gl.constexpr = USE_WGMMA and NG == 1 and ROWS <= 16 and POST_REGS <= 192
    # The scale rows feed the asm, in the words' layout, or multiply partial sums, in the accumulator's; the
    # zero-point rows go with them, but into the asm for post-scaled tiles.
    S_ROWS: gl.constexpr = gl.SliceLayout(1, A_OP) if SCALED and not POST_SCALED else gl.SliceLayout(1, MMA)
    Z_ROWS: gl.constexpr = gl.SliceLayout(1, A_OP) if POST_SCALED else S_ROWS
    offs_k = gl.arange(0, _TILE_K, layout=gl.SliceLayout(0, A_LOAD))
    ones = gl.full([BLOCK_N, R], 1.0, DTYPE, A_OP)

    acc = gl.zeros([BLOCK_N, LO_ROWS], gl.float32, MMA)
    acc_up = gl.zeros([BLOCK_N, LO_ROWS], gl.float32, MMA)
    acc_hi = gl.zeros([BLOCK_N, HI_ROWS], gl.float32, MMA_HI) if HI_ROWS else acc
    acc_up_hi = gl.zeros([BLOCK_N, HI_ROWS], gl.float32, MMA_HI) if HI_ROWS else acc
    # On wgmma a GEMM2 tile's last CARRY mmas may stay in flight past its end, beside the next tile's barrier,
    # refill and word loads, where the tensor cores would wait otherwise (`_tile_step_scaled`). The stage they
    # read is refilled a tile later: the ring runs STAGES - 2 tiles ahead, not STAGES - 1.
    CARRIED: gl.constexpr = (CARRY if USE_WGMMA and SCALED and not POST_SCALED and not GATED and STAGES >= 3
                             and not HI_ROWS else 0)
    AHEAD: gl.constexpr = STAGES - 1 - (1 if CARRIED else 0)
    carried = ()  # (the slots those mmas read; none in flight before the first tile)
    for _ in gl.static_range(CARRIED):
        carried = carried + (ones,)
    k_step = _TILE_K  # (a tensor-typed step keeps the loop's bounds runtime values)
    # Words, scale and zero-point rows and activations through a STAGES-deep cp.async ring in shared memory
    # (module docstring).
    c_offs, c_cols = _word_copy_offsets(stride_wk, BITS, BLOCK_N, NUM_WARPS)
    c_ptrs = w_ptr + expert * stride_we + pid_n * BLOCK_N * COLUMN_STEP + c_offs
    c_mask = pid_n * BLOCK_N + c_cols < N
    # Scale rows, HALVES * NG rows of BLOCK_N per slot, flat, 16 bytes per copy; zero-point rows likewise.
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    offs_s = gl.arange(0, HALVES * NG * BLOCK_N, layout=gl.BlockedLayout([8], [32], [NUM_WARPS], [0]))
    s_base = s_ptr + expert * stride_se
    if HAS_ZP:
        offs_z = gl.arange(0, HALVES * NG * BLOCK_N, layout=gl.BlockedLayout([16], [32], [NUM_WARPS], [0]))
        z_base = z_ptr + expert * stride_se
    else:
        z_base, offs_z = s_base, offs_s
    n0 = pid_n * BLOCK_N
    # The activation tiles [ROWS, TILE_K] in a ring of their own (two: LO_ROWS and HI_ROWS), slot for slot with
    # the words.
    # 8-element groups XOR-swizzled by row: a B operand read (16 columns of 8 rows) touches 8 bank groups.
    # (wgmma reads its B operand in the tensor cores' 128-byte swizzle)
    A_SMEM: gl.constexpr = (gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2) if USE_WGMMA
                            else gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    # A narrow block's stages are buffers of their own, its loop unrolled by STAGES, so that every buffer a tile
    # reads or refills is known at compile time: one CTA barrier per tile. A wide block holds one loop per row
    # count; unrolled, they outgrew the instruction cache (32-row blocks 10-32% slower, NOTES.md v36): its rings
    # are indexed at run time (two barriers per tile; 64-row blocks unrolled: qwen3-30b-a3b 5-8% slower, NOTES.md
    # v62). 128-row int4 blocks (and 144-row ones up to 128 rows) stay unrolled: indexed, kimi-k2 M = 2048 ran 2.9%
    # slower (NOTES.md v61, v62). An int8 tile has twice the words: unrolled, its 128-row loops spilled and spanned
    # ~1.9K instructions; indexed they run up to 5% faster (W8A16 qwen3-30b-a3b M = 1800-8192, NOTES.md v62).
    # (A 128-row block's 64 + 32 loop is indexed: unrolled, it spilled at 3 stages.)
    UNROLL: gl.constexpr = not WIDE or (BLOCK_M >= 128 and BITS == 4 and not HI_ROWS)
    DEPTH: gl.constexpr = [] if UNROLL else [STAGES]
    WORD_TILE: gl.constexpr = word_slot_shape(BITS, BLOCK_N)
    buffers = ()  # per stage (UNROLL) or per ring: (gate words, up words, scale rows, zero-point rows, activations)
    for _ in gl.static_range(STAGES if UNROLL else 1):
        w_gate = gl.allocate_shared_memory(gl.int32, DEPTH + WORD_TILE, FRAGMENT_SMEM)
        w_up = gl.allocate_shared_memory(gl.int32, DEPTH + WORD_TILE, FRAGMENT_SMEM) if GATED else w_gate
        s_buf = gl.allocate_shared_memory(s_ptr.dtype.element_ty, DEPTH + [HALVES * NG * BLOCK_N], ROW_SMEM)
        z_buf = (gl.allocate_shared_memory(z_ptr.dtype.element_ty, DEPTH + [HALVES * NG * BLOCK_N], ROW_SMEM)
                 if HAS_ZP else s_buf)
        a_bufs = (gl.allocate_shared_memory(DTYPE, DEPTH + [LO_ROWS, _TILE_K], A_SMEM),)
        if HI_ROWS:
            a_bufs = a_bufs + (gl.allocate_shared_memory(DTYPE, DEPTH + [HI_ROWS, _TILE_K], A_SMEM),)
        buffers = buffers + ((w_gate, w_up, s_buf, z_buf, a_bufs),)
    COPY_A: gl.constexpr = not HAS_PERM and ALIGNED
    # A prefetching GEMM2 copies its first tiles' weights before it waits, their activations (GEMM1's output)
    # after, one commit group per tile: the loop's wait then still needs only its own tile's last group.
    for s in gl.static_range(AHEAD):
        _copy_tile(_stage(buffers, s, UNROLL), c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0, a_row_ptrs, offs_k,
                   k_begin + s * k_step, k_first, k_end, N, stride_wk, GROUP_SIZE, stride_sg, PACK, GATED,
                   COPY_A and not PREFETCH, EVEN_K, HAS_ZP, GROUP_IN_TILE, BLOCK_N, ALIGNED)
    if PREFETCH:  # the first tiles' weights are on their way while the previous grid finishes
        enter_dependent(PDL)
        if TRACE:
            _stamp(trace_ptr, TRACE_WAITED)
        if COPY_A:
            for s in gl.static_range(AHEAD):
                live = k_begin + s * k_step < k_end  # (as `_copy_tile`)
                _copy_activations(_stage(buffers, s, UNROLL)[4], a_row_ptrs, offs_k,
                                  gl.where(live, k_begin + s * k_step, k_first), k_end, EVEN_K, live)
                async_copy.commit_group()
    a_tile = _activation_tile(a_row_ptrs, perm_ptr, offs_k, k_first, k_end, HAS_PERM, EVEN_K, COPY_A)
    if not COPY_A:  # through registers, stored one tile ahead (after the barrier)
        _store_tiles(_stage(buffers, 0, UNROLL)[4], a_tile)
    if PERSISTENT:
        # One ring through the program's share of the items' K tiles (stream-K): the refills run STAGES - 1 tiles
        # ahead into the next item while this one's last tiles multiply, and each item's epilogue comes between
        # tiles, its loads of the next item already in flight. The refill side (item_r at k_r) sets up an item's
        # operands when it first copies from it; refills past the share copy the next share's first tiles
        # (unused). An item split between two shares: its first tiles are the earlier program's last, its last
        # tiles the later program's first (`shared_first`): GEMM2 adds both parts into the output (the bias with
        # the first), GEMM1's later program leaves its sums for the earlier one, which finishes the item.
        item_r, n0_r, a_row_ptrs_r, c_ptrs_r, c_mask_r, s_base_r, z_base_r = (item, n0, a_row_ptrs, c_ptrs, c_mask,
                                                                               s_base, z_base)
        k_r = k_begin + AHEAD * k_step
        total = share_end - share_begin
        done = share_begin % tiles  # tiles of `item` multiplied (by the program before, for its first part)
        shared_first = done > 0
        for t_round in range(0, total, STAGES):
            for slot in gl.static_range(STAGES):
                if t_round + slot < total:
                    if k_r >= KD:
                        k_r = k_r * 0
                        item_r = gl.minimum(item_r + 1, items - 1)
                        block_r = item_r % blocks
                        expert_r = gl.load(expert_ids_ptr + block_r).to(gl.int64)
                        a_row_ptrs_r = (_activation_rows(gl.load(sorted_ids_ptr + block_r * BLOCK_M + m_b), a_ptr,
                                                         P, stride_am, TOP_K, GATED),)
                        n0_r = item_r // blocks * BLOCK_N
                        c_ptrs_r = w_ptr + expert_r * stride_we + n0_r * COLUMN_STEP + c_offs
                        c_mask_r = n0_r + c_cols < N
                        s_base_r = s_ptr + expert_r * stride_se
                        z_base_r = z_ptr + expert_r * stride_se if HAS_ZP else s_base_r
                    acc, acc_up, acc_hi, acc_up_hi, carried = _ring_tile(
                        acc, acc_up, acc_hi, acc_up_hi, carried, buffers[slot], buffers[(slot + AHEAD) % STAGES],
                        buffers[(slot + 1) % STAGES][4], k_r, k_r, k_step, k_first, KD, c_ptrs_r, c_mask_r, s_base_r,
                        z_base_r, offs_s, offs_z, n0_r, a_row_ptrs_r, perm_ptr, offs_k, ones, N, stride_wk, GROUP_SIZE,
                        stride_sg, PACK, GATED, COPY_A, EVEN_K, HAS_ZP, HAS_PERM, GROUP_IN_TILE, BLOCK_N, ALIGNED,
                        STAGES, BITS, SCALED, POST_SCALED, USE_WGMMA, DTYPE, A_OP, B_OP, S_ROWS, Z_ROWS, AHEAD,
                        CARRIED, 0)
                    k_r += k_step
                    done += 1
                    if done == tiles:
                        if not GATED:  # (a later part of an item adds no bias)
                            _item_epilogue(acc, acc_up, item, shared_first.to(gl.int32), blocks, m_acc,
                                           sorted_ids_ptr, expert_ids_ptr, out_ptr, bias_ptr, topk_w_ptr, N, P,
                                           stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, HAS_BIAS,
                                           SPLIT_K, USE_WGMMA, BLOCK_M, BLOCK_N, NUM_WARPS, MMA)
                        elif shared_first:
                            _park_sums(acc, acc_up, part_ptr, flags_ptr, gl.program_id(0), BLOCK_N, ROWS, MMA)
                        else:
                            _item_epilogue(acc, acc_up, item, 0, blocks, m_acc, sorted_ids_ptr, expert_ids_ptr,
                                           out_ptr, bias_ptr, topk_w_ptr, N, P, stride_om, alpha, beta, limit, TOP_K,
                                           GATED, ACT, HAS_LIMIT, HAS_BIAS, SPLIT_K, USE_WGMMA, BLOCK_M, BLOCK_N,
                                           NUM_WARPS, MMA)
                        acc = gl.zeros_like(acc)
                        acc_up = gl.zeros_like(acc_up)
                        done = done * 0
                        item += 1
                        shared_first = done > 0
        if done > 0:  # the share ends inside an item: the program after has its last tiles
            if GATED:
                acc, acc_up = _take_sums(acc, acc_up, part_ptr, flags_ptr, gl.program_id(0) + 1, BLOCK_N, ROWS, MMA)
            _item_epilogue(acc, acc_up, item, 0, blocks, m_acc, sorted_ids_ptr, expert_ids_ptr, out_ptr, bias_ptr,
                           topk_w_ptr, N, P, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, HAS_BIAS,
                           SPLIT_K, USE_WGMMA, BLOCK_M, BLOCK_N, NUM_WARPS, MMA)
    elif UNROLL:
        for k_round in range(k_begin, k_end, STAGES * k_step):
            for slot in gl.static_range(STAGES):
                k = k_round + slot * k_step
                if k < k_end:
                    acc, acc_up, acc_hi, acc_up_hi, carried = _ring_tile(
                        acc, acc_up, acc_hi, acc_up_hi, carried, buffers[slot], buffers[(slot + AHEAD) % STAGES],
                        buffers[(slot + 1) % STAGES][4], k, k + AHEAD * k_step, k_step, k_first, k_end, c_ptrs,
                        c_mask, s_base, z_base, offs_s, offs_z, n0, a_row_ptrs, perm_ptr, offs_k, ones, N, stride_wk,
                        GROUP_SIZE, stride_sg, PACK, GATED, COPY_A, EVEN_K, HAS_ZP, HAS_PERM, GROUP_IN_TILE, BLOCK_N,
                        ALIGNED, STAGES, BITS, SCALED, POST_SCALED, USE_WGMMA, DTYPE, A_OP, B_OP, S_ROWS, Z_ROWS,
                        AHEAD, CARRIED, HI_ROWS)
    else:
        slot = 0
        for k in range(k_begin, k_end, k_step):
            acc, acc_up, acc_hi, acc_up_hi, carried = _ring_tile(
                acc, acc_up, acc_hi, acc_up_hi, carried, _stage(buffers, slot, False),
                _stage(buffers, (slot + AHEAD) % STAGES, False), _stage(buffers, (slot + 1) % STAGES, False)[4], k,
                k + AHEAD * k_step, k_step, k_first, k_end, c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0,
                a_row_ptrs, perm_ptr, offs_k, ones, N, stride_wk, GROUP_SIZE, stride_sg, PACK, GATED, COPY_A, EVEN_K,
                HAS_ZP, HAS_PERM, GROUP_IN_TILE, BLOCK_N, ALIGNED, STAGES, BITS, SCALED, POST_SCALED, USE_WGMMA,
                DTYPE, A_OP, B_OP, S_ROWS, Z_ROWS, AHEAD, CARRIED, HI_ROWS)
            slot = (slot + 1) % STAGES
    if CARRIED:  # (GEMM2: one accumulator)
        acc = warpgroup_mma_wait(0, deps=(acc,) + carried)[0]
    leave_main_loop(PDL)
    if TRACE:
        _stamp(trace_ptr, TRACE_LOOP_END)

    if not PERSISTENT:
        _epilogue(acc, acc_up, rows, expert, offs_n, n_mask, n0, pid_k, out_ptr, bias_ptr, topk_w_ptr, N, P,
                  stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, HAS_BIAS, SPLIT_K, USE_WGMMA, BLOCK_M,
                  BLOCK_N, NUM_WARPS)
    if HI_ROWS:
        offs_n_hi = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA_HI))
        _epilogue(acc_hi, acc_up_hi, rows_hi, expert, offs_n_hi, offs_n_hi < N, n0, pid_k, out_ptr, bias_ptr,
                  topk_w_ptr, N, P, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, HAS_BIAS, SPLIT_K,
                  USE_WGMMA, BLOCK_M, BLOCK_N, NUM_WARPS)


@gluon.jit
def _share_start(program, units, programs, tiles, AHEAD: gl.constexpr):
    """Where `program`'s share of `units` (items x K tiles, in order) begins, of `programs` near-equal shares
    (`programs` itself: the end). A share never begins in an item's last AHEAD - 1 tiles but at the next item:
    its ring's first AHEAD tiles are one item's. With shares of at least tiles + AHEAD - 1 units, each item is
    split between two programs at most."""
    start = (program.to(gl.int64) * units // programs).to(gl.int32)
    offset = start % tiles
    return gl.where(offset > tiles - AHEAD, start + tiles - offset, start)


@gluon.jit
def _sums_offsets(BLOCK_N: gl.constexpr, ROWS: gl.constexpr, MMA: gl.constexpr):
    """Offsets [BLOCK_N, ROWS] of an item's partial sums in a program's slot of the stream-K workspace."""
    return (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))[:, None] * ROWS
            + gl.arange(0, ROWS, layout=gl.SliceLayout(0, MMA))[None, :])


@gluon.jit
def _park_sums(acc, acc_up, part_ptr, flags_ptr, program, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
               MMA: gl.constexpr):
    """A GEMM1 program's sums over the last tiles of an item the program before began: into the program's slot,
    then its flag raised (every thread's stores first)."""
    offs = _sums_offsets(BLOCK_N, ROWS, MMA)
    slot = part_ptr + program.to(gl.int64) * 2 * BLOCK_N * ROWS
    gl.store(slot + offs, acc)
    gl.store(slot + BLOCK_N * ROWS + offs, acc_up)
    gl.thread_barrier()
    gl.atomic_xchg(flags_ptr + program, 1, sem="release", scope="gpu")


@gluon.jit
def _take_sums(acc, acc_up, part_ptr, flags_ptr, program, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
               MMA: gl.constexpr):
    """acc and acc_up plus the sums `program` parked (`_park_sums`), once its flag is up; the flag is lowered
    again for the next launch. The program after began with those tiles, so the wait is rarely a wait."""
    while gl.atomic_add(flags_ptr + program, 0, sem="acquire", scope="gpu") == 0:
        pass
    offs = _sums_offsets(BLOCK_N, ROWS, MMA)
    slot = part_ptr + program.to(gl.int64) * 2 * BLOCK_N * ROWS
    acc += gl.load(slot + offs, cache_modifier=".cg")
    acc_up += gl.load(slot + BLOCK_N * ROWS + offs, cache_modifier=".cg")
    gl.atomic_xchg(flags_ptr + program, 0, sem="relaxed", scope="gpu")
    return acc, acc_up


@gluon.jit
def _item_epilogue(acc, acc_up, item, pid_k, blocks, m_acc, sorted_ids_ptr, expert_ids_ptr, out_ptr, bias_ptr,
                   topk_w_ptr, N, P, stride_om, alpha, beta, limit, TOP_K: gl.constexpr, GATED: gl.constexpr,
                   ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                   USE_WGMMA: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr,
                   MMA: gl.constexpr):
    """`_epilogue` of a persistent program's item (its row block and column tile found again from its index)."""
    block = item % blocks
    n0 = item // blocks * BLOCK_N
    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    _epilogue(acc, acc_up, gl.load(sorted_ids_ptr + block * BLOCK_M + m_acc),
              gl.load(expert_ids_ptr + block).to(gl.int64), cols, cols < N, n0, pid_k, out_ptr, bias_ptr,
              topk_w_ptr, N, P, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, HAS_BIAS, SPLIT_K,
              USE_WGMMA, BLOCK_M, BLOCK_N, NUM_WARPS)


@gluon.jit
def _epilogue(acc, acc_up, rows, expert, offs_n, n_mask, n0, pid_k, out_ptr, bias_ptr, topk_w_ptr, N, P, stride_om,
              alpha, beta, limit, TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr,
              HAS_LIMIT: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, USE_WGMMA: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr):
    """A block's results out: GEMM1's activation (or K-split partial sums) stored, GEMM2's rows scaled by their
    router weights and added into their tokens' rows. `rows`: the block's pairs (P: padding), `offs_n` its
    columns, both in the accumulator's layout."""
    row_mask = rows < P
    out_mask = n_mask[:, None] & row_mask[None, :]
    # 64- and 128-row wgmma blocks leave through `_store_layout`: on an H200, M = 8192 -1.7% (deepseek-v3) and
    # -4.6% (qwen3-30b-a3b), 64 rows at M = 2048 -1.6% (deepseek-v3) and -0.8% (kimi-k2) (NOTES.md v39, v40).
    # 32-row blocks measured -0.5% to +2.4%, within noise: they and the other blocks keep the mma layout's stores.
    WIDE_OUT: gl.constexpr = USE_WGMMA and BLOCK_M >= 64
    if GATED and SPLIT_K > 1:  # float32 partial sums [SPLIT_K, P, 2N]; kernels/activation.py finishes them
        part_rows = pid_k.to(gl.int64) * P + rows.to(gl.int64)
        part_ptrs = out_ptr + part_rows[None, :] * stride_om + offs_n[:, None]
        gl.store(part_ptrs, acc, mask=out_mask)
        gl.store(part_ptrs + N, acc_up, mask=out_mask)
    elif GATED:
        if HAS_BIAS:
            acc += gl.load(bias_ptr + expert * 2 * N + offs_n, mask=n_mask, other=0.0)[:, None]
            acc_up += gl.load(bias_ptr + expert * 2 * N + N + offs_n, mask=n_mask, other=0.0)[:, None]
        h = gated_activation(acc, acc_up, alpha, beta, limit, ACT, HAS_LIMIT).to(out_ptr.dtype.element_ty)
        if WIDE_OUT:  # 16-byte stores: 8x fewer
            h, rows, offs_n = _store_layout(h, rows, n0, BLOCK_N, NUM_WARPS)
            out_mask = (offs_n < N)[:, None] & (rows < P)[None, :]
        out_ptrs = out_ptr + rows.to(gl.int64)[None, :] * stride_om + offs_n[:, None]
        gl.store(out_ptrs, h, mask=out_mask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += gl.load(bias_ptr + expert * N + offs_n, mask=n_mask, other=0.0)[:, None]
        if WIDE_OUT:  # 4-wide atomics (sm_90): 4x fewer, and no spill of a 64-bit address per element
            acc, rows, offs_n = _store_layout(acc, rows, n0, BLOCK_N, NUM_WARPS)
            row_mask = rows < P
            out_mask = (offs_n < N)[:, None] & row_mask[None, :]
        router_w = gl.load(topk_w_ptr + rows, mask=row_mask, other=0.0).to(gl.float32)
        acc = acc * router_w[None, :]
        tokens = rows // TOP_K
        out_ptrs = out_ptr + tokens.to(gl.int64)[None, :] * stride_om + offs_n[:, None]
        gl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")



@gluon.jit
def _wide_block(
    live, a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
    stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts, flags_ptr, part_ptr,
    TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr,
    HAS_ZP: gl.constexpr, HAS_PERM: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr,
    GROUP_IN_TILE: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    EVEN_K: gl.constexpr, ALIGNED: gl.constexpr, ID_BLOCKS: gl.constexpr, NUM_WARPS: gl.constexpr,
    STAGES: gl.constexpr, PDL: gl.constexpr, PREFETCH: gl.constexpr, WGMMA: gl.constexpr, GROUP_M: gl.constexpr,
    CARRY: gl.constexpr, TRACE: gl.constexpr,
):
    """A wide block multiplies only its first 8, 16, 32, 64 or 128 rows, the fewest that hold its `live` ones
    (padding rows are sorted last): an expert's last block is mostly padding at mid M. A 48-, 96- or 144-row block
    (wgmma) multiplies all of them past 32, 64 or 128 at once: an expert of a few rows more than a power of two gets
    one block, not a second one that reads and dequantizes its weights again for those rows (NOTES.md v79). A
    144-row block's expert's other blocks hold 128 pairs (the alignment's extra rows), so only the last runs the
    split loop, and its loops up to 128 rows are a 128-row block's (NOTES.md v86). A 128-row wgmma block (no carry)
    multiplies 65-96 live rows in the 96-row block's 64 + 32 loop:
    a quarter fewer mmas than its 128-row loop, 3-10% faster at 90-100 rows per expert (NOTES.md v82). (The calls
    differ in their two row counts only: a tuple of the operands passed with `*` loses its constexprs in Gluon 3.6.)"""
    if live <= 8:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 8, 0, PDL,
                    PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif live <= 16:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 16, 0, PDL,
                    PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif live <= 32 or BLOCK_M == 32:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 32, 0, PDL,
                    PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif BLOCK_M == 48:  # 33-48 rows: 32 + 16 in two accumulators (no 64-row loop to size the kernel)
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 64, 16,
                    PDL, PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif live <= 64 or BLOCK_M == 64:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 64, 0, PDL,
                    PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif BLOCK_M == 96 or (BLOCK_M >= 128 and WGMMA and not CARRY and live <= 96):  # 65-96 rows: 64 + 32
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 128, 32,
                    PDL, PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    elif live <= 128 or BLOCK_M == 128:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 128, 0,
                    PDL, PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)
    else:  # BLOCK_M == 144, 129-144 rows: 128 + 16
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                    stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts,
                    flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, 256, 16,
                    PDL, PREFETCH, False, WGMMA, GROUP_M, False, CARRY, TRACE)


@gluon.jit
def _moe_gemm_decode_kernel(
    a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
    stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts, flags_ptr, part_ptr,
    TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr,
    HAS_ZP: gl.constexpr, HAS_PERM: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr,
    GROUP_IN_TILE: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    EVEN_K: gl.constexpr, ALIGNED: gl.constexpr, ID_BLOCKS: gl.constexpr, ZERO_OUT: gl.constexpr,
    NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr, WGMMA: gl.constexpr, GROUP_M: gl.constexpr,
    PERSISTENT: gl.constexpr, CARRY: gl.constexpr, TRACE: gl.constexpr,
):
    FLAT: gl.constexpr = gl.BlockedLayout([4], [32], [NUM_WARPS], [0])
    BLOCK_M_POW2: gl.constexpr = 1 << (BLOCK_M - 1).bit_length()  # (a tensor's dimension)
    # Launched as a programmatic dependent (kernels/grid_dependence.py), GEMM2 starts copying weights before it
    # waits (its blocks were final before GEMM1 ran; its activations, GEMM1's output, are copied after the
    # wait). GEMM1 reads the previous grid's output (the blocks, the hidden states): it waits first.
    PREFETCH: gl.constexpr = PDL and not GATED
    if TRACE:
        _stamp(trace_ptr, TRACE_START)
        _stamp(trace_ptr, TRACE_SM)
    if not PREFETCH:
        enter_dependent(PDL)
        if TRACE:
            _stamp(trace_ptr, TRACE_WAITED)
    WIDE_DISPATCH: gl.constexpr = BLOCK_M >= _WIDE_M and ID_BLOCKS != 1
    # Every program, idle ones too, clears its share of the next GEMM's output. A narrow block does so in
    # `_block_gemm` after reading its program ids: in that order the kernel compiles to the SASS it had before
    # wide blocks, and kimi-k2 M = 8 ran 524 us, against 566 with the clearing first (NOTES.md v29).
    if ZERO_OUT and WIDE_DISPATCH:
        zero_program_share(zero_ptr, zero_numel, gl.arange(0, 4 * 32 * NUM_WARPS, layout=FLAT))
    if WIDE_DISPATCH:
        pid_m = _program_block(num_m_blocks, N, BLOCK_N, GROUP_M)[0]
        if ID_BLOCKS:  # row j holds token j: as many rows as tokens
            _wide_block(P // TOP_K, a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr,
                        sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks,
                        stride_am, stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit,
                        trace_ptr, num_experts, flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP,
                        HAS_PERM, HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED,
                        ID_BLOCKS, NUM_WARPS, STAGES, PDL, PREFETCH, WGMMA, GROUP_M, CARRY, TRACE)
        elif pid_m * BLOCK_M < gl.load(num_padded_ptr):
            offs = gl.arange(0, BLOCK_M_POW2, layout=FLAT)
            if BLOCK_M_POW2 > BLOCK_M:  # (48 and 96 rows: the next block's rows are not this one's)
                ids = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs, mask=offs < BLOCK_M, other=P)
            else:
                ids = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs)
            live = gl.sum((ids < P).to(gl.int32), axis=0)
            _wide_block(live, a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                        expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am,
                        stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr,
                        num_experts, flags_ptr, part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM,
                        HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS,
                        NUM_WARPS, STAGES, PDL, PREFETCH, WGMMA, GROUP_M, CARRY, TRACE)
    else:
        _block_gemm(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr,
                    expert_ids_ptr, num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am, stride_we,
                    stride_wk, stride_se, stride_sg, stride_om, alpha, beta, limit, trace_ptr, num_experts, flags_ptr,
                    part_ptr, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS, GROUP_SIZE,
                    GROUP_IN_TILE, SPLIT_K, BLOCK_M, BLOCK_N, EVEN_K, ALIGNED, ID_BLOCKS, NUM_WARPS, STAGES, BLOCK_M, 0,
                    PDL, PREFETCH, ZERO_OUT, WGMMA, GROUP_M, PERSISTENT, CARRY, TRACE)
    if TRACE:
        _stamp(trace_ptr, TRACE_END)
