"""QuantizedWeight / QuantizedExperts (the canonical form) and round-to-nearest quantization."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import dequantize_ref, random_experts, random_weight, step_ref
from hypothesis import given
from hypothesis import strategies as st

from wna16moe import InvalidInputError, QuantizedExperts, QuantizedWeight, UnsupportedError, WeightScheme, quantize_rtn

SCALE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RTN_SCHEMES = ["int4_g32_sym", "int4_g128_zp", "int8_g64_sym", "int8_ch_zp", "int4_ch_sym", "int8_g32_zp"]


# ----- dequantize -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    [
        "int4_g32_sym",  # implicit zero 8
        "int8_g128_zp",  # stored zero points, int8
        "int4_ch_zp",  # one group per row
        "int4_g32_sym_actorder",  # groups from a shuffled g_idx
        "int8_g64_zp_actorder",  # act-order with zero points
    ],
)
def test_dequantize_matches_reference(name: str) -> None:
    scheme = WeightScheme.from_name(name, torch.float16)
    weight = random_weight(scheme, 3, 24, 160, torch.default_generator)  # K=160: a partial last g64/g128 group
    full = weight.dequantize()
    assert full.dtype == torch.float32 and full.shape == (3, 24, 160)
    torch.testing.assert_close(full.double(), dequantize_ref(weight), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.dequantize(1), full[1], rtol=0, atol=0)


def test_dequantize_uses_g_idx() -> None:
    """A hand-made act-order weight: element k belongs to group g_idx[k], not k // group_size."""
    scheme = WeightScheme(4, 2, act_order=True, scale_dtype=torch.float32)
    codes = torch.tensor([[[9, 10, 11, 12]]], dtype=torch.uint8)  # q - 8 = 1, 2, 3, 4
    scales = torch.tensor([[[1.0, 100.0]]])
    g_idx = torch.tensor([[1, 0, 0, 1]], dtype=torch.int32)
    weight = QuantizedWeight(scheme, codes, scales, None, g_idx)
    assert weight.dequantize(0).tolist() == [[100.0, 2.0, 3.0, 400.0]]


def test_experts_properties_and_dequantize() -> None:
    experts = random_experts(WeightScheme(4, 32, zero_point=True), 4, 64, 32)
    assert (experts.num_experts, experts.hidden_size, experts.intermediate_size) == (4, 64, 32)
    assert experts.scheme == experts.w13.scheme
    w13, w2 = experts.dequantize()
    assert w13.shape == (4, 64, 64) and w2.shape == (4, 64, 32)
    torch.testing.assert_close(w13.double(), dequantize_ref(experts.w13), rtol=0, atol=1e-6)
    torch.testing.assert_close(w2.double(), dequantize_ref(experts.w2), rtol=0, atol=1e-6)
    moved = experts.to("cpu")
    assert torch.equal(moved.w13.codes, experts.w13.codes) and torch.equal(moved.w2.zeros, experts.w2.zeros)


# ----- validation of the canonical form ---------------------------------------------------------------------

def _parts(scheme: WeightScheme, e: int = 2, n: int = 8, k: int = 64) -> dict:
    w = random_weight(scheme, e, n, k, torch.default_generator)
    return {"scheme": scheme, "codes": w.codes, "scales": w.scales, "zeros": w.zeros, "g_idx": w.g_idx}


