"""Row blocks straight from topk_ids, without an alignment pass, for at most BLOCK_M tokens: how both grouped GEMM
kernels (`moe_gemm`, `moe_gemm_decode`) run small decode batches in one launch fewer.

Block b belongs to pair b's expert. Row j of the block holds token j's pair routed to that expert (a token names
an expert at most once in real routing; a token that names it twice sends its n-th such pair to the block of the
expert's n-th pairs). Only the block of the expert's first pair in token order works; the others are idle. So
every pair lands in exactly one working block, with the rows of its expert's other tokens, as an aligned block
would hold them (token order instead of pair order, padding rows in between)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_block_rows(ids_ptr, block, expert, P, r, TOP_K: tl.constexpr):
    """(rows, first): the pair in row r (0 .. ROWS - 1 in the caller's layout, ROWS >= P / TOP_K tokens) of
    block `block`, whose expert is `expert` = ids[block] >= 0, or P where token r has none; first: whether this is
    the block that works (see the module docstring)."""
    token_b = block // TOP_K
    # (0 unless token_b names the expert more than once before pair `block`)
    nth = 0
    for s in tl.static_range(TOP_K):
        nth += ((s < block % TOP_K) & (tl.load(ids_ptr + token_b * TOP_K + s) == expert)).to(tl.int32)
    seen = r * 0
    slot = seen - 1
    for s in tl.static_range(TOP_K):
        hit = tl.load(ids_ptr + r * TOP_K + s, mask=r < P // TOP_K, other=-1) == expert
        slot = tl.where(hit & (seen == nth), s, slot)
        seen += hit.to(tl.int32)
    has = slot >= 0
    first = tl.sum((has & (r < token_b)).to(tl.int32), axis=0) == 0
    return tl.where(has, r * TOP_K + slot, P), first
