"""FLASHINFER_TRTLLM: FlashInfer's TRT-LLM MxInt4 fused MoE, which routes and runs both GEMMs in one call.

Monolithic: it takes router logits [T, E], not routed ids. "MxInt4" here means int4 weights with one bfloat16
scale per 32 input elements (not e8m0 scales). This version declares the kernel's capabilities only: the
oracle reports it unavailable ("not implemented in this version") and constructing it raises.

Decisions that differ from vLLM's wrapper (see the checks below):
  * SWIGLU_OAI is rejected. The wrapper passes no alpha/beta/limit, so the kernel computes plain
    silu(gate) * up; accepting SWIGLU_OAI would silently drop its alpha, `up + beta` and clamp.
  * bfloat16 activations are a capability check here, not an assertion at the first forward.
  * Expert parallelism is rejected: the kernel addresses local experts by a contiguous offset
    (ep_rank * E_local) and takes no expert map, and this library does not model that placement yet.
  * H and I/tp must be multiples of 256 (the weight layout needs whole 256-element K blocks); vLLM does
    not check this before preparing the weights.
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
    dtype_label,
    fail,
    labels,
)
from wna16moe.scheme import WeightScheme

NAME = "flashinfer_trtllm"

# The TRT-LLM MxInt4 kernels are built for the SM10x family (B200 sm_100, B300 sm_103); SM12x (RTX 50xx)
# is a different family. Some FlashInfer builds ship sm_100-only cubins, so sm_103 can still fail to load.
ARCHS = (100, 103)
_ARCH_NAMES = " or ".join(f"sm_{sm}" for sm in ARCHS)
REQUIRED_PACKAGES = ("flashinfer",)
# The one weight format the kernel reads: int4, symmetric, one bf16 scale per 32 inputs.
BITS = 4
GROUP_SIZE = 32
# The kernel takes bf16 activations only (vLLM asserts it inside the wrapper).
ACT_DTYPES = (torch.bfloat16,)
# Plain silu(gate) * up is all the kernel computes (no alpha, beta or clamp are passed).
ACTIVATIONS = (Activation.SILU,)
# Weights are stored BlockMajorK: K split into 128-byte blocks of 256 int4 values, for both GEMMs
# (GEMM1's K is H, GEMM2's K is I/tp).
K_BLOCK = 256
# Router-logit dtypes per routing method: bf16 for all; DeepSeek-V3 routing also reads fp32 logits.
LOGITS_DTYPES: dict[RoutingMethod, tuple[torch.dtype, ...]] = {
    RoutingMethod.SOFTMAX: (torch.bfloat16,),
    RoutingMethod.SIGMOID: (torch.bfloat16,),
    RoutingMethod.DEEPSEEK_V3: (torch.bfloat16, torch.float32),
}


class FlashInferTrtllmExperts(Experts):
    """FlashInfer TRT-LLM MxInt4 MoE: int4 g32 symmetric, bf16, SiLU, fused routing (declared only)."""

    NAME = NAME
    MONOLITHIC = True
    IMPLEMENTED = False

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CUDA:
            return fail(f"needs a CUDA device of compute capability {_ARCH_NAMES}, got {device.name} "
                        f"({device.platform.value})")
        if device.sm not in ARCHS:
            return fail(f"needs compute capability {_ARCH_NAMES} (the SM10x family), got sm_{device.sm} "
                        f"({device.name})")
        missing = [p for p in REQUIRED_PACKAGES if not device.has_package(p)]
        if missing:
            return fail(f"needs the {', '.join(missing)} package (with TRT-LLM fused MoE), which is not importable")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        wanted = f"int{BITS}_g{GROUP_SIZE}_sym"
        if scheme.bits != BITS or scheme.group_size != GROUP_SIZE or scheme.zero_point or scheme.act_order:
            return fail(f"weight scheme {scheme.name} is not supported; the kernel reads only {wanted} (int4, "
                        f"symmetric, group_size {GROUP_SIZE}, no act-order)")
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation == Activation.SWIGLU_OAI:
            return fail("activation swiglu_oai is not supported: the kernel computes plain silu(gate) * up and "
                        "would drop SwiGLU-OAI's alpha, beta and limit; expected silu")
        if activation not in ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported; expected {labels(ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_routing(cls, routing: RoutingConfig, top_k: int, logits_dtype: torch.dtype | None) -> Check:
        method = routing.method
        # Our three methods map to the kernel's Renormalize, Llama4 and DeepSeekV3 routing; anything those
        # do not compute exactly is rejected rather than approximated.
        if method == RoutingMethod.SOFTMAX and not routing.renormalize:
            return fail("softmax routing without renormalization is not supported; the kernel's Renormalize "
                        "routing always renormalizes the top-k weights")
        if method == RoutingMethod.SIGMOID and (top_k != 1 or routing.renormalize):
            return fail(f"sigmoid routing is supported only as Llama-4 routing (top_k=1, no renormalization), got "
                        f"top_k={top_k}, renormalize={routing.renormalize}")
        if method == RoutingMethod.DEEPSEEK_V3 and not routing.renormalize:
            return fail("deepseek_v3 routing without renormalization is not supported; the kernel's DeepSeekV3 "
                        "routing always renormalizes")
        # Only the kernel's DeepSeekV3 routing has a scaling step; elsewhere the factor would be dropped.
        if method != RoutingMethod.DEEPSEEK_V3 and routing.routed_scaling_factor != 1.0:
            return fail(f"routed_scaling_factor={routing.routed_scaling_factor} is supported only with deepseek_v3 "
                        f"routing, got {method.value}")
        allowed = LOGITS_DTYPES[method]
        if logits_dtype is not None and logits_dtype not in allowed:
            return fail(f"router logits dtype {dtype_label(logits_dtype)} is not supported with {method.value} "
                        f"routing; expected {labels(allowed)}")
        return OK

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        if parallel.use_ep:
            return fail(f"expert parallelism (ep_size={parallel.ep_size}) is not supported: the kernel takes no "
                        "expert map and this library does not model its contiguous expert offset; use tp_size "
                        "instead")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        h, i = spec.moe.hidden_size, spec.intermediate_per_shard
        if h % K_BLOCK or i % K_BLOCK:
            return fail(f"H and I/tp must be multiples of {K_BLOCK} (whole 256-element K blocks in the kernel's "
                        f"weight layout), got H={h}, I/tp={i}")
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        if has_bias:
            return fail("expert bias is not supported: the kernel takes no bias")
        if clamp_limit is not None:
            return fail(f"the SwiGLU clamp limit ({clamp_limit}) is not supported: the kernel computes unclamped "
                        "silu(gate) * up")
        return OK