@pytest.mark.parametrize(
    ("scheme_name", "change", "message"),
    [
        ("int4_g32_sym", {"codes": torch.zeros(2, 8, 64, dtype=torch.int32)}, "codes must be"),  # codes not uint8
        ("int4_g32_sym", {"codes": torch.zeros(8, 64, dtype=torch.uint8)}, "codes must be"),  # no expert dim
        ("int4_g32_sym", {"scales": torch.ones(2, 8, 3, dtype=torch.bfloat16)}, "scales must be"),  # G=3, not 2
        ("int4_g32_sym", {"scales": torch.ones(2, 8, 2, dtype=torch.float16)}, "scales must be"),  # scale dtype
        ("int4_g32_zp", {"zeros": None}, "zeros is None"),  # zero-point scheme without zeros
        ("int4_g32_sym", {"zeros": torch.zeros(2, 8, 2, dtype=torch.uint8)}, "symmetric"),  # zeros on sym
        ("int4_g32_zp", {"zeros": torch.zeros(2, 8, 2, dtype=torch.int32)}, "zeros must be"),  # zeros dtype
        ("int4_g32_sym_actorder", {"g_idx": None}, "g_idx is None"),  # act-order without g_idx
        ("int4_g32_sym", {"g_idx": torch.zeros(2, 64, dtype=torch.int32)}, "no act-order"),  # g_idx w/o act-order
        ("int4_g32_sym_actorder", {"g_idx": torch.zeros(2, 64, dtype=torch.int64)}, "g_idx must be"),  # g_idx dtype
        ("int4_g32_sym_actorder", {"g_idx": torch.zeros(2, 63, dtype=torch.int32)}, "g_idx must be"),  # g_idx [E,K]
    ],
)
def test_weight_rejects_inconsistent_parts(scheme_name: str, change: dict, message: str) -> None:
    parts = _parts(WeightScheme.from_name(scheme_name)) | change
    with pytest.raises(InvalidInputError, match=message):
        QuantizedWeight(**parts)


def test_experts_reject_mismatched_projections() -> None:
    scheme = WeightScheme(4, 32)
    gen = torch.default_generator
    w13 = random_weight(scheme, 2, 64, 64, gen)  # [E, 2I=64, H=64]
    with pytest.raises(InvalidInputError, match="w2 must be"):
        QuantizedExperts(w13, random_weight(scheme, 2, 64, 64, gen))  # w2 should be [2, 64, 32]
    with pytest.raises(InvalidInputError, match="schemes differ"):
        QuantizedExperts(w13, random_weight(WeightScheme(4, 32, zero_point=True), 2, 64, 32, gen))
    with pytest.raises(InvalidInputError, match="gate rows then up rows"):
        QuantizedExperts(random_weight(scheme, 2, 63, 64, gen), random_weight(scheme, 2, 64, 31, gen))


