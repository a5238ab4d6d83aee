"""Grouped MoE GEMM with int4/int8 weights dequantized in registers, fp32 accumulation.

Legend: T tokens, K top-k, P = T * K routed pairs, E experts, N output features, KD reduction dim (H for
GEMM1, I for GEMM2), G groups, PACK = 32 // bits codes per int32 word, R = BLOCK_K // PACK words per tile.

Rows are the pairs of `moe_align_block_size`, one expert per BLOCK_M block. Weights are K-major: w[e, r, n]
holds the codes of kd = PACK * r + j for slot j (bits [j * bits, (j + 1) * bits)), so a tile of R words x
BLOCK_N columns is one coalesced load along N. Each K tile lies inside one quantization group (BLOCK_K
divides the group size): the scale multiplies the tile's partial sum, not every weight.

Two inner products, chosen by USE_DOT:
- tensor cores: codes unpacked to [BLOCK_K, BLOCK_N], (q - z) in the activation dtype, `tl.dot`.
- CUDA cores, for few rows per expert (decode): slot j of every word is masked in place (no shift) and
  converted to float, which gives q * 2**(bits * j); the activations of slot j are pre-scaled by
  2**(-bits * j) to match. Products accumulate in a [BLOCK_M, R, BLOCK_N] register tile, reduced once at the
  end; the zero point enters as a correction z * s * sum(a) per tile.

GEMM1 (GATED): a = hidden_states [T, H]; the program computes a gate tile (columns n) and the matching up
tile (columns n + N) and writes act(gate, up) to intermediate [P, N] in the activation dtype.
GEMM2: a = intermediate [P, I]; the program multiplies by the pair's router weight and atomically adds into
out [T, N] float32, which reduces the top-k contributions of each token (summation order is not fixed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU_OAI = 0, 1, 2, 3


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
def _dot_tile(a, words, z, BITS: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] @ (codes - z) [BLOCK_K, BLOCK_N] on tensor cores, float32."""
    PACK: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PACK) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    if HAS_ZP:
        w = (codes - z[None, :]).to(a.dtype)
    else:
        w = (codes - z).to(a.dtype)
    return tl.dot(a, w)


