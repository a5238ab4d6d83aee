"""GEMM2 of prefill on two warp-specialized warpgroups (Hopper) that meet only on the ring's mbarriers.

The decode kernel's 128-row wgmma blocks (`kernels/moe_gemm_decode.py`) run 8 warps that copy, wait for their
copies and meet at a CTA barrier every K tile. At deepseek-v3 M = 8192 its GEMM2 keeps the tensor pipe 47% busy,
and a sixth of the warps' samples sit on that barrier (benchmarks/NOTES.md v44). Here each program runs the same
block as two partitions of one warpgroup each (`gl.warp_specialize`), each owning half of the block's columns:
it copies its half of every tile's words, scale and zero-point rows and half of its activation rows into a
STAGES-deep cp.async ring, waits on the stage's `full` mbarrier (both halves landed), dequantizes its words
(scaled in the asm, as the decode kernel's wide blocks) and multiplies them with warpgroup mmas against the
whole activation tile, then releases the stage on its `empty` mbarrier. A warpgroup refilling a stage waits for
the other's release of it, a tile back: the two never meet at a barrier.

(A copy partition of its own beside the two warpgroups, v45's first form, makes 12 warps: ptxas then gives every
thread 168 registers whatever `setmaxnreg` says, and a 128 x 256 block's mmas serialize (C7511). Eight warps
keep 255.)

Same operands, layouts and outputs as the decode kernel's GEMM2 (not gated, sorted blocks, no K split, no
act-order, rows in whole 16-byte pieces); `moe_gemm(..., specialize=True)` launches it.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from wna16moe.kernels.grid_dependence import enter_dependent, leave_main_loop
from wna16moe.kernels.layout import TILE_K
from wna16moe.kernels.moe_gemm_decode import (
    COLUMN_STEP,
    FRAGMENT_SMEM,
    _activation_rows,
    _copy_tile,
    _epilogue,
    _load_words,
    _program_block,
    _tile_step_scaled,
    _word_copy_offsets,
    word_slot_shape,
)

_TILE_K = gl.constexpr(TILE_K)
# Registers per thread of the second warpgroup's partition (the first gets the rest of the SM's 65536).
_WORKER_REGS = gl.constexpr(240)


def ws_extra_bytes(block_n: int, num_stages: int) -> int:
    """Shared memory the kernel takes beside the decode kernel's ring (`ring_bytes`): each warpgroup's epilogue
    scratch (64 rows of its half at a time, float32), two mbarriers per stage and a few bytes more (the
    compiler's figure is 12 less)."""
    return block_n // 2 * 64 * 4 + 2 * 8 * num_stages + 16


@gluon.jit
def _half(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring, a_ring,
          full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se, stride_sg, stride_om,
          HALF: gl.constexpr, TOP_K: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr, HAS_BIAS: gl.constexpr,
          GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          EVEN_K: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr):
    """Half HALF of the block's columns over its first ROWS rows (module docstring): its copies, its mmas, its
    epilogue."""
    PACK: gl.constexpr = 32 // BITS
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    HALF_N: gl.constexpr = BLOCK_N // 2
    HALF_ROWS: gl.constexpr = ROWS // 2
    DTYPE: gl.constexpr = a_ring.dtype
    AHEAD: gl.constexpr = STAGES - 1
    # The copies: this half's columns of the words and group rows, this half's activation rows.
    A_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    rows_b = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + HALF * HALF_ROWS
                     + gl.arange(0, HALF_ROWS, layout=gl.SliceLayout(1, A_LOAD)))
    a_row_ptrs = _activation_rows(rows_b, a_ptr, P, stride_am, TOP_K, False)
    offs_k = gl.arange(0, _TILE_K, layout=gl.SliceLayout(0, A_LOAD))
    n0_half = n0 + HALF * HALF_N
    c_offs, c_cols = _word_copy_offsets(stride_wk, BITS, HALF_N, 4)
    c_ptrs = w_ptr + expert * stride_we + n0_half * COLUMN_STEP + c_offs
    c_mask = n0_half + c_cols < N
    offs_s = gl.arange(0, NG * HALF_N, layout=gl.BlockedLayout([8], [32], [4], [0]))
    s_base = s_ptr + expert * stride_se
    if HAS_ZP:
        offs_z = gl.arange(0, NG * HALF_N, layout=gl.BlockedLayout([16], [32], [4], [0]))
        z_base = z_ptr + expert * stride_se
    else:
        z_base, offs_z = s_base, offs_s
    # The mmas.
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROW: gl.constexpr = gl.SliceLayout(1, A_OP)
    acc = gl.zeros([HALF_N, ROWS], gl.float32, MMA)

    tiles = gl.cdiv(KD, _TILE_K)
    for t in range(tiles + AHEAD):
        if t < tiles:  # this half of tile t into its stage, once both halves released its last use
            s = t % STAGES
            mbarrier.wait(empty.index(s), (t // STAGES + 1) & 1, pred=t >= STAGES)
            mine = 2 * s + HALF
            stage = (w_ring.index(mine), w_ring.index(mine), s_ring.index(mine), z_ring.index(mine),
                     (a_ring.index(s).slice(HALF * HALF_ROWS, HALF_ROWS, dim=0),))
            _copy_tile(stage, c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0_half, (a_row_ptrs,), offs_k,
                       t * _TILE_K, 0, KD, N, stride_wk, GROUP_SIZE, stride_sg, PACK, False, True, EVEN_K, HAS_ZP,
                       GROUP_IN_TILE, HALF_N, True)
            async_copy.mbarrier_arrive(full.index(s), increment_count=False)
        if t >= AHEAD:  # tile t - AHEAD, both halves landed
            u = t - AHEAD
            s = u % STAGES
            mbarrier.wait(full.index(s), (u // STAGES) & 1)
            fence_async_shared()  # (the copies landed through the generic proxy; the mmas read the async one)
            mine = 2 * s + HALF
            words = _load_words(w_ring.index(mine), BITS, A_OP)
            scale_rows = ()
            zero_rows = ()
            for g in gl.static_range(NG):
                scale_rows = scale_rows + (s_ring.index(mine).slice(g * HALF_N, HALF_N).load(ROW),)
                if HAS_ZP:
                    zero_rows = zero_rows + (z_ring.index(mine).slice(g * HALF_N, HALF_N).load(ROW),)
            side = (scale_rows, zero_rows)
            a_tile = a_ring.index(s).slice(0, ROWS, dim=0)
            acc = _tile_step_scaled(acc, acc, acc, acc, (), words, words, side, side, (a_tile,), BITS, HAS_ZP,
                                    GROUP_IN_TILE, False, DTYPE, B_OP, True, 0, 0)[0]
            mbarrier.arrive(empty.index(s))
    rows = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + gl.arange(0, ROWS, layout=gl.SliceLayout(0, MMA)))
    offs_n = n0_half + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, MMA))
    _epilogue(acc, acc, rows, expert, offs_n, offs_n < N, n0_half, 0, out_ptr, bias_ptr, topk_w_ptr, N, P, stride_om,
              1.0, 0.0, 0.0, TOP_K, False, 0, False, HAS_BIAS, 1, True, ROWS, HALF_N, 4)


@gluon.jit
def _specialized(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                 a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                 stride_sg, stride_om, TOP_K: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
                 HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, EVEN_K: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr):
    """The block's first ROWS rows on the two warpgroups (module docstring)."""
    gl.warp_specialize(
        [(_half, (a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                  a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                  stride_sg, stride_om, 0, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, BLOCK_M,
                  BLOCK_N, EVEN_K, STAGES, ROWS)),
         (_half, (a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                  a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                  stride_sg, stride_om, 1, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, BLOCK_M,
                  BLOCK_N, EVEN_K, STAGES, ROWS))],
        [4], [_WORKER_REGS])


@gluon.jit
def _moe_gemm_ws_kernel(
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
    # (the decode kernel's arguments, so that `moe_gemm` launches either; the launcher admits GEMM2 only)
    gl.static_assert(not GATED and not HAS_PERM and SPLIT_K == 1 and ALIGNED and ID_BLOCKS == 0 and NUM_WARPS == 4
                     and not TRACE)
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n = _program_block(num_m_blocks, N, BLOCK_N, GROUP_M)
    enter_dependent(PDL)
    if pid_m * BLOCK_M >= gl.load(num_padded_ptr):
        return
    expert = gl.load(expert_ids_ptr + pid_m).to(gl.int64)
    n0 = pid_n * BLOCK_N
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    A_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # (each half's words and group rows in buffers of their own, stage s half h at 2 s + h: what one
    # warpgroup copies is contiguous)
    w_ring = gl.allocate_shared_memory(gl.int32, [2 * STAGES] + word_slot_shape(BITS, BLOCK_N // 2), FRAGMENT_SMEM)
    s_ring = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [2 * STAGES, NG * BLOCK_N // 2], ROW_SMEM)
    z_ring = (gl.allocate_shared_memory(z_ptr.dtype.element_ty, [2 * STAGES, NG * BLOCK_N // 2], ROW_SMEM) if HAS_ZP
              else s_ring)
    a_ring = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, _TILE_K], A_SMEM)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=256)  # (one arrival per thread, as its copies land)
        mbarrier.init(empty.index(i), count=2)  # (one per warpgroup)
    # An expert's last block is mostly padding at prefill (sorted last): it multiplies its first 64 rows only
    # when they hold its real ones, as the decode kernel's wide blocks do (one specialized region per row count).
    FLAT: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    ids = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=FLAT))
    if gl.sum((ids < P).to(gl.int32), axis=0) <= 64:
        _specialized(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                     a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                     stride_sg, stride_om, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, BLOCK_M, BLOCK_N,
                     EVEN_K, STAGES, 64)
    else:
        _specialized(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                     a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                     stride_sg, stride_om, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_SIZE, GROUP_IN_TILE, BLOCK_M, BLOCK_N,
                     EVEN_K, STAGES, BLOCK_M)
    leave_main_loop(PDL)
