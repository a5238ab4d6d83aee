"""The Marlin weight layout converters (experts/marlin_layout.py), on CPU.

Three kinds of evidence, none of which needs a GPU:
* independent index arithmetic: for every element of tiny random inputs, the word, bit slot, row or column
  where the Marlin layout puts it, computed one element at a time from the fragment description (which
  thread of a 16 x 16 tensor-core tile holds which element) rather than by the converters' gathers;
* golden digests: the converters' output for fixed inputs hashes to what vLLM 0.33's own pure-torch reference
  functions (`marlin_utils_test.marlin_weights` with `get_weight_perm`, `marlin_utils.marlin_permute_scales`
  and `marlin_zero_points`) produce for the same inputs (computed once with vLLM's code, outside this repo);
* round trips: canonical -> Marlin -> canonical is bit-exact for every supported scheme, padding included.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import random_experts
from hypothesis import given
from hypothesis import strategies as st

from wna16moe.errors import InvalidInputError, UnsupportedError
from wna16moe.experts import marlin_layout as layout
from wna16moe.experts.marlin_layout import (
    marlin_to_canonical,
    pack_zero_points,
    padded_intermediate,
    permute_scales,
    prepare_marlin_weights,
    repack_weight,
    scalar_type_id,
    unpack_weight,
    unpack_zero_points,
    unpermute_scales,
)
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

# Slot s of a packed word holds element ORDER[bits][s] of its run (the dequantizer's order), as facts.
ORDER = {4: [0, 2, 4, 6, 1, 3, 5, 7], 8: [0, 2, 1, 3]}


def _slot_value(words: torch.Tensor, row: int, word: int, slot: int, bits: int) -> int:
    return (int(words[row, word]) & 0xFFFFFFFF) >> (bits * slot) & ((1 << bits) - 1)


# ----- independent index arithmetic ----------------------------------------------------------------------------

def weight_position(n: int, k: int, bits: int) -> tuple[int, int, int]:
    """(row, word, slot) of canonical weight element (output n, input k) in the Marlin words.

    Row k // 16 holds the 16-row K strip. Along the row, runs of 4 column tiles (64 columns) take 1024 slots
    each; inside a run, thread t of the MMA fragment owns 32 consecutive elements: for each of the 4 tiles, its
    column n % 8 == t // 4 in the left (n % 16 < 8) then the right half, and in it the rows
    2 (t % 4), 2 (t % 4) + 1, 2 (t % 4) + 8, 2 (t % 4) + 9."""
    kk, nn = k % 16, n % 16
    run, tile = divmod(n // 16, 4)
    thread = 4 * (nn % 8) + (kk % 8) // 2
    position = 1024 * run + 32 * thread + 8 * tile + 4 * (nn // 8) + 2 * (kk // 8) + kk % 2
    word, element = divmod(position, 32 // bits)
    return k // 16, word, ORDER[bits].index(element)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_elements_land_where_the_fragment_layout_says(bits: int) -> None:
    n, k = 128, 32  # two permutation runs, two K strips
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    words = repack_weight(codes, bits)
    assert words.shape == (k // 16, n * bits // 2) and words.dtype == torch.int32
    for row_n in range(n):
        for col_k in range(k):
            row, word, slot = weight_position(row_n, col_k, bits)
            assert _slot_value(words, row, word, slot, bits) == int(codes[row_n, col_k]), (row_n, col_k)


def scale_column(column: int, grouped: bool) -> int:
    """Where scale column `column` lands in its row: grouped scales transpose each 8 x 8 block of a 64-column
    run; channel-wise scales place, in each 32-column run, columns 2i, 2i+1, 2i+8, 2i+9, 2i+16, ... next to
    each other (i = 0..3)."""
    if grouped:
        run, o = divmod(column, 64)
        return 64 * run + 8 * (o % 8) + o // 8
    run, o = divmod(column, 32)
    return 32 * run + 8 * ((o % 8) // 2) + 2 * (o // 8) + o % 2


@pytest.mark.parametrize("groups", [1, 3])
def test_scales_land_where_the_layout_says(groups: int) -> None:
    n = 128
    scales = torch.rand(n, groups).to(torch.bfloat16)
    out = permute_scales(scales)
    assert out.shape == (groups, n) and out.dtype == torch.bfloat16
    for column in range(n):
        for group in range(groups):
            assert out[group, scale_column(column, grouped=groups > 1)] == scales[column, group]


@pytest.mark.parametrize(("bits", "groups"), [(4, 1), (4, 2), (8, 2)])
def test_zero_points_land_where_the_layout_says(bits: int, groups: int) -> None:
    # Always the grouped 64-column transpose (even for one group), then packed with the weights' slot order.
    n = 128
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8)
    words = pack_zero_points(zeros, bits)
    assert words.shape == (groups, n * bits // 32) and words.dtype == torch.int32
    for column in range(n):
        word, element = divmod(scale_column(column, grouped=True), 32 // bits)
        for group in range(groups):
            slot = ORDER[bits].index(element)
            assert _slot_value(words, group, word, slot, bits) == int(zeros[column, group])


# ----- golden digests from vLLM's reference functions ----------------------------------------------------------

def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


GOLDEN_WEIGHTS = {4: "5e90bc782845cb7fe001e66fc721bd67aa8d93b93905fe3d94dbf95f3d30e5d1",
                  8: "d45dc643bfadf2084d5ce08ba775fe22140ef00891ea9067f626d0a8c1fcdeec"}
GOLDEN_ZEROS = {4: "82bc01a3b7e34d99cc987c72195b0a7141643d93f1c0ecf11274f1ead36cc5a9",
                8: "782f831c638f2f1c0d4daabf0f099796b6e10d645236bfac5abc3e8c9b127e65"}
GOLDEN_SCALES = {3: "6cf6fdf72363aa0819d389cafe0d8c1d6f39be93af682a36a395e40b910a64f5",
                 1: "53df80268fefc00d8dfd1d8d70b88cdcbf9a583612c0ca21946782baa7928cec"}


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_and_zero_points_match_vllm_reference(bits: int) -> None:
    # vLLM's inputs are K-major [K=48, N=192] codes and [G=3, N] zero points; ours are their transposes.
    k = torch.arange(48).view(48, 1)
    n = torch.arange(192).view(1, 192)
    codes_kn = (k * 131 + n * 7 + (k * n) % 5) % (1 << bits)
    assert _digest(repack_weight(codes_kn.t().to(torch.uint8), bits)) == GOLDEN_WEIGHTS[bits]
    zeros_gn = (torch.arange(3).view(3, 1) * 5 + n * 3) % (1 << bits)
    assert _digest(pack_zero_points(zeros_gn.t().to(torch.uint8), bits)) == GOLDEN_ZEROS[bits]


@pytest.mark.parametrize("groups", [3, 1])
def test_scales_match_vllm_reference(groups: int) -> None:
    scales_gn = (torch.arange(groups * 192).view(groups, 192).float() / 7).to(torch.float16)
    assert _digest(permute_scales(scales_gn.t())) == GOLDEN_SCALES[groups]


# ----- inverses and round trips ------------------------------------------------------------------------------

@given(bits=st.sampled_from([4, 8]), n_runs=st.integers(1, 3), k_tiles=st.integers(1, 3), groups=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_per_projection_inverses(bits: int, n_runs: int, k_tiles: int, groups: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, k = 64 * n_runs, 16 * k_tiles
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    assert torch.equal(unpack_weight(repack_weight(codes, bits), bits, n, k), codes)
    scales = torch.rand(n, groups, generator=gen).to(torch.float16)
    assert torch.equal(unpermute_scales(permute_scales(scales)), scales)
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, generator=gen)
    assert torch.equal(unpack_zero_points(pack_zero_points(zeros, bits), bits, n), zeros)


ROUND_TRIP = [
    # scheme, E, H, I -- what it exercises
    ("int4_g32_sym", 2, 128, 96),    # I padded 96 -> 128 in each half of w13 and in w2's inputs
    ("int4_g64_sym", 2, 256, 64),    # no padding, 4 groups along H
    ("int4_g128_sym", 1, 256, 128),  # group == I: w13 still has 2 groups (grouped scale layout)
    ("int4_ch_sym", 2, 128, 40),     # channel-wise, padded 40 -> 64
    ("int4_g128_zp", 2, 128, 128),   # zero points
    ("int4_g32_zp", 1, 128, 32),     # zero points, padded 32 -> 64
    ("int4_ch_zp", 1, 256, 64),      # channel-wise zero points (grouped zero-point layout)
    ("int8_g128_sym", 2, 128, 256),  # int8
    ("int8_g32_sym", 1, 128, 160),   # int8, padded 160 -> 192
    ("int8_ch_sym", 1, 256, 64),     # int8 channel-wise
]


@pytest.mark.parametrize(("name", "e", "h", "i"), ROUND_TRIP)
def test_canonical_marlin_canonical_is_exact(name: str, e: int, h: int, i: int) -> None:
    scheme = WeightScheme.from_name(name, torch.float16)
    experts = random_experts(scheme, e, h, i)
    prepared = prepare_marlin_weights(experts, "cpu")
    i_pad = padded_intermediate(i, scheme.group_size)
    per_word = 32 // scheme.bits
    g1, g2 = scheme.num_groups(h), scheme.num_groups(i_pad)
    expected = {"w13": ((e, h // 16, 2 * i_pad * scheme.bits // 2), torch.int32),
                "w13_scales": ((e, g1, 2 * i_pad), torch.float16),
                "w2": ((e, i_pad // 16, h * scheme.bits // 2), torch.int32),
                "w2_scales": ((e, g2, h), torch.float16)}
    if scheme.zero_point:
        expected |= {"w13_zeros": ((e, g1, 2 * i_pad // per_word), torch.int32),
                     "w2_zeros": ((e, g2, h // per_word), torch.int32)}
    assert {key: (tuple(t.shape), t.dtype) for key, t in prepared.items()} == expected
    back = marlin_to_canonical(prepared, scheme, i)
    for got, want in ((back.w13, experts.w13), (back.w2, experts.w2)):
        assert torch.equal(got.codes, want.codes)
        assert got.scales.dtype == want.scales.dtype and torch.equal(got.scales, want.scales)
        assert (got.zeros is None) == (want.zeros is None)
        if want.zeros is not None:
            assert torch.equal(got.zeros, want.zeros)


def test_padding_is_zero_scaled_and_split_per_half() -> None:
    scheme = WeightScheme.from_name("int4_g32_sym")
    e, h, i = 2, 128, 96
    experts = random_experts(scheme, e, h, i)
    prepared = prepare_marlin_weights(experts, "cpu")
    i_pad = 128
    for expert in range(e):
        scales13 = unpermute_scales(prepared["w13_scales"][expert])  # [2I', G1]
        assert (scales13[i:i_pad] == 0).all() and (scales13[i_pad + i:] == 0).all()
        assert torch.equal(scales13[:i], experts.w13.scales[expert, :i])
        assert torch.equal(scales13[i_pad:i_pad + i], experts.w13.scales[expert, i:])  # up rows start at I'
        codes2 = unpack_weight(prepared["w2"][expert], 4, h, i_pad)
        assert (codes2[:, i:] == 0).all()
        scales2 = unpermute_scales(prepared["w2_scales"][expert])  # [H, I'/32]
        assert (scales2[:, i // 32:] == 0).all()


def test_conversion_runs_expert_by_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    # The only full-size tensors are the preallocated results: every repack sees one expert's [N, K] codes.
    seen: list[tuple[int, ...]] = []
    original = layout.repack_weight

    def spy(codes: torch.Tensor, bits: int) -> torch.Tensor:
        seen.append(tuple(codes.shape))
        return original(codes, bits)

    monkeypatch.setattr(layout, "repack_weight", spy)
    prepare_marlin_weights(random_experts(WeightScheme.from_name("int4_g64_sym"), 3, 128, 64), "cpu")
    assert seen == [(128, 128), (128, 64)] * 3


@pytest.mark.parametrize(("i", "group", "expected"), [(96, 32, 128), (128, 128, 128), (192, 64, 192),
                                                      (352, 32, 384), (40, None, 64), (200, 64, 256),
                                                      (64, 128, 128)])
def test_padded_intermediate(i: int, group: int | None, expected: int) -> None:
    assert padded_intermediate(i, group) == expected


def test_scalar_type_ids() -> None:
    # vLLM 0.33 scalar_types.uint4b8.id / uint4.id / uint8b128.id, read by running vllm/scalar_type.py.
    assert scalar_type_id("uint4b8") == 1125899907892224
    assert scalar_type_id("uint4") == 1125899906843648
    assert scalar_type_id("uint8b128") == 1125899923621888
    with pytest.raises(UnsupportedError, match="'uint8' is not one of"):
        scalar_type_id("uint8")


# ----- refusals -----------------------------------------------------------------------------------------------

def _dummy(scheme: WeightScheme, e: int, h: int, i: int) -> QuantizedExperts:
    def weight(n: int, k: int) -> QuantizedWeight:
        g = scheme.num_groups(k)
        zeros = torch.zeros(e, n, g, dtype=torch.uint8) if scheme.zero_point else None
        g_idx = scheme.group_of(k).to(torch.int32).repeat(e, 1) if scheme.act_order else None
        return QuantizedWeight(scheme, torch.zeros(e, n, k, dtype=torch.uint8),
                               torch.ones(e, n, g, dtype=scheme.scale_dtype), zeros, g_idx)

    return QuantizedExperts(weight(2 * i, h), weight(h, i))


@pytest.mark.parametrize(("name", "h", "i", "message"), [
    ("int8_g128_zp", 128, 128, "no kernel for int8 with zero points"),
    ("int4_g32_sym_actorder", 128, 64, "takes no g_idx"),
    ("int4_g256_sym", 256, 256, "group sizes 32, 64, 128 and channel-wise"),
    ("int4_g32_sym", 160, 64, "hidden_size=160 is not a multiple of 128"),
    ("int4_g128_sym", 128, 192, "intermediate_size=192 is not a multiple of group_size 128"),
])
def test_prepare_refuses_what_marlin_cannot_lay_out(name: str, h: int, i: int, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        prepare_marlin_weights(_dummy(WeightScheme.from_name(name), 1, h, i), "cpu")


def test_converters_name_bad_inputs() -> None:
    with pytest.raises(InvalidInputError, match=r"codes must be \[N, K\] uint8"):
        repack_weight(torch.zeros(64, 16, dtype=torch.int32), 4)
    with pytest.raises(InvalidInputError, match="N % 64 == 0 and K % 16 == 0, got N=96, K=16"):
        repack_weight(torch.zeros(96, 16, dtype=torch.uint8), 4)
    with pytest.raises(InvalidInputError, match=r"words must be \[1, 128\] int32"):
        unpack_weight(torch.zeros(1, 64, dtype=torch.int32), 4, 64, 16)
    with pytest.raises(UnsupportedError, match="bits=2"):
        repack_weight(torch.zeros(64, 16, dtype=torch.uint8), 2)