@triton.jit
def _fma_tile(words, a_row_ptrs, row_mask, a_perm_ptr, k, k_end, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
              R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_k a[m, k] * q[k, n] kept per word row: [BLOCK_M, R, BLOCK_N] float32, and sum_k a[m, k] [BLOCK_M]."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    part = tl.zeros([BLOCK_M, R, BLOCK_N], dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in tl.static_range(PACK):
        offs = k + PACK * tl.arange(0, R) + j
        k_mask = offs < k_end
        if HAS_PERM:
            cols = tl.load(a_perm_ptr + offs, mask=k_mask, other=0)
        else:
            cols = offs
        a_j = tl.load(a_row_ptrs + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_j = a_j.to(tl.float32)
        a_sum += tl.sum(a_j, axis=1)
        if j == PACK - 1:  # the top slot: one shift (its in-place value would need the sign bit)
            w_j = ((words >> (BITS * j)) & MASK).to(tl.float32)
        else:
            w_j = (words & (MASK << (BITS * j))).to(tl.float32)
            a_j = a_j * (1.0 / (1 << (BITS * j)))
        part += a_j[:, :, None] * w_j[None, :, :]
    return part, a_sum


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # (A_rows, KD) activations: hidden_states [T, H] (GATED) or intermediate [P, I]
    a_perm_ptr,  # (E, KD) int32 act-order column permutation of A per expert (HAS_PERM)
    w_ptr,  # (E, KD // PACK, N_total) int32 packed codes, K-major
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
    stride_wk,
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
    USE_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    R: tl.constexpr = BLOCK_K // PACK
    # The CUDA-core path's per-word accumulators; a 1-element dummy on the tensor-core path.
    FM: tl.constexpr = 1 if USE_DOT else BLOCK_M
    FR: tl.constexpr = 1 if USE_DOT else R
    FN: tl.constexpr = 1 if USE_DOT else BLOCK_N
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
    num_words = tl.cdiv(KD, PACK)

    a_row_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
    perm_ptr = a_perm_ptr + expert * KD
    w_base = w_ptr + expert * stride_we
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([FM, FR, FN], dtype=tl.float32)
    acc3_up = tl.zeros([FM, FR, FN], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        word_rows = k // PACK + tl.arange(0, R)
        w_mask = (word_rows < num_words)[:, None] & n_mask[None, :]
        w_ptrs = w_base + word_rows[:, None] * stride_wk + offs_n[None, :]
        words = tl.load(w_ptrs, mask=w_mask, other=0)
        group = k // group_size
        s = tl.load(s_base + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_base + group * stride_sg + offs_n, mask=n_mask, other=0).to(tl.int32)
        else:
            z = 1 << (BITS - 1)
        if GATED:
            words_up = tl.load(w_ptrs + N, mask=w_mask, other=0)
            s_up = tl.load(s_base + group * stride_sg + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZP:
                z_up = tl.load(z_base + group * stride_sg + N + offs_n, mask=n_mask, other=0).to(tl.int32)
            else:
                z_up = z
        if USE_DOT:
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
            else:
                cols = offs_k
            a = tl.load(a_row_ptrs + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc += _dot_tile(a, words, z, BITS, HAS_ZP, BLOCK_K, BLOCK_N) * s[None, :]
            if GATED:
                acc_up += _dot_tile(a, words_up, z_up, BITS, HAS_ZP, BLOCK_K, BLOCK_N) * s_up[None, :]
        else:
            part, a_sum = _fma_tile(words, a_row_ptrs, row_mask, perm_ptr, k, k_end, BITS, HAS_PERM, R,
                                    BLOCK_M, BLOCK_N)
            acc3 += part * s[None, None, :]
            acc -= a_sum[:, None] * (z * s)[None, :]
            if GATED:
                part_up, _ = _fma_tile(words_up, a_row_ptrs, row_mask, perm_ptr, k, k_end, BITS, HAS_PERM, R,
                                       BLOCK_M, BLOCK_N)
                acc3_up += part_up * s_up[None, None, :]
                acc_up -= a_sum[:, None] * (z_up * s_up)[None, :]
    if not USE_DOT:
        acc += tl.sum(acc3, axis=1)
        acc_up += tl.sum(acc3_up, axis=1)

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
    use_dot: bool = True,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Launch one grouped GEMM (see the module docstring for the math and layouts).

    Parameters
    ----------
    a : GEMM1 hidden_states [T, H]; GEMM2 intermediate [P, I]. bfloat16 or float16, row-major.
    w : [E, KD // PACK, N_total] int32 (K-major), N_total = 2N for GEMM1 (gate columns, then up), N for GEMM2.
    scales : [E, G, N_total]; zeros : [E, G, N_total] uint8 or None (symmetric: zero 2**(bits - 1)).
    a_perm : [E, KD] int32 act-order column order of `a`, or None.
    bias : [E, N_total] float32 or None.
    out : GEMM1 [P, N] in a's dtype; GEMM2 [T, N] float32, pre-filled (accumulated into).
    topk_weights : [P] float32 router weights (GEMM2).
    group_size : elements per group, a multiple of block_k (channel-wise: any multiple of block_k >= KD).
    use_dot : tensor cores (`tl.dot`, block_m >= 16) or CUDA-core FMAs (few rows per expert).
    """
    n_total = w.shape[2]
    n = n_total // 2 if gated else n_total
    kd = a.shape[1]
    if use_dot and block_m < 16:
        raise ValueError(f"tl.dot needs block_m >= 16, got {block_m}; use the CUDA-core path (use_dot=False)")
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
        HAS_PERM=a_perm is not None, HAS_BIAS=bias is not None, USE_DOT=use_dot, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out