def test_frozen() -> None:
    experts = random_experts(WeightScheme(4, 32), 2, 64, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        experts.w13 = experts.w13  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        experts.w2.scales = experts.w2.scales  # type: ignore[misc]


# ----- round-to-nearest ---------------------------------------------------------------------------------------

def _check_rtn(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Quantize and check: codes in range, scales of the right dtype, every element within half a step."""
    q = quantize_rtn(weight, scheme)
    assert q.codes.shape == weight.shape and q.scales.dtype == scheme.scale_dtype
    assert int(q.codes.max()) <= scheme.max_code
    assert (q.scales.float() > 0).all()
    error = (dequantize_ref(q) - weight.double()).abs() / step_ref(q)
    assert float(error.max()) <= 0.5 + 1e-4, f"worst element {float(error.max()):.4f} steps"
    return q


@pytest.mark.parametrize("dtype", SCALE_DTYPES)  # bf16 scales are the coarse case that needs rounding up
@pytest.mark.parametrize("name", RTN_SCHEMES)  # int4/int8, sym/zp, groups and channel-wise
def test_rtn_within_half_a_step(name: str, dtype: torch.dtype) -> None:
    weight = torch.randn(3, 16, 200) * torch.rand(3, 16, 1) * 0.1  # K=200: partial last group for g32/g64/g128
    q = _check_rtn(weight, WeightScheme.from_name(name, dtype))
    if q.zeros is None:
        # The full range: each group's largest |w| lands at (or next to) an end of the code range.
        assert int(q.codes.max()) >= q.scheme.max_code - 1


@given(
    name=st.sampled_from(RTN_SCHEMES),
    dtype=st.sampled_from(SCALE_DTYPES),
    e=st.integers(1, 3), n=st.integers(1, 12), k=st.integers(1, 300),
    magnitude=st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 300.0]),  # 1e-9 and 1e-6 underflow float16 scales
    positive=st.booleans(),  # one-signed groups exercise the asymmetric zero point at 0
    seed=st.integers(0, 2**31 - 1),
)
def test_rtn_bound_property(name: str, dtype: torch.dtype, e: int, n: int, k: int, magnitude: float,
                            positive: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(e, n, k, generator=gen) * magnitude
    if positive:
        weight = weight.abs()
    _check_rtn(weight, WeightScheme.from_name(name, dtype))


@pytest.mark.parametrize("name", ["int4_g32_sym", "int8_g32_zp"])  # implicit and stored zero points
def test_rtn_all_zero_group_is_exact(name: str) -> None:
    weight = torch.randn(1, 3, 64)
    weight[0, 1, :32] = 0  # one all-zero group beside ordinary ones
    q = _check_rtn(weight, WeightScheme.from_name(name, torch.float32))
    assert float(q.scales[0, 1, 0]) > 0  # a usable (positive) scale, not 0
    assert torch.equal(q.dequantize()[0, 1, :32], torch.zeros(32))


def test_rtn_asymmetric_uses_zero_points() -> None:
    scheme = WeightScheme(4, 32, zero_point=True, scale_dtype=torch.float32)
    weight = torch.rand(2, 4, 64) + 1.0  # all positive: range [0, max]
    q = _check_rtn(weight, scheme)
    assert q.zeros is not None and q.zeros.dtype == torch.uint8
    assert (q.zeros == 0).all()  # min(w, 0) = 0 maps to code 0


@pytest.mark.parametrize(
    ("weight", "scheme", "error", "message"),
    [
        (torch.tensor([[[1.0, float("nan")]]]), WeightScheme(4, 32), InvalidInputError, "NaN"),  # NaN
        (torch.tensor([[[1.0, float("inf")]]]), WeightScheme(4, 32), InvalidInputError, "NaN or infinite"),  # inf
        (torch.ones(4, 32), WeightScheme(4, 32), InvalidInputError, r"\[E, N, K\]"),  # 2-D
        (torch.ones(1, 4, 32, dtype=torch.int32), WeightScheme(4, 32), InvalidInputError, "float"),  # integers
        (torch.ones(1, 4, 32), WeightScheme(4, 32, act_order=True), UnsupportedError, "act-order"),  # no g_idx
        (torch.full((1, 2, 32), 1e6), WeightScheme(4, 32, scale_dtype=torch.float16), InvalidInputError,
         "too large"),  # the scale overflows float16
    ],
)
def test_rtn_rejects(weight: torch.Tensor, scheme: WeightScheme, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        quantize_rtn(weight, scheme)


def test_experts_quantize() -> None:
    w13, w2 = torch.randn(2, 64, 48), torch.randn(2, 48, 32)
    experts = QuantizedExperts.quantize(w13, w2, WeightScheme(8, 16, zero_point=True))
    d13, d2 = experts.dequantize()
    assert relative_error_ok(d13, w13) and relative_error_ok(d2, w2)


def relative_error_ok(approx: torch.Tensor, exact: torch.Tensor) -> bool:
    """int8 g16 RTN of Gaussian weights keeps the relative Frobenius error near 0.4%."""
    return float((approx - exact).norm() / exact.norm()) < 0.01


def test_group_order_sorts_columns_into_whole_groups() -> None:
    scheme = WeightScheme(4, 4, act_order=True)
    g_idx = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.int32)
    codes = torch.randint(0, 16, (1, 2, 8), dtype=torch.uint8)
    weight = QuantizedWeight(scheme, codes, torch.rand(1, 2, 2).to(torch.bfloat16) + 0.1, g_idx=g_idx)
    order = weight.group_order(0, "w2", "a test")
    assert torch.equal(g_idx[0, order], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32))
    uneven = QuantizedWeight(scheme, codes, weight.scales, g_idx=torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]],
                                                                               dtype=torch.int32))
    with pytest.raises(UnsupportedError, match=r"w2 g_idx of expert 0 .* a test cannot run it"):
        uneven.group_order(0, "w2", "a test")
