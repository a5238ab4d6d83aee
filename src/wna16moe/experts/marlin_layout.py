"""The Marlin MoE weight layout: pure converters from canonical experts, and their inverses.

Everything here is plain torch index arithmetic (CPU or GPU, no kernel), so every fact can be checked
without a GPU. The layout is defined by vLLM's Marlin MoE op (`torch.ops._moe_C.moe_wna16_marlin_gemm`);
the facts below were read from these sources (vLLM 0.33.0 unless noted) and restated in our own code:

[T] `vllm/model_executor/layers/quantization/utils/marlin_utils_test.py`: `get_weight_perm`,
    `marlin_permute_weights`, `marlin_weights` -- the weight tiles, the 1024-entry permutation and the
    packing order (16-bit activations, i.e. `is_a_8bit=False`).
[S] `vllm/model_executor/layers/quantization/utils/marlin_utils.py`: `get_scale_perms`,
    `marlin_permute_scales`, `marlin_zero_points`, `marlin_moe_padded_intermediate`; `quant_utils.pack_cols`.
[O] `vllm/model_executor/layers/fused_moe/oracle/int_wna16.py` `_process_weights_marlin`: the intermediate
    is padded separately in the gate and the up half of w13 (also /work/shared/reference/anchor_system_vllm.md
    §3.4).
[C] the op itself: its schema string in `vllm/_moe_C_stable_libtorch.abi3.so` and its argument checks
    (`csrc/moe/marlin_moe_wna16/ops.cu`): `b_q_weight` is [E, K/16, N * bits / 2], `b_scales` [E, G, N],
    `b_zeros` [E, G, N / (32 / bits)]; the op infers the group size from G, and G == 1 means channel-wise.
[V] `vllm/scalar_type.py` `ScalarType.id`: the bit fields of the weight-type id the op takes.

Layout of one expert's projection with N outputs and K inputs (canonical codes [N, K], see `quantized.py`):

* Weights [K/16, N * bits / 2] int32 ([T]). Cut the [K, N] matrix (input-major) into 16 x 16 tiles; row r of
  the result holds the tiles of K-rows 16r..16r+15, tile after tile along N, each tile row-major (k, then
  n). Each run of 1024 elements (4 tiles, 64 columns) is permuted by `weight_tile_perm()` (a gather:
  `out[c] = in[perm[c]]`), then every `32 / bits` consecutive elements are packed into one int32, LSB
  first, slot s holding element `weight_interleave(bits)[s]` of the run (the dequantizer's order).
* Scales [G, N] ([S], [C]). With more than one group, every run of 64 columns is gathered by
  `scale_perm(grouped=True)`; with one group (channel-wise) every run of 32 by `scale_perm(grouped=False)`.
  vLLM's Python decides "grouped" from `group_size < size_k` and passes the intermediate size as w13's
  size_k; we follow the op, which treats G > 1 as grouped whatever the sizes.
* Zero points [G, N / (32 / bits)] int32 ([S] `marlin_zero_points`): always the 64-column grouped gather
  (they are applied on every MMA), then packed like the weights, with the same slot interleave.
* Padding ([S], [O]): the intermediate size I is zero-padded to I' = round_up(I, lcm(64, group_size)), in
  w13 separately for the gate rows [0, I') and the up rows [I', 2I'), in w2 along its inputs. Padded
  rows of w13 carry zero scales, so GEMM1's padded outputs are exactly 0, and so is the activation of
  (0, 0): the padded inputs of w2 contribute nothing.
"""

from __future__ import annotations

import math

import torch

from wna16moe.errors import InvalidInputError, UnsupportedError
from wna16moe.formats.packing import pack_int32, unpack_int32
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

