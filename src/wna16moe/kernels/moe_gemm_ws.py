"""GEMM2 of prefill on warp-specialized programs (Hopper): a copy partition and two mma warpgroups on mbarriers.

The decode kernel's 128-row wgmma blocks (`kernels/moe_gemm_decode.py`) run 8 warps that copy, wait for their
copies and meet at a CTA barrier every K tile. At deepseek-v3 M = 8192 its GEMM2 keeps the tensor pipe 47% busy,
and a sixth of the warps' samples sit on that barrier (benchmarks/NOTES.md v44). Here each program splits the
same block and operands across three partitions (`gl.warp_specialize`):
  - a copy partition (COPY_WARPS warps) streams the tiles' words, scale and zero-point rows and activations
    into a STAGES-deep ring with cp.async; each stage's `full` mbarrier completes when its copies land;
  - two warpgroups each take half the block's columns: wait for a stage, dequantize their half of its words
    (scaled in the asm, as the decode kernel's wide blocks) and multiply it against the stage's activations
    with warpgroup mmas, then release the stage on its `empty` mbarrier.
No partition waits for another except on a stage: the warpgroups do not meet each other, and the copies run as
far ahead as the ring allows. The epilogue (router weights, atomic top-k sum) is the decode kernel's, per half.

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
    _activation_rows,
    _copy_tile,
    _epilogue,
    _program_block,
    _tile_step_scaled,
)

_TILE_K = gl.constexpr(TILE_K)
# Warps and registers per thread of the partitions: two mma warpgroups beside the copy warps (65536 registers
# an SM; the copy warps hold a tile's row pointers).
COPY_WARPS = 4
_COPY_WARPS = gl.constexpr(COPY_WARPS)
_MMA_REGS = gl.constexpr(208)
_COPY_REGS = gl.constexpr(88)


@gluon.jit
def _copy_partition(a_ptr, w_ptr, s_ptr, z_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring, a_ring, full, empty,
                    expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se, stride_sg,
                    TOP_K: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr, GROUP_SIZE: gl.constexpr,
                    GROUP_IN_TILE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    EVEN_K: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr):
    """Every K tile of the block's first ROWS rows into the ring, stage after stage, each once its last readers
    released it."""
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    COPY: gl.constexpr = gl.BlockedLayout([1, 4], [32 // min(32, BLOCK_N // 4), min(32, BLOCK_N // 4)],
                                          [_COPY_WARPS, 1], [1, 0])
    A_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [_COPY_WARPS, 1], [1, 0])
    rows_b = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + gl.arange(0, ROWS, layout=gl.SliceLayout(1, A_LOAD)))
    a_row_ptrs = _activation_rows(rows_b, a_ptr, P, stride_am, TOP_K, False)
    offs_k = gl.arange(0, _TILE_K, layout=gl.SliceLayout(0, A_LOAD))
    offs_n_c = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, COPY))
    c_ptrs = (w_ptr + expert * stride_we + gl.arange(0, R, layout=gl.SliceLayout(1, COPY))[:, None] * stride_wk
              + offs_n_c[None, :])
    c_mask = (offs_n_c < N)[None, :]
    offs_s = gl.arange(0, NG * BLOCK_N, layout=gl.BlockedLayout([8], [32], [_COPY_WARPS], [0]))
    s_base = s_ptr + expert * stride_se
    if HAS_ZP:
        offs_z = gl.arange(0, NG * BLOCK_N, layout=gl.BlockedLayout([16], [32], [_COPY_WARPS], [0]))
        z_base = z_ptr + expert * stride_se
    else:
        z_base, offs_z = s_base, offs_s
    for t in range(gl.cdiv(KD, _TILE_K)):
        s = t % STAGES
        # (a stage's first fill waits for nothing; its n-th for the readers' (n - 1)-th release)
        mbarrier.wait(empty.index(s), (t // STAGES + 1) & 1, pred=t >= STAGES)
        stage = (w_ring.index(s), w_ring.index(s), s_ring.index(s), z_ring.index(s),
                 a_ring.index(s).slice(0, ROWS, dim=0))
        _copy_tile(stage, c_ptrs, c_mask, s_base, z_base, offs_s, offs_z, n0, a_row_ptrs, offs_k, t * _TILE_K, 0,
                   KD, N, stride_wk, GROUP_SIZE, stride_sg, PACK, False, True, EVEN_K, HAS_ZP, GROUP_IN_TILE, BLOCK_N,
                   True)
        async_copy.mbarrier_arrive(full.index(s), increment_count=False)


@gluon.jit
def _mma_partition(w_ring, s_ring, z_ring, a_ring, full, empty, sorted_ids_ptr, out_ptr, bias_ptr, topk_w_ptr,
                   expert, pid_m, n0, N, KD, P, stride_om, HALF: gl.constexpr, TOP_K: gl.constexpr,
                   BITS: gl.constexpr, HAS_ZP: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_IN_TILE: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr):
    """Half HALF of the block's columns over its first ROWS rows: every K tile from the ring, then the
    epilogue."""
    DTYPE: gl.constexpr = a_ring.dtype
    HALF_N: gl.constexpr = BLOCK_N // 2
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, ROWS, 16])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROW: gl.constexpr = gl.SliceLayout(1, A_OP)
    acc = gl.zeros([HALF_N, ROWS], gl.float32, MMA)
    for t in range(gl.cdiv(KD, _TILE_K)):
        s = t % STAGES
        mbarrier.wait(full.index(s), (t // STAGES) & 1)
        fence_async_shared()  # (the copies landed through the generic proxy; the mmas read through the async one)
        words = w_ring.index(s).slice(HALF * HALF_N, HALF_N, dim=1).permute([1, 0]).load(A_OP)
        scale_rows = ()
        zero_rows = ()
        for g in gl.static_range(NG):
            scale_rows = scale_rows + (s_ring.index(s).slice(g * BLOCK_N + HALF * HALF_N, HALF_N).load(ROW),)
            if HAS_ZP:
                zero_rows = zero_rows + (z_ring.index(s).slice(g * BLOCK_N + HALF * HALF_N, HALF_N).load(ROW),)
        side = (scale_rows, zero_rows)
        a_tile = a_ring.index(s).slice(0, ROWS, dim=0)
        acc = _tile_step_scaled(acc, acc, (), words, words, side, side, a_tile, BITS, HAS_ZP, GROUP_IN_TILE, False,
                                DTYPE, B_OP, True, 0)[0]
        mbarrier.arrive(empty.index(s))
    rows = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + gl.arange(0, ROWS, layout=gl.SliceLayout(0, MMA)))
    offs_n = n0 + HALF * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, MMA))
    _epilogue(acc, acc, rows, expert, offs_n, offs_n < N, n0 + HALF * HALF_N, 0, out_ptr, bias_ptr, topk_w_ptr, N, P,
              stride_om, 1.0, 0.0, 0.0, TOP_K, False, 0, False, HAS_BIAS, 1, True, ROWS, HALF_N, 4)


@gluon.jit
def _specialized(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, topk_w_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring,
                 a_ring, full, empty, expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se,
                 stride_sg, stride_om, TOP_K: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
                 HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, EVEN_K: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr):
    """The block's first ROWS rows on the three partitions (module docstring)."""
    gl.warp_specialize(
        [(_mma_partition, (w_ring, s_ring, z_ring, a_ring, full, empty, sorted_ids_ptr, out_ptr, bias_ptr, topk_w_ptr,
                           expert, pid_m, n0, N, KD, P, stride_om, 0, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_IN_TILE,
                           BLOCK_M, BLOCK_N, STAGES, ROWS)),
         (_mma_partition, (w_ring, s_ring, z_ring, a_ring, full, empty, sorted_ids_ptr, out_ptr, bias_ptr, topk_w_ptr,
                           expert, pid_m, n0, N, KD, P, stride_om, 1, TOP_K, BITS, HAS_ZP, HAS_BIAS, GROUP_IN_TILE,
                           BLOCK_M, BLOCK_N, STAGES, ROWS)),
         (_copy_partition, (a_ptr, w_ptr, s_ptr, z_ptr, sorted_ids_ptr, w_ring, s_ring, z_ring, a_ring, full, empty,
                            expert, pid_m, n0, N, KD, P, stride_am, stride_we, stride_wk, stride_se, stride_sg, TOP_K,
                            BITS, HAS_ZP, GROUP_SIZE, GROUP_IN_TILE, BLOCK_M, BLOCK_N, EVEN_K, STAGES, ROWS))],
        [4, _COPY_WARPS], [_MMA_REGS, _COPY_REGS])


