"""Token alignment: group the routed (token, expert) pairs by expert, each expert's rows padded to BLOCK_M.

Legend: T tokens, K top-k, P = T * K routed pairs, E experts, M = BLOCK_M.

A pair whose expert id is -1 (an expert another EP rank owns, after the expert map) is left out: it appears
in no row, and its pair index is never written. So is a pair whose id lies past the experts (E or more, or below
-1): a caller's bad ids cost those pairs, never a write out of bounds or a block of a nonexistent expert, and
checking them on the host would cost a device sync per forward.

Outputs (fixed sizes, so the whole step is CUDA-graph capturable, no host sync):
    sorted_ids   [max_padded] int32  pair index p (token p // K, slot p % K) of each row; P marks padding
    expert_ids   [max_blocks] int32  expert of each M-row block; -1 past the used blocks
    num_padded   [1] int32           rows in use (a multiple of M)
with max_padded = P + min(E, P) * (M - 1) and max_blocks = max_padded // M: at most min(E, P) experts are
non-empty and each wastes fewer than M rows (left-out pairs only lower the count).

Each pair takes the next row of its expert from an atomic counter per expert (O(P) work), so the order of an
expert's pairs within its rows is not fixed; nothing depends on it (each row of a GEMM is computed alone).
For few pairs one program does everything (one launch, every pair in its registers); above, a grid of programs
counts and then places the pairs (a clear of the counters and two launches), since one SM's atomics are the
one program's bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wna16moe.kernels.grid_dependence import enter_dependent, launch_options
from wna16moe.kernels.launch import launch, scratch

# One program while pairs <= 4096 and pairs x experts <= 2^18. As graph replays on the H200 (bench_align.py,
# NOTES.md v75) it took 2.3 / 4.3 / 5.9 µs at 256 / 1024 / 2048 pairs of 128 experts against the grid's 5.1 / 6.6 /
# 6.4, and 4.7 µs at 4096 pairs of 8 experts against 6.8; but 7.8 µs at 1024 pairs of 384 experts against 7.1, and
# 9.9 at 4096 of 128 against 6.9: its time grows with the pairs (one SM's atomics) and with the experts.
SINGLE_PROGRAM_MAX_PAIRS = 4096
SINGLE_PROGRAM_MAX_WORK = 1 << 18
ONE_PROGRAM_LIMIT = 8192  # pairs one program holds in registers at all (8 warps, 32 per thread)
_CHUNK = 1024  # pairs per program of the grid


@triton.jit
def _pair_experts(topk_ids_ptr, offs, P, E):
    """The experts of pairs `offs` and which of them are kept (ids in [0, E); the others are left out)."""
    ids = tl.load(topk_ids_ptr + offs, mask=offs < P, other=-1)
    return ids, (ids >= 0) & (ids < E)


@triton.jit
def _rank_pairs(topk_ids_ptr, rank_ptr, counts_ptr, offs, P, E):
    """Each kept pair takes the next row of its expert (counts_ptr: one int32 counter per expert)."""
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=keep, sem="relaxed", scope="gpu")
    tl.store(rank_ptr + offs, rank, mask=keep)


@triton.jit
def _place_pairs(topk_ids_ptr, rank_ptr, sorted_ids_ptr, starts, offs, P, E):
    """Each kept pair's index goes to its expert's first row plus its rank."""
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    rank = tl.load(rank_ptr + offs, mask=keep, other=0)
    row = tl.gather(starts, tl.where(keep, ids, 0), axis=0) + rank
    tl.store(sorted_ids_ptr + row, offs.to(tl.int32), mask=keep)


@triton.jit
def _fill_experts(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, mine, P, max_blocks, part, parts,
                  BLOCK_M: tl.constexpr, TAIL: tl.constexpr):
    """For the experts where `mine` (part `part` of `parts` programs): their blocks' expert ids and P in their
    padding rows; and this part's share of the rows and blocks past the used ones (P; -1). Written per expert,
    so that no block searches for its expert."""
    experts = tl.arange(0, counts.shape[0])
    pairs_end = starts + counts
    for j in range(0, BLOCK_M - 1):  # an expert's padding rows: fewer than BLOCK_M
        tl.store(sorted_ids_ptr + pairs_end + j, tl.zeros_like(experts) + P, mask=mine & (pairs_end + j < ends))
    first_block = starts // BLOCK_M
    blocks = tl.where(mine, ends // BLOCK_M - first_block, 0)
    for j in range(0, tl.max(blocks, axis=0)):
        tl.store(expert_ids_ptr + first_block + j, experts, mask=j < blocks)
    used = tl.max(ends, axis=0)
    tail = tl.arange(0, TAIL)
    for row in range(used + part * TAIL, max_blocks * BLOCK_M, parts * TAIL):
        tl.store(sorted_ids_ptr + row + tail, tl.zeros_like(tail) + P, mask=row + tail < max_blocks * BLOCK_M)
    for block in range(used // BLOCK_M + part * TAIL, max_blocks, parts * TAIL):
        tl.store(expert_ids_ptr + block + tail, tl.zeros_like(tail) - 1, mask=block + tail < max_blocks)


@triton.jit
def _block_ranges(counts, BLOCK_M: tl.constexpr):
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    return ends - padded, ends


@triton.jit
def _align_one_program(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, counts_ptr, P, E, max_blocks,
                       E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, PAIRS: tl.constexpr, TAIL: tl.constexpr,
                       PDL: tl.constexpr):
    """Every pair in registers at once, its rank from an atomic counter per expert, and the blocks and padding rows
    written per expert: the ids are read once and the ranks never leave registers, and nothing searches the
    blocks' experts. (`tl.histogram` for the counts cost O(pairs x experts): 9.4 µs at 1024 pairs of 384
    experts on the H200, against one read of the counters here; NOTES.md v75.)"""
    enter_dependent(PDL)  # (kernels/grid_dependence.py; with PDL 1 the next kernel launches as this one exits)
    experts = tl.arange(0, E_POW2)
    # One SM issues ~1 global atomic per 5 cycles to distinct addresses (NOTES.md v75), so only the ranks are
    # atomics: the counters are cleared by stores and read back by loads that skip L1 (the atomics update L2);
    # the CTA barriers order both against the atomics.
    tl.store(counts_ptr + experts, tl.zeros_like(experts))
    offs = tl.arange(0, PAIRS)
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    tl.debug_barrier()
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=keep, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    counts = tl.load(counts_ptr + experts, volatile=True)
    starts, ends = _block_ranges(counts, BLOCK_M)
    used = tl.max(ends, axis=0)
    tl.store(num_padded_ptr, used)
    row = tl.gather(starts, tl.where(keep, ids, 0), axis=0) + rank
    tl.store(sorted_ids_ptr + row, offs.to(tl.int32), mask=keep)
    _fill_experts(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, experts < E_POW2, P, max_blocks, 0, 1,
                  BLOCK_M, TAIL)


@triton.jit
def _count_kernel(topk_ids_ptr, rank_ptr, counts_ptr, P, E, CHUNK: tl.constexpr, PDL: tl.constexpr):
    enter_dependent(PDL)
    _rank_pairs(topk_ids_ptr, rank_ptr, counts_ptr, tl.program_id(0) * CHUNK + tl.arange(0, CHUNK), P, E)


@triton.jit
def _place_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, rank_ptr, counts_ptr, P, E, max_blocks,
                  E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, TAIL: tl.constexpr,
                  PDL: tl.constexpr):
    """Program i places the pairs of chunk i and fills the blocks of experts i, i + programs, ... (the counts are
    final)."""
    enter_dependent(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + experts)
    starts, ends = _block_ranges(counts, BLOCK_M)
    if pid == 0:
        tl.store(num_padded_ptr, tl.max(ends, axis=0))
    _place_pairs(topk_ids_ptr, rank_ptr, sorted_ids_ptr, starts, pid * CHUNK + tl.arange(0, CHUNK), P, E)
    _fill_experts(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, experts % programs == pid, P, max_blocks, pid,
                  programs, BLOCK_M, TAIL)


def one_program(num_pairs: int, experts_pow2: int) -> bool:
    """Whether one program aligns `num_pairs` pairs over `experts_pow2` (a power of two) experts."""
    return num_pairs <= SINGLE_PROGRAM_MAX_PAIRS and num_pairs * experts_pow2 <= SINGLE_PROGRAM_MAX_WORK


def one_program_warps(num_pairs: int) -> int:
    """The one program's warps: at most 8 pairs per thread up to 1024 pairs, then 8 warps."""
    if num_pairs > ONE_PROGRAM_LIMIT:
        raise ValueError(f"one program aligns at most {ONE_PROGRAM_LIMIT} pairs, got {num_pairs}")
    return 4 if num_pairs <= 1024 else 8


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int, pdl: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group routed pairs by expert, padded to `block_m` rows per expert.

    Parameters
    ----------
    topk_ids : [T, K] int32 expert ids in [0, num_experts), or -1 for a pair to leave out (as is any other id).
    num_experts : E.
    block_m : rows per GEMM block.
    pdl : launch as programmatic dependents, not 0 (CUDA sm90+ only; kernels/grid_dependence.py; they release
        the next kernel as they exit).

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
    max_blocks = max_padded // block_m
    device = ids.device
    sorted_ids = scratch((max_padded,), torch.int32, device)
    expert_ids = scratch((max_blocks,), torch.int32, device)
    num_padded = scratch((1,), torch.int32, device)
    e_pow2 = triton.next_power_of_2(num_experts)
    if one_program(p, e_pow2):
        counts = scratch((e_pow2,), torch.int32, device)
        warps = one_program_warps(p)
        launch(_align_one_program, (1,), ids, sorted_ids, expert_ids, num_padded, counts, p, num_experts, max_blocks,
               E_POW2=e_pow2, BLOCK_M=block_m, PAIRS=triton.next_power_of_2(max(p, 1)), TAIL=128 * warps, PDL=pdl,
               num_warps=warps, **launch_options(pdl))
    else:
        rank = scratch((max(p, 1),), torch.int32, device)
        counts = scratch((e_pow2,), torch.int32, device, zeroed=True)
        programs = max(1, triton.cdiv(p, _CHUNK))
        launch(_count_kernel, (programs,), ids, rank, counts, p, num_experts, CHUNK=_CHUNK, PDL=pdl, num_warps=4,
               **launch_options(pdl))
        launch(_place_kernel, (programs,), ids, sorted_ids, expert_ids, num_padded, rank, counts, p, num_experts,
               max_blocks, E_POW2=e_pow2, BLOCK_M=block_m, CHUNK=_CHUNK, TAIL=512, PDL=pdl, num_warps=4,
               **launch_options(pdl))
    return sorted_ids, expert_ids, num_padded
