"""XPU: Intel GPU fused MoE from `vllm_xpu_kernels` (vLLM's `XPUExpertsWNA16`), declared only.

Modular, STANDARD format only. This version declares its capabilities only: the oracle reports it
unavailable ("not implemented in this version") and constructing it raises.

Intel GPUs run today through the TRITON backend: our Triton kernels on torch.xpu, where the installed
Triton carries Intel's XPU backend (`triton.backends.intel`; DeviceInfo's pseudo-package "triton_xpu").
The oracle's "xpu" row tries this class first, then TRITON, then EMULATION: once the native kernel lands
and is measured, it takes over where its checks pass. Nothing here has run on an XPU; the oracle tests
cover selection and rejections with named devices.
"""

from __future__ import annotations

import torch

from wna16moe.config import Activation
from wna16moe.device import DeviceInfo, Platform
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    check_clamp,
    check_member,
    check_whole_groups,
    fail,
    labels,
)
from wna16moe.scheme import WeightScheme

NAME = "xpu"

REQUIRED_PACKAGES = ("vllm_xpu_kernels",)
# The kernel reads int4 as signed s4 (it converts from uint4b8 itself), so weights must be symmetric.
BITS = (4,)
# Group sizes of the int4 weight keys the XPU kernel is known to accept (32 and the default 128);
# channel-wise is not among them.
GROUP_SIZES = (32, 128)
ACT_DTYPES = (torch.bfloat16, torch.float16)
ACTIVATIONS = (Activation.SILU, Activation.GELU, Activation.GELU_TANH, Activation.SWIGLU_OAI)
# The clamp limit reaches the kernel as SwiGLU-OAI's `limit` only.
CLAMP_ACTIVATIONS = (Activation.SWIGLU_OAI,)


class XPUExperts(Experts):
    """Intel XPU fused MoE: int4 symmetric, groups 32/128, bias and SwiGLU clamp (declared only)."""

    NAME = NAME
    IMPLEMENTED = False

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.XPU:
            return fail(f"needs an Intel XPU, got {device.name} ({device.platform.value})")
        missing = [p for p in REQUIRED_PACKAGES if not device.has_package(p)]
        if missing:
            return fail(f"needs the {', '.join(missing)} package, which is not importable")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.bits not in BITS:
            return fail(f"int{scheme.bits} weights are not supported; expected int4")
        if scheme.zero_point:
            return fail("zero points are not supported; the XPU kernel reads symmetric int4 only")
        if scheme.act_order:
            return fail("act-order (g_idx) is not supported by the XPU kernel")
        if not (group := check_member(scheme.group_size, GROUP_SIZES, "group_size")).ok:
            return group
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation not in ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported; expected {labels(ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        # Scales are [.., K // group_size]: a partial last group has no scale.
        return check_whole_groups(spec)

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        return check_clamp(clamp_limit, activation, CLAMP_ACTIVATIONS)
