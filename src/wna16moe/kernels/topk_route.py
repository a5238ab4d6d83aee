"""Routing in one launch: router logits [T, E] -> top-k weights [T, K] float32 and expert ids [T, K] int32, the
math of `routing.py` (softmax or sigmoid scores, DeepSeek-V3's expert groups and correction bias,
renormalization, the scaling factor). torch needs five to a dozen launches for it: 21-74 µs at one token as a
graph replay on an H200, more than qwen3-30b-a3b's whole layer; this kernel takes 5-7 µs (benchmarks/NOTES.md
v49).

Each program, one warp, routes one token, its E logits in registers: the ~30 dependent reductions of a routing
stay shuffles within the warp (16 tokens x 256 experts over 4 warps, a barrier per reduction, ran 45 µs at
deepseek-v3 M = 32). A choice is one max-reduction: the ordering key's float32 bits mapped to an
order-preserving int32, shifted up 32 bits, with BLOCK_E - 1 - index below it, so the largest packed value is
the largest key at the lowest index (the tie rule of `routing.py`). Chosen and padding experts drop to the
int64 minimum; NaN keys rank as -inf, so the ids are always distinct and in range (the weights carry the NaN
on).

As a programmatic dependent it waits for the router's logits, but does not let the layer's first kernel launch
early: that GEMM's programs, parked beside it, then ran 23% slower at qwen3-30b-a3b M = 8 (GEMM1 27.3 -> 33.9
µs; launched after it, level with a forward from routed ids; level at M = 1; benchmarks/NOTES.md v50).
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options
from wna16moe.kernels.launch import PlanCache, launch, layout_key, scratch

_INT64_MIN = tl.constexpr(-(2**63))
_PLANS = PlanCache()


@triton.jit
def _packed(key, index, LOW: tl.constexpr):
    """Order-preserving int64 of (key, -index): key's float32 bits as a monotone int32 in the high half."""
    key = tl.where(key == key, key, float("-inf"))
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (LOW - index).to(tl.int64)