# [T]: Marlin tiles are 16 x 16; the weight permutation runs over 4 tiles along N (64 columns).
TILE = 16
PERM_TILES = 4
PERM_SIZE = TILE * TILE * PERM_TILES
# Every N the op sees must hold whole permutation runs; every K whole tiles.
N_ALIGN = TILE * PERM_TILES
K_ALIGN = TILE
# [S] marlin_moe_padded_intermediate: the intermediate is padded to a multiple of lcm(64, group_size).
INTERMEDIATE_TILE = 64
# [T] / [S]: slot s of a packed word holds element INTERLEAVE[bits][s] of its run of 32 / bits elements.
INTERLEAVE: dict[int, tuple[int, ...]] = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
# (bits, zero points) -> the vLLM scalar type the op dequantizes with ([V]; vLLM's `scalar_types`):
# uint4b8 = (q - 8) * s, uint4 = (q - z) * s with runtime zero points, uint8b128 = (q - 128) * s.
# There is no uint8 + zero-point kernel in vLLM's build.
WEIGHT_TYPES: dict[tuple[int, bool], str] = {(4, False): "uint4b8", (4, True): "uint4", (8, False): "uint8b128"}
# [V]: integer scalar types as (size_bits, bias); `ScalarType.uint(size_bits, bias)` has exponent 0.
_SCALAR_TYPES: dict[str, tuple[int, int]] = {"uint4b8": (4, 8), "uint4": (4, 0), "uint8b128": (8, 128)}
# [V]: NanRepr.IEEE_754, the default of every integer ScalarType.
_NAN_REPR_IEEE_754 = 1


def scalar_type_id(name: str) -> int:
    """The int64 id of a vLLM integer `ScalarType` (`uint4b8`, `uint4`, `uint8b128`) as the op takes it.

    [V]: fields packed LSB first -- exponent (8 bits), mantissa (8), signed (1), bias (32), finite-values-only
    (1), NaN representation (8). An unsigned integer type has exponent 0, mantissa = its size in bits,
    signed 0, finite-values-only 0 and NaN representation IEEE_754 (1).
    """
    if name not in _SCALAR_TYPES:
        raise UnsupportedError(f"weight type {name!r} is not one of {sorted(_SCALAR_TYPES)}")
    size_bits, bias = _SCALAR_TYPES[name]
    value, offset = 0, 0
    for field, width in ((0, 8), (size_bits, 8), (0, 1), (bias, 32), (0, 1), (_NAN_REPR_IEEE_754, 8)):
        value |= (field & ((1 << width) - 1)) << offset
        offset += width
    return value


def weight_type(scheme: WeightScheme) -> str:
    """The Marlin scalar type name for `scheme` (UnsupportedError for int8 with zero points)."""
    key = (scheme.bits, scheme.zero_point)
    if key not in WEIGHT_TYPES:
        raise UnsupportedError(f"scheme {scheme.name}: Marlin has no kernel for int{scheme.bits} with zero points; "
                               "expected int4 symmetric, int4 with zero points or int8 symmetric")
    return WEIGHT_TYPES[key]


