"""Token alignment: group the routed (token, expert) pairs by expert, each expert's rows padded to BLOCK_M.

Legend: T tokens, K top-k, P = T * K routed pairs, E experts, M = BLOCK_M.

A pair whose expert id is -1 (an expert another EP rank owns, after the expert map) is left out: it appears
in no row, and its pair index is never written.

Outputs (fixed sizes, so the whole step is CUDA-graph capturable, no host sync):
    sorted_ids   [max_padded] int32  pair index p (token p // K, slot p % K) of each row; P marks padding
    expert_ids   [max_blocks] int32  expert of each M-row block; -1 past the used blocks
    num_padded   [1] int32           rows in use (a multiple of M)
with max_padded = P + min(E, P) * (M - 1) and max_blocks = max_padded // M: at most min(E, P) experts are
non-empty and each wastes fewer than M rows (left-out pairs only lower the count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pairs above which the one-program kernel is slower than sorting with torch (measured on H100 later).
SINGLE_PROGRAM_MAX_PAIRS = 4096


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr,  # (P,) int32 expert of each routed pair, -1: left out
    sorted_ids_ptr,  # (max_padded,) int32 out
    expert_ids_ptr,  # (max_blocks,) int32 out
    num_padded_ptr,  # (1,) int32 out
    rank_ptr,  # (P,) int32 scratch: rank of each pair among the pairs of its expert
    P,
    max_padded,
    max_blocks,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    experts = tl.arange(0, E_POW2)
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    # Pass 1: rank of each pair within its expert, in pair order (stable).
    for start in range(0, P, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < P
        ids = tl.load(topk_ids_ptr + offs, mask=mask, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E]
        earlier = tl.cumsum(onehot, axis=0) - onehot
        rank = tl.sum((earlier + counts[None, :]) * onehot, axis=1)
        tl.store(rank_ptr + offs, rank, mask=mask)
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    for start in range(0, max_padded, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + P, mask=offs < max_padded)
    for start in range(0, max_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        first_row = blocks * BLOCK_M
        # The block's expert is the first whose padded range ends after the block's first row.
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < max_blocks)
    # Pass 2 reads ranks written by other threads and overwrites the padding fill: order the phases.
    tl.debug_barrier()
    for start in range(0, P, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < P
        ids = tl.load(topk_ids_ptr + offs, mask=mask, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        base = tl.sum(onehot * starts[None, :], axis=1)
        rank = tl.load(rank_ptr + offs, mask=mask, other=0)
        # A -1 pair matches no expert (its base and rank are 0): it must not be written over row 0.
        tl.store(sorted_ids_ptr + base + rank, offs.to(tl.int32), mask=mask & (ids >= 0))


def _align_torch(ids: torch.Tensor, num_experts: int, block_m: int, max_padded: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same result from torch ops (sort based), for many pairs; still no host sync."""
    p = ids.numel()
    valid = ids >= 0
    # Left-out (-1) pairs sort after every expert and are written to a scratch row past max_padded.
    key = torch.where(valid, ids.long(), num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = torch.cat([ends - padded, ends.new_full((1,), max_padded)])
    order = torch.argsort(key, stable=True)
    expert_of_sorted = key[order]
    first_sorted = torch.cat([torch.cumsum(counts, 0) - counts, counts.sum().view(1)])
    rank = torch.arange(p, device=ids.device) - first_sorted[expert_of_sorted]
    rows = torch.where(expert_of_sorted < num_experts, starts[expert_of_sorted] + rank, max_padded)
    sorted_ids = torch.full((max_padded + 1,), p, dtype=torch.int32, device=ids.device)
    sorted_ids[rows] = order.to(torch.int32)
    first_rows = torch.arange(0, max_padded, block_m, device=ids.device)
    total = ends[-1:]
    expert_ids = torch.searchsorted(ends, first_rows, right=True)
    expert_ids = torch.where(first_rows < total, expert_ids, -1).to(torch.int32)
    return sorted_ids[:max_padded], expert_ids, total.to(torch.int32)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group routed pairs by expert, padded to `block_m` rows per expert.

    Parameters
    ----------
    topk_ids : [T, K] int32 expert ids in [0, num_experts), or -1 for a pair to leave out.
    num_experts : E.
    block_m : rows per GEMM block.

    Returns
    -------
    sorted_ids [max_padded] int32, expert_ids [max_padded // block_m] int32, num_padded [1] int32
    (see the module docstring).
    """
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    p = ids.numel()
    max_padded = max_padded_rows(p, num_experts, block_m)
    if p > SINGLE_PROGRAM_MAX_PAIRS:
        return _align_torch(ids, num_experts, block_m, max_padded)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
    rank = torch.empty(max(p, 1), dtype=torch.int32, device=ids.device)
    e_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(1, min(triton.next_power_of_2(max(p, 1)), 8192 // e_pow2))
    _moe_align_kernel[(1,)](ids, sorted_ids, expert_ids, num_padded, rank, p, max_padded, max_padded // block_m,
                            E_POW2=e_pow2, BLOCK_M=block_m, CHUNK=chunk, num_warps=4)
    return sorted_ids, expert_ids, num_padded
