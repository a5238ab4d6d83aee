"""Both GEMMs of a one-token MoE forward in one grid whose programs never wait on each other (Gluon).

At one token a forward streams its routed experts' weights once. What the two-kernel forward adds to that
stream is the hop between the GEMMs: GEMM1's last programs, the activation pass after a K split, GEMM2's launch
and first copies (2-4 µs on the big experts, benchmarks/NOTES.md v54). Here program (pair p, slice s) owns 128
intermediate columns of p's expert:
- it runs GEMM1 over them, all of H, gate and up, the activation fused (`_block_gemm` of the decode kernel,
  one 8-row block, no K split), and stores them;
- it multiplies those 128 activations, GEMM2's K tile s, against every column tile of W2 through a cp.async
  ring of its own, one 128-deep tile per column tile;
- it writes its router-weighted [H] contribution as float32 row `pid` of `partials`.
`sum_partials` then adds the rows and casts. No program reads another's output: no counter, no spin, no order
between programs. The price: GEMM1 cannot split K (the slice is exactly GEMM2's 128-deep K tile), and the
partial rows (programs x H float32) go through the L2 once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from wna16moe.kernels.grid_dependence import await_prior_grids, enter_dependent, launch_options
from wna16moe.kernels.launch import launch, scratch
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K
from wna16moe.kernels.moe_gemm_decode import (
    COLUMN_STEP,
    FRAGMENT_SMEM,
    _block_gemm,
    _copy_group_rows,
    _group_rows,
    _load_words,
    _ring_operands,
    _tile_mma,
    _word_copy_offsets,
    ring_bytes,
    tiling_error,
    word_slot_shape,
)

_TILE_K = gl.constexpr(TILE_K)
_ROWS = gl.constexpr(8)  # (mma.sync's N: the token's row and 7 of zeros)


@gluon.jit
def _copy_column_tile(w_buf, s_buf, z_buf, c_ptrs, c_cols, s_base, z_base, offs_s, offs_z, t, k0, KD, H, group_size,
                      stride_sg, HAS_ZP: gl.constexpr, GROUP_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr,
                      ALIGNED: gl.constexpr):
    """cp.async of column tile t of W2's K tile at k0 (words, scale and zero-point rows) into one ring stage, one
    commit group; past the last column tile nothing is read (addresses fall back on the last), the group still
    committed (the ring's waits count groups)."""
    tiles = gl.cdiv(H, BLOCK_N)
    live = t < tiles
    n0 = gl.minimum(t, tiles - 1) * BLOCK_N  # (a multiple of BLOCK_N to the compiler: 16-byte copies)
    _copy_group_rows(s_buf, s_base, offs_s, n0, k0, KD, H, group_size, stride_sg, BLOCK_N, GROUP_IN_TILE, ALIGNED,
                     live)
    if HAS_ZP:
        _copy_group_rows(z_buf, z_base, offs_z, n0, k0, KD, H, group_size, stride_sg, BLOCK_N, GROUP_IN_TILE,
                         ALIGNED, live)
    async_copy.async_copy_global_to_shared(w_buf, c_ptrs + n0 * COLUMN_STEP, mask=(n0 + c_cols < H) & live)
    async_copy.commit_group()


@gluon.jit
def _gemm2_slice(h_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, topk_w_ptr, part_ptr, pair, expert, k0, H, KD, stride_hm,
                 stride_we, stride_wk, stride_se, stride_sg, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
                 HAS_BIAS: gl.constexpr, GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr,
                 NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, ALIGNED: gl.constexpr):
    """GEMM2's K tile at k0 (the activations this program's GEMM1 stored in row `pair` of h) against every
    column tile of W2, router-weighted, into the program's row of `part_ptr` (its [H] contribution)."""
    PACK: gl.constexpr = 32 // BITS
    R: gl.constexpr = _TILE_K // PACK
    NG: gl.constexpr = _TILE_K // GROUP_IN_TILE
    SLOTS_PER_GROUP: gl.constexpr = GROUP_IN_TILE // R
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    S_ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    DTYPE: gl.constexpr = h_ptr.dtype.element_ty
    RAW: gl.constexpr = not (BITS == 8 and DTYPE == gl.bfloat16)
    NEED_SUMS: gl.constexpr = RAW or HAS_ZP

    # The activation tile [8, TILE_K]: the token's row, then zeros; the same B operands for every column tile.
    A_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NUM_WARPS, 1], [1, 0])
    m_b = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, A_LOAD))
    k_b = k0 + gl.arange(0, _TILE_K, layout=gl.SliceLayout(0, A_LOAD))
    a = gl.load(h_ptr + pair * stride_hm + m_b[:, None] * 0 + k_b[None, :],
                mask=(m_b == 0)[:, None] & (k_b < KD)[None, :], other=0.0)
    a_smem = gl.allocate_shared_memory(DTYPE, [_ROWS, _TILE_K],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]), a)
    b_tiles = _ring_operands(a_smem, PACK, B_OP)
    ones = gl.full([BLOCK_N, R], 1.0, DTYPE, A_OP)
    # Each group's activation sums (the offset-free dequantization's correction): one K tile, so computed once.
    sums = ()
    if NEED_SUMS:
        for g in gl.static_range(NG):
            group_sum = gl.zeros([BLOCK_N, _ROWS], gl.float32, MMA)
            for jj in gl.static_range(SLOTS_PER_GROUP):
                group_sum = mma_v2(ones, b_tiles[g * SLOTS_PER_GROUP + jj], group_sum)
            sums = sums + (group_sum,)

    c_offs, c_cols = _word_copy_offsets(stride_wk, BITS, BLOCK_N, NUM_WARPS)
    c_ptrs = w_ptr + expert * stride_we + (k0 // PACK) * stride_wk + c_offs
    offs_s = gl.arange(0, NG * BLOCK_N, layout=gl.BlockedLayout([8], [32], [NUM_WARPS], [0]))
    s_base = s_ptr + expert * stride_se
    if HAS_ZP:
        offs_z = gl.arange(0, NG * BLOCK_N, layout=gl.BlockedLayout([16], [32], [NUM_WARPS], [0]))
        z_base = z_ptr + expert * stride_se
    else:
        z_base, offs_z = s_base, offs_s
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    WORD_TILE: gl.constexpr = word_slot_shape(BITS, BLOCK_N)
    ring = ()  # per stage (the loop is unrolled by STAGES: one CTA barrier per tile)
    for _ in gl.static_range(STAGES):
        w_buf = gl.allocate_shared_memory(gl.int32, WORD_TILE, FRAGMENT_SMEM)
        s_buf = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [NG * BLOCK_N], ROW_SMEM)
        z_buf = gl.allocate_shared_memory(z_ptr.dtype.element_ty, [NG * BLOCK_N], ROW_SMEM) if HAS_ZP else s_buf
        ring = ring + ((w_buf, s_buf, z_buf),)
    for s in gl.static_range(STAGES - 1):
        _copy_column_tile(ring[s][0], ring[s][1], ring[s][2], c_ptrs, c_cols, s_base, z_base, offs_s, offs_z, s, k0,
                          KD, H, GROUP_SIZE, stride_sg, HAS_ZP, GROUP_IN_TILE, BLOCK_N, ALIGNED)

    router_w = gl.load(topk_w_ptr + pair).to(gl.float32)
    m_acc = gl.arange(0, _ROWS, layout=gl.SliceLayout(0, MMA))
    tiles = gl.cdiv(H, BLOCK_N)
    for t_round in range(0, tiles, STAGES):
        for slot in gl.static_range(STAGES):
            t = t_round + slot
            if t < tiles:
                async_copy.wait_group(STAGES - 2)
                gl.thread_barrier()  # every thread's copies of this tile landed; every warp is done with the last
                refill = ring[(slot + STAGES - 1) % STAGES]
                _copy_column_tile(refill[0], refill[1], refill[2], c_ptrs, c_cols, s_base, z_base, offs_s,
                                  offs_z, t + STAGES - 1, k0, KD, H, GROUP_SIZE, stride_sg, HAS_ZP, GROUP_IN_TILE,
                                  BLOCK_N, ALIGNED)
                w_buf, s_buf, z_buf = ring[slot]
                words = _load_words(w_buf, BITS, A_OP)
                s_rows = _group_rows(s_buf, 0, NG, BLOCK_N, S_ROWS)
                z_rows = _group_rows(z_buf, 0, NG, BLOCK_N, S_ROWS) if HAS_ZP else ()
                acc = _tile_mma(gl.zeros([BLOCK_N, _ROWS], gl.float32, MMA), words, b_tiles, ones, s_rows, z_rows,
                                sums, BITS, HAS_ZP, GROUP_IN_TILE, RAW, True)[0]
                offs_n = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
                n_mask = offs_n < H
                if HAS_BIAS:
                    if k0 == 0:  # (the bias once per pair: by its first slice)
                        acc += gl.load(bias_ptr + expert * H + offs_n, mask=n_mask, other=0.0)[:, None]
                gl.store(part_ptr + offs_n[:, None] + m_acc[None, :] * 0, acc * router_w,
                         mask=n_mask[:, None] & (m_acc == 0)[None, :])
    async_copy.wait_group(0)  # (the refills past the last tile: committed, reading nothing)