@gluon.jit
def _moe_gemm_ws_kernel(
    a_ptr, a_perm_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_padded_ptr, zero_ptr, zero_numel, N, KD, P, num_m_blocks, stride_am, stride_we, stride_wk, stride_se,
    stride_sg, stride_om, alpha, beta, limit,
    TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr,
    HAS_ZP: gl.constexpr, HAS_PERM: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr,
    GROUP_IN_TILE: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    EVEN_K: gl.constexpr, ALIGNED: gl.constexpr, ID_BLOCKS: gl.constexpr, ZERO_OUT: gl.constexpr,
    NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr, WGMMA: gl.constexpr, GROUP_M: gl.constexpr,
    PERSISTENT: gl.constexpr, CARRY: gl.constexpr,
):
    # (the decode kernel's arguments, so that `moe_gemm` launches either; the launcher admits GEMM2 only)
    gl.static_assert(not GATED and not HAS_PERM and SPLIT_K == 1 and ALIGNED and ID_BLOCKS == 0 and NUM_WARPS == 4)
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n = _program_block(num_m_blocks, N, BLOCK_N, GROUP_M)
    enter_dependent(PDL)
    if pid_m * BLOCK_M >= gl.load(num_padded_ptr):
        return
    expert = gl.load(expert_ids_ptr + pid_m).to(gl.int64)
    n0 = pid_n * BLOCK_N
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=2, max_phase=4, order=[1, 0])
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    A_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, R, BLOCK_N], SMEM)
    s_ring = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [STAGES, NG * BLOCK_N], ROW_SMEM)
    z_ring = gl.allocate_shared_memory(z_ptr.dtype.element_ty, [STAGES, NG * BLOCK_N], ROW_SMEM) if HAS_ZP else s_ring
    a_ring = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, _TILE_K], A_SMEM)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=32 * _COPY_WARPS)  # (one arrival per copying thread)
        mbarrier.init(empty.index(i), count=2)  # (one per mma warpgroup)
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
