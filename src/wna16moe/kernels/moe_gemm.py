"""Grouped MoE GEMM with int4/int8 weights dequantized in registers, fp32 accumulation.

Legend: T tokens, K top-k, P = T * K routed pairs, E experts, N output features, KD reduction dim (H for
GEMM1, I for GEMM2), G groups, PACK = 32 // bits codes per int32 word.

Rows are the pairs of `moe_align_block_size`, one expert per BLOCK_M block. Weights are N-major with the
reduction dim packed: w[e, n, kd // PACK] holds codes of kd = PACK * word + slot, slot j in bits
[j * bits, (j + 1) * bits). Each K tile lies inside one quantization group (BLOCK_K divides the group size),
so the scale multiplies the tile's dot product instead of every weight: out += (a @ (q - z)^T) * s.

GEMM1 (GATED): a = hidden_states [T, H]; the program computes a gate tile (rows n) and the matching up tile
(rows n + N) and writes act(gate, up) to intermediate [P, N] in the activation dtype.
GEMM2: a = intermediate [P, I]; the program multiplies by the pair's router weight and atomically adds into
out [T, N] float32, which reduces the top-k contributions of each token (summation order is not fixed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU_OAI = 0, 1, 2, 3


@triton.jit
def _load_codes(w_ptrs, mask, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words [BLOCK_N, BLOCK_K // PACK] -> unsigned codes [BLOCK_N, BLOCK_K] int32."""
    PACK: tl.constexpr = 32 // BITS
    words = tl.load(w_ptrs, mask=mask, other=0)
    shifts = tl.arange(0, PACK) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _activation(gate, up, alpha, beta, limit, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr):
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACT == 0:  # SiLU
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:  # exact GELU
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:  # tanh GELU; tanh(x) = 2 * sigmoid(2x) - 1
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner)) * up
    else:  # gpt-oss SwiGLU
        out = gate * tl.sigmoid(alpha * gate) * (up + beta)
    return out


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # (A_rows, KD) activations: hidden_states [T, H] (GATED) or intermediate [P, I]
    a_perm_ptr,  # (E, KD) int32 act-order column permutation of A per expert (HAS_PERM)
    w_ptr,  # (E, N_total, KD // PACK) int32 packed codes
    s_ptr,  # (E, G, N_total) scales
    z_ptr,  # (E, G, N_total) uint8 zero points (HAS_ZP)
    bias_ptr,  # (E, N_total) float32 (HAS_BIAS)
    out_ptr,  # GATED: (P, N) activation dtype; else (T, N) float32, accumulated atomically
    topk_w_ptr,  # (P,) float32 router weights (not GATED)
    sorted_ids_ptr,  # (max_padded,) int32 pair of each row, P for padding
    expert_ids_ptr,  # (max_blocks,) int32 expert of each BLOCK_M block
    num_padded_ptr,  # (1,) int32 rows in use
    N,
    KD,
    P,
    num_m_blocks,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sg,
    stride_om,
    group_size,
    alpha,
    beta,
    limit,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BITS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks
    pid_k = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + offs_m)
    row_mask = rows < P
    if GATED:
        a_rows = rows // TOP_K
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tiles = tl.cdiv(KD, BLOCK_K)
    tiles_per_split = tl.cdiv(tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(KD, k_begin + tiles_per_split * BLOCK_K)

    a_row_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        if HAS_PERM:
            cols = tl.load(a_perm_ptr + expert * KD + offs_k, mask=k_mask, other=0)
        else:
            cols = offs_k
        a = tl.load(a_row_ptrs + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        offs_words = k // PACK + tl.arange(0, BLOCK_K // PACK)
        w_mask = n_mask[:, None] & (offs_words < tl.cdiv(KD, PACK))[None, :]
        w_ptrs = w_base + offs_n[:, None] * stride_wn + offs_words[None, :]
        group = k // group_size
        s = tl.load(s_base + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_base + group * stride_sg + offs_n, mask=n_mask, other=0).to(tl.int32)
        else:
            z = 1 << (BITS - 1)
        q = _load_codes(w_ptrs, w_mask, BITS, BLOCK_N, BLOCK_K)
        if HAS_ZP:
            wq = (q - z[:, None]).to(a.dtype)
        else:
            wq = (q - z).to(a.dtype)
        acc += tl.dot(a, tl.trans(wq)) * s[None, :]
        if GATED:
            s_up = tl.load(s_base + group * stride_sg + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            q_up = _load_codes(w_ptrs + N * stride_wn, w_mask, BITS, BLOCK_N, BLOCK_K)
            if HAS_ZP:
                z_up = tl.load(z_base + group * stride_sg + N + offs_n, mask=n_mask, other=0).to(tl.int32)
                wq_up = (q_up - z_up[:, None]).to(a.dtype)
            else:
                wq_up = (q_up - z).to(a.dtype)
            acc_up += tl.dot(a, tl.trans(wq_up)) * s_up[None, :]

    out_mask = row_mask[:, None] & n_mask[None, :]
    if GATED:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * 2 * N + offs_n, mask=n_mask, other=0.0)[None, :]
            acc_up += tl.load(bias_ptr + expert * 2 * N + N + offs_n, mask=n_mask, other=0.0)[None, :]
        h = _activation(acc, acc_up, alpha, beta, limit, ACT, HAS_LIMIT)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + expert * N + offs_n, mask=n_mask, other=0.0)[None, :]
        router_w = tl.load(topk_w_ptr + rows, mask=row_mask, other=0.0)
        acc = acc * router_w[:, None]
        tokens = rows // TOP_K
        out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    a_perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    top_k: int,
    gated: bool,
    act: int = ACT_SILU,
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Launch one grouped GEMM (see the module docstring for the math and layouts).

    Parameters
    ----------
    a : GEMM1 hidden_states [T, H]; GEMM2 intermediate [P, I]. bfloat16 or float16, row-major.
    w : [E, N_total, KD // PACK] int32, N_total = 2N for GEMM1 (gate rows, then up rows), N for GEMM2.
    scales : [E, G, N_total]; zeros : [E, G, N_total] uint8 or None (symmetric: zero 2**(bits - 1)).
    a_perm : [E, KD] int32 act-order column order of `a`, or None.
    bias : [E, N_total] float32 or None.
    out : GEMM1 [P, N] in a's dtype; GEMM2 [T, N] float32, pre-filled (accumulated into).
    topk_weights : [P] float32 router weights (GEMM2).
    group_size : elements per group, a multiple of block_k (channel-wise: any multiple of block_k >= KD).
    """
    n_total = w.shape[1]
    n = n_total // 2 if gated else n_total
    kd = a.shape[1]
    if group_size % block_k:
        raise ValueError(f"block_k={block_k} must divide group_size={group_size}")
    if gated and split_k != 1:
        raise ValueError("the gated GEMM1 cannot split K: its activation needs the full sum")
    if zeros is not None and (zeros.shape != scales.shape or zeros.stride() != scales.stride()):
        raise ValueError(f"zeros {list(zeros.shape)} must match scales {list(scales.shape)} in shape and strides")
    # P: GEMM1 writes one row per routed pair, GEMM2 reads one.
    num_pairs = out.shape[0] if gated else a.shape[0]
    num_m_blocks = expert_ids.shape[0]
    grid = (num_m_blocks * triton.cdiv(n, block_n), split_k)
    _moe_gemm_kernel[grid](
        a, a_perm if a_perm is not None else a, w, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, out, topk_weights if topk_weights is not None else scales,
        sorted_ids, expert_ids, num_padded,
        n, kd, num_pairs, num_m_blocks,
        a.stride(0), w.stride(0), w.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        group_size, alpha, beta, 0.0 if limit is None else limit,
        TOP_K=top_k, GATED=gated, ACT=act, HAS_LIMIT=limit is not None, BITS=bits, HAS_ZP=zeros is not None,
        HAS_PERM=a_perm is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out

