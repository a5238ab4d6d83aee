"""Routing: router logits [T, E] -> top-k weights [T, K] float32 and expert ids [T, K] int32.

Plain torch, computed in float32. Who applies what: `routed_scaling_factor` is applied here, so a layer's
output already includes it.
"""

from __future__ import annotations

import torch

from wna16moe.config import RoutingConfig, RoutingMethod
from wna16moe.errors import InvalidInputError


def _topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along the last dim and their indices, ties broken towards the lower index
    (`torch.topk` promises no order among equal values)."""
    ordered, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return ordered[..., :k], order[..., :k]


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits) over all experts; keep the k largest p (ties: lower id first); with
    `renormalize`, divide them by their sum."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = _topk(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def sigmoid_topk(logits: torch.Tensor, top_k: int, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-4 style: choose the k largest logits (ties: lower id first), weight each by sigmoid(logit);
    optionally renormalize."""
    values, ids = _topk(logits.float(), top_k)
    weights = torch.sigmoid(values)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _check_groups(num_experts: int, n_group: int) -> None:
    if num_experts % n_group:
        raise InvalidInputError(f"num_experts={num_experts} is not a multiple of n_group={n_group}")


def grouped_topk(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                 correction_bias: torch.Tensor | None = None, renormalize: bool = True,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing.

    s = sigmoid(logits); c = s + correction_bias (choice only). Experts form `n_group` equal groups; a
    group's score is the sum of its two largest c. Only the `topk_group` best groups stay eligible; the k
    largest eligible c are chosen (ties, of groups and of experts: lower index first). Weights are s
    (without bias) of the chosen experts, divided by their sum if `renormalize`, then multiplied by
    `routed_scaling_factor`.
    """
    t, e = logits.shape
    _check_groups(e, n_group)
    scores = torch.sigmoid(logits.float())
    choice = scores if correction_bias is None else scores + correction_bias.float()
    grouped = choice.view(t, n_group, e // n_group)
    group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # [T, n_group]
    best_groups = _topk(group_scores, topk_group)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    eligible = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, e)
    masked = choice.masked_fill(~eligible, float("-inf"))
    ids = _topk(masked, top_k)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def route(logits: torch.Tensor, routing: RoutingConfig, top_k: int,
          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route with the method of `routing`; `correction_bias` [E] is used by DEEPSEEK_V3 only."""
    if logits.dim() != 2:
        raise InvalidInputError(f"router_logits must be [T, E], got {list(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise InvalidInputError(f"top_k={top_k} must lie in [1, E={num_experts}]")
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise InvalidInputError(f"correction_bias must be [E={num_experts}], got {list(correction_bias.shape)}")
    deepseek = routing.method == RoutingMethod.DEEPSEEK_V3
    if deepseek and routing.has_correction_bias and correction_bias is None:
        raise InvalidInputError("this routing config needs an e_score_correction_bias [E], got None")
    if deepseek:
        _check_groups(num_experts, routing.n_group)
    if logits.is_cuda:
        return _route_in_one_launch(logits, routing, top_k, correction_bias if deepseek else None)
    return route_torch(logits, routing, top_k, correction_bias)


def route_torch(logits: torch.Tensor, routing: RoutingConfig, top_k: int,
                correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` in torch on any device (several launches on a GPU), without `route`'s checks."""
    if routing.method == RoutingMethod.SOFTMAX:
        weights, ids = softmax_topk(logits, top_k, routing.renormalize)
    elif routing.method == RoutingMethod.SIGMOID:
        weights, ids = sigmoid_topk(logits, top_k, routing.renormalize)
    else:
        return grouped_topk(logits, top_k, routing.n_group, routing.topk_group, correction_bias,
                            routing.renormalize, routing.routed_scaling_factor)
    if routing.routed_scaling_factor != 1.0:
        weights = weights * routing.routed_scaling_factor
    return weights, ids


def _route_in_one_launch(logits: torch.Tensor, routing: RoutingConfig, top_k: int,
                         correction_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` on a GPU: the same math as one Triton kernel (kernels/topk_route.py), a programmatic dependent of
    the router's matmul where the layer's kernels are."""
    from wna16moe.kernels.grid_dependence import chained_launch
    from wna16moe.kernels.topk_route import topk_route

    deepseek = routing.method == RoutingMethod.DEEPSEEK_V3
    return topk_route(logits, top_k, softmax=routing.method == RoutingMethod.SOFTMAX,
                      renormalize=routing.renormalize, n_group=routing.n_group if deepseek else 1,
                      topk_group=routing.topk_group if deepseek else 1, scale=routing.routed_scaling_factor,
                      bias=correction_bias, pdl=int(chained_launch(logits.device)))