@gluon.jit
def _moe_mlp_decode_kernel(
    x_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, h_ptr, w2_ptr, s2_ptr, z2_ptr, bias2_ptr, topk_w_ptr,
    topk_ids_ptr, part_ptr, H, INTER, P, stride_xm, stride_w1e, stride_w1k, stride_s1e, stride_s1g, stride_hm,
    stride_w2e, stride_w2k, stride_s2e, stride_s2g, alpha, beta, limit,
    TOP_K: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
    HAS_PERM: gl.constexpr, HAS_BIAS1: gl.constexpr, HAS_BIAS2: gl.constexpr, GROUP_SIZE: gl.constexpr,
    GROUP_IN_TILE: gl.constexpr, EVEN_K: gl.constexpr, ALIGNED1: gl.constexpr, ALIGNED2: gl.constexpr,
    NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, STAGES2: gl.constexpr, BLOCK_N2: gl.constexpr, PDL: gl.constexpr,
):
    """Program pid: pair pid % P, intermediate slice pid // P (module docstring)."""
    enter_dependent(PDL)  # (it reads the hidden states and ids the grids before wrote)
    pid = gl.program_id(0)
    pair = pid % P
    k0 = pid // P * _TILE_K
    part_row = part_ptr + pid.to(gl.int64) * H
    # GEMM1 over the slice: one 8-row block holding the pair alone, no K split, the activation into h's row.
    _block_gemm(x_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, h_ptr, topk_w_ptr, topk_ids_ptr, topk_ids_ptr,
                topk_ids_ptr, part_ptr, 0, INTER, H, P, P, stride_xm, stride_w1e, stride_w1k, stride_s1e, stride_s1g,
                stride_hm, alpha, beta, limit, x_ptr, TOP_K, True, ACT, HAS_LIMIT, BITS, HAS_ZP, HAS_PERM, HAS_BIAS1,
                GROUP_SIZE, GROUP_IN_TILE, 1, 8, _TILE_K, EVEN_K, ALIGNED1, 1, NUM_WARPS, STAGES, 8, PDL, False,
                False, False, 1, False, 0, False)
    expert = gl.load(topk_ids_ptr + pair).to(gl.int64)
    if expert < 0:  # a pair left out (expert parallelism): its row adds nothing
        FLAT: gl.constexpr = gl.BlockedLayout([4], [32], [NUM_WARPS], [0])
        for n0 in range(0, H, 4 * 32 * NUM_WARPS):
            offs = n0 + gl.arange(0, 4 * 32 * NUM_WARPS, layout=FLAT)
            gl.store(part_row + offs, gl.zeros_like(offs.to(gl.float32)), mask=offs < H)
    else:
        gl.thread_barrier()  # (this program's activations, stored by all its threads, before any reads them)
        _gemm2_slice(h_ptr, w2_ptr, s2_ptr, z2_ptr, bias2_ptr, topk_w_ptr, part_row, pair, expert, k0, H, INTER,
                     stride_hm, stride_w2e, stride_w2k, stride_s2e, stride_s2g, BITS, HAS_ZP, HAS_BIAS2, GROUP_SIZE,
                     GROUP_IN_TILE, BLOCK_N2, NUM_WARPS, STAGES2, ALIGNED2)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:  # (it reads what the fused grid wrote: nothing before the wait)
        await_prior_grids()
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < cols
    acc = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        part = tl.load(part_ptr + offs_r.to(tl.int64)[:, None] * cols + offs_c[None, :],
                       mask=(offs_r < rows)[:, None] & c_mask[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(out_ptr + offs_c, acc.to(out_ptr.dtype.element_ty), mask=c_mask)


def sum_partials(partials: torch.Tensor, dtype: torch.dtype, pdl: int = 0) -> torch.Tensor:
    """[1, C] in `dtype`: the sum of the rows of float32 `partials` [rows, C] (contiguous). pdl: as for `cast`."""
    if partials.dtype != torch.float32 or partials.dim() != 2 or not partials.is_contiguous():
        raise ValueError(f"partials must be contiguous float32 [rows, C], got {partials.dtype} "
                         f"{list(partials.shape)}")
    rows, cols = partials.shape
    out = scratch((1, cols), dtype, partials.device)
    block_c = 64
    launch(_sum_partials_kernel, (triton.cdiv(cols, block_c),), partials, out, rows, cols, BLOCK_R=32,
           BLOCK_C=block_c, PDL=pdl, num_warps=4, **launch_options(pdl))
    return out


def _aligned(*values: int) -> bool:
    return all(v % 16 == 0 for v in values)


def mlp_shared_bytes(bits: int, has_zp: bool, group_in_tile: int, num_stages: int, block_n2: int,
                     num_stages2: int) -> int:
    """Shared memory of the fused kernel: GEMM1's ring (`ring_bytes`) or, once it is done, GEMM2's (words, scale and
    zero-point rows per stage) beside its activation tile, in the same bytes (the compiler reuses them)."""
    gemm2 = num_stages2 * ((TILE_K * bits // 32) * block_n2 * 4 + (TILE_K // group_in_tile) * block_n2 *
                           (3 if has_zp else 2))
    return max(ring_bytes(bits, True, has_zp, group_in_tile, 8, TILE_K, num_stages), gemm2 + 8 * TILE_K * 2)


def moe_mlp_decode(
    x: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    z13: torch.Tensor | None,
    perm13: torch.Tensor | None,
    bias13: torch.Tensor | None,
    w2: torch.Tensor,
    s2: torch.Tensor,
    z2: torch.Tensor | None,
    bias2: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    act: int,
    alpha: float,
    beta: float,
    limit: float | None,
    num_warps: int,
    num_stages: int,
    num_stages2: int,
    block_n2: int,
    pdl: int = 0,
) -> torch.Tensor:
    """One token's forward (x [1, H], topk_ids [1, K]) in two launches, the fused grid and `sum_partials`:
    [1, H] float32 sums cast to x's dtype. Weights as `moe_gemm` takes them in fragment tiles (the decode
    kernel's layout, GEMM1's N and GEMM2's K the same padded intermediate size); W2 without act-order columns
    (its K tiles must be the slices GEMM1 writes). group_size: -1 for channel-wise."""
    from wna16moe.kernels.moe_gemm import _group_in_tile, _max_shared_memory

    t, top_k = topk_ids.shape
    h = x.shape[1]
    error = (tiling_error(8, TILE_K, num_warps, num_stages) or tiling_error(8, block_n2, num_warps, num_stages2))
    if error:
        raise ValueError(f"fused one-token forward: {error}")
    if t != 1 or x.shape[0] != 1:
        raise ValueError(f"the fused forward runs one token, got x {list(x.shape)}, topk_ids {list(topk_ids.shape)}")
    if w13.dim() != 4 or w2.dim() != 4 or w13.shape[3] != FRAGMENT_WORDS or w2.shape[3] != FRAGMENT_WORDS:
        raise ValueError("the fused forward reads words in fragment tiles [E, half tiles, N_total, 16]")
    if w2.shape[1] * FRAGMENT_WORDS * 32 // bits != triton.cdiv(w13.shape[2] // 2, TILE_K) * TILE_K:
        raise ValueError(f"W2's K tiles {list(w2.shape)} do not hold GEMM1's {w13.shape[2] // 2} columns")
    intermediate_size = w13.shape[2] // 2
    group_in_tile = _group_in_tile(group_size)
    shared = mlp_shared_bytes(bits, z13 is not None, group_in_tile, num_stages, block_n2, num_stages2)
    shared_limit = _max_shared_memory(x.device)
    if shared_limit is not None and shared > shared_limit:
        raise ValueError(f"the fused forward's rings (GEMM1 {num_stages} stages, GEMM2 {num_stages2} x {block_n2}, "
                         f"{bits}-bit) need {shared} bytes of shared memory, this GPU {shared_limit}")
    pairs = top_k
    slices = triton.cdiv(intermediate_size, TILE_K)
    activations = scratch((pairs, intermediate_size), x.dtype, x.device)
    partials = scratch((pairs * slices, h), torch.float32, x.device)
    aligned1 = _aligned(w13.shape[2] // 2, x.shape[1], x.stride(0), x.data_ptr(), s13.stride(0), s13.stride(1),
                        s13.data_ptr(), 0 if z13 is None else z13.data_ptr())
    aligned2 = _aligned(w2.shape[2], s2.stride(0), s2.stride(1), s2.data_ptr(), 0 if z2 is None else z2.data_ptr())
    launch(
        _moe_mlp_decode_kernel, (pairs * slices,), x, perm13 if perm13 is not None else x, w13, s13,
        z13 if z13 is not None else s13, bias13 if bias13 is not None else s13, activations, w2, s2,
        z2 if z2 is not None else s2, bias2 if bias2 is not None else s2, topk_weights.reshape(-1),
        topk_ids.reshape(-1), partials, h, intermediate_size, pairs, x.stride(0), w13.stride(0),
        w13.stride(1) // FRAGMENT_WORDS, s13.stride(0), s13.stride(1), activations.stride(0), w2.stride(0),
        w2.stride(1) // FRAGMENT_WORDS, s2.stride(0), s2.stride(1), alpha, beta, 0.0 if limit is None else limit,
        TOP_K=top_k, ACT=act, HAS_LIMIT=limit is not None, BITS=bits, HAS_ZP=z13 is not None,
        HAS_PERM=perm13 is not None, HAS_BIAS1=bias13 is not None, HAS_BIAS2=bias2 is not None,
        GROUP_SIZE=1 << 30 if group_size == -1 else group_size, GROUP_IN_TILE=group_in_tile,
        EVEN_K=h % TILE_K == 0, ALIGNED1=aligned1, ALIGNED2=aligned2, NUM_WARPS=num_warps, STAGES=num_stages,
        STAGES2=num_stages2, BLOCK_N2=block_n2, PDL=pdl, num_warps=num_warps, **launch_options(pdl),
    )
    return sum_partials(partials, x.dtype, pdl)
