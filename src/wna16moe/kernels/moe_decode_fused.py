"""Both GEMMs of a one-token forward in one launch, on the decode kernel's blocks (Gluon, NVIDIA sm80+).

At one token a forward is GEMM1 (K split into float32 partial sums), the activation pass, GEMM2 and the cast: each
hop between them costs a kernel's tail and the next one's ramp (qwen3-30b-a3b M = 1 on an H200: GEMM1 7.5 µs, the
activation pass ends 1.7 µs after it, GEMM2 5.4 µs; benchmarks/NOTES.md v47). Here one grid runs the programs of
both GEMMs through `moe_gemm_decode._block_gemm`, one block per pair (`moe_gemm`'s blocks from the ids):

- Each program takes a ticket from a counter as it starts. Tickets below GEMM1's program count are GEMM1's
  programs in its grid's order; the others are GEMM2's.
- A GEMM1 program stores its results (partial sums, or with one K split the activations), then counts itself
  done (a release).
- A GEMM2 program copies its first tiles' weights into its ring, waits until every GEMM1 program is done (an
  acquire), then reads its activations: with a K-split GEMM1 it sums the partial sums and applies the activation
  as it reads them (`_finished_partials`), which replaces the activation pass.
- Roles go by ticket, not by program id: a GEMM2 program waits only for GEMM1 programs that took their tickets
  before it, which are running or done. So the launch cannot deadlock, whatever order the GPU starts programs
  in and however many fit at once.
- The last GEMM2 program to finish waits for every GEMM1 program, then zeroes the counters for the next launch.
  Graph replays are covered. A layer's counters serve one forward at a time (its stream's order).

Layouts, operands and outputs are `moe_gemm`'s (kernels/moe_gemm.py): GEMM1 [P, 2N] words of `w13`, its output
(partial sums [S, P, 2I] or activations [P, I]) in `mid`, GEMM2's atomics into the float32 `out` [1, H] that
GEMM1's programs clear.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from wna16moe.kernels.activation import ACT_SILU
from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K
from wna16moe.kernels.moe_gemm import _group_in_tile, _max_shared_memory, rows_in_16_bytes
from wna16moe.kernels.moe_gemm_decode import _await_count, _block_gemm, ring_bytes, tiling_error

# The counters a fused launch keeps (int32, zero between launches): tickets taken, GEMM1 programs done, GEMM2
# programs done.
SYNC_COUNTERS = 3


@gluon.jit
def _moe_decode_fused_kernel(
    a_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, mid_ptr, perm2_ptr, w2_ptr, s2_ptr, z2_ptr, bias2_ptr,
    out_ptr, topk_w_ptr, ids_ptr, sync_ptr, hidden, inter, P, stride_am, stride_mid, stride_om,
    stride_w1e, stride_w1k, stride_s1e, stride_s1g, stride_w2e, stride_w2k, stride_s2e, stride_s2g,
    alpha, beta, limit,
    TOP_K: gl.constexpr, ACT: gl.constexpr, HAS_LIMIT: gl.constexpr, BITS: gl.constexpr, HAS_ZP: gl.constexpr,
    HAS_PERM1: gl.constexpr, HAS_PERM2: gl.constexpr, HAS_BIAS1: gl.constexpr, HAS_BIAS2: gl.constexpr,
    GROUP_SIZE: gl.constexpr, GROUP_IN_TILE: gl.constexpr, SPLIT_K1: gl.constexpr, SPLIT_K2: gl.constexpr,
    BLOCK_N1: gl.constexpr, BLOCK_N2: gl.constexpr, EVEN_K1: gl.constexpr, EVEN_K2: gl.constexpr,
    ALIGNED1: gl.constexpr, ALIGNED2: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES1: gl.constexpr,
    STAGES2: gl.constexpr, PDL: gl.constexpr,
):
    if PDL:  # (the hidden states and ids come from the grid before)
        await_prior_grids()
    ticket = gl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    tiles1 = P * gl.cdiv(inter, BLOCK_N1)
    programs1 = tiles1 * SPLIT_K1
    tiles2 = P * gl.cdiv(hidden, BLOCK_N2)
    # Each role lets the next grid (the cast) launch after its loop.
    ROLE_PDL: gl.constexpr = 1 if PDL else 0
    if ticket < programs1:
        _block_gemm(
            a_ptr, perm1_ptr, w1_ptr, s1_ptr, z1_ptr, bias1_ptr, mid_ptr, topk_w_ptr, ids_ptr, ids_ptr, ids_ptr,
            out_ptr, hidden, inter, hidden, P, P, stride_am, stride_w1e, stride_w1k, stride_s1e, stride_s1g, stride_mid,
            alpha, beta, limit,
            TOP_K=TOP_K, GATED=True, ACT=ACT, HAS_LIMIT=HAS_LIMIT, BITS=BITS, HAS_ZP=HAS_ZP, HAS_PERM=HAS_PERM1,
            HAS_BIAS=HAS_BIAS1, GROUP_SIZE=GROUP_SIZE, GROUP_IN_TILE=GROUP_IN_TILE, SPLIT_K=SPLIT_K1, BLOCK_M=8,
            BLOCK_N=BLOCK_N1, EVEN_K=EVEN_K1, ALIGNED=ALIGNED1, ID_BLOCKS=1, NUM_WARPS=NUM_WARPS, STAGES=STAGES1,
            ROWS=8, PDL=ROLE_PDL, PREFETCH=False, ZERO_OUT=True, WGMMA=False, GROUP_M=1, PERSISTENT=False, CARRY=0,
            pid=ticket % tiles1, pid_k=ticket // tiles1, ready_ptr=sync_ptr, ready_count=0, FUSED=True, A_ACT=(0,))
        gl.thread_barrier()  # (every thread's stores before the count: a release covers what the CTA wrote)
        gl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        second = ticket - programs1
        A_ACT: gl.constexpr = (SPLIT_K1, ACT, HAS_LIMIT, a_ptr.dtype.element_ty) if SPLIT_K1 > 1 else (0,)
        _block_gemm(
            mid_ptr, perm2_ptr, w2_ptr, s2_ptr, z2_ptr, bias2_ptr, out_ptr, topk_w_ptr, ids_ptr, ids_ptr, ids_ptr,
            out_ptr, 0, hidden, inter, P, P, stride_mid, stride_w2e, stride_w2k, stride_s2e, stride_s2g, stride_om,
            alpha, beta, limit,
            TOP_K=TOP_K, GATED=False, ACT=ACT, HAS_LIMIT=HAS_LIMIT, BITS=BITS, HAS_ZP=HAS_ZP, HAS_PERM=HAS_PERM2,
            HAS_BIAS=HAS_BIAS2, GROUP_SIZE=GROUP_SIZE, GROUP_IN_TILE=GROUP_IN_TILE, SPLIT_K=SPLIT_K2, BLOCK_M=8,
            BLOCK_N=BLOCK_N2, EVEN_K=EVEN_K2, ALIGNED=ALIGNED2, ID_BLOCKS=1, NUM_WARPS=NUM_WARPS, STAGES=STAGES2,
            ROWS=8, PDL=ROLE_PDL, PREFETCH=True, ZERO_OUT=False, WGMMA=False, GROUP_M=1, PERSISTENT=False, CARRY=0,
            pid=second % tiles2, pid_k=second // tiles2, ready_ptr=sync_ptr + 1, ready_count=programs1, FUSED=True,
            A_ACT=A_ACT)
        finished = gl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu")
        if finished == tiles2 * SPLIT_K2 - 1:  # the last GEMM2 program: every ticket is taken
            _await_count(sync_ptr + 1, programs1)  # (GEMM1 programs of idle pairs may still be clearing `out`)
            gl.store(sync_ptr, 0)
            gl.store(sync_ptr + 1, 0)
            gl.store(sync_ptr + 2, 0)


def fused_tiling_error(block_n1: int, block_n2: int, num_warps: int, stages1: int, stages2: int) -> str | None:
    """Why a fused launch cannot run these tilings (8-row blocks, one warp count for both GEMMs), or None."""
    return tiling_error(8, block_n1, num_warps, stages1) or tiling_error(8, block_n2, num_warps, stages2)


def moe_decode_fused(
    hidden_states: torch.Tensor,
    w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    mid: torch.Tensor,
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
    pdl: int = 0,
) -> torch.Tensor:
    """out [1, H] float32 = GEMM2(act(GEMM1(hidden_states [1, H]))) over the token's pairs, in one launch (module
    docstring); returns `out`, which need not be cleared.

    w13, w2 : (words in fragment tiles, scales, zero points or None, act-order permutation or None, float32 bias or
        None) as `moe_gemm` takes them; w13's bias only with split_k1 = 1 (with a K split the activation pass adds
        it, and there is none here).
    mid : GEMM1's output: float32 partial sums [split_k1, P, 2I] with split_k1 > 1, else activations [P, I] in the
        hidden states' dtype.
    topk_weights, topk_ids : [1, K] router weights and experts (-1: left out).
    sync : int32 [SYNC_COUNTERS] on the device, zero before the first launch (it is zero after every launch).
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
    if split_k1 > 1:
        if mid.shape != (split_k1, pairs, 2 * i) or mid.dtype != torch.float32 or not mid.is_contiguous():
            raise ValueError(f"mid must be contiguous float32 partial sums [{split_k1}, {pairs}, {2 * i}], got "
                             f"{mid.dtype} {list(mid.shape)}")
        if bias1 is not None:
            raise ValueError("w13's bias with split_k1 > 1 is the activation pass's: a fused launch has none")
    elif mid.shape != (pairs, i) or mid.dtype != hidden_states.dtype or mid.stride(1) != 1:
        raise ValueError(f"mid must be [{pairs}, {i}] {hidden_states.dtype} with unit column stride, got "
                         f"{mid.dtype} {list(mid.shape)}")
    if out.shape != (1, h) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [1, {h}], got {out.dtype} {list(out.shape)}")
    if sync.shape != (SYNC_COUNTERS,) or sync.dtype != torch.int32:
        raise ValueError(f"sync must be int32 [{SYNC_COUNTERS}], got {sync.dtype} {list(sync.shape)}")
    r = TILE_K * bits // 32
    if group_size != -1 and group_size % r:
        raise ValueError(f"group_size={group_size} must be a multiple of {r} for {bits}-bit tiles")
    shared = (ring_bytes(bits, True, z1 is not None, _group_in_tile(group_size), 8, block_n1, stages1)
              + ring_bytes(bits, False, z2 is not None, _group_in_tile(group_size), 8, block_n2, stages2))
    limit_bytes = _max_shared_memory(hidden_states.device)
    if limit_bytes is not None and shared > limit_bytes:
        raise ValueError(f"a fused launch's two rings (block_n1={block_n1} x {stages1} stages, block_n2={block_n2} x "
                         f"{stages2}) need {shared} bytes of shared memory, more than this GPU has")
    programs = pairs * (triton.cdiv(i, block_n1) * split_k1 + triton.cdiv(h, block_n2) * split_k2)
    mid_rows = mid[0] if split_k1 > 1 else mid
    _moe_decode_fused_kernel[(programs,)](
        hidden_states, perm1 if perm1 is not None else hidden_states, w1, s1, z1 if z1 is not None else s1,
        bias1 if bias1 is not None else s1, mid, perm2 if perm2 is not None else hidden_states, w2_words, s2,
        z2 if z2 is not None else s2, bias2 if bias2 is not None else s2, out, topk_weights.reshape(-1),
        topk_ids.reshape(-1), sync, h, i, pairs, hidden_states.stride(0), mid_rows.stride(0),
        out.stride(0),
        # (a tile's words start (k // PACK) * stride_wk in: N_total words per word row)
        w1.stride(0), w1.stride(1) // FRAGMENT_WORDS, s1.stride(0), s1.stride(1),
        w2_words.stride(0), w2_words.stride(1) // FRAGMENT_WORDS, s2.stride(0), s2.stride(1),
        alpha, beta, 0.0 if limit is None else limit,
        TOP_K=top_k, ACT=act, HAS_LIMIT=limit is not None, BITS=bits, HAS_ZP=z1 is not None,
        HAS_PERM1=perm1 is not None, HAS_PERM2=perm2 is not None, HAS_BIAS1=bias1 is not None,
        HAS_BIAS2=bias2 is not None, GROUP_SIZE=1 << 30 if group_size == -1 else group_size,
        GROUP_IN_TILE=_group_in_tile(group_size), SPLIT_K1=split_k1, SPLIT_K2=split_k2, BLOCK_N1=block_n1,
        BLOCK_N2=block_n2, EVEN_K1=h % TILE_K == 0, EVEN_K2=i % TILE_K == 0,
        ALIGNED1=rows_in_16_bytes(hidden_states, s1, z1, i), ALIGNED2=rows_in_16_bytes(mid_rows, s2, z2, h),
        NUM_WARPS=num_warps, STAGES1=stages1, STAGES2=stages2, PDL=pdl, num_warps=num_warps, **launch_options(pdl),
    )
    return out
