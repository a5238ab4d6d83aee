"""Both GEMMs of a one-token forward in one launch, on the decode kernel's blocks (Gluon, NVIDIA sm80+).

At one token a forward is GEMM1 (K split into float32 partial sums), the activation pass, GEMM2 and the cast: each
hop between them costs a kernel's tail and the next one's ramp (qwen3-30b-a3b M = 1 on an H200: GEMM1 7.5 µs, the
activation pass ends 1.7 µs after it, GEMM2 5.4 µs; benchmarks/NOTES.md v47). Here one grid runs the programs of
both GEMMs through `moe_gemm_decode._block_gemm`, one block per pair (`moe_gemm`'s blocks from the ids):

- The first programs to arrive on each SM (as many as GEMM1's blocks per SM) take GEMM1 blocks from a counter
  while any are left: GEMM1 is spread over every SM as in a launch of its own. Then every program takes GEMM2
  blocks from another counter.
- A GEMM1 block stores its results, then counts itself done (a release). Unsplit, its results are the
  activations. Split over K, they are partial sums, and the last split of each block and column tile to store
  them (a counter per tile) sums all of them into the activations: the activation pass's work, without its
  launch.
- A GEMM2 block copies its first tiles' weights into its ring, waits until every GEMM1 block is done (an
  acquire), then copies the activations as a GEMM2 launched after GEMM1 does.
- No wait can deadlock, whatever order the GPU starts programs in and however many fit at once: a GEMM1 block
  never waits, and the first program on any SM keeps taking GEMM1 blocks until none are left.
- The last program to leave zeroes the counters for the next launch (graph replays included): a layer's
  counters serve one forward at a time (its stream's order).

Layouts, operands and outputs are `moe_gemm`'s (kernels/moe_gemm.py): GEMM1's partial sums [S, P, 2I] and
activations [P, I], GEMM2's atomics into the float32 `out` [1, H] that GEMM1's programs clear.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from wna16moe.kernels.activation import ACT_SILU
from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K
from wna16moe.kernels.moe_gemm import _group_in_tile, _max_shared_memory, _num_sms, rows_in_16_bytes
from wna16moe.kernels.moe_gemm_decode import _await_count, _block_gemm, ring_bytes, tiling_error

# The counters a fused launch keeps (int32, zero between launches, `sync_size`): GEMM1 blocks taken and done,
# programs that left, GEMM2 blocks taken; programs that arrived on each SM (by SM id, wrapped at SM_SLOTS); one per
# GEMM1 block and column tile (its K splits that stored their partial sums).
GEMM1_ITEMS, GEMM1_DONE, LEFT, GEMM2_ITEMS, ARRIVALS = range(5)
SM_SLOTS = 256
TILES = ARRIVALS + SM_SLOTS
_GEMM1_ITEMS, _GEMM1_DONE, _LEFT, _GEMM2_ITEMS, _ARRIVALS, _SM_SLOTS, _TILES = (
    gl.constexpr(c) for c in (GEMM1_ITEMS, GEMM1_DONE, LEFT, GEMM2_ITEMS, ARRIVALS, SM_SLOTS, TILES))


@gluon.jit
def _end_item():
    """Between a program's blocks: the ring's last copies (refills past the block's last tile) have landed and
    every thread is done with the block, before the next block's copies reuse the buffers; and every thread's
    stores come before a count that releases them."""
    async_copy.wait_group(0)
    gl.thread_barrier()


@gluon.jit
def _moe_decode_fused_kernel(
    a_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, part_ptr, inter_ptr, perm2_ptr, w2_ptr, s2_ptr, z2_ptr,
    bias2_ptr, out_ptr, topk_w_ptr, ids_ptr, sync_ptr, gemm1_per_sm, hidden, inter, P, stride_am, stride_part,
    stride_inter,
    stride_om, stride_w1e, stride_w1k, stride_s1e, stride_s1g, stride_w2e, stride_w2k, stride_s2e, stride_s2g, alpha,
    beta, limit,
    TOP_K: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
    HAS_PERM1: gl.constexpr, HAS_PERM2: gl.constexpr, HAS_BIAS1: gl.constexpr, HAS_BIAS2: gl.constexpr,
    GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, SPLIT_K1: gl.constexpr, SPLIT_K2: gl.constexpr,
    BLOCK_N1: gl.constexpr, BLOCK_N2: gl.constexpr, EVEN_K1: gl.constexpr, EVEN_K2: gl.constexpr,
    ALIGNED1: gl.constexpr, ALIGNED2: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES1: gl.constexpr,
    STAGES2: gl.constexpr, PDL: gl.constexpr,
):
    if PDL:  # (the hidden states and ids come from the grid before)
        await_prior_grids()
    tiles1 = P * gl.cdiv(inter, BLOCK_N1)
    programs1 = tiles1 * SPLIT_K1
    tiles2 = P * gl.cdiv(hidden, BLOCK_N2)
    programs2 = tiles2 * SPLIT_K2
    # Each role lets the next grid (the cast) launch after its loop.
    ROLE_PDL: gl.constexpr = 1 if PDL else 0
    # The first `gemm1_per_sm` programs to arrive on each SM work on GEMM1 blocks while any are left.
    sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    arrival = gl.atomic_add(sync_ptr + _ARRIVALS + sm % _SM_SLOTS, 1, sem="relaxed", scope="gpu")
    if arrival < gemm1_per_sm:
        item = gl.atomic_add(sync_ptr + _GEMM1_ITEMS, 1, sem="relaxed", scope="gpu")
        while item < programs1:
            # (split over K it stores partial sums, the last split of a tile finishes them into `inter_ptr`)
            _block_gemm(
                a_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, part_ptr if SPLIT_K1 > 1 else inter_ptr,
                topk_w_ptr, ids_ptr, ids_ptr, ids_ptr, out_ptr, hidden, inter, hidden, P, P, stride_am, stride_w1e,
                stride_w1k, stride_s1e, stride_s1g, stride_part if SPLIT_K1 > 1 else stride_inter, alpha, beta, limit,
                TOP_K=TOP_K, GATED=True, ACT=ACT, HAS_LIMIT=HAS_LIMIT, BITS=BITS, HAS_ZP=HAS_ZP, HAS_PERM=HAS_PERM1,
                HAS_BIAS=HAS_BIAS1, GROUP_SIZE=GROUP_SIZE, GROUP_IN_TILE=GROUP_IN_TILE, SPLIT_K=SPLIT_K1, BLOCK_M=8,
                BLOCK_N=BLOCK_N1, EVEN_K=EVEN_K1, ALIGNED=ALIGNED1, ID_BLOCKS=1, NUM_WARPS=NUM_WARPS,
                STAGES=STAGES1, ROWS=8, PDL=ROLE_PDL, PREFETCH=False, ZERO_OUT=True, WGMMA=False, GROUP_M=1,
                PERSISTENT=False, CARRY=0, pid=item % tiles1, pid_k=item // tiles1, ready_ptr=sync_ptr,
                ready_count=0, inter_ptr=inter_ptr, stride_inter=stride_inter, counters_ptr=sync_ptr + _TILES,
                FUSED=True)
            _end_item()
            gl.atomic_add(sync_ptr + _GEMM1_DONE, 1, sem="release", scope="gpu")
            item = gl.atomic_add(sync_ptr + _GEMM1_ITEMS, 1, sem="relaxed", scope="gpu")
    item = gl.atomic_add(sync_ptr + _GEMM2_ITEMS, 1, sem="relaxed", scope="gpu")
    while item < programs2:
        _block_gemm(
            inter_ptr, perm2_ptr, w2_ptr, s2_ptr, z2_ptr, bias2_ptr, out_ptr, topk_w_ptr, ids_ptr, ids_ptr, ids_ptr,
            out_ptr, 0, hidden, inter, P, P, stride_inter, stride_w2e, stride_w2k, stride_s2e, stride_s2g, stride_om,
            alpha, beta, limit,
            TOP_K=TOP_K, GATED=False, ACT=ACT, HAS_LIMIT=HAS_LIMIT, BITS=BITS, HAS_ZP=HAS_ZP, HAS_PERM=HAS_PERM2,
            HAS_BIAS=HAS_BIAS2, GROUP_SIZE=GROUP_SIZE, GROUP_IN_TILE=GROUP_IN_TILE, SPLIT_K=SPLIT_K2, BLOCK_M=8,
            BLOCK_N=BLOCK_N2, EVEN_K=EVEN_K2, ALIGNED=ALIGNED2, ID_BLOCKS=1, NUM_WARPS=NUM_WARPS, STAGES=STAGES2,
            ROWS=8, PDL=ROLE_PDL, PREFETCH=True, ZERO_OUT=False, WGMMA=False, GROUP_M=1, PERSISTENT=False, CARRY=0,
            pid=item % tiles2, pid_k=item // tiles2, ready_ptr=sync_ptr + _GEMM1_DONE, ready_count=programs1,
            inter_ptr=inter_ptr, stride_inter=stride_inter, counters_ptr=sync_ptr, FUSED=True)
        _end_item()
        item = gl.atomic_add(sync_ptr + _GEMM2_ITEMS, 1, sem="relaxed", scope="gpu")
    # The last program to leave: every counter has been taken for the last time; zero them for the next launch.
    if gl.atomic_add(sync_ptr + _LEFT, 1, sem="acq_rel", scope="gpu") == gl.num_programs(0) - 1:
        _await_count(sync_ptr + _GEMM1_DONE, programs1)  # (GEMM1 blocks of idle pairs may still clear `out`)
        RESET: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        offs = gl.arange(0, 2 * _SM_SLOTS, layout=RESET)
        gl.store(sync_ptr + offs, gl.zeros_like(offs), mask=offs < _TILES)


def fused_tiling_error(block_n1: int, block_n2: int, num_warps: int, stages1: int, stages2: int) -> str | None:
    """Why a fused launch cannot run these tilings (8-row blocks, one warp count for both GEMMs), or None."""
    return tiling_error(8, block_n1, num_warps, stages1) or tiling_error(8, block_n2, num_warps, stages2)


def sync_size(pairs: int, inter: int, block_n1: int) -> int:
    """int32 counters a fused launch needs (`GEMM1_ITEMS` ... `TILES`)."""
    return TILES + pairs * triton.cdiv(inter, block_n1)


def moe_decode_fused(
    hidden_states: torch.Tensor,
    w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    partials: torch.Tensor | None,
    intermediate: torch.Tensor,
    out: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    sync: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    act: int = ACT_SILU,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
    block_n1: int,
    block_n2: int,
    split_k1: int,
    split_k2: int,
    num_warps: int = 4,
    stages1: int = 2,
    stages2: int = 2,
    max_registers: int | None = None,
    programs: int | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """out [1, H] float32 = GEMM2(act(GEMM1(hidden_states [1, H]))) over the token's pairs, in one launch (module
    docstring); returns `out`, which need not be cleared.

    w13, w2 : (words in fragment tiles, scales, zero points or None, act-order permutation or None, float32 bias or
        None) as `moe_gemm` takes them.
    partials : with split_k1 > 1, GEMM1's float32 partial sums [split_k1, P, 2I] (else None).
    intermediate : the activations [P, I] in the hidden states' dtype, GEMM1's output and GEMM2's input.
    topk_weights, topk_ids : [1, K] router weights and experts (-1: left out).
    sync : int32 [`sync_size`] or longer on the device, zero before the first launch (it is zero after every
        launch).
    max_registers : a cap on registers per thread (ptxas .maxnreg): the launch takes the more demanding of its two
        roles' registers, which may leave fewer programs per SM than either GEMM alone.
    programs : how many programs to launch (at least 1); default one per block of either GEMM. Fewer take
        several blocks each, one after another.
    pdl : nonzero: launch as a programmatic dependent (kernels/grid_dependence.py).
    """
    w1, s1, z1, perm1, bias1 = w13
    w2_words, s2, z2, perm2, bias2 = w2
    t, top_k = topk_ids.shape
    h = hidden_states.shape[1]
    i = w1.shape[2] // 2
    pairs = t * top_k
    if t != 1 or hidden_states.shape[0] != 1:
        raise ValueError(f"a fused launch runs one token, got hidden_states {list(hidden_states.shape)} and "
                         f"topk_ids {list(topk_ids.shape)}")
    error = fused_tiling_error(block_n1, block_n2, num_warps, stages1, stages2)
    if error:
        raise ValueError(error)
    for name, words, rows in (("w13", w1, 2 * i), ("w2", w2_words, h)):
        if words.dim() != 4 or words.shape[2] != rows or words.shape[3] != FRAGMENT_WORDS:
            raise ValueError(f"{name} must be words in fragment tiles [E, half tiles, {rows}, {FRAGMENT_WORDS}], got "
                             f"{list(words.shape)}")
    if split_k1 > 1 and (partials is None or partials.shape != (split_k1, pairs, 2 * i)
                         or partials.dtype != torch.float32 or not partials.is_contiguous()):
        raise ValueError(f"partials must be contiguous float32 [{split_k1}, {pairs}, {2 * i}] for split_k1="
                         f"{split_k1}, got {None if partials is None else (partials.dtype, list(partials.shape))}")
    if (intermediate.shape != (pairs, i) or intermediate.dtype != hidden_states.dtype
            or intermediate.stride(1) != 1):
        raise ValueError(f"intermediate must be [{pairs}, {i}] {hidden_states.dtype} with unit column stride, got "
                         f"{intermediate.dtype} {list(intermediate.shape)}")
    if out.shape != (1, h) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [1, {h}], got {out.dtype} {list(out.shape)}")
    if sync.dim() != 1 or sync.numel() < sync_size(pairs, i, block_n1) or sync.dtype != torch.int32:
        raise ValueError(f"sync must be int32 [>= {sync_size(pairs, i, block_n1)}], got {sync.dtype} "
                         f"{list(sync.shape)}")
    r = TILE_K * bits // 32
    if group_size != -1 and group_size % r:
        raise ValueError(f"group_size={group_size} must be a multiple of {r} for {bits}-bit tiles")
    shared = (ring_bytes(bits, True, z1 is not None, _group_in_tile(group_size), 8, block_n1, stages1)
              + ring_bytes(bits, False, z2 is not None, _group_in_tile(group_size), 8, block_n2, stages2))
    limit_bytes = _max_shared_memory(hidden_states.device)
    if limit_bytes is not None and shared > limit_bytes:
        raise ValueError(f"a fused launch's two rings (block_n1={block_n1} x {stages1} stages, block_n2={block_n2} x "
                         f"{stages2}) need {shared} bytes of shared memory, more than this GPU has")
    programs1 = pairs * triton.cdiv(i, block_n1) * split_k1
    grid = programs1 + pairs * triton.cdiv(h, block_n2) * split_k2 if programs is None else programs
    if grid < 1:
        raise ValueError(f"programs must be at least 1, got {programs}")
    part = partials if split_k1 > 1 else intermediate
    _moe_decode_fused_kernel[(grid,)](
        hidden_states, perm1 if perm1 is not None else hidden_states, w1, s1, z1 if z1 is not None else s1,
        bias1 if bias1 is not None else s1, part, intermediate, perm2 if perm2 is not None else hidden_states,
        w2_words, s2, z2 if z2 is not None else s2, bias2 if bias2 is not None else s2, out,
        topk_weights.reshape(-1), topk_ids.reshape(-1), sync,
        triton.cdiv(programs1, _num_sms(hidden_states.device.index)), h, i, pairs, hidden_states.stride(0),
        part.stride(-2), intermediate.stride(0), out.stride(0),
        # (a tile's words start (k // PACK) * stride_wk in: N_total words per word row)
        w1.stride(0), w1.stride(1) // FRAGMENT_WORDS, s1.stride(0), s1.stride(1),
        w2_words.stride(0), w2_words.stride(1) // FRAGMENT_WORDS, s2.stride(0), s2.stride(1),
        alpha, beta, 0.0 if limit is None else limit,
        TOP_K=top_k, ACT=act, HAS_LIMIT=limit is not None, BITS=bits, HAS_ZP=z1 is not None,
        HAS_PERM1=perm1 is not None, HAS_PERM2=perm2 is not None, HAS_BIAS1=bias1 is not None,
        HAS_BIAS2=bias2 is not None, GROUP_SIZE=1 << 30 if group_size == -1 else group_size,
        GROUP_IN_TILE=_group_in_tile(group_size), SPLIT_K1=split_k1, SPLIT_K2=split_k2, BLOCK_N1=block_n1,
        BLOCK_N2=block_n2, EVEN_K1=h % TILE_K == 0, EVEN_K2=i % TILE_K == 0,
        ALIGNED1=rows_in_16_bytes(hidden_states, s1, z1, i), ALIGNED2=rows_in_16_bytes(intermediate, s2, z2, h),
        NUM_WARPS=num_warps, STAGES1=stages1, STAGES2=stages2, PDL=pdl, num_warps=num_warps, **launch_options(pdl),
        **({} if max_registers is None else {"maxnreg": max_registers}),
    )
    return out
