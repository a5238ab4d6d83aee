"""Grouped MoE GEMM with int4/int8 weights dequantized in registers, fp32 accumulation on tensor cores.

Legend: T tokens, K top-k, P = T * K routed pairs, E experts, N output features, KD reduction dim (H for
GEMM1, I for GEMM2), G groups, PACK = 32 // bits codes per int32 word, TILE_K = 128 reduction elements per
tile, R = TILE_K // PACK words per tile column.

Rows are the pairs of `moe_align_block_size`, one expert per BLOCK_M block, or for at most BLOCK_M tokens blocks
straight from topk_ids (ID_BLOCKS: one pair per block for one token, else `kernels/token_blocks.py`). With SHRINK
a block whose real rows (padding is sorted last) fit in BLOCK_M / 2 (or / 4) runs the main loop and epilogue
compiled for that many rows (`_gemm_block`).

Weight layout, K-major and tile-interleaved: w[e, t * R + r, n] is one int32 word of column n; its slot j
(bits [j * bits, (j + 1) * bits)) holds the code of reduction index kd = t * TILE_K + j * R + r. So a tile
is one coalesced [R, BLOCK_N] load, and slot j of all its words is the contiguous sub-block
[j * R, (j + 1) * R) of the tile: unpacking is a shift and a mask per element, with no interleave, and each
sub-block feeds its own `tl.dot` of depth R (16 for int4, 32 for int8). Words in fragment tiles (FRAGMENT:
w[e, h, n, p] for the Gluon kernels, each column's words of a half tile of 16 word rows contiguous in mma
fragment order, words with their halves exchanged in pairs, `layout.py`) are read where they sit, each
word with its partner row (r ^ 1, the neighbouring position) and exchanged back (`_exchange_halves`):
`tl.dot`'s operand layouts do not pair word rows as the Gluon kernels' do, and its loads along N are 64 bytes
apart there. Sub-blocks
never straddle a quantization group (groups are multiples of R), so the scale multiplies each group's partial
sum. On NVIDIA GPUs (FAST_DEQUANT) the slots come from `kernels/dequant.py` instead: exponent tricks in PTX rather than
quarter-rate int -> float conversions, with the scale folded into the weights for groups smaller than a tile;
with SWAP_AB the program computes the transposed tile (weights as the MMA's register operand, see _tile_dot).
When KD is a whole number of tiles (EVEN_K) no load along K is masked.

GEMM1 (GATED): a = hidden_states [T, H]; the program computes a gate tile (columns n) and the matching up
tile (columns n + N) and writes act(gate, up) to intermediate [P, N] in the activation dtype. Split over K
(decode), it writes float32 partial sums [SPLIT_K, P, 2N] instead, for `activation.split_k_activation`.
GEMM2: a = intermediate [P, I]; the program multiplies by the pair's router weight and atomically adds into
out [T, N] float32, which reduces the top-k contributions of each token (summation order is not fixed).
GEMM1's programs clear that accumulator beforehand (ZERO_OUT), so a forward needs no separate fill.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.compiler.compiler import max_shared_mem
from triton.runtime.errors import OutOfResources

from wna16moe.kernels.activation import ACT_SILU, gated_activation
from wna16moe.kernels.dequant import (
    QUARTERS,
    centred,
    dequant_magic,
    dequant_offset,
    dequant_slots_exact,
    dequant_slots_raw,
    dequant_slots_scaled,
)
from wna16moe.kernels.grid_dependence import enter_dependent, launch_options, leave_main_loop
from wna16moe.kernels.launch import launch, scratch
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K
from wna16moe.kernels.moe_gemm_decode import (
    MAX_CARRY,
    SPLIT_BLOCK_MS,
    TRACE_FIELDS,
    _moe_gemm_decode_kernel,
    ring_bytes,
    tiling_error,
)
from wna16moe.kernels.moe_gemm_ws import _moe_gemm_ws_kernel, ws_extra_bytes
from wna16moe.kernels.token_blocks import token_block_rows
from wna16moe.kernels.zero_share import zero_program_share

# Kernels may read module globals only when they are constexpr objects.
_TILE_K = tl.constexpr(TILE_K)
_FRAGMENT_WORDS = tl.constexpr(FRAGMENT_WORDS)
_QUARTERS = tl.constexpr(QUARTERS)


@triton.jit
def _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """Activation columns `offs` of the block's rows (through the act-order permutation when HAS_PERM).

    Every row pointer is valid (padding rows point at a real row; their results are never stored), so only
    columns past KD need a mask, and none when KD is a whole number of tiles (EVEN_K).
    """
    if EVEN_K:
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs)
        else:
            cols = offs
        return tl.load(a_row_ptrs + cols[None, :])
    k_mask = offs < k_end
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs, mask=k_mask, other=0)
    else:
        cols = offs
    return tl.load(a_row_ptrs + cols[None, :], mask=k_mask[None, :], other=0.0)


@triton.jit
def _group_row(ptrs, n_mask, row, k_end, group_size, stride_sg, CLAMP: tl.constexpr):
    """Columns n of the scale (or zero-point) row of the group holding reduction row `row`, [BLOCK_N]. With
    CLAMP a row past the split reads the split's last group (a load ahead of the loop's end, or a tile quarter
    past KD: never used, its activations are zero)."""
    if CLAMP:
        row = tl.minimum(row, k_end - 1)
    return tl.load(ptrs + (row // group_size) * stride_sg, mask=n_mask, other=0)


@triton.jit
def _zero_points(z_row, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """int32 zero points from a group's zero-point row; the symmetric midpoint without zero points."""
    if HAS_ZP:
        z = z_row.to(tl.int32)
    else:
        z = tl.full(z_row.shape, 1 << (BITS - 1), tl.int32)
    return z


