"""CPU: a fused int4 MoE for CPUs (vLLM's `CPUExpertsInt4`), declared only.

Monolithic: it takes router logits [T, E] and computes softmax top-k itself. This version declares its
capabilities only: the oracle reports it unavailable ("not implemented in this version") and constructing
it raises; on a CPU the oracle therefore picks EMULATION.

Note for whoever writes the kernel: vLLM's CPU path quantizes activations to int8 per token (it runs a
W4A8 kernel), which is not W4A16 and would not match EMULATION; the kernel that lands here must keep
activations in bf16/fp16 or declare the difference.
"""

from __future__ import annotations

import torch

from wna16moe.config import Activation, ParallelConfig, RoutingConfig, RoutingMethod
from wna16moe.device import DeviceInfo, Platform
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    check_member,
    check_whole_groups,
    dtype_label,
    fail,
    labels,
)
from wna16moe.scheme import WeightScheme

NAME = "cpu"

# The CPU kernel is W4A16 only (vLLM refuses 8-bit MoE weights on CPU).
BITS = (4,)
ACT_DTYPES = (torch.bfloat16, torch.float16)
# The kernel's gated activation is silu(gate) * up, nothing else.
ACTIVATIONS = (Activation.SILU,)
# It routes by softmax top-k (with or without renormalization); sigmoid and DeepSeek-V3 routing are not in it.
ROUTING_METHODS = (RoutingMethod.SOFTMAX,)
# Softmax top-k reads logits of any floating dtype.
LOGITS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CPUExperts(Experts):
    """Fused int4 MoE on CPU: int4 (symmetric or zero points), SiLU, softmax routing (declared only)."""

    NAME = NAME
    MONOLITHIC = True
    IMPLEMENTED = False

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CPU:
            return fail(f"runs on the CPU only, got {device.name} ({device.platform.value})")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.bits not in BITS:
            return fail(f"int{scheme.bits} weights are not supported; expected int4")
        if scheme.act_order:
            return fail("act-order (g_idx) is not supported: the CPU kernel's blocked repack assumes groups in order")
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation not in ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported; expected {labels(ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_routing(cls, routing: RoutingConfig, top_k: int, logits_dtype: torch.dtype | None) -> Check:
        if routing.method not in ROUTING_METHODS:
            return fail(f"routing method {routing.method.value} is not supported; expected {labels(ROUTING_METHODS)}")
        if logits_dtype is not None and logits_dtype not in LOGITS_DTYPES:
            return fail(f"router logits dtype {dtype_label(logits_dtype)} is not supported; expected "
                        f"{labels(LOGITS_DTYPES)}")
        return OK

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        if parallel.use_ep:
            return fail(f"expert parallelism (ep_size={parallel.ep_size}) is not supported: the CPU kernel takes no "
                        "expert map")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        # The blocked (VNNI) repack works on whole groups along each GEMM's K.
        return check_whole_groups(spec)

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        if clamp_limit is not None:
            return fail(f"the SwiGLU clamp limit ({clamp_limit}) is not supported by the CPU kernel")
        return OK
