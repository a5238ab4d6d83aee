"""Straightforward float64 reference implementations the tests compare the library against.

Written independently of `wna16moe` (plain loops and float64 torch math): routing, gated activations and a
whole MoE forward over dequantized weights. Routing references also return each token's *margin*, the gap
between the last chosen and the first rejected score (groups and experts), so tests can avoid near-ties
where float32 and float64 may legitimately choose differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # weights [T, K] f64, ids [T, K] i64, margin [T] f64


def _top(values: list[float], k: int, eligible: list[int] | None = None) -> tuple[list[int], float]:
    """Indices of the k largest values (ties: lower index first) and the gap to the next one (inf if none)."""
    candidates = list(range(len(values))) if eligible is None else eligible
    order = sorted(candidates, key=lambda i: (-values[i], i))
    margin = values[order[k - 1]] - values[order[k]] if len(order) > k else math.inf
    return order[:k], margin


def softmax_topk_ref(logits: torch.Tensor, k: int, renormalize: bool, scale: float = 1.0) -> Routing:
    weights, ids, margins = [], [], []
    for row in logits.double().tolist():
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        total = sum(exps)
        probs = [v / total for v in exps]
        chosen, margin = _top(probs, k)
        w = [probs[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
        margins.append(margin)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids), torch.tensor(margins, dtype=torch.float64)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def sigmoid_topk_ref(logits: torch.Tensor, k: int, renormalize: bool, scale: float = 1.0) -> Routing:
    weights, ids, margins = [], [], []
    for row in logits.double().tolist():
        chosen, margin = _top(row, k)
        w = [_sigmoid(row[i]) for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
        margins.append(margin)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids), torch.tensor(margins, dtype=torch.float64)


def grouped_topk_ref(logits: torch.Tensor, k: int, n_group: int, topk_group: int,
                     correction_bias: torch.Tensor | None, renormalize: bool, scale: float) -> Routing:
    """DeepSeek-V3 (noaux_tc): s = sigmoid(logit); c = s + bias chooses; a group scores the sum of its two best
    c; the topk_group best groups are eligible; top-k eligible c are chosen; weights are s, renormalized if
    asked, times `scale`."""
    e = logits.shape[1]
    size = e // n_group
    bias = [0.0] * e if correction_bias is None else correction_bias.double().tolist()
    weights, ids, margins = [], [], []
    for row in logits.double().tolist():
        s = [_sigmoid(v) for v in row]
        c = [s[i] + bias[i] for i in range(e)]
        group_scores = []
        for g in range(n_group):
            members = sorted(c[g * size:(g + 1) * size], reverse=True)
            group_scores.append(sum(members[:2]))
        groups, group_margin = _top(group_scores, topk_group)
        eligible = [i for g in sorted(groups) for i in range(g * size, (g + 1) * size)]
        chosen, margin = _top(c, k, eligible)
        w = [s[i] for i in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
        margins.append(min(margin, group_margin))
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids), torch.tensor(margins, dtype=torch.float64)


MARGIN = 1e-4  # near-ties closer than this may be decided differently in float32 and float64


def assert_routing(got: tuple[torch.Tensor, torch.Tensor], want: Routing) -> None:
    """Routing (weights float32, ids int32) equal to a reference's: the same ids in the same order, weights
    within float32 rounding."""
    weights, ids = got
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), want[1]), "expert ids differ"
    torch.testing.assert_close(weights.double(), want[0], rtol=2e-6, atol=1e-7)


def unambiguous_logits(t: int, e: int, reference: Callable[[torch.Tensor], Routing],
                       generator: torch.Generator | None = None, scale: float = 2.0) -> torch.Tensor:
    """Random float32 logits [T, E] whose rows have no near-tie at a routing decision (rows redrawn)."""
    def draw(rows: int) -> torch.Tensor:
        return torch.randn(rows, e, generator=generator) * scale

    logits = draw(t)
    for _ in range(100):
        ambiguous = reference(logits)[2] < MARGIN
        if not ambiguous.any():
            return logits
        logits[ambiguous] = draw(int(ambiguous.sum()))
    raise AssertionError("could not draw unambiguous logits")


# ----- gated activations: x [T, 2I] = [gate | up] -> [T, I] -----------------------------------------------

def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = x.shape[-1] // 2
    x = x.double()
    return x[..., :i], x[..., i:]


def silu_and_mul_ref(x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    gate, up = _halves(x)
    if limit is not None:
        gate = torch.minimum(gate, torch.full_like(gate, limit))
        up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
    return gate / (1.0 + torch.exp(-gate)) * up


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    gate, up = _halves(x)
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1.0 + torch.tanh(inner)) * up
    return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up


def swiglu_oai_ref(x: torch.Tensor, alpha: float = 1.702, beta: float = 1.0, limit: float | None = 7.0
                   ) -> torch.Tensor:
    gate, up = _halves(x)
    if limit is not None:
        gate = torch.minimum(gate, torch.full_like(gate, limit))
        up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
    return gate * (1.0 / (1.0 + torch.exp(-alpha * gate))) * (up + beta)


# ----- a whole MoE layer -----------------------------------------------------------------------------------

def moe_forward_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor],
                    w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [T, H] = sum_k weight[t, k] * (w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e]), e = ids[t, k]."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    ids = topk_ids.long()
    gate_up = torch.einsum("tkoh,th->tko", w13[ids], x)  # [T, K, 2I]
    if w13_bias is not None:
        gate_up = gate_up + w13_bias.double()[ids]
    act = activation(gate_up)  # [T, K, I]
    down = torch.einsum("tkhi,tki->tkh", w2[ids], act)  # [T, K, H]
    if w2_bias is not None:
        down = down + w2_bias.double()[ids]
    return torch.einsum("tk,tkh->th", topk_weights.double(), down)
