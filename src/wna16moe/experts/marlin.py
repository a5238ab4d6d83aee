"""MARLIN and BATCHED_MARLIN: the Marlin MoE GEMMs (vLLM's `moe_wna16_marlin_gemm` op), declared only.

Modular: they take routed top-k ids and weights. `MarlinExperts` reads the STANDARD activation format
([T, H] plus top-k ids); `BatchedMarlinExperts` reads the BATCHED one ([E_local, max_tokens, H], used by
low-latency all-to-all expert parallelism). A layer needs exactly one of the two formats, so at most one of
them passes. This version declares their capabilities only: the oracle reports them unavailable ("not
implemented in this version") and constructing them raises.

The op comes from a Marlin MoE library (vLLM's `_moe_C_stable_libtorch.abi3.so`, or `$WNA16MOE_MARLIN_LIB`);
`DeviceInfo` records it as the pseudo-package "marlin". The op takes no `g_idx`, so act-order checkpoints
are rejected.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from wna16moe.config import Activation, ActivationFormat
from wna16moe.device import MARLIN_LIBRARY_ENV, MARLIN_PROVIDER, DeviceInfo, Platform
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    check_member,
    fail,
    labels,
)
from wna16moe.scheme import WeightScheme

NAME = "marlin"
BATCHED_NAME = "batched_marlin"

# Marlin's tensor-core tiles need Turing (sm_75) or newer; it has no ROCm build.
MIN_SM = 75
REQUIRED_PACKAGES = (MARLIN_PROVIDER,)
# (bits, zero points) -> the Marlin scalar type that dequantizes it. There is no uint8 + zero-point type, so
# int8 must be symmetric.
WEIGHT_TYPES: dict[tuple[int, bool], str] = {(4, False): "uint4b8", (4, True): "uint4", (8, False): "uint8b128"}
# Group sizes Marlin's scale layout handles; None is channel-wise (group_size -1).
GROUP_SIZES = (None, 32, 64, 128)
ACT_DTYPES = (torch.bfloat16, torch.float16)
# H is GEMM1's K and GEMM2's N; both run in tiles of 128.
H_MULTIPLE = 128
# I/tp is zero-padded per shard up to a multiple of lcm(64, group_size) (zero scales keep the padding out of
# the result), so only a group split by the TP shard boundary rules a layer out.
I_TILE = 64
# The activation runs between the two GEMMs in plain torch/triton, so every gated activation works.
ACTIVATIONS = (Activation.SILU, Activation.GELU, Activation.GELU_TANH, Activation.SWIGLU_OAI)
# The batched format needs "masked" activations (per-expert valid-token counts); only these two are known to
# have one, the others are rejected rather than assumed.
BATCHED_ACTIVATIONS = (Activation.SILU, Activation.SWIGLU_OAI)
# Activations whose clamp limit the Marlin path applies.
CLAMP_ACTIVATIONS = (Activation.SILU, Activation.SWIGLU_OAI)


class MarlinExperts(Experts):
    """Marlin MoE, STANDARD format: int4 sym / int4 zp / int8 sym, groups -1/32/64/128, bias (declared only)."""

    NAME = NAME
    IMPLEMENTED = False
    ACTIVATIONS: ClassVar[tuple[Activation, ...]] = ACTIVATIONS

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CUDA:
            return fail(f"needs a CUDA device (sm_{MIN_SM}+), got {device.name} ({device.platform.value}); Marlin "
                        "has no ROCm, XPU or CPU build")
        if (device.sm or 0) < MIN_SM:
            return fail(f"needs compute capability sm_{MIN_SM} or newer, got sm_{device.sm} ({device.name})")
        if not all(device.has_package(p) for p in REQUIRED_PACKAGES):
            return fail(f"the Marlin MoE op library (pseudo-package {MARLIN_PROVIDER!r}) is missing: install vLLM "
                        f"or set {MARLIN_LIBRARY_ENV} to a Marlin MoE library")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.act_order:
            return fail("act-order (g_idx) is not supported: the Marlin MoE op takes no g_idx; re-quantize without "
                        "desc_act/actorder")
        if (scheme.bits, scheme.zero_point) not in WEIGHT_TYPES:
            return fail(f"int{scheme.bits} with zero points is not supported (Marlin has no uint8 + zero-point type); "
                        "expected int4 symmetric, int4 with zero points or int8 symmetric")
        if not (group := check_member(scheme.group_size, GROUP_SIZES, "group_size")).ok:
            return group
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation not in cls.ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported with the {cls.ACTIVATION_FORMAT.value} "
                        f"format; expected {labels(cls.ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        h, i, group = spec.moe.hidden_size, spec.intermediate_per_shard, spec.scheme.group_size
        if h % H_MULTIPLE:
            return fail(f"H={h} is not a multiple of {H_MULTIPLE} (Marlin's tile along H)")
        if group is not None and i % group:
            tile = math.lcm(I_TILE, group)
            return fail(f"I/tp={i} is not a multiple of group_size {group}: a quantization group would straddle "
                        f"the TP shard, which padding to a multiple of lcm({I_TILE}, {group})={tile} cannot fix; use a "
                        f"tp_size that keeps I/tp a multiple of {group}")
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        if clamp_limit is not None and activation not in CLAMP_ACTIVATIONS:
            return fail(f"the SwiGLU clamp limit is supported only with {labels(CLAMP_ACTIVATIONS)}, got "
                        f"{activation.value}")
        return OK


class BatchedMarlinExperts(MarlinExperts):
    """Marlin MoE, BATCHED format [E_local, max_tokens, H]: as `MarlinExperts`, masked activations only."""

    NAME = BATCHED_NAME
    ACTIVATION_FORMAT = ActivationFormat.BATCHED
    ACTIVATIONS = BATCHED_ACTIVATIONS