@triton.jit
def _quarter_offset_scale(s_ptrs, z_ptrs, n_mask, row, k_end, group_size, stride_sg, BITS: tl.constexpr,
                          HAS_ZP: tl.constexpr, DTYPE: tl.constexpr, EVEN_K: tl.constexpr):
    """The `dequant_slots_scaled` operands of the tile quarter starting at reduction row `row`: its group's
    negative offset and scale in DTYPE, [1, BLOCK_N]."""
    s_row = _group_row(s_ptrs, n_mask, row, k_end, group_size, stride_sg, not EVEN_K)
    z_row = _group_row(z_ptrs, n_mask, row, k_end, group_size, stride_sg, not EVEN_K) if HAS_ZP else s_row
    return dequant_offset(_zero_points(z_row, BITS, HAS_ZP), BITS, DTYPE)[None, :], s_row.to(DTYPE)[None, :]


@triton.jit
def _exchange_halves(words, partner, odd):
    """`layout.exchange_halves` elementwise: a word row's plain word from its paired form and its partner row's
    (r ^ 1; `odd`: r is odd)."""
    return tl.where(odd, ((partner >> 16) & 0xFFFF) | (words & -0x10000), (words & 0xFFFF) | (partner << 16))


@triton.jit
def _tile_from_slots(slots, PACK: tl.constexpr):
    """The [_TILE_K, BLOCK_N] tile from its PACK slot tensors [R, BLOCK_N] (slot j holds rows j * R + r):
    joined in registers, slot-major."""
    R: tl.constexpr = slots[0].shape[0]
    BLOCK_N: tl.constexpr = slots[0].shape[1]
    if PACK == 8:
        low = tl.join(tl.join(slots[0], slots[1]), tl.join(slots[2], slots[3]))
        high = tl.join(tl.join(slots[4], slots[5]), tl.join(slots[6], slots[7]))
        # [R, BLOCK_N, 2, 2, 2]: slot j = s + 2p + 4q at indices (s, p, q)
        tile = tl.permute(tl.join(low, high), (4, 3, 2, 0, 1))
    else:
        tile = tl.permute(tl.join(tl.join(slots[0], slots[1]), tl.join(slots[2], slots[3])), (3, 2, 0, 1))
    return tl.reshape(tile, (PACK * R, BLOCK_N))


