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

With X extra rows (the decode kernel's 144-row blocks: B = 128, X = 16), an expert's blocks hold B pairs each but
its last, which holds up to B + X: an expert of n pairs takes max(1, ceil((n - X) / B)) blocks of M = B + X rows,
their last X rows padding but in the last one. So an expert of a few rows past a multiple of B gets no block of
its own for them (which would read and dequantize its weights again), and only the last block multiplies more
than B rows (NOTES.md v86). There max_blocks = ceil((P + min(E, P) * (B - 1)) / B).

Each pair takes the next row of its expert from an atomic counter per expert (O(P) work), so the order of an
expert's pairs within its rows is not fixed; nothing depends on it (each row of a GEMM is computed alone).
For few pairs one program does everything (one launch, every pair in its registers). Above, since one SM's
atomics bound the one program, programs share the pairs: with a workspace of the caller's (`align_workspace`,
one per layer) they meet at a grid-wide barrier inside one launch; without one, or in the interpreter, a grid
counts and then places them (a clear of the counters and two launches).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from wna16moe.kernels.grid_dependence import enter_dependent, launch_options
from wna16moe.kernels.launch import launch, scratch

# One program while pairs <= 4096 and pairs x experts <= 2^17; above, with a workspace, the cooperative programs
# (at most COOPERATIVE_MAX_PROGRAMS of COOPERATIVE_CHUNK pairs, all resident at once), else the grid. As graph
# replays on the H200 (bench_align.py, NOTES.md v75), µs, one program / cooperative / grid: 1024 pairs of 128
# experts 4.3 / 4.7 / 6.6, 2048 of 128 5.9 / 4.5 / 6.4, 4096 of 128 9.8 / 4.8 / 6.9, 1024 of 384 7.8 / 6.0 / 7.1,
# 16384 of 128 - / 8.5 / 10.2, 4096 of 8 4.7 / 4.8 / 6.8. The one program's time grows with the pairs (one SM's
# atomics) and with the experts.
SINGLE_PROGRAM_MAX_PAIRS = 4096
SINGLE_PROGRAM_MAX_WORK = 1 << 17
ONE_PROGRAM_LIMIT = 8192  # pairs one program holds in registers at all (8 warps, 32 per thread)
COOPERATIVE_MAX_PROGRAMS = 64
COOPERATIVE_CHUNK = 512
_CHUNK = 1024  # pairs per program of the grid
_BLOCK_CHUNK = 64  # M blocks per program of the grid


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
def _put_pairs(sorted_ids_ptr, starts, ends, ids, keep, rank, offs, BLOCK_M: tl.constexpr, EXTRA: tl.constexpr):
    """Each kept pair's index (`offs`) goes to its expert's first row plus its rank (with EXTRA rows, plus EXTRA
    padding rows per block before its own: blocks of BLOCK_M - EXTRA pairs but the expert's last)."""
    expert = tl.where(keep, ids, 0)
    row = tl.gather(starts, expert, axis=0) + rank
    if EXTRA:
        blocks = tl.gather((ends - starts) // BLOCK_M, expert, axis=0)
        row += tl.minimum(rank // (BLOCK_M - EXTRA), blocks - 1) * EXTRA
    tl.store(sorted_ids_ptr + row, offs.to(tl.int32), mask=keep)


@triton.jit
def _place_pairs(topk_ids_ptr, rank_ptr, sorted_ids_ptr, starts, ends, offs, P, E, BLOCK_M: tl.constexpr,
                 EXTRA: tl.constexpr):
    """`_put_pairs` for the pairs `offs`, their ranks read from `rank_ptr`."""
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    _put_pairs(sorted_ids_ptr, starts, ends, ids, keep, tl.load(rank_ptr + offs, mask=keep, other=0), offs, BLOCK_M,
               EXTRA)


@triton.jit
def _fill_blocks(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, blocks, P, max_blocks, E_POW2: tl.constexpr,
                 LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M_POW2: tl.constexpr, EXTRA: tl.constexpr):
    """The expert of each block in `blocks` (-1 past the used rows), and P in the block's rows no pair takes."""
    first_row = blocks * BLOCK_M
    total = tl.max(ends, axis=0)
    # The block's expert: how many experts' padded ranges end at or before its first row (a binary search
    # over the non-decreasing `ends`).
    expert = tl.zeros_like(blocks)
    for step in tl.static_range(LOG2_E):
        probe = expert + (E_POW2 >> (step + 1))
        expert = tl.where(tl.gather(ends, probe - 1, axis=0) <= first_row, probe, expert)
    used = first_row < total
    in_range = blocks < max_blocks
    tl.store(expert_ids_ptr + blocks, tl.where(used, expert, -1), mask=in_range)
    offs = tl.arange(0, BLOCK_M_POW2)  # (MARLIN's blocks may be 48 rows)
    if EXTRA:  # the block's pairs: BLOCK_M - EXTRA but in the expert's last block
        start = tl.gather(starts, expert, axis=0)
        expert_blocks = (tl.gather(ends, expert, axis=0) - start) // BLOCK_M
        index = (first_row - start) // BLOCK_M
        last = tl.gather(counts, expert, axis=0) - (expert_blocks - 1) * (BLOCK_M - EXTRA)
        pairs = tl.where(used, tl.where(index < expert_blocks - 1, BLOCK_M - EXTRA, last), 0)
        padding = (offs[None, :] >= pairs[:, None]) & in_range[:, None] & (offs < BLOCK_M)[None, :]
    else:
        # Past the used rows the search ends at an expert whose pairs all lie before: every row is padding there.
        pairs_end = tl.gather(starts + counts, expert, axis=0)  # the row after the expert's last pair
        padding = ((first_row[:, None] + offs[None, :] >= pairs_end[:, None]) & in_range[:, None]
                   & (offs < BLOCK_M)[None, :])
    rows = first_row[:, None] + offs[None, :]
    tl.store(sorted_ids_ptr + rows, tl.zeros_like(rows) + P, mask=padding)


@triton.jit
def _block_ranges(counts, BLOCK_M: tl.constexpr, EXTRA: tl.constexpr):
    """Each expert's first row and the row after its blocks: ceil(n / BLOCK_M) blocks of BLOCK_M rows for n pairs,
    with EXTRA max(1, ceil((n - EXTRA) / (BLOCK_M - EXTRA))) (none for no pair)."""
    base: tl.constexpr = BLOCK_M - EXTRA
    blocks = (counts - EXTRA + base - 1) // base
    if EXTRA:
        blocks = tl.where(counts > 0, tl.maximum(blocks, 1), 0)
    padded = blocks * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    return ends - padded, ends


@triton.jit
def _align_one_program(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, counts_ptr, P, E, max_blocks,
                       E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, EXTRA: tl.constexpr, PAIRS: tl.constexpr,
                       TAIL: tl.constexpr, PDL: tl.constexpr):
    """Every pair in registers at once, its rank from an atomic counter per expert: the ids are read once and the
    ranks never leave registers. (`tl.histogram` for the counts cost O(pairs x experts), 9.4 µs at 1024 pairs of
    384 experts on the H200, against one read of the counters here; NOTES.md v75.)"""
    enter_dependent(PDL)  # (kernels/grid_dependence.py; with PDL 1 the next kernel launches as this one exits)
    experts = tl.arange(0, E_POW2)
    # One SM's atomics to distinct addresses bound this kernel (~2.4 ns a pair at 128 experts, NOTES.md v75), so
    # only the ranks are atomics: the counters are cleared by stores and read back by loads that skip L1 (the
    # atomics update L2); the CTA barriers order both against the atomics.
    tl.store(counts_ptr + experts, tl.zeros_like(experts))
    offs = tl.arange(0, PAIRS)
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    tl.debug_barrier()
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=keep, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    counts = tl.load(counts_ptr + experts, volatile=True)
    starts, ends = _block_ranges(counts, BLOCK_M, EXTRA)
    used = tl.max(ends, axis=0)
    tl.store(num_padded_ptr, used)
    _put_pairs(sorted_ids_ptr, starts, ends, ids, keep, rank, offs, BLOCK_M, EXTRA)
    # The blocks and padding rows written per expert, not searched per block as the grid does (`_fill_blocks`):
    # one program has few pairs, so an expert's padding loop is short next to a search per block.
    first_block = starts // BLOCK_M
    blocks = ends // BLOCK_M - first_block
    pairs_end = starts + counts + tl.maximum(blocks - 1, 0) * EXTRA  # (the row after its last pair)
    for j in range(0, BLOCK_M - 1):  # an expert's padding rows past its last pair: fewer than BLOCK_M
        tl.store(sorted_ids_ptr + pairs_end + j, tl.zeros_like(experts) + P, mask=pairs_end + j < ends)
    if EXTRA:  # and the last EXTRA rows of its blocks but the last
        for block in range(0, tl.max(blocks, axis=0) - 1):
            for j in range(BLOCK_M - EXTRA, BLOCK_M):
                tl.store(sorted_ids_ptr + starts + block * BLOCK_M + j, tl.zeros_like(experts) + P,
                         mask=block < blocks - 1)
    for j in range(0, tl.max(blocks, axis=0)):
        tl.store(expert_ids_ptr + first_block + j, experts, mask=j < blocks)
    tail = tl.arange(0, TAIL)
    for row in range(used, max_blocks * BLOCK_M, TAIL):  # past the used rows: padding, in no block
        tl.store(sorted_ids_ptr + row + tail, tl.zeros_like(tail) + P, mask=row + tail < max_blocks * BLOCK_M)
    for block in range(used // BLOCK_M, max_blocks, TAIL):
        tl.store(expert_ids_ptr + block + tail, tl.zeros_like(tail) - 1, mask=block + tail < max_blocks)


@triton.jit
def _count_kernel(topk_ids_ptr, rank_ptr, counts_ptr, P, E, CHUNK: tl.constexpr, PDL: tl.constexpr):
    enter_dependent(PDL)
    _rank_pairs(topk_ids_ptr, rank_ptr, counts_ptr, tl.program_id(0) * CHUNK + tl.arange(0, CHUNK), P, E)


@triton.jit
def _place_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, rank_ptr, counts_ptr, P, E, max_blocks,
                  E_POW2: tl.constexpr, LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M_POW2: tl.constexpr,
                  EXTRA: tl.constexpr, CHUNK: tl.constexpr, BLOCK_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program i places the pairs of chunk i and fills the blocks of block chunk i (the counts are final)."""
    enter_dependent(PDL)
    pid = tl.program_id(0)
    counts = tl.load(counts_ptr + tl.arange(0, E_POW2))
    starts, ends = _block_ranges(counts, BLOCK_M, EXTRA)
    if pid == 0:
        tl.store(num_padded_ptr, tl.max(ends, axis=0))
    _place_pairs(topk_ids_ptr, rank_ptr, sorted_ids_ptr, starts, ends, pid * CHUNK + tl.arange(0, CHUNK), P, E,
                 BLOCK_M, EXTRA)
    _fill_blocks(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, pid * BLOCK_CHUNK + tl.arange(0, BLOCK_CHUNK),
                 P, max_blocks, E_POW2, LOG2_E, BLOCK_M, BLOCK_M_POW2, EXTRA)


@triton.jit
def _align_programs(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, work_ptr, P, E, max_blocks,
                    E_POW2: tl.constexpr, LOG2_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M_POW2: tl.constexpr,
                    EXTRA: tl.constexpr, CHUNK: tl.constexpr, BLOCK_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """The grid's count and place in one launch: program i ranks the pairs of chunk i, the programs meet at a
    grid-wide barrier, then each places its own pairs (their ranks still in registers) and fills block chunks
    i, i + programs, ... `work_ptr`: int32 [E_POW2 + 2], the counters, then the arrivals at the barrier and the
    departures; zero at entry, and the last program to leave zeroes it again. The barrier needs every program
    resident at once (a few, each small) and a GPU: the interpreter runs programs one after another."""
    enter_dependent(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids, keep = _pair_experts(topk_ids_ptr, offs, P, E)
    rank = tl.atomic_add(work_ptr + ids, 1, mask=keep, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # (every thread's ranks taken before the release below)
    tl.atomic_add(work_ptr + E_POW2, 1, sem="release", scope="gpu")
    while tl.atomic_add(work_ptr + E_POW2, 0, sem="acquire", scope="gpu") < programs:
        pass
    tl.debug_barrier()
    experts = tl.arange(0, E_POW2)
    counts = tl.load(work_ptr + experts, volatile=True)
    starts, ends = _block_ranges(counts, BLOCK_M, EXTRA)
    if pid == 0:
        tl.store(num_padded_ptr, tl.max(ends, axis=0))
    _put_pairs(sorted_ids_ptr, starts, ends, ids, keep, rank, offs, BLOCK_M, EXTRA)
    for start in range(pid * BLOCK_CHUNK, max_blocks, programs * BLOCK_CHUNK):
        _fill_blocks(expert_ids_ptr, sorted_ids_ptr, counts, starts, ends, start + tl.arange(0, BLOCK_CHUNK), P,
                     max_blocks, E_POW2, LOG2_E, BLOCK_M, BLOCK_M_POW2, EXTRA)
    tl.debug_barrier()  # (every thread's counts read before this program leaves)
    if tl.atomic_add(work_ptr + E_POW2 + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
        tl.store(work_ptr + experts, tl.zeros_like(experts))
        tl.store(work_ptr + E_POW2 + tl.arange(0, 2), tl.zeros((2,), tl.int32))


def one_program(num_pairs: int, experts_pow2: int) -> bool:
    """Whether one program aligns `num_pairs` pairs over `experts_pow2` (a power of two) experts."""
    return num_pairs <= SINGLE_PROGRAM_MAX_PAIRS and num_pairs * experts_pow2 <= SINGLE_PROGRAM_MAX_WORK


def one_program_warps(num_pairs: int) -> int:
    """The one program's warps: at most 8 pairs per thread up to 1024 pairs, then 8 warps."""
    if num_pairs > ONE_PROGRAM_LIMIT:
        raise ValueError(f"one program aligns at most {ONE_PROGRAM_LIMIT} pairs, got {num_pairs}")
    return 4 if num_pairs <= 1024 else 8


def cooperative(num_pairs: int, device: torch.device) -> bool:
    """Whether programs that meet at a grid-wide barrier align `num_pairs` pairs on `device`: an NVIDIA GPU (not
    the interpreter, which runs programs one after another) and few enough programs to be resident at once."""
    return (device.type == "cuda" and torch.version.cuda is not None and os.environ.get("TRITON_INTERPRET") != "1"
            and num_pairs <= COOPERATIVE_MAX_PROGRAMS * COOPERATIVE_CHUNK)


def alignment_path(num_pairs: int, num_experts: int, device: torch.device, workspace: bool) -> str:
    """Which kernel aligns `num_pairs` pairs over `num_experts` experts on `device`: "one program", "cooperative"
    (only with a workspace) or "grid"."""
    if one_program(num_pairs, triton.next_power_of_2(num_experts)):
        return "one program"
    return "cooperative" if workspace and cooperative(num_pairs, device) else "grid"


def align_workspace(num_experts: int, device: torch.device) -> torch.Tensor:
    """The cooperative path's counters and barrier counts for `num_experts` experts: zero, and left zero by every
    alignment that uses it. One per layer: alignments that share it must run one after another (one stream)."""
    return torch.zeros(triton.next_power_of_2(num_experts) + 2, dtype=torch.int32, device=device)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int, extra_rows: int = 0) -> int:
    """The rows of the most blocks `num_pairs` pairs can take (module docstring)."""
    base = block_m - extra_rows
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (base - 1), base) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int, pdl: int = 0,
                         workspace: torch.Tensor | None = None, extra_rows: int = 0,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group routed pairs by expert, padded to `block_m` rows per expert.

    Parameters
    ----------
    topk_ids : [T, K] int32 expert ids in [0, num_experts), or -1 for a pair to leave out (as is any other id).
    num_experts : E.
    block_m : rows per GEMM block.
    pdl : launch as programmatic dependents, not 0 (CUDA sm90+ only; kernels/grid_dependence.py; they release
        the next kernel as they exit).
    workspace : `align_workspace(E', ...)` for some E' >= num_experts, zero: allows the cooperative path
        (`cooperative`), which leaves it zero.
    extra_rows : rows an expert's last block holds past the others' `block_m - extra_rows` pairs (module
        docstring), fewer than those; 0: every block holds up to `block_m`.

    Returns
    -------
    sorted_ids [max_padded] int32, expert_ids [max_padded // block_m] int32, num_padded [1] int32
    (see the module docstring).
    """
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    p = ids.numel()
    if not 0 <= extra_rows < block_m - extra_rows:
        raise ValueError(f"extra_rows must be at least 0 and fewer than block_m - extra_rows, got {extra_rows} "
                         f"with block_m={block_m}")
    max_padded = max_padded_rows(p, num_experts, block_m, extra_rows)
    max_blocks = max_padded // block_m
    device = ids.device
    sorted_ids = scratch((max_padded,), torch.int32, device)
    expert_ids = scratch((max_blocks,), torch.int32, device)
    num_padded = scratch((1,), torch.int32, device)
    e_pow2 = triton.next_power_of_2(num_experts)
    if workspace is not None and (workspace.dtype != torch.int32 or workspace.numel() < e_pow2 + 2
                                  or workspace.device != device):
        raise ValueError(f"workspace must be align_workspace(num_experts >= {num_experts}) on {device}, got "
                         f"{workspace.dtype} [{workspace.numel()}] on {workspace.device}")
    path = alignment_path(p, num_experts, device, workspace is not None)
    if path == "one program":
        counts = scratch((e_pow2,), torch.int32, device)
        warps = one_program_warps(p)
        launch(_align_one_program, (1,), ids, sorted_ids, expert_ids, num_padded, counts, p, num_experts, max_blocks,
               E_POW2=e_pow2, BLOCK_M=block_m, EXTRA=extra_rows, PAIRS=triton.next_power_of_2(max(p, 1)),
               TAIL=128 * warps, PDL=pdl, num_warps=warps, **launch_options(pdl))
    elif path == "cooperative":
        launch(_align_programs, (triton.cdiv(p, COOPERATIVE_CHUNK),), ids, sorted_ids, expert_ids, num_padded,
               workspace, p, num_experts, max_blocks, E_POW2=e_pow2, LOG2_E=e_pow2.bit_length() - 1, BLOCK_M=block_m,
               BLOCK_M_POW2=triton.next_power_of_2(block_m), EXTRA=extra_rows, CHUNK=COOPERATIVE_CHUNK,
               BLOCK_CHUNK=_BLOCK_CHUNK, PDL=pdl, num_warps=4, **launch_options(pdl))
    else:
        rank = scratch((max(p, 1),), torch.int32, device)
        counts = scratch((e_pow2,), torch.int32, device, zeroed=True)
        launch(_count_kernel, (triton.cdiv(p, _CHUNK),), ids, rank, counts, p, num_experts, CHUNK=_CHUNK, PDL=pdl,
               num_warps=4, **launch_options(pdl))
        programs = max(triton.cdiv(p, _CHUNK), triton.cdiv(max_blocks, _BLOCK_CHUNK))
        launch(_place_kernel, (programs,), ids, sorted_ids, expert_ids, num_padded, rank, counts, p, num_experts,
               max_blocks, E_POW2=e_pow2, LOG2_E=e_pow2.bit_length() - 1, BLOCK_M=block_m,
               BLOCK_M_POW2=triton.next_power_of_2(block_m), EXTRA=extra_rows, CHUNK=_CHUNK, BLOCK_CHUNK=_BLOCK_CHUNK,
               PDL=pdl, num_warps=4, **launch_options(pdl))
    return sorted_ids, expert_ids, num_padded
