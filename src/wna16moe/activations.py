"""Gated activations between the two expert GEMMs, as plain torch functions.

Each takes GEMM1's output x [T, 2I] = [gate | up] (gate in the first I columns) and returns [T, I].
Computed in float32 and returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wna16moe.config import Activation
from wna16moe.errors import InvalidInputError

SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0
# The code of each activation in the Triton kernels' ACT argument (`kernels/activation.py`).
KERNEL_CODES = {Activation.SILU: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.SWIGLU_OAI: 3}


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % 2:
        raise InvalidInputError(f"gated activation needs an even last dim [.., 2I], got {list(x.shape)}")
    gate, up = x.float().chunk(2, dim=-1)
    return gate, up


def silu_and_mul(x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up, with silu(g) = g * sigmoid(g); with a `limit`, gate is first clamped to
    (-inf, limit] and up to [-limit, limit] (the SwiGLU clamp some models put on plain SiLU)."""
    gate, up = _halves(x)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up; exact gelu(g) = g * Phi(g), or its tanh approximation with approximate="tanh"."""
    gate, up = _halves(x)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)


def swiglu_oai(x: torch.Tensor, alpha: float = SWIGLU_OAI_ALPHA, beta: float = 1.0,
               limit: float | None = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """gpt-oss SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit), g * sigmoid(alpha * g) * (u + beta).

    With limit None nothing is clamped.
    """
    gate, up = _halves(x)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (gate * torch.sigmoid(alpha * gate) * (up + beta)).to(x.dtype)


def apply_activation(x: torch.Tensor, activation: Activation, alpha: float | None = None,
                     beta: float | None = None, limit: float | None = None) -> torch.Tensor:
    """Dispatch on `activation`. SWIGLU_OAI uses alpha/beta/limit (defaulting to gpt-oss's); SILU uses
    `limit` when given; the GELUs take none."""
    if activation == Activation.SILU:
        return silu_and_mul(x, limit)
    if activation == Activation.GELU:
        return gelu_and_mul(x)
    if activation == Activation.GELU_TANH:
        return gelu_and_mul(x, approximate="tanh")
    if activation == Activation.SWIGLU_OAI:
        return swiglu_oai(x, SWIGLU_OAI_ALPHA if alpha is None else alpha, 1.0 if beta is None else beta,
                          SWIGLU_OAI_LIMIT if limit is None else limit)
    raise InvalidInputError(f"unknown activation {activation!r}")
