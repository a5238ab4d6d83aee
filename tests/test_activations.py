"""Gated activations against the float64 references in tests/reference.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from reference import gelu_and_mul_ref, silu_and_mul_ref, swiglu_oai_ref

from wna16moe import Activation, InvalidInputError
from wna16moe.activations import apply_activation, gelu_and_mul, silu_and_mul, swiglu_oai


def gate_up(t: int = 33, i: int = 48, spread: float = 5.0) -> torch.Tensor:
    """Random [T, 2I] GEMM1 outputs, wide enough to reach the SwiGLU clamps (|x| > 7 somewhere)."""
    x = torch.randn(t, 2 * i) * spread
    assert (x.abs() > 7.5).any()
    return x


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("function", "reference"),
    [
        (lambda x: silu_and_mul(x), lambda x: silu_and_mul_ref(x)),  # plain SiLU-and-mul
        (lambda x: silu_and_mul(x, limit=7.0), lambda x: silu_and_mul_ref(x, 7.0)),  # with the SwiGLU clamp
        (lambda x: gelu_and_mul(x), lambda x: gelu_and_mul_ref(x)),  # exact (erf) GELU
        (lambda x: gelu_and_mul(x, approximate="tanh"), lambda x: gelu_and_mul_ref(x, "tanh")),  # tanh GELU
        (lambda x: swiglu_oai(x), lambda x: swiglu_oai_ref(x)),  # gpt-oss defaults: alpha 1.702, limit 7
        (lambda x: swiglu_oai(x, alpha=1.0, beta=0.5, limit=3.0),
         lambda x: swiglu_oai_ref(x, 1.0, 0.5, 3.0)),  # other alpha, beta and limit
        (lambda x: swiglu_oai(x, limit=None), lambda x: swiglu_oai_ref(x, 1.702, 1.0, None)),  # no clamp
    ],
)
def test_against_reference(function: Callable[[torch.Tensor], torch.Tensor],
                           reference: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = gate_up()
    assert_close(function(x), reference(x))


def test_gate_is_the_first_half() -> None:
    """Swapping the halves changes the result: gate = x[:, :I], up = x[:, I:]."""
    x = gate_up(i=16)
    swapped = torch.cat([x[:, 16:], x[:, :16]], dim=1)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))
    assert not torch.allclose(silu_and_mul(swapped).double(), silu_and_mul_ref(x), rtol=1e-2, atol=1e-2)


def test_clamps_engage() -> None:
    """With limit 7, gates above 7 and ups beyond +-7 saturate; without it they do not."""
    x = torch.tensor([[20.0, 1.0, 20.0, -30.0]])  # gates [20, 1], ups [20, -30]
    clamped = swiglu_oai(x, alpha=1.0, beta=1.0, limit=7.0)
    sig7 = 7.0 / (1.0 + torch.exp(torch.tensor(-7.0)))
    torch.testing.assert_close(clamped, torch.stack([sig7 * 8.0, torch.sigmoid(torch.tensor(1.0)) * -6.0]).view(1, 2))
    assert float(swiglu_oai(x, alpha=1.0, beta=1.0, limit=None)[0, 0]) > 400  # 20 * 21 unclamped
    assert float(silu_and_mul(x, limit=7.0)[0, 1]) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0)) * -7.0))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,  # computed in float32, returned in bf16
        torch.float16,  # returned in fp16
    ],
)
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x = (torch.randn(9, 64) * 3).to(dtype)
    for function, reference in ((silu_and_mul, silu_and_mul_ref), (gelu_and_mul, gelu_and_mul_ref),
                                (swiglu_oai, swiglu_oai_ref)):
        got = function(x)
        assert got.dtype == dtype and got.shape == (9, 32)
        # One rounding to the output dtype away from the float64 value of the same (rounded) input.
        torch.testing.assert_close(got, reference(x).to(dtype), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got.double(), reference(x), rtol=2 ** -7, atol=1e-3)


def test_leading_dims() -> None:
    x = torch.randn(3, 4, 20) * 3
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))
    assert_close(swiglu_oai(x), swiglu_oai_ref(x))


@pytest.mark.parametrize(
    ("activation", "kwargs", "reference"),
    [
        (Activation.SILU, {}, lambda x: silu_and_mul_ref(x)),  # no clamp by default
        (Activation.SILU, {"limit": 5.0}, lambda x: silu_and_mul_ref(x, 5.0)),  # SILU honours a limit
        (Activation.GELU, {}, lambda x: gelu_and_mul_ref(x)),  # exact GELU
        (Activation.GELU_TANH, {}, lambda x: gelu_and_mul_ref(x, "tanh")),  # tanh GELU
        (Activation.SWIGLU_OAI, {}, lambda x: swiglu_oai_ref(x, 1.702, 1.0, 7.0)),  # None -> gpt-oss defaults
        (Activation.SWIGLU_OAI, {"alpha": 2.0, "beta": 0.0, "limit": 4.0},
         lambda x: swiglu_oai_ref(x, 2.0, 0.0, 4.0)),  # explicit parameters
    ],
)
def test_apply_activation(activation: Activation, kwargs: dict,
                          reference: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = gate_up()
    assert_close(apply_activation(x, activation, **kwargs), reference(x))


@pytest.mark.parametrize("function", [silu_and_mul, gelu_and_mul, swiglu_oai])
def test_odd_width_rejected(function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    with pytest.raises(InvalidInputError, match=r"even last dim"):
        function(torch.randn(4, 7))


def test_unknown_activation_rejected() -> None:
    with pytest.raises(InvalidInputError, match="unknown activation"):
        apply_activation(torch.randn(2, 8), "relu")  # type: ignore[arg-type]
