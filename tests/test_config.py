"""Frozen configs: MoEConfig, RoutingConfig, ParallelConfig and make_wna16_moe_quant_config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wna16moe import (
    Activation,
    InvalidInputError,
    MoEConfig,
    ParallelConfig,
    RoutingConfig,
    RoutingMethod,
    UnsupportedError,
    make_wna16_moe_quant_config,
)

E, H, I = 4, 96, 40  # noqa: E741 (I is the intermediate size); H, I not multiples of 32: partial groups

# ----- RoutingConfig and MoEConfig validation ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_group": 0}, "topk_group"),  # no groups
        ({"n_group": 4, "topk_group": 5}, "topk_group=5"),  # more groups kept than exist
        ({"n_group": 4, "topk_group": 0}, "topk_group=0"),  # no group kept
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),  # zero scale
        ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),  # negative
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),  # NaN
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),  # inf
        ({"method": "bogus"}, "RoutingConfig.method must be one of softmax, sigmoid"),  # no such method
    ],
)
def test_routing_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        RoutingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_experts": 0}, InvalidInputError, "num_experts"),  # no experts
        ({"hidden_size": -4}, InvalidInputError, "hidden_size"),  # negative size
        ({"intermediate_size": 2.0}, InvalidInputError, "intermediate_size"),  # not an int
        ({"num_experts": True}, InvalidInputError, "num_experts"),  # a bool is not a count
        ({"activation": "relu"}, InvalidInputError, "MoEConfig.activation must be one of silu"),  # not supported
        ({"routing": "softmax"}, InvalidInputError, "MoEConfig.routing must be a RoutingConfig"),  # a bare method
        ({"top_k": 9}, InvalidInputError, "top_k=9 exceeds num_experts=8"),  # more than E
        ({"dtype": torch.float32}, UnsupportedError, "bfloat16 or float16"),  # float32 activations
        ({"routing": RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=3)}, InvalidInputError,
         "not a multiple of n_group=3"),  # 8 experts in 3 groups
        ({"top_k": 5, "routing": RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=4, topk_group=2)},
         InvalidInputError, "exceeds the 4 experts"),  # 2 groups of 2 experts cannot give 5
    ],
)
def test_moe_config_rejects(kwargs: dict, error: type[Exception], message: str) -> None:
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 32}
    with pytest.raises(error, match=message):
        MoEConfig(**(base | kwargs))


def test_enum_settings_take_their_values_as_strings() -> None:
    cfg = MoEConfig(8, 2, 64, 32, activation="gelu", routing=RoutingConfig("sigmoid"))
    assert cfg.activation is Activation.GELU and cfg.routing.method is RoutingMethod.SIGMOID


def test_moe_config_is_frozen() -> None:
    cfg = MoEConfig(8, 2, 64, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    assert cfg.routing == RoutingConfig() and cfg.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp_size": 0}, "tp_rank=0"),  # no ranks
        ({"tp_size": 2, "tp_rank": 2}, "tp_rank=2"),  # rank out of range
        ({"ep_size": 4, "ep_rank": -1}, "ep_rank=-1"),  # negative rank
    ],
)
def test_parallel_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        ParallelConfig(**kwargs)
    assert ParallelConfig(ep_size=2, ep_rank=1).use_ep and not ParallelConfig().use_ep


# ----- make_wna16_moe_quant_config -------------------------------------------------------------------------------

def scales(group_size: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive scales: w1 [E, 2I, G1], w2 [E, H, G2]."""
    g1 = 1 if group_size == -1 else -(-H // group_size)
    g2 = 1 if group_size == -1 else -(-I // group_size)
    return (torch.rand(E, 2 * I, g1) + 0.01).to(dtype), (torch.rand(E, H, g2) + 0.01).to(dtype)


@pytest.mark.parametrize(
    ("group_size", "bits", "zero_points"),
    [
        (32, 4, False),  # int4 g32 symmetric, partial last groups (G1 = 3, G2 = 2)
        (-1, 8, False),  # int8 channel-wise
        (128, 4, True),  # int4 with zero points; one (partial) group
        (16, 8, True),  # int8 with uint8 zero points up to 255
    ],
)
def test_valid_quant_config(group_size: int, bits: int, zero_points: bool) -> None:
    w1, w2 = scales(group_size)
    zp = {}
    if zero_points:
        zp = {"w1_zp": torch.randint(0, 1 << bits, w1.shape, dtype=torch.uint8),
              "w2_zp": torch.randint(0, 1 << bits, w2.shape, dtype=torch.uint8)}
        zp["w1_zp"][0, 0, 0] = (1 << bits) - 1  # the largest code is a legal zero point
    bias = {"w1_bias": torch.randn(E, 2 * I), "w2_bias": torch.randn(E, H, dtype=torch.bfloat16)}
    q = make_wna16_moe_quant_config(w1, w2, group_size, bits, **zp, **bias, a1_gscale=torch.rand(E) + 0.1,
                                    a2_gscale=torch.tensor(2.0), gemm1_clamp_limit=7.0, gemm1_alpha=1.702,
                                    gemm1_beta=1.0)
    assert q.w1_scale is w1 and q.w2_scale is w2
    assert (q.group_size, q.num_bits) == (group_size, bits)
    assert q.has_zero_points == zero_points and q.has_bias
    assert (q.gemm1_clamp_limit, q.gemm1_alpha, q.gemm1_beta) == (7.0, 1.702, 1.0)


def test_quant_config_is_immutable() -> None:
    q = make_wna16_moe_quant_config(*scales(32), 32, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.num_bits = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.w1_scale = torch.ones(1)  # type: ignore[misc]
    assert not q.has_bias and not q.has_zero_points


def _bad(**change: object) -> dict:
    w1, w2 = scales(32)
    return {"w1_scale": w1, "w2_scale": w2, "group_size": 32, "num_bits": 4} | change


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (_bad(num_bits=3), UnsupportedError, "num_bits=3"),  # unsupported bits
        (_bad(num_bits=16), UnsupportedError, "num_bits=16"),  # same
        (_bad(group_size=0), UnsupportedError, "group_size=0"),  # empty groups
        (_bad(group_size=-2), UnsupportedError, "group_size=-2"),  # only -1 means channel-wise
        (_bad(group_size=32.0), UnsupportedError, "group_size=32.0"),  # not an int
        (_bad(w1_scale=torch.rand(E, 2 * I)), InvalidInputError, "w1_scale must be a 3-D float"),  # 2-D scales
        (_bad(w2_scale=torch.ones(E, H, 2, dtype=torch.int32)), InvalidInputError, "w2_scale must be a 3-D float"),
        (_bad(w2_scale=torch.rand(E + 1, H, 2)), InvalidInputError, "disagree"),  # expert counts differ
        (_bad(w1_scale=torch.rand(E, 2 * I + 1, 3)), InvalidInputError, "disagree"),  # odd 2I
        (_bad(w1_scale=torch.rand(E, 2 * I, 2)), InvalidInputError, "G1=3"),  # G1 does not fit H=96 / 32
        (_bad(w2_scale=torch.rand(E, H, 1)), InvalidInputError, "G2=2"),  # G2 does not fit I=40 / 32
        (_bad(w1_scale=torch.full((E, 2 * I, 3), float("nan"))), InvalidInputError, "w1_scale holds NaN"),
        (_bad(w1_zp=torch.zeros(E, 2 * I, 3, dtype=torch.uint8)), InvalidInputError, "both w1_zp and w2_zp"),
        (_bad(w1_zp=torch.zeros(E, 2 * I, 2, dtype=torch.uint8), w2_zp=torch.zeros(E, H, 2, dtype=torch.uint8)),
         InvalidInputError, "w1_zp must be an integer tensor shaped like"),  # zp shape
        (_bad(w1_zp=torch.zeros(E, 2 * I, 3), w2_zp=torch.zeros(E, H, 2)), InvalidInputError,
         "w1_zp must be an integer"),  # float zero points
        (_bad(w1_zp=torch.full((E, 2 * I, 3), 16, dtype=torch.uint8), w2_zp=torch.zeros(E, H, 2, dtype=torch.uint8)),
         InvalidInputError, r"w1_zp values must lie in \[0, 16\)"),  # 16 does not fit 4 bits
        (_bad(w1_zp=torch.zeros(E, 2 * I, 3, dtype=torch.int32), w2_zp=torch.full((E, H, 2), -1, dtype=torch.int32)),
         InvalidInputError, "w2_zp values must lie"),  # negative
        (_bad(w1_bias=torch.randn(E, I)), InvalidInputError, r"w1_bias must be \[4, 80\]"),  # bias shape
        (_bad(w2_bias=torch.ones(E, H, dtype=torch.int64)), InvalidInputError, "w2_bias must be a 2-D float"),
        (_bad(a1_gscale=torch.rand(E + 1)), InvalidInputError, "a1_gscale must be a float tensor, scalar"),  # not [E]
        (_bad(a2_gscale=torch.tensor(-1.0)), InvalidInputError, "a2_gscale must be positive"),  # negative
        (_bad(gemm1_clamp_limit=0.0), InvalidInputError, "gemm1_clamp_limit must be > 0"),  # zero limit
        (_bad(gemm1_clamp_limit=float("nan")), InvalidInputError, "gemm1_clamp_limit"),  # NaN limit
        (_bad(gemm1_alpha=float("inf")), InvalidInputError, "gemm1_alpha must be a finite number"),  # inf alpha
        (_bad(gemm1_alpha="1"), InvalidInputError, "gemm1_alpha must be a finite number, got '1'"),  # a string
        (_bad(gemm1_clamp_limit=torch.tensor([1.0, 2.0])), InvalidInputError, "gemm1_clamp_limit must be a finite"),
        (_bad(num_bits=4.0), UnsupportedError, "num_bits=4.0"),  # not an int
        (_bad(group_size=True), UnsupportedError, "group_size=True"),  # a bool is not a size
        (_bad(w1_scale=torch.rand(0, 2 * I, 3), w2_scale=torch.rand(0, H, 2)), InvalidInputError, "disagree"),  # E=0
        (_bad(w2_scale=-torch.rand(E, H, 2)), InvalidInputError, "w2_scale holds negative scales"),
        (_bad(w1_zp=[0], w2_zp=[0]), InvalidInputError, r"w1_zp must be an integer tensor .* got \[0\]"),
        (_bad(w1_zp=torch.ones(E, 2 * I, 3, dtype=torch.bool), w2_zp=torch.ones(E, H, 2, dtype=torch.bool)),
         InvalidInputError, "w1_zp must be an integer"),  # bool zero points
        (_bad(w1_bias=torch.full((E, 2 * I), float("nan"))), InvalidInputError, "w1_bias holds NaN"),
        (_bad(a1_gscale=1.0), InvalidInputError, "a1_gscale must be a float tensor, scalar or .* got 1.0"),
    ],
)
def test_quant_config_rejects(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make_wna16_moe_quant_config(**kwargs)