@triton.jit
def _tile_dot(acc, words, s_row, z_row, a_row_ptrs, perm_ptr, s_ptrs, z_ptrs, n_mask, k, k_end, group_size,
              stride_sg, BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
              GROUP_IN_TILE: tl.constexpr, SCALE_WEIGHTS: tl.constexpr, FAST_DEQUANT: tl.constexpr,
              SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + a[:, tile] @ dequant(words) for one _TILE_K tile.

    Where the kernel loads them ahead (ROWS_AHEAD) `s_row` and `z_row` [BLOCK_N] are the tile's scale and
    zero-point rows; otherwise the groups' rows are read here.

    Plain path, SCALE_WEIGHTS (or BLOCK_M 64 with a group of a whole tile): all slots are unpacked into one
    [_TILE_K, BLOCK_N] operand (slot-major order is the natural K order of the tile) and a single dot covers
    the tile. Otherwise each slot is its own dot of depth R:
      - FAST_DEQUANT (NVIDIA): slots from `kernels/dequant.py`; with one group per tile, integer weights and
        the scale multiplies the tile's sum; with smaller groups (or SWAP_AB), weights scaled in the asm, so
        every slot accumulates straight into acc.
      - plain: shift, mask, subtract the zero point, convert; each group's slots summed, then scaled.
    SWAP_AB (FAST_DEQUANT): acc is [BLOCK_N, BLOCK_M] and the tile is one dot(W^T, a^T) with the slots joined
    in registers (`_tile_from_slots`): the dequantized weights are the A operand, which wgmma (Hopper) reads
    from registers (as B they would be stored to shared memory first), and one dot per tile lets wgmma keep
    its K steps in flight.
    """
    PACK: tl.constexpr = 32 // BITS
    R: tl.constexpr = _TILE_K // PACK
    DTYPE: tl.constexpr = a_row_ptrs.dtype.element_ty
    # One dot per tile pays off at BLOCK_M 64 (wgmma) in the plain path; per-slot dots are faster with mma.sync
    # (BLOCK_M 16, decode) and at BLOCK_M 128 (H100, 2026-11-28, benchmarks/NOTES.md v4).
    if not SWAP_AB and (SCALE_WEIGHTS or (GROUP_IN_TILE == _TILE_K and acc.shape[0] == 64)):
        offs = k + tl.arange(0, _TILE_K)
        a = _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM, EVEN_K)
        BLOCK_N: tl.constexpr = words.shape[1]
        NG: tl.constexpr = _TILE_K // GROUP_IN_TILE
        shifts = tl.arange(0, PACK) * BITS
        q = (words[None, :, :] >> shifts[:, None, None]) & ((1 << BITS) - 1)  # [PACK, R, BLOCK_N]
        q = tl.reshape(q, (NG, GROUP_IN_TILE, BLOCK_N))  # the tile's groups, in K order
        # One scale and zero row per group of the tile (rows past KD are masked).
        group_rows = k + tl.arange(0, NG) * GROUP_IN_TILE
        g_ptrs = (group_rows // group_size)[:, None] * stride_sg
        g_mask = n_mask[None, :] & (group_rows < k_end)[:, None]
        if SCALE_WEIGHTS:
            if HAS_ZP:
                z = tl.load(z_ptrs[None, :] + g_ptrs, mask=g_mask, other=0).to(tl.int32)[:, None, :]
            else:
                z = 1 << (BITS - 1)
            s = tl.load(s_ptrs[None, :] + g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            w = tl.reshape((q - z).to(tl.float32) * s[:, None, :], (_TILE_K, BLOCK_N)).to(a.dtype)
            acc = tl.dot(a, w, acc)
        else:  # a single group: scale the tile's sum
            w = tl.reshape(q - _zero_points(z_row, BITS, HAS_ZP)[None, None, :], (_TILE_K, BLOCK_N)).to(a.dtype)
            acc += tl.dot(a, w) * s_row.to(tl.float32)[None, :]
    elif FAST_DEQUANT and (GROUP_IN_TILE < _TILE_K or SWAP_AB):
        QUARTER: tl.constexpr = _TILE_K // _QUARTERS
        o0, s0 = _quarter_offset_scale(s_ptrs, z_ptrs, n_mask, k, k_end, group_size, stride_sg, BITS, HAS_ZP,
                                       DTYPE, EVEN_K)
        if GROUP_IN_TILE < _TILE_K:
            o1, s1 = _quarter_offset_scale(s_ptrs, z_ptrs, n_mask, k + QUARTER, k_end, group_size, stride_sg, BITS,
                                           HAS_ZP, DTYPE, EVEN_K)
            o2, s2 = _quarter_offset_scale(s_ptrs, z_ptrs, n_mask, k + 2 * QUARTER, k_end, group_size, stride_sg,
                                           BITS, HAS_ZP, DTYPE, EVEN_K)
            o3, s3 = _quarter_offset_scale(s_ptrs, z_ptrs, n_mask, k + 3 * QUARTER, k_end, group_size, stride_sg,
                                           BITS, HAS_ZP, DTYPE, EVEN_K)
        else:  # one group for the whole tile
            o1, s1, o2, s2, o3, s3 = o0, s0, o0, s0, o0, s0
        slots = dequant_slots_scaled(words, o0, o1, o2, o3, s0, s1, s2, s3, BITS, DTYPE, False)
        if SWAP_AB and (PACK == 8 or acc.shape[1] > 128):  # one dot per tile: wgmma keeps its K steps in flight
            a = _load_a(a_row_ptrs, perm_ptr, k + tl.arange(0, _TILE_K), k_end, HAS_PERM, EVEN_K)
            acc = tl.dot(tl.trans(_tile_from_slots(slots, PACK)), tl.trans(a), acc)
        elif SWAP_AB:
            # int8 up to BLOCK_M 128: the joined tile spills at BLOCK_M 64 x BLOCK_N 128 (SASS: 46 STL per tile
            # against 12 per slot; W8A16 1.4-1.6x slower at M = 512-2048 than per slot, H200); one dot per slot.
            # (At BLOCK_M 256 per-slot operands overflow shared memory.)
            for j in tl.static_range(PACK):
                a = _load_a(a_row_ptrs, perm_ptr, k + j * R + tl.arange(0, R), k_end, HAS_PERM, EVEN_K)
                acc = tl.dot(tl.trans(slots[j]), tl.trans(a), acc)
        else:
            for j in tl.static_range(PACK):
                offs = k + j * R + tl.arange(0, R)
                a = _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM, EVEN_K)
                acc = tl.dot(a, slots[j], acc)
    elif FAST_DEQUANT:  # one group covers the tile
        z = _zero_points(z_row, BITS, HAS_ZP)
        partial = tl.zeros(acc.shape, dtype=tl.float32)
        if centred(BITS, DTYPE):  # q - z straight from the dequantization (no row sums)
            slots = dequant_slots_exact(words, z[None, :], BITS, DTYPE, HAS_ZP, False)
            for j in tl.static_range(PACK):
                offs = k + j * R + tl.arange(0, R)
                a = _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM, EVEN_K)
                partial = tl.dot(a, slots[j], partial)
        else:
            # The slots are magic + q, exactly: sum_k a (magic + q) - (magic + z) sum_k a = sum_k a (q - z), with
            # the activations' row sums from one more dot per slot against ones (shared by GEMM1's gate and up
            # tiles): one MMA per slot instead of one packed subtraction per two weights.
            slots = dequant_slots_raw(words, BITS, DTYPE, False)
            row_sums = tl.zeros(acc.shape, dtype=tl.float32)
            ones = tl.full((R, words.shape[1]), 1.0, DTYPE)
            for j in tl.static_range(PACK):
                offs = k + j * R + tl.arange(0, R)
                a = _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM, EVEN_K)
                partial = tl.dot(a, slots[j], partial)
                row_sums = tl.dot(a, ones, row_sums)
            partial -= row_sums * (dequant_magic(BITS, DTYPE) + z.to(tl.float32))[None, :]
        acc += partial * s_row.to(tl.float32)[None, :]
    else:
        SLOTS_PER_GROUP: tl.constexpr = GROUP_IN_TILE // R
        for g in tl.static_range(_TILE_K // GROUP_IN_TILE):
            group_start = k + g * GROUP_IN_TILE
            group = group_start // group_size
            # A group past the end of KD (last, partial tile) has no scale row to read.
            g_mask = n_mask & (group_start < k_end)
            if GROUP_IN_TILE == _TILE_K:
                s = s_row.to(tl.float32)
                z = _zero_points(z_row, BITS, HAS_ZP)[None, :]
            else:
                s = tl.load(s_ptrs + group * stride_sg, mask=g_mask, other=0.0).to(tl.float32)
                if HAS_ZP:
                    z = tl.load(z_ptrs + group * stride_sg, mask=g_mask, other=0).to(tl.int32)[None, :]
                else:
                    z = 1 << (BITS - 1)
            partial = tl.zeros(acc.shape, dtype=tl.float32)
            for j in tl.static_range(g * SLOTS_PER_GROUP, (g + 1) * SLOTS_PER_GROUP):
                offs = k + j * R + tl.arange(0, R)
                a = _load_a(a_row_ptrs, perm_ptr, offs, k_end, HAS_PERM, EVEN_K)
                w = (((words >> (BITS * j)) & ((1 << BITS) - 1)) - z).to(a.dtype)
                partial = tl.dot(a, w, partial)
            acc += partial * s[None, :]
    return acc


@triton.jit
def _gemm_block(
    a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, pid_m, pid_n, pid_k,
    expert, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se, stride_sg, stride_om, alpha, beta,
    limit,
    TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr, BITS: tl.constexpr,
    HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    GROUP_IN_TILE: tl.constexpr, SCALE_WEIGHTS: tl.constexpr, SPLIT_K: tl.constexpr, FAST_DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
    ID_BLOCKS: tl.constexpr, PDL: tl.constexpr, ROWS: tl.constexpr, FRAGMENT: tl.constexpr,
):
    """Block pid_m of `expert` (rows pid_m * BLOCK_M onward; with ID_BLOCKS see the kernel), its first ROWS rows
    only, N tile pid_n and K split pid_k: both the main loop and the epilogue of the kernel below."""
    PACK: tl.constexpr = 32 // BITS
    R: tl.constexpr = _TILE_K // PACK
    if ID_BLOCKS == 1:  # one token: block b holds pair b alone
        rows = tl.where(tl.arange(0, ROWS) == 0, pid_m, P)
    elif ID_BLOCKS:
        rows, first = token_block_rows(sorted_ids_ptr, pid_m, expert, P, tl.arange(0, ROWS), TOP_K)
        if not first:  # (another block of the expert's works)
            return
    else:
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, ROWS))
    row_mask = rows < P
    # Padding rows (P) read pair 0's activations instead of masking every load; their results are dropped.
    safe_rows = tl.where(row_mask, rows, 0)
    if GATED:
        a_rows = safe_rows // TOP_K
    else:
        a_rows = safe_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tiles = tl.cdiv(KD, _TILE_K)
    tiles_per_split = tl.cdiv(tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * _TILE_K
    k_end = tl.minimum(KD, k_begin + tiles_per_split * _TILE_K)

    a_row_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
    perm_ptr = a_perm_ptr + expert * KD
    word_rows = tl.arange(0, R)
    odd_rows = (word_rows % 2 == 1)[:, None]
    PAIRED: tl.constexpr = FRAGMENT
    if FRAGMENT:  # fragment tiles (layout.py): word row r of column n in half tile r // 16 (16 word rows of
        # stride_wk words each) at n * 16 + p(r % 16); a word's partner at p(r) ^ 1
        positions = (word_rows // _FRAGMENT_WORDS * _FRAGMENT_WORDS * stride_wk + 4 * (word_rows // 2 % 4)
                     + 2 * (word_rows // 8 % 2) + word_rows % 2)
        w_ptrs = w_ptr + expert * stride_we + positions[:, None] + offs_n[None, :] * _FRAGMENT_WORDS
        partner_step = tl.where(odd_rows, -1, 1)
        up_step = N * _FRAGMENT_WORDS
    else:
        w_ptrs = w_ptr + expert * stride_we + word_rows[:, None] * stride_wk + offs_n[None, :]
        up_step = N
    s_ptrs = s_ptr + expert * stride_se + offs_n
    z_ptrs = z_ptr + expert * stride_se + offs_n
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    # One group per tile, its sum scaled after the dot: the tile's scale and zero-point rows are loaded one tile
    # ahead, into registers. Triton's pipeliner prefetches through shared memory only the loads that feed a dot,
    # and a scale row that multiplies the dot's result (or a byte-wide zero-point row) loaded in its own
    # iteration stalled every tile for a memory round trip (decode; benchmarks/NOTES.md v12). Two tiles ahead
    # makes Triton 3.6 drop the loop's pipelining. (SWAP_AB scales in the dequantization: pipelined as is.)
    ROWS_AHEAD: tl.constexpr = GROUP_IN_TILE == _TILE_K and not SCALE_WEIGHTS and not SWAP_AB
    if ROWS_AHEAD:  # (what a layer lacks, the up half or zero points, repeats a row it has: unused)
        s_next = _group_row(s_ptrs, n_mask, k_begin, k_end, GROUP_SIZE, stride_sg, True)
        s_up_next = _group_row(s_ptrs + N, n_mask, k_begin, k_end, GROUP_SIZE, stride_sg, True) if GATED else s_next
        z_next, z_up_next = s_next, s_up_next
        if HAS_ZP:
            z_next = _group_row(z_ptrs, n_mask, k_begin, k_end, GROUP_SIZE, stride_sg, True)
            z_up_next = _group_row(z_ptrs + N, n_mask, k_begin, k_end, GROUP_SIZE, stride_sg, True) if GATED else z_next
    for k in range(k_begin, k_end, _TILE_K):
        if ROWS_AHEAD:
            s_row, s_up, z_row, z_up = s_next, s_up_next, z_next, z_up_next
            s_next = _group_row(s_ptrs, n_mask, k + _TILE_K, k_end, GROUP_SIZE, stride_sg, True)
            if GATED:
                s_up_next = _group_row(s_ptrs + N, n_mask, k + _TILE_K, k_end, GROUP_SIZE, stride_sg, True)
            if HAS_ZP:
                z_next = _group_row(z_ptrs, n_mask, k + _TILE_K, k_end, GROUP_SIZE, stride_sg, True)
                if GATED:
                    z_up_next = _group_row(z_ptrs + N, n_mask, k + _TILE_K, k_end, GROUP_SIZE, stride_sg, True)
        else:  # rows read per group inside _tile_dot
            s_row, s_up, z_row, z_up = n_mask, n_mask, n_mask, n_mask
        tile_ptrs = w_ptrs + (k // PACK) * stride_wk
        words = tl.load(tile_ptrs, mask=n_mask[None, :], other=0)
        if PAIRED:
            words = _exchange_halves(words, tl.load(tile_ptrs + partner_step, mask=n_mask[None, :], other=0),
                                     odd_rows)
        acc = _tile_dot(acc, words, s_row, z_row, a_row_ptrs, perm_ptr, s_ptrs, z_ptrs, n_mask, k, k_end,
                        GROUP_SIZE, stride_sg, BITS, HAS_ZP, HAS_PERM, GROUP_IN_TILE, SCALE_WEIGHTS, FAST_DEQUANT,
                        SWAP_AB, EVEN_K)
        if GATED:
            words_up = tl.load(tile_ptrs + up_step, mask=n_mask[None, :], other=0)
            if PAIRED:
                partner_up = tl.load(tile_ptrs + up_step + partner_step, mask=n_mask[None, :], other=0)
                words_up = _exchange_halves(words_up, partner_up, odd_rows)
            acc_up = _tile_dot(acc_up, words_up, s_up, z_up, a_row_ptrs, perm_ptr, s_ptrs + N, z_ptrs + N, n_mask,
                               k, k_end, GROUP_SIZE, stride_sg, BITS, HAS_ZP, HAS_PERM, GROUP_IN_TILE,
                               SCALE_WEIGHTS, FAST_DEQUANT, SWAP_AB, EVEN_K)
    leave_main_loop(PDL)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)

    out_mask = row_mask[:, None] & n_mask[None, :]
    if GATED and SPLIT_K > 1:  # float32 partial sums [SPLIT_K, P, 2N]; kernels/activation.py finishes them
        part_rows = pid_k.to(tl.int64) * P + rows.to(tl.int64)
        part_ptrs = out_ptr + part_rows[:, None] * stride_om + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)
        tl.store(part_ptrs + N, acc_up, mask=out_mask)
    elif GATED:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * 2 * N + offs_n, mask=n_mask, other=0.0)[None, :]
            acc_up += tl.load(bias_ptr + expert * 2 * N + N + offs_n, mask=n_mask, other=0.0)[None, :]
        h = gated_activation(acc, acc_up, alpha, beta, limit, ACT, HAS_LIMIT)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + expert * N + offs_n, mask=n_mask, other=0.0)[None, :]
        router_w = tl.load(topk_w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * router_w[:, None]
        tokens = rows // TOP_K
        out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")




@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # (A_rows, KD) activations: hidden_states [T, H] (GATED) or intermediate [P, I]
    a_perm_ptr,  # (E, KD) int32 act-order column permutation of A per expert (HAS_PERM)
    w_ptr,  # (E, ceil(KD / _TILE_K) * R, N_total) int32 packed codes, K-major, tile-interleaved
    s_ptr,  # (E, G, N_total) scales
    z_ptr,  # (E, G, N_total) uint8 zero points (HAS_ZP)
    bias_ptr,  # (E, N_total) float32 (HAS_BIAS)
    out_ptr,  # GATED: (P, N) activation dtype; else (T, N) float32, accumulated atomically
    topk_w_ptr,  # (P,) router weights, any float dtype (not GATED)
    sorted_ids_ptr,  # (max_padded,) int32 pair of each row, P for padding (not ID_BLOCKS)
    expert_ids_ptr,  # (max_blocks,) int32 expert of each BLOCK_M block; ID_BLOCKS: (P,) of each pair, -1 left out
    num_padded_ptr,  # (1,) int32 rows in use (not ID_BLOCKS)
    zero_ptr,  # (zero_numel,) float32 to fill with zeros (ZERO_OUT)
    zero_numel,
    N,
    KD,
    P,
    num_m_blocks,
    stride_am,
    stride_we,
    stride_wk,
    stride_se,
    stride_sg,
    stride_om,
    alpha,
    beta,
    limit,
    num_experts,  # E: the weights' experts (ID_BLOCKS: a pair of any other id is left out, as of -1)
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BITS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_IN_TILE: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FAST_DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr,
    ID_BLOCKS: tl.constexpr,  # 0: aligned blocks; 1: one token, block b = pair b; 2: kernels/token_blocks.py
    ZERO_OUT: tl.constexpr,
    PDL: tl.constexpr,
    SHRINK: tl.constexpr,
    FRAGMENT: tl.constexpr,  # words in fragment tiles (layout.py), paired: read with their partners
):
    enter_dependent(PDL)  # (launched with PDL: nothing is read or written before the previous grid ends)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks
    pid_k = tl.program_id(1)
    # (the clearing after the program ids: in that order GEMM1 compiles as before blocks could shrink)
    if ZERO_OUT:  # every program, idle ones too, clears its share of the next GEMM's output (one launch fewer)
        zero_program_share(zero_ptr, zero_numel, tl.arange(0, 1024))
    if ID_BLOCKS:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if (expert < 0) | (expert >= num_experts):
            return
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if SHRINK and not ID_BLOCKS:
        # The block multiplies only its first BLOCK_M / 2 (or / 4, SHRINK 2) rows when they hold all its real
        # ones (padding rows are sorted last): an expert's last block is often mostly padding.
        live = tl.sum((tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) < P).to(tl.int32))
        if SHRINK > 1 and live <= BLOCK_M // 4:
            _gemm_block(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, pid_m,
                        pid_n, pid_k, expert, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
                        stride_sg, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM,
                        HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, SCALE_WEIGHTS, SPLIT_K, FAST_DEQUANT, BLOCK_M, BLOCK_N,
                        SWAP_AB, EVEN_K, ID_BLOCKS, PDL, BLOCK_M // 4, FRAGMENT)
        elif live <= BLOCK_M // 2:
            _gemm_block(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, pid_m,
                        pid_n, pid_k, expert, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
                        stride_sg, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM,
                        HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, SCALE_WEIGHTS, SPLIT_K, FAST_DEQUANT, BLOCK_M, BLOCK_N,
                        SWAP_AB, EVEN_K, ID_BLOCKS, PDL, BLOCK_M // 2, FRAGMENT)
        else:
            _gemm_block(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, pid_m,
                        pid_n, pid_k, expert, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
                        stride_sg, stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM,
                        HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, SCALE_WEIGHTS, SPLIT_K, FAST_DEQUANT, BLOCK_M, BLOCK_N,
                        SWAP_AB, EVEN_K, ID_BLOCKS, PDL, BLOCK_M, FRAGMENT)
    else:
        _gemm_block(a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, pid_m, pid_n,
                    pid_k, expert, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se, stride_sg,
                    stride_om, alpha, beta, limit, TOP_K, GATED, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS,
                    GROUP_SIZE, GROUP_IN_TILE, SCALE_WEIGHTS, SPLIT_K, FAST_DEQUANT, BLOCK_M, BLOCK_N, SWAP_AB, EVEN_K,
                    ID_BLOCKS, PDL, BLOCK_M, FRAGMENT)


# Row blocks that go through all column tiles together at prefill (`_program_block`; 8 and 16 measured alike,
# NOTES.md v38).
PREFILL_GROUP_M = 8


# Narrower blocks group too from this reduction length (NOTES.md v77).
GROUPED_FROM_K = 2048


def group_m(block_m: int, k: int) -> int:
    """The decode kernel's GROUP_M for blocks of `block_m` rows over a reduction of `k`. Blocks of 64 rows and more
    are prefill's, whose activations are worth keeping in L2 while every column tile reads them. Narrower blocks
    group over long reductions too (v77: int4 deepseek-v3 and kimi-k2 M = 8-512 0.1-3.5% faster, W8A16 1.2-3.6%,
    mixtral level); over short ones they keep the decode order (qwen3-30b-a3b's GEMM2, k = 768: 1.2-2.2% slower
    grouped)."""
    return PREFILL_GROUP_M if block_m >= 64 or k >= GROUPED_FROM_K else 1


def _max_shared_memory(device: torch.device) -> int | None:
    """Shared memory one program may use on a CUDA device, else None: the limit Triton checks a compiled
    kernel against at its first launch (its own cached query)."""
    return max_shared_mem(device.index) if device.type == "cuda" else None


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _group_in_tile(group_size: int) -> int:
    """Reduction rows of one quantization group inside a TILE_K tile (group_size -1: channel-wise)."""
    return TILE_K if group_size == -1 else min(group_size, TILE_K)


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    a_perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    sorted_ids: torch.Tensor | None,
    expert_ids: torch.Tensor,
    num_padded: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    top_k: int,
    gated: bool,
    act: int = ACT_SILU,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
    block_m: int,
    block_n: int,
    split_k: int = 1,
    fast_dequant: bool = False,
    swap_ab: bool = False,
    decode: bool = False,
    zero_out: torch.Tensor | None = None,
    pdl: int = 0,
    shrink: int = 0,
    num_warps: int = 4,
    num_stages: int = 3,
    max_registers: int | None = None,
    wgmma: bool = False,
    carry: int = 0,
    persistent: int = 0,
    specialize: bool = False,
    trace: torch.Tensor | None = None,
    share_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch one grouped GEMM (see the module docstring for the math and layouts): this module's kernel or,
    with `decode`, `kernels/moe_gemm_decode.py`'s (the same operands and outputs).

    Parameters
    ----------
    a : GEMM1 hidden_states [T, H]; GEMM2 intermediate [P, I]. bfloat16 or float16, row-major.
    w : [E, ceil(KD / TILE_K) * R, N_total] int32, tile-interleaved K-major (`layout.tile_interleave`, transposed);
        N_total = 2N for GEMM1 (gate columns, then up columns), N for GEMM2. Or in fragment tiles
        [E, ceil(KD / TILE_K) * R / 16, N_total, 16] (`layout.fragment_tiles`, words paired), the only layout
        the decode kernel reads; this module's kernel reads both.
    scales : [E, G, N_total]; zeros : [E, G, N_total] uint8 or None (symmetric: zero 2**(bits - 1)).
    a_perm : [E, KD] int32 act-order column order of `a`, or None.
    bias : [E, N_total] float32 or None.
    out : GEMM1 [P, N] in a's dtype, or with split_k > 1 [split_k, P, 2N] float32 partial sums; GEMM2 [T, N]
        float32, pre-filled (accumulated into).
    topk_weights : [P] router weights (GEMM2), float32, bfloat16 or float16 (read as float32).
    sorted_ids, expert_ids, num_padded : the blocks of `moe_align_block_size`; or, for at most block_m tokens,
        sorted_ids and num_padded None and expert_ids [P] = topk_ids.reshape(-1) (-1: left out): blocks found from
        the ids in the kernel (one pair per block for one token; `kernels/token_blocks.py`), no alignment pass.
    group_size : elements per group, a multiple of R (16 for int4, 32 for int8), or -1 for channel-wise.
    fast_dequant : dequantize with NVIDIA PTX (kernels/dequant.py); CUDA only, not under the interpreter.
    swap_ab : with fast_dequant, multiply as (W^T a^T)^T, the weights scaled in the dequantization (no effect on
        the plain path).
    decode : the Gluon decode kernel (NVIDIA sm80+, not under the interpreter), on a tiling its `tiling_error`
        accepts: block_m one of its BLOCK_MS, block_n a multiple of 16 x num_warps, num_stages >= 2 the depth
        of its cp.async ring, which must fit the GPU's shared memory (`ring_bytes`); fast_dequant and swap_ab do
        not apply.
    zero_out : a contiguous float32 tensor the programs fill with zeros (GEMM2's output, cleared by GEMM1).
    pdl : launch as a programmatic dependent of the kernel before, releasing the next one after the loop (1) or
        at the wait (2); 0: a plain launch (CUDA sm90+ only; kernels/grid_dependence.py).
    shrink : this module's kernel only: a block whose real rows fit in block_m / 2 (shrink 1) or block_m / 4
        (shrink 2; the smaller that fits) multiplies only those rows, each size compiled as its own loop
        (an expert's last block is often mostly padding). The decode kernel's wide blocks always do so.
    max_registers : a cap on registers per thread (ptxas .maxnreg), or None for the compiler's choice.
    wgmma : the decode kernel's wide blocks (block_m >= 32) multiply with Hopper's warpgroup mmas (sm_90 only).
    carry : with wgmma, a GEMM2 (not gated) whose ring has 3 stages or more leaves each tile's last `carry`
        warpgroup mmas in flight past the tile's end, over the next tile's barrier, copies and first
        dequantization; its ring then runs num_stages - 2 tiles ahead (kernels/moe_gemm_decode.py).
    persistent : the decode kernel's narrow blocks (8 and 16 rows) on `persistent` programs per SM, each taking
        an equal share of the (row block, column tile) items' K tiles through one cp.async ring (stream-K,
        kernels/moe_gemm_decode.py); 0: one program per block and tile. At most as many per SM as their rings
        fit in its shared memory (registers are the caller's to fit: `max_registers`). Where the ring cannot run
        on (K split, blocks without alignment, act-order columns or rows not in 16-byte pieces, fewer K tiles
        than stages) the launch is one program per block and tile.
    specialize : a GEMM2 (not gated) on the decode kernel's 128-row wgmma blocks at 8 warps, 128 or 256 wide,
        runs on warp-specialized programs instead (kernels/moe_gemm_ws.py: two warpgroups, each copying and
        multiplying half the columns, meeting only on mbarriers); blocks without alignment, act-order columns and
        rows off 16 bytes keep the decode kernel.
    trace : int64 [>= programs, TRACE_FIELDS] (kernels/moe_gemm_decode.py), or None: the decode kernel (not
        specialized) writes each program's timeline into row pid_0 + pid_1 x grid_0 (global timer at start, after
        its wait, after its loop, at the end; its SM), for benchmarks/program_timeline.py. Fields a program does not
        reach (an idle block's loop) and rows past the grid keep what they held.
    share_flags : int32 [>= programs], zero, for a persistent GEMM1: where a program that finished the later part
        of an item another began signals that its sums wait in the workspace. Each launch leaves them zero. None:
        a zeroed temporary (one more fill per launch).
    """
    registers = {} if max_registers is None else {"maxnreg": max_registers}
    fragment = w.dim() == 4
    if fragment and w.shape[3] != FRAGMENT_WORDS:
        raise ValueError(f"w of shape {list(w.shape)}: fragment tiles are [E, half tiles, N_total, "
                         f"{FRAGMENT_WORDS}]")
    if decode:
        error = tiling_error(block_m, block_n, num_warps, num_stages)
        if error:
            raise ValueError(error)
        if shrink:
            raise ValueError(f"shrink={shrink} is this module's kernel's: the decode kernel's wide blocks always "
                             "multiply only their real rows")
        # Rows of scales, zero points and activations (GEMM1's, wide blocks') go through the cp.async ring in
        # 16-byte pieces where they come in them; else through registers.
        aligned = all(x % 16 == 0 for x in (w.shape[2] // (2 if gated else 1), a.shape[1], a.stride(0), a.data_ptr(),
                                           scales.stride(0), scales.stride(1), scales.data_ptr(),
                                           0 if zeros is None else zeros.data_ptr()))
        if wgmma and block_m < 32:
            raise ValueError(f"wgmma multiplies the decode kernel's wide blocks (block_m >= 32), got {block_m}")
        if (carry and not wgmma) or not 0 <= carry <= MAX_CARRY:
            raise ValueError(f"carry (warpgroup mmas left in flight, 0 to {MAX_CARRY}) needs wgmma, got "
                             f"carry={carry} wgmma={wgmma}")
        if block_m in SPLIT_BLOCK_MS and (not wgmma or carry or specialize or sorted_ids is None):
            raise ValueError(f"blocks of {SPLIT_BLOCK_MS} rows run on wgmma from the alignment's blocks, without "
                             f"carry or specialize, got block_m={block_m} wgmma={wgmma} carry={carry} "
                             f"specialize={specialize} aligned blocks={sorted_ids is not None}")
        if persistent and (block_m >= 32 or sorted_ids is None or split_k > 1 or a_perm is not None or not aligned
                           or triton.cdiv(a.shape[1], TILE_K) < num_stages):
            persistent = 0
        kernel, constexprs = _moe_gemm_decode_kernel, dict(NUM_WARPS=num_warps, STAGES=num_stages, ALIGNED=aligned,
                                                           WGMMA=wgmma, GROUP_M=group_m(block_m, a.shape[1]),
                                                           PERSISTENT=persistent > 0, CARRY=carry,
                                                           trace_ptr=a if trace is None else trace,
                                                           TRACE=trace is not None)
        options = dict(num_warps=num_warps, **registers)
        if specialize and (gated or not wgmma or block_m != 128 or block_n not in (128, 256) or num_warps != 8
                           or split_k != 1 or carry or persistent or max_registers is not None):
            raise ValueError(
                f"specialize runs a GEMM2 on 128 x 128 or 128 x 256 wgmma blocks at 8 warps (no K split, carry, "
                f"persistent or register cap), got gated={gated} wgmma={wgmma} block_m={block_m} block_n={block_n} "
                f"num_warps={num_warps} split_k={split_k} carry={carry} persistent={persistent} "
                f"max_registers={max_registers}")
        if not fragment:
            raise ValueError(f"the decode kernel reads words in fragment tiles [E, half tiles, N_total, 16] "
                             f"(layout.fragment_tiles), got w of shape {list(w.shape)}")
        # (blocks from the ids, act-order columns and rows off 16 bytes run the same tiles on the decode kernel)
        if specialize and sorted_ids is not None and a_perm is None and aligned:
            # (the kernel's num_warps are its first warpgroup's; the second runs beside it as a worker partition)
            kernel = _moe_gemm_ws_kernel
            constexprs["NUM_WARPS"] = 4
            options = dict(num_warps=4)
    else:
        if wgmma or persistent or carry or specialize or trace is not None:
            raise ValueError("wgmma, carry, persistent, specialize and trace are the decode kernel's (decode=True)")
        if shrink not in (0, 1, 2) or block_m >> shrink < 16:
            raise ValueError(f"shrink must be 0, 1 or 2 and tl.dot needs blocks of >= 16 rows, got block_m={block_m} "
                             f"shrink={shrink}")
        # Scaling weights costs BLOCK_N per K row, rescaling partial sums BLOCK_M * BLOCK_N per group.
        kernel, constexprs = _moe_gemm_kernel, dict(SCALE_WEIGHTS=block_m > _group_in_tile(group_size),
                                                    FAST_DEQUANT=fast_dequant, SWAP_AB=swap_ab and fast_dequant,
                                                    SHRINK=shrink, FRAGMENT=fragment)
        options = dict(num_warps=num_warps, num_stages=num_stages, **registers)
    n_total = w.shape[2]
    n = n_total // 2 if gated else n_total
    kd = a.shape[1]
    r = TILE_K * bits // 32
    if group_size != -1 and group_size % r:
        raise ValueError(f"group_size={group_size} must be a multiple of {r} for {bits}-bit tiles")
    shared_limit = _max_shared_memory(a.device) if decode else None
    if shared_limit is not None:
        ring = ring_bytes(bits, gated, zeros is not None, _group_in_tile(group_size), block_m, block_n, num_stages)
        if kernel is _moe_gemm_ws_kernel:
            ring += ws_extra_bytes(block_n, num_stages)
        if ring > shared_limit:
            raise ValueError(f"the decode kernel's ring of num_stages={num_stages} x block_m={block_m} x "
                             f"block_n={block_n} ({bits}-bit{', gated' if gated else ''}) needs {ring} bytes of "
                             f"shared memory, this GPU {shared_limit}: fewer stages or smaller blocks")
        # (programs that do not fit on an SM at once would start after the others: each holds 1 / programs of
        # the work, so the last ones would double the time)
        persistent = min(persistent, shared_limit // ring)
    partials = gated and split_k > 1
    if partials and (out.dim() != 3 or out.shape[0] != split_k or out.shape[2] != n_total
                     or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"a K-split GEMM1 writes float32 partial sums [{split_k}, P, {n_total}], got "
                         f"{out.dtype} {list(out.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.stride() != scales.stride()):
        raise ValueError(f"zeros {list(zeros.shape)} must match scales {list(scales.shape)} in shape and strides")
    # P: GEMM1 writes one row per routed pair, GEMM2 reads one.
    num_pairs = (out.shape[1] if partials else out.shape[0]) if gated else a.shape[0]
    num_m_blocks = expert_ids.shape[0]
    id_blocks = 0 if sorted_ids is not None else 1 if num_pairs == top_k else 2
    if id_blocks and expert_ids.shape != (num_pairs,):
        raise ValueError(f"blocks without alignment need the expert of each of the {num_pairs} pairs, got "
                         f"{list(expert_ids.shape)}")
    if id_blocks and num_pairs > block_m * top_k:
        raise ValueError(f"blocks without alignment hold a token per row: {num_pairs // top_k} tokens need "
                         f"block_m >= {num_pairs // top_k}, got {block_m}")
    if zero_out is not None and (zero_out.dtype != torch.float32 or not zero_out.is_contiguous()):
        raise ValueError(f"zero_out must be contiguous float32, got {zero_out.dtype}")
    grid = (num_m_blocks * triton.cdiv(n, block_n), split_k)
    if decode and persistent:
        grid = (min(grid[0], persistent * _num_sms(a.device.index)), 1)
    if decode:  # (a persistent GEMM1's programs hand the sums of items they share through a workspace)
        shared_sums = persistent and gated
        if shared_sums and share_flags is None:
            share_flags = scratch((grid[0],), torch.int32, a.device, zeroed=True)
        if shared_sums and (share_flags.dtype != torch.int32 or share_flags.dim() != 1
                            or share_flags.numel() < grid[0] or not share_flags.is_contiguous()):
            raise ValueError(f"share_flags must be contiguous int32 [>= {grid[0]}] (a flag per program), got "
                             f"{share_flags.dtype} {list(share_flags.shape)}")
        constexprs.update(
            flags_ptr=share_flags if shared_sums else a,
            part_ptr=scratch((grid[0], 2, block_n, block_m), torch.float32, a.device) if shared_sums else a)
    if trace is not None and (kernel is _moe_gemm_ws_kernel or trace.dtype != torch.int64 or trace.dim() != 2
                              or trace.shape[0] < grid[0] * grid[1] or trace.shape[1] != TRACE_FIELDS.value
                              or not trace.is_contiguous()):
        raise ValueError(f"trace must be contiguous int64 [>= {grid[0] * grid[1]}, {TRACE_FIELDS.value}] (a row per "
                         f"program of the decode kernel, not specialized), got {trace.dtype} {list(trace.shape)}")
    try:
        launch(
            kernel, grid, a, a_perm if a_perm is not None else a, w, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, out, topk_weights if topk_weights is not None else scales,
            expert_ids if id_blocks else sorted_ids, expert_ids, expert_ids if id_blocks else num_padded,
            zero_out if zero_out is not None else out, 0 if zero_out is None else zero_out.numel(),
            n, kd, num_pairs, num_m_blocks,
            # (a tile's words start (k // PACK) * stride_wk in: N_total words per word row in both layouts)
            a.stride(0), w.stride(0), w.stride(1) // w.shape[3] if fragment else w.stride(1), scales.stride(0),
            scales.stride(1), out.stride(-2),
            alpha, beta, 0.0 if limit is None else limit, num_experts=w.shape[0],
            TOP_K=top_k, GATED=gated, ACT=act, HAS_LIMIT=limit is not None, BITS=bits, HAS_ZP=zeros is not None,
            HAS_PERM=a_perm is not None, HAS_BIAS=bias is not None,
            GROUP_SIZE=1 << 30 if group_size == -1 else group_size,  # channel-wise: one group spanning every K
            GROUP_IN_TILE=_group_in_tile(group_size), SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n,
            EVEN_K=kd % TILE_K == 0, ID_BLOCKS=id_blocks, ZERO_OUT=zero_out is not None, PDL=pdl, **constexprs,
            **options, **launch_options(pdl),
        )
    except OutOfResources as error:  # (this kernel's shared memory is its pipeliner's, known once compiled)
        raise ValueError(f"block_m={block_m} x block_n={block_n} at num_warps={num_warps}, num_stages={num_stages} "
                         f"({bits}-bit{', gated' if gated else ''}, {kernel.__name__}) does not fit this GPU: "
                         f"{error}") from error
    return out

