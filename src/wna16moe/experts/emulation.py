"""EMULATION: the reference backend. Dequantizes each routed expert to float32 and runs it with torch.

Runs on any device. Every other backend is tested against it. Slow by design: weights stay quantized in
memory and are dequantized per forward, expert by expert. Standard format only; takes an expert map (pairs
with local expert id -1 are skipped), so it runs every TP and EP layer whose TP shards hold whole groups.
"""

from __future__ import annotations

import torch

from wna16moe.activations import apply_activation
from wna16moe.errors import InvalidInputError
from wna16moe.experts.base import Check, Experts, LayerSpec, check_tp_groups
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

NAME = "emulation"


def experts_to_tensors(experts: QuantizedExperts) -> dict[str, torch.Tensor]:
    """Canonical experts as a flat dict: w13_codes, w13_scales, [w13_zeros], [w13_g_idx], w2_... ."""
    out = {}
    for stem, weight in (("w13", experts.w13), ("w2", experts.w2)):
        out[f"{stem}_codes"] = weight.codes
        out[f"{stem}_scales"] = weight.scales
        if weight.zeros is not None:
            out[f"{stem}_zeros"] = weight.zeros
        if weight.g_idx is not None:
            out[f"{stem}_g_idx"] = weight.g_idx
    return out


def tensors_to_weight(scheme: WeightScheme, tensors: dict[str, torch.Tensor], stem: str) -> QuantizedWeight:
    return QuantizedWeight(scheme, tensors[f"{stem}_codes"], tensors[f"{stem}_scales"],
                           tensors.get(f"{stem}_zeros"), tensors.get(f"{stem}_g_idx"))


class EmulationExperts(Experts):
    """Dequantize + float32 matmul, for every scheme, activation and device."""

    NAME = NAME
    SUPPORTS_EXPERT_MAP = True

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        return check_tp_groups(spec)

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        return {key: t.to(device) for key, t in experts_to_tensors(experts).items()}

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_routed(hidden_states, topk_weights, topk_ids)
        scheme = self.scheme
        w13 = tensors_to_weight(scheme, weights, "w13")
        w2 = tensors_to_weight(scheme, weights, "w2")
        q = self.quant
        x = hidden_states.float()
        out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
        num_experts = w13.codes.shape[0]
        for expert in torch.unique(topk_ids).tolist():  # host sync: the reference may sync
            if not -1 <= expert < num_experts:
                raise InvalidInputError(f"topk_ids holds expert {expert}, but the layer has {num_experts} experts "
                                        "(and -1 for one another EP rank owns)")
            if expert < 0:  # owned by another EP rank
                continue
            token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            gate_up = x[token] @ w13.dequantize(expert).t()
            if q.w1_bias is not None:
                gate_up = gate_up + q.w1_bias[expert].float()
            act = apply_activation(gate_up, self.moe.activation, q.gemm1_alpha, q.gemm1_beta, q.gemm1_clamp_limit)
            down = act @ w2.dequantize(expert).t()
            if q.w2_bias is not None:
                down = down + q.w2_bias[expert].float()
            out.index_add_(0, token, down * topk_weights[token, slot].float().unsqueeze(1))
        return out.to(hidden_states.dtype)
