"""Routing against the float64 references in tests/reference.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import Routing, assert_routing, grouped_topk_ref, sigmoid_topk_ref, softmax_topk_ref, unambiguous_logits

from wna16moe import InvalidInputError, RoutingConfig, RoutingMethod
from wna16moe.routing import grouped_topk, route, sigmoid_topk, softmax_topk

# ----- softmax ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("t", "e", "k"),
    [
        (1, 8, 2),  # a single token (decode)
        (33, 16, 4),  # a batch
        (9, 64, 1),  # top-1
        (5, 8, 8),  # every expert
    ],
)
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk(t: int, e: int, k: int, renormalize: bool) -> None:
    def ref(x: torch.Tensor) -> Routing:
        return softmax_topk_ref(x, k, renormalize)

    logits = unambiguous_logits(t, e, ref)
    assert_routing(softmax_topk(logits, k, renormalize), ref(logits))
    if renormalize:
        torch.testing.assert_close(softmax_topk(logits, k, True)[0].sum(-1), torch.ones(t))


def test_softmax_bf16_logits_and_ties() -> None:
    """bf16 logits (routed in float32): equal logits tie exactly, and ties go to the lower expert id."""
    logits = (torch.randn(64, 16) * 2).to(torch.bfloat16)
    logits[:8] = logits[:8].round()  # many exact ties
    logits[8] = 0  # all experts tied
    assert_routing(softmax_topk(logits, 4, False), softmax_topk_ref(logits.double(), 4, False))
    assert softmax_topk(logits, 4, False)[1][8].tolist() == [0, 1, 2, 3]


# ----- sigmoid --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("t", "e", "k", "renormalize"),
    [
        (1, 16, 1, False),  # Llama-4: top-1, sigmoid weight
        (17, 16, 2, False),  # top-2, plain sigmoid weights
        (17, 32, 4, True),  # renormalized
    ],
)
def test_sigmoid_topk(t: int, e: int, k: int, renormalize: bool) -> None:
    def ref(x: torch.Tensor) -> Routing:
        return sigmoid_topk_ref(x, k, renormalize)

    logits = unambiguous_logits(t, e, ref)
    assert_routing(sigmoid_topk(logits, k, renormalize), ref(logits))


def test_sigmoid_ties() -> None:
    logits = torch.zeros(3, 8)
    logits[1, [6, 2, 4]] = 1.0  # a three-way tie for two places
    ids = sigmoid_topk(logits, 2)[1].tolist()
    assert ids == [[0, 1], [2, 4], [0, 1]]


# ----- DeepSeek-V3 grouped top-k ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("e", "k", "n_group", "topk_group", "bias", "renormalize", "scale"),
    [
        (16, 4, 4, 2, True, True, 2.5),  # DeepSeek-V3 in miniature (256/8/8/4, scale 2.5)
        (16, 4, 4, 2, False, True, 1.0),  # no correction bias
        (32, 6, 8, 3, True, False, 1.5),  # no renormalization: raw sigmoid scores times the scale
        (8, 2, 8, 2, True, True, 1.0),  # groups of one expert (group score = its single score)
        (12, 3, 1, 1, True, True, 2.0),  # one group (GLM-4.5 style): plain biased top-k
    ],
)
def test_grouped_topk(e: int, k: int, n_group: int, topk_group: int, bias: bool, renormalize: bool,
                      scale: float) -> None:
    correction = torch.randn(e) * 0.3 if bias else None

    def ref(x: torch.Tensor) -> Routing:
        return grouped_topk_ref(x, k, n_group, topk_group, correction, renormalize, scale)

    logits = unambiguous_logits(40, e, ref)
    got = grouped_topk(logits, k, n_group, topk_group, correction, renormalize, scale)
    assert_routing(got, ref(logits))
    # Chosen experts all lie in topk_group groups.
    groups = got[1].long() // (e // n_group)
    assert all(len(set(row)) <= topk_group for row in groups.tolist())


def test_grouped_topk_bias_changes_choice_not_weights() -> None:
    """A large bias on expert 0 forces it in, but its weight stays its unbiased sigmoid score."""
    logits = torch.randn(6, 16)
    logits[:, 0] = -5.0
    bias = torch.zeros(16)
    bias[0] = 10.0
    weights, ids = grouped_topk(logits, 4, 4, 2, bias, renormalize=False)
    assert (ids == 0).any(-1).all()
    slot = (ids == 0).int().argmax(-1)
    torch.testing.assert_close(weights[torch.arange(6), slot], torch.sigmoid(torch.tensor(-5.0)).expand(6))


@given(
    t=st.integers(1, 12),
    groups=st.sampled_from([(1, 1), (4, 1), (4, 2), (8, 4), (2, 2)]),  # (n_group, topk_group)
    per_group=st.integers(1, 6),
    k=st.integers(1, 8),
    bias=st.booleans(),
    renormalize=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_grouped_topk_property(t: int, groups: tuple[int, int], per_group: int, k: int, bias: bool,
                               renormalize: bool, scale: float, seed: int) -> None:
    n_group, topk_group = groups
    e = n_group * per_group
    k = min(k, topk_group * per_group)
    gen = torch.Generator().manual_seed(seed)
    correction = torch.randn(e, generator=gen) * 0.2 if bias else None

    def ref(x: torch.Tensor) -> Routing:
        return grouped_topk_ref(x, k, n_group, topk_group, correction, renormalize, scale)

    logits = unambiguous_logits(t, e, ref, gen)
    assert_routing(grouped_topk(logits, k, n_group, topk_group, correction, renormalize, scale), ref(logits))


# ----- route() -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("routing", "reference"),
    [
        (RoutingConfig(RoutingMethod.SOFTMAX), lambda x, b: softmax_topk_ref(x, 4, False)),  # Qwen default
        (RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True, routed_scaling_factor=2.0),
         lambda x, b: softmax_topk_ref(x, 4, True, 2.0)),  # the scaling factor applies to softmax too
        (RoutingConfig(RoutingMethod.SIGMOID, routed_scaling_factor=0.5),
         lambda x, b: sigmoid_topk_ref(x, 4, False, 0.5)),  # and to sigmoid
        (RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, has_correction_bias=True),
         lambda x, b: grouped_topk_ref(x, 4, 4, 2, b, True, 2.5)),  # DeepSeek-V3
    ],
)
def test_route(routing: RoutingConfig, reference: Callable) -> None:
    bias = torch.randn(16) * 0.2

    def ref(x: torch.Tensor) -> Routing:
        return reference(x, bias)

    logits = unambiguous_logits(20, 16, ref)
    assert_routing(route(logits, routing, 4, bias), ref(logits))


@pytest.mark.parametrize(
    ("logits", "routing", "bias", "message"),
    [
        (torch.randn(16), RoutingConfig(), None, r"router_logits must be \[T, E\]"),  # 1-D
        (torch.randn(2, 3, 16), RoutingConfig(), None, r"router_logits must be \[T, E\]"),  # 3-D
        (torch.randn(4, 16), RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=4, topk_group=2,
                                           has_correction_bias=True), None, "e_score_correction_bias"),
    ],
)
def test_route_rejects(logits: torch.Tensor, routing: RoutingConfig, bias: torch.Tensor | None,
                       message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        route(logits, routing, 2, bias)


def test_grouped_topk_rejects_uneven_groups() -> None:
    with pytest.raises(InvalidInputError, match="not a multiple of n_group=3"):
        grouped_topk(torch.randn(2, 16), 2, 3, 1)


@pytest.mark.parametrize("top_k", [0, 9])
def test_route_rejects_top_k_outside_the_experts(top_k: int) -> None:
    with pytest.raises(InvalidInputError, match=f"top_k={top_k}"):
        route(torch.randn(3, 8), RoutingConfig(), top_k)


def test_route_rejects_a_misshapen_correction_bias() -> None:
    config = RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=2, topk_group=1, has_correction_bias=True)
    with pytest.raises(InvalidInputError, match="correction_bias"):
        route(torch.randn(3, 8), config, 2, torch.randn(7))