@triton.jit
def _unpacked_key(packed):
    ordered = (packed >> 32).to(tl.int32)
    return tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _topk_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, group_size, stride_t, scale,
    TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TILES: tl.constexpr, PDL: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if PDL:  # the logits are the previous kernel's output (the next kernel launches as this one ends)
        await_prior_grids()
    row_ptr = logits_ptr + tl.program_id(0).to(tl.int64) * stride_t
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(row_ptr + experts, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        peak = tl.max(logits, axis=0)
        denominator = tl.sum(tl.exp(logits - peak), axis=0)
    # Softmax and sigmoid keep the logits' order: the logits themselves rank the experts, unless a bias or a
    # group's score (a sum of two scores) needs the scores.
    KEY_IS_SCORE: tl.constexpr = HAS_BIAS or N_GROUP > 1
    if KEY_IS_SCORE:
        key = tl.exp(logits - peak) / denominator if SOFTMAX else tl.sigmoid(logits)
        if HAS_BIAS:
            key += tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
    else:
        key = logits
    packed = tl.where(valid, _packed(key, experts, BLOCK_E - 1), _INT64_MIN)
    if N_GROUP > 1:
        # A group's score: the sum of its two largest keys (its only key for groups of one).
        group_of = experts // group_size
        groups = tl.arange(0, BLOCK_G)
        if GROUP_TILES:  # the groups as the rows of a [N_GROUP, E / N_GROUP] tile: two reductions in all
            tiles = tl.reshape(packed, [BLOCK_G, BLOCK_E // BLOCK_G])
            first = tl.max(tiles, axis=1)
            second = tl.max(tl.where(tiles == first[:, None], _INT64_MIN, tiles), axis=1)
            score = _unpacked_key(first) + tl.where(group_size > 1, _unpacked_key(second), 0.0)
            group_packed = _packed(score, groups, BLOCK_G - 1)
        else:  # two reductions per group
            group_packed = tl.full([BLOCK_G], _INT64_MIN, tl.int64)
            for g in tl.static_range(N_GROUP):
                member = group_of == g
                first = tl.max(tl.where(member, packed, _INT64_MIN), axis=0)
                second = tl.max(tl.where(member & (packed != first), packed, _INT64_MIN), axis=0)
                score = _unpacked_key(first) + tl.where(group_size > 1, _unpacked_key(second), 0.0)
                group_packed = tl.where(groups == g, _packed(score, tl.full([], g, tl.int32), BLOCK_G - 1),
                                        group_packed)
        eligible = tl.zeros([BLOCK_E], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_packed, axis=0)
            chosen = BLOCK_G - 1 - (best & 0xFFFFFFFF).to(tl.int32)
            eligible = eligible | (group_of == chosen)
            group_packed = tl.where(groups == chosen, _INT64_MIN, group_packed)
        packed = tl.where(eligible, packed, _INT64_MIN)
    slots = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(packed, axis=0)
        chosen = BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        ids = tl.where(slots == j, chosen, ids)
        packed = tl.where(experts == chosen, _INT64_MIN, packed)
    out_mask = slots < TOP_K
    chosen_logits = tl.load(row_ptr + ids, mask=out_mask, other=0.0).to(tl.float32)
    if SOFTMAX:
        weights = tl.exp(chosen_logits - peak) / denominator
    else:
        weights = tl.sigmoid(chosen_logits)
    weights = tl.where(out_mask, weights, 0.0)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    out_offs = tl.program_id(0).to(tl.int64) * TOP_K + slots
    tl.store(weights_ptr + out_offs, weights * scale, mask=out_mask)
    tl.store(ids_ptr + out_offs, ids, mask=out_mask)


def topk_route(logits: torch.Tensor, top_k: int, softmax: bool, renormalize: bool = False, n_group: int = 1,
               topk_group: int = 1, scale: float = 1.0, bias: torch.Tensor | None = None,
               pdl: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of logits [T, E] (any float dtype, unit stride along E) in one launch: scores softmax(logits)
    or sigmoid(logits); experts ranked by score + bias with `bias` [E] or groups (n_group > 1; only the
    topk_group groups of largest top-2 sums eligible), else by logit; weights = the chosen scores, divided by
    their sum with `renormalize`, times `scale`. -> (weights [T, K] float32, ids [T, K] int32). The caller
    checks shapes and settings (`routing.route`). pdl: launched as a programmatic dependent (CUDA sm90+). On a
    GPU, replayed from a launch plan after its first call per settings and input layout (kernels/launch.py)."""
    forward = partial(_topk_route, logits, top_k, softmax, renormalize, n_group, topk_group, scale, bias, pdl)
    if not logits.is_cuda or not logits.shape[0]:
        return forward()
    key = (top_k, softmax, renormalize, n_group, topk_group, scale, pdl, torch.cuda.current_device(),
           layout_key(logits, bias))
    return _PLANS.run(key, [logits] if bias is None else [logits, bias], forward)


def _topk_route(logits: torch.Tensor, top_k: int, softmax: bool, renormalize: bool, n_group: int, topk_group: int,
                scale: float, bias: torch.Tensor | None, pdl: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = scratch((t, top_k), torch.float32, logits.device)
    ids = scratch((t, top_k), torch.int32, logits.device)
    if t == 0:
        return weights, ids
    block_e, block_g = triton.next_power_of_2(e), triton.next_power_of_2(n_group)
    launch(
        _topk_route_kernel, (t,),
        logits, logits if bias is None else bias, weights, ids, e, e // n_group, logits.stride(0), scale,
        TOP_K=top_k, SOFTMAX=softmax, N_GROUP=n_group, TOPK_GROUP=topk_group, RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None, GROUP_TILES=block_e == e and block_g == n_group, PDL=pdl, BLOCK_E=block_e,
        BLOCK_G=block_g, BLOCK_K=triton.next_power_of_2(top_k), num_warps=1, **launch_options(pdl))
    return weights, ids