def padded_intermediate(intermediate_size: int, group_size: int | None) -> int:
    """I' = I rounded up to a multiple of lcm(64, group_size) ([S]; channel-wise: 64)."""
    unit = math.lcm(INTERMEDIATE_TILE, group_size or 1)
    return -(-intermediate_size // unit) * unit


# ----- permutations ------------------------------------------------------------------------------------------

def weight_tile_perm() -> torch.Tensor:
    """int64 [1024]: the gather that orders one run of 4 tiles (16 K-rows x 64 columns) for Marlin ([T]).

    The run holds tile j (0..3) at offset 256 j, element (k, n) of a tile at 16 k + n. Output position
    `32 t + 8 j + 4 b + r` belongs to thread t (0..31) of the tensor-core fragment and reads tile j, column
    `t // 4 + 8 b` (b: left or right 8 columns), row `2 (t % 4) + (r % 2) + 8 (r // 2)` (r: the 4 rows a
    thread holds per column, two adjacent pairs 8 rows apart).
    """
    t = torch.arange(32).view(32, 1, 1, 1)
    j = torch.arange(PERM_TILES).view(1, PERM_TILES, 1, 1)
    b = torch.arange(2).view(1, 1, 2, 1)
    r = torch.arange(4).view(1, 1, 1, 4)
    row = 2 * (t % 4) + r % 2 + 8 * (r // 2)
    col = t // 4 + 8 * b
    return (TILE * TILE * j + TILE * row + col).reshape(-1)


def weight_interleave(bits: int) -> tuple[int, ...]:
    """Slot order inside a packed word: slot s holds element `weight_interleave(bits)[s]` of its run."""
    if bits not in INTERLEAVE:
        raise UnsupportedError(f"bits={bits} is not supported by Marlin; expected 4 or 8")
    return INTERLEAVE[bits]


def scale_perm(grouped: bool) -> torch.Tensor:
    """int64 gather over a run of scale columns ([S] `get_scale_perms`).

    grouped (G > 1): 64 columns, `out[8 i + j] = in[i + 8 j]` (an 8 x 8 transpose).
    channel-wise (G == 1): 32 columns, `out[8 i + m] = in[2 i + (0, 1, 8, 9, 16, 17, 24, 25)[m]]`, i in 0..3.
    """
    if grouped:
        i = torch.arange(8).view(8, 1)
        j = torch.arange(8).view(1, 8)
        return (i + 8 * j).reshape(-1)
    i = torch.arange(4).view(4, 1)
    offsets = torch.tensor([0, 1, 8, 9, 16, 17, 24, 25]).view(1, 8)
    return (2 * i + offsets).reshape(-1)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return inverse


def _gather_runs(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Gather every run of `perm.numel()` elements along the last dim of `x` by `perm`."""
    run = perm.numel()
    runs = x.reshape(*x.shape[:-1], x.shape[-1] // run, run)
    return runs[..., perm.to(x.device)].reshape(x.shape)


# ----- one projection of one expert --------------------------------------------------------------------------

def _check_tiles(n: int, k: int, what: str) -> None:
    if n % N_ALIGN or k % K_ALIGN:
        raise InvalidInputError(f"{what}: Marlin needs N % {N_ALIGN} == 0 and K % {K_ALIGN} == 0, got N={n}, K={k}")


def repack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical codes [N, K] uint8 (output-major) -> Marlin words [K/16, N * bits / 2] int32 (module docstring).

    N must be a multiple of 64 and K of 16.
    """
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise InvalidInputError(f"codes must be [N, K] uint8, got {list(codes.shape)} {codes.dtype}")
    n, k = codes.shape
    _check_tiles(n, k, "codes")
    tiles = codes.t().reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    return pack_int32(_gather_runs(tiles, weight_tile_perm()), bits, dim=-1, order=weight_interleave(bits))


def unpack_weight(words: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of `repack_weight`: Marlin words [K/16, N * bits / 2] int32 -> codes [N, K] uint8."""
    _check_tiles(n, k, "words")
    expected = (k // TILE, n * bits // 2)
    if tuple(words.shape) != expected or words.dtype != torch.int32:
        raise InvalidInputError(f"words must be {list(expected)} int32 for N={n}, K={k}, int{bits}, got "
                                f"{list(words.shape)} {words.dtype}")
    tiles = unpack_int32(words, bits, dim=-1, size=n * TILE, order=weight_interleave(bits))
    tiles = _gather_runs(tiles, _inverse(weight_tile_perm()))
    return tiles.reshape(k // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(k, n).t().contiguous()


def permute_scales(scales: torch.Tensor) -> torch.Tensor:
    """Canonical scales [N, G] -> Marlin scales [G, N], same dtype (grouped gather iff G > 1)."""
    n, g = scales.shape
    if n % N_ALIGN:
        raise InvalidInputError(f"scales: Marlin needs N % {N_ALIGN} == 0, got N={n}")
    return _gather_runs(scales.t().contiguous(), scale_perm(grouped=g > 1))


def unpermute_scales(scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_scales`: Marlin scales [G, N] -> canonical [N, G]."""
    g = scales.shape[0]
    return _gather_runs(scales, _inverse(scale_perm(grouped=g > 1))).t().contiguous()


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical zero points [N, G] uint8 -> Marlin zero points [G, N * bits / 32] int32."""
    n = zeros.shape[0]
    if n % N_ALIGN:
        raise InvalidInputError(f"zeros: Marlin needs N % {N_ALIGN} == 0, got N={n}")
    permuted = _gather_runs(zeros.t().contiguous(), scale_perm(grouped=True))
    return pack_int32(permuted, bits, dim=-1, order=weight_interleave(bits))


def unpack_zero_points(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_zero_points`: Marlin zero points [G, N * bits / 32] int32 -> canonical [N, G] uint8."""
    zeros = unpack_int32(words, bits, dim=-1, size=n, order=weight_interleave(bits))
    return _gather_runs(zeros, _inverse(scale_perm(grouped=True))).t().contiguous()


# ----- whole layers ------------------------------------------------------------------------------------------

def check_marlin_scheme(scheme: WeightScheme, hidden_size: int, intermediate_size: int) -> None:
    """Raise UnsupportedError unless the Marlin converters can lay out this scheme and shape."""
    weight_type(scheme)
    if scheme.act_order:
        raise UnsupportedError(f"scheme {scheme.name}: the Marlin MoE op takes no g_idx, act-order cannot be laid out")
    if scheme.group_size not in (None, 32, 64, 128):
        raise UnsupportedError(f"scheme {scheme.name}: Marlin supports group sizes 32, 64, 128 and channel-wise")
    if hidden_size % 128:
        raise UnsupportedError(f"hidden_size={hidden_size} is not a multiple of 128 (Marlin's tile along H)")
    if scheme.group_size is not None and intermediate_size % scheme.group_size:
        raise UnsupportedError(f"intermediate_size={intermediate_size} is not a multiple of group_size "
                               f"{scheme.group_size}: padding cannot split a quantization group")


def prepare_marlin_weights(experts: QuantizedExperts, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Canonical experts -> the tensors the Marlin MoE op reads, on `device`.

    With E experts, H hidden, I' = `padded_intermediate(I, group_size)`, G1 = groups of H, G2 = groups of I',
    PF = 32 / bits:
        w13        [E, H/16, 2I' * bits / 2] int32    gate outputs [0, I'), up outputs [I', 2I')
        w13_scales [E, G1, 2I']                       checkpoint scale dtype, padded outputs 0
        w13_zeros  [E, G1, 2I' / PF] int32            zero-point schemes only
        w2         [E, I'/16, H * bits / 2] int32     inputs [I, I') are zero codes
        w2_scales  [E, G2, H]                         padded groups 0
        w2_zeros   [E, G2, H / PF] int32              zero-point schemes only
    Converted expert by expert into preallocated results: the extra memory is one expert's temporaries.
    """
    s = experts.scheme
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    check_marlin_scheme(s, h, i)
    i_pad = padded_intermediate(i, s.group_size)
    g1, g2 = s.num_groups(h), s.num_groups(i_pad)
    per_word = 32 // s.bits
    out = {
        "w13": torch.empty(e, h // TILE, 2 * i_pad * s.bits // 2, dtype=torch.int32, device=device),
        "w13_scales": torch.empty(e, g1, 2 * i_pad, dtype=s.scale_dtype, device=device),
        "w2": torch.empty(e, i_pad // TILE, h * s.bits // 2, dtype=torch.int32, device=device),
        "w2_scales": torch.empty(e, g2, h, dtype=s.scale_dtype, device=device),
    }
    if s.zero_point:
        out["w13_zeros"] = torch.empty(e, g1, 2 * i_pad // per_word, dtype=torch.int32, device=device)
        out["w2_zeros"] = torch.empty(e, g2, h // per_word, dtype=torch.int32, device=device)
    halves = ((slice(0, i), slice(0, i)), (slice(i, 2 * i), slice(i_pad, i_pad + i)))
    for expert in range(e):
        w13 = _expert_tensors(experts.w13, expert, device)
        rows = {name: torch.zeros(2 * i_pad, *t.shape[1:], dtype=t.dtype, device=device) for name, t in w13.items()}
        for src, dst in halves:
            for name, t in w13.items():
                rows[name][dst] = t[src]
        _store(out, "w13", expert, rows, s.bits)
        w2 = _expert_tensors(experts.w2, expert, device)
        cols = {
            "codes": torch.zeros(h, i_pad, dtype=torch.uint8, device=device),
            "scales": torch.zeros(h, g2, dtype=s.scale_dtype, device=device),
        }
        if s.zero_point:
            cols["zeros"] = torch.zeros(h, g2, dtype=torch.uint8, device=device)
        cols["codes"][:, :i] = w2["codes"]
        for name in ("scales", "zeros"):
            if name in cols:
                cols[name][:, : w2[name].shape[1]] = w2[name]
        _store(out, "w2", expert, cols, s.bits)
    return out


def _expert_tensors(weight: QuantizedWeight, expert: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    tensors = {"codes": weight.codes[expert].to(device), "scales": weight.scales[expert].to(device)}
    if weight.zeros is not None:
        tensors["zeros"] = weight.zeros[expert].to(device)
    return tensors


def _store(out: dict[str, torch.Tensor], stem: str, expert: int, canonical: dict[str, torch.Tensor], bits: int) -> None:
    """Write one expert's padded canonical codes [N, K], scales [N, G] and zeros [N, G] in Marlin layout."""
    out[stem][expert] = repack_weight(canonical["codes"], bits)
    out[f"{stem}_scales"][expert] = permute_scales(canonical["scales"])
    if "zeros" in canonical:
        out[f"{stem}_zeros"][expert] = pack_zero_points(canonical["zeros"], bits)


def marlin_to_canonical(weights: dict[str, torch.Tensor], scheme: WeightScheme,
                        intermediate_size: int) -> QuantizedExperts:
    """Inverse of `prepare_marlin_weights`: the canonical experts back from the Marlin tensors (padding
    dropped), on the tensors' device. `intermediate_size` is the unpadded I."""
    e, h_tiles, _ = weights["w13"].shape
    h, i = h_tiles * TILE, intermediate_size
    i_pad = padded_intermediate(i, scheme.group_size)
    if weights["w2"].shape[1] * TILE != i_pad:
        raise InvalidInputError(f"w2 holds {weights['w2'].shape[1] * TILE} padded inputs; intermediate_size={i} "
                                f"pads to {i_pad}")
    g2 = scheme.num_groups(i)

    def one(stem: str, n: int, k: int, keep_rows: torch.Tensor | slice, keep_k: int, groups: int | None
            ) -> QuantizedWeight:
        codes, scales, zeros = [], [], []
        for expert in range(e):
            codes.append(unpack_weight(weights[stem][expert], scheme.bits, n, k)[keep_rows, :keep_k])
            scales.append(unpermute_scales(weights[f"{stem}_scales"][expert])[keep_rows, :groups])
            if scheme.zero_point:
                zeros.append(unpack_zero_points(weights[f"{stem}_zeros"][expert], scheme.bits, n)[keep_rows, :groups])
        return QuantizedWeight(scheme, torch.stack(codes), torch.stack(scales),
                               torch.stack(zeros) if scheme.zero_point else None)

    device = weights["w13"].device
    gate_up = torch.cat([torch.arange(i, device=device), torch.arange(i_pad, i_pad + i, device=device)])
    w13 = one("w13", 2 * i_pad, h, gate_up, h, None)
    w2 = one("w2", h, i_pad, slice(None), i, g2)
    return QuantizedExperts(w13, w2)
