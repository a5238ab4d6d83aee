"""Gated activations in Triton, and the activation pass after a K-split GEMM1.

`gated_activation` is the element-wise act(gate, up) that GEMM1 applies in its epilogue
(kernels/moe_gemm.py). When GEMM1 splits its reduction over S programs (decode: too few experts x N tiles to
fill the GPU), it writes float32 partial sums instead, and `split_k_activation` finishes them:

    partials [S, P, 2N] float32   gate sums in columns [0, N), up sums in [N, 2N), one slice per split
    out[p, n] = act(sum_s partials[s, p, n] + bias[e_p, n], sum_s partials[s, p, N + n] + bias[e_p, N + n])

with e_p the expert of pair p. Pairs left out (expert -1) are skipped: GEMM1 wrote no partials for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wna16moe.activations import KERNEL_CODES
from wna16moe.config import Activation
from wna16moe.kernels.grid_dependence import enter_dependent, launch_options, leave_main_loop
from wna16moe.kernels.launch import launch

ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU_OAI = (
    KERNEL_CODES[a] for a in (Activation.SILU, Activation.GELU, Activation.GELU_TANH, Activation.SWIGLU_OAI))
# Kernels may read module globals only when they are constexpr objects.
_SILU, _GELU, _GELU_TANH = tl.constexpr(ACT_SILU), tl.constexpr(ACT_GELU), tl.constexpr(ACT_GELU_TANH)


@triton.jit
def gated_activation(gate, up, alpha, beta, limit, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr):
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACT == _SILU:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == _GELU:  # exact
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    elif ACT == _GELU_TANH:  # tanh(x) = 2 * sigmoid(2x) - 1
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner)) * up
    else:  # gpt-oss SwiGLU
        out = gate * tl.sigmoid(alpha * gate) * (up + beta)
    return out


@triton.jit
def _split_k_activation_kernel(
    part_ptr,  # (S, P, 2N) float32
    expert_ptr,  # (P,) int32 expert of each pair, -1: left out
    bias_ptr,  # (E, 2N) float32 (HAS_BIAS)
    out_ptr,  # (P, N) activation dtype
    N,
    P,
    E,  # the bias's rows: a pair of an expert past them is left out, as of -1 (GEMM2 skips it too)
    stride_om,
    alpha,
    beta,
    limit,
    SPLITS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    enter_dependent(PDL)  # (kernels/grid_dependence.py)
    pair = tl.program_id(0)
    expert = tl.load(expert_ptr + pair)
    if (expert < 0) | (expert >= E):
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    row = part_ptr + pair.to(tl.int64) * 2 * N + cols
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        gate += tl.load(row + s * P * 2 * N, mask=mask, other=0.0)
        up += tl.load(row + s * P * 2 * N + N, mask=mask, other=0.0)
    if HAS_BIAS:
        bias = bias_ptr + expert.to(tl.int64) * 2 * N + cols
        gate += tl.load(bias, mask=mask, other=0.0)
        up += tl.load(bias + N, mask=mask, other=0.0)
    leave_main_loop(PDL)
    h = gated_activation(gate, up, alpha, beta, limit, ACT, HAS_LIMIT)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_activation(partials: torch.Tensor, topk_ids: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                       *, act: int = ACT_SILU, alpha: float = 1.0, beta: float = 0.0,
                       limit: float | None = None, pdl: int = 0) -> torch.Tensor:
    """out [P, N] = act of the summed GEMM1 partials [S, P, 2N] (see the module docstring).

    topk_ids: [T, K] or [P] expert of each pair (-1: left out); bias: [E, 2N] float32 or None; pdl: as for
    `moe_gemm`, or 3: the next kernel (GEMM2) may launch before this one waits (kernels/grid_dependence.py).
    """
    splits, num_pairs, two_n = partials.shape
    n = two_n // 2
    if partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(f"partials must be contiguous float32 [S, P, 2N], got {partials.dtype} {list(partials.shape)}")
    if out.shape != (num_pairs, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{num_pairs}, {n}] with unit column stride, got {list(out.shape)}")
    ids = topk_ids.reshape(-1)
    if ids.numel() != num_pairs:
        raise ValueError(f"topk_ids has {ids.numel()} pairs, partials {num_pairs}")
    if num_pairs == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    launch(_split_k_activation_kernel, (num_pairs, triton.cdiv(n, block)),
        partials, ids.to(torch.int32), bias if bias is not None else partials, out, n, num_pairs,
        bias.shape[0] if bias is not None else 1 << 30, out.stride(0),
        alpha, beta, 0.0 if limit is None else limit,
        SPLITS=splits, ACT=act, HAS_LIMIT=limit is not None, HAS_BIAS=bias is not None, BLOCK=block, PDL=pdl,
        num_warps=4, **launch_options(pdl))
    return out
