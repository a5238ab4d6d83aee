"""The experts (kernel) class protocol: class-level capability checks plus weight preparation and apply.

Every backend file in `experts/` defines one or more `Experts` subclasses. The oracle asks a class, never
an instance, whether it can run a layer: each `supports_*` classmethod returns a `Check` (ok, reason).
Modular experts take routed top-k ids and weights; monolithic experts take router logits and route inside
the kernel, so they also declare the routing methods and router-logit dtypes they accept.

A class with `IMPLEMENTED = False` is a declaration only (its kernel comes in a later version): the oracle
reports it unavailable, and constructing it raises `NotImplementedError`, so nothing can run it.

Dimension legend: T tokens, K top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from wna16moe.config import (
    Activation,
    ActivationFormat,
    MoEConfig,
    MoEQuantConfig,
    ParallelConfig,
    RoutingConfig,
)
from wna16moe.device import DeviceInfo
from wna16moe.errors import InvalidInputError
from wna16moe.quantized import QuantizedExperts
from wna16moe.scheme import WeightScheme


class Check(NamedTuple):
    """Result of one capability check: `ok`, and when not ok, why."""

    ok: bool
    reason: str = ""


OK = Check(True)


def fail(reason: str) -> Check:
    return Check(False, reason)


def group_label(group_size: int | None) -> str:
    """A group size as reasons write it: `128`, or `channel-wise` for None."""
    return "channel-wise" if group_size is None else str(group_size)


def dtype_label(dtype: torch.dtype) -> str:
    """`bfloat16` for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def labels(values: tuple[object, ...]) -> str:
    """Allowed values for a reason: `bfloat16, float16`, with enum members by value and None as channel-wise."""
    def one(value: object) -> str:
        if value is None or isinstance(value, int):
            return group_label(value)
        if isinstance(value, torch.dtype):
            return dtype_label(value)
        return str(getattr(value, "value", value))
    return ", ".join(one(v) for v in values)


def check_member(value: object, allowed: tuple[object, ...], what: str) -> Check:
    """OK if `value` is one of `allowed`, else the reason naming both (`what`: "group_size", ...)."""
    if value in allowed:
        return OK
    expected = labels(allowed) if len(allowed) == 1 else f"one of {labels(allowed)}"
    return fail(f"{what} {labels((value,))} is not supported; expected {expected}")


def tp_group_split(intermediate_size: int, tp_size: int, group_size: int | None) -> str | None:
    """Why tensor parallelism cannot shard I without splitting a quantization group, or None when it can.

    Each TP rank holds I/tp of w2's input columns with their own scale groups, so I/tp must hold whole groups.
    """
    shard = intermediate_size // tp_size
    if tp_size == 1 or group_size is None or shard % group_size == 0:
        return None
    return (f"I/tp={shard} (intermediate_size={intermediate_size}, tp_size={tp_size}) is not a multiple of "
            f"group_size {group_size}: a quantization group would straddle two TP shards; use a tp_size that keeps "
            f"I/tp a multiple of {group_size}, or expert parallelism (ep_size) instead of tensor parallelism")


def check_tp_groups(spec: LayerSpec) -> Check:
    """OK when every TP shard of I holds whole quantization groups (see `tp_group_split`)."""
    reason = tp_group_split(spec.moe.intermediate_size, spec.parallel.tp_size, spec.scheme.group_size)
    return OK if reason is None else fail(reason)


def check_clamp(clamp_limit: float | None, activation: Activation, allowed: tuple[Activation, ...]) -> Check:
    """A SwiGLU clamp limit is OK only with the activations a kernel clamps (it must never be dropped)."""
    if clamp_limit is not None and activation not in allowed:
        return fail(f"the SwiGLU clamp limit is supported only with {labels(allowed)}, got {activation.value}")
    return OK


def check_whole_groups(spec: LayerSpec) -> Check:
    """H and I per shard must hold whole groups (kernels whose scales have no partial last group)."""
    group = spec.scheme.group_size
    h, i = spec.moe.hidden_size, spec.intermediate_per_shard
    if group is not None and (h % group or i % group):
        return fail(f"H and I/tp must be multiples of group_size {group}, got H={h}, I/tp={i}")
    return OK


@dataclass(frozen=True)
class LayerSpec:
    """Everything about a layer that capability checks look at; holds no tensors.

    `activation_format` defaults to the one the parallel config implies (`ParallelConfig.activation_format`);
    it may be given as BATCHED for a single-rank layer, never as STANDARD for a batched parallel config.
    """

    moe: MoEConfig
    scheme: WeightScheme
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    activation_format: ActivationFormat | None = None  # resolved in __post_init__, never None afterwards
    has_bias: bool = False
    clamp_limit: float | None = None
    router_logits_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        # Tensor parallelism splits every expert's intermediate dimension evenly; a remainder has no owner.
        if self.moe.intermediate_size % self.parallel.tp_size:
            raise InvalidInputError(f"intermediate_size={self.moe.intermediate_size} is not divisible by "
                                    f"tp_size={self.parallel.tp_size}; use a tp_size that divides it, or EP")
        self.parallel.local_experts(self.moe.num_experts)  # raises when an EP rank would own no expert
        if self.activation_format is None:
            object.__setattr__(self, "activation_format", self.parallel.activation_format)
        elif self.parallel.batched and self.activation_format != ActivationFormat.BATCHED:
            raise InvalidInputError(f"activation_format={self.activation_format.value} contradicts the parallel "
                                    "config (batched=True implies the batched format)")

    @property
    def act_dtype(self) -> torch.dtype:
        return self.moe.dtype

    @property
    def intermediate_per_shard(self) -> int:
        """I / tp_size: the intermediate size each tensor-parallel rank holds (GEMM1's N/2, GEMM2's K)."""
        return self.moe.intermediate_size // self.parallel.tp_size

    @property
    def local_num_experts(self) -> int:
        """Experts this EP rank holds (all of them without EP): the kernels' E."""
        return len(self.parallel.local_experts(self.moe.num_experts))

    @property
    def logits_dtype(self) -> torch.dtype:
        """Dtype of the router logits the layer passes; the activation dtype unless stated."""
        return self.router_logits_dtype or self.moe.dtype


class Experts:
    """Base of every kernel class. Subclasses override the `supports_*` hooks they restrict."""

    NAME: ClassVar[str] = "experts"
    MONOLITHIC: ClassVar[bool] = False
    ACTIVATION_FORMAT: ClassVar[ActivationFormat] = ActivationFormat.STANDARD
    # Standard-format kernels under EP get local expert ids with -1 for experts other ranks own (the expert
    # map applied by the prepare step); True when `apply` skips those pairs. Batched kernels see local
    # experts only and need no map.
    SUPPORTS_EXPERT_MAP: ClassVar[bool] = False
    # False for declared-but-not-yet-written kernels: the oracle reports them unavailable, nothing runs them.
    IMPLEMENTED: ClassVar[bool] = True
    # What `explain` appends to the verdict of a kernel that passes every check (e.g. that it has not been run
    # on hardware); empty for none.
    CAVEAT: ClassVar[str] = ""
    # True for kernels that launch with the shipped per-card tuned table (`wna16moe.tuning`): `explain` then
    # says where this layer's launch configurations come from.
    TUNED: ClassVar[bool] = False

    # ----- capability checks (class-level, never instantiate) -----
    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        return OK

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        return OK

    @classmethod
    def supports_routing(cls, routing: RoutingConfig, top_k: int, logits_dtype: torch.dtype | None) -> Check:
        """Monolithic kernels route themselves and must override this (methods and logit dtypes they accept);
        modular ones take routed ids, so routing never limits them."""
        return OK

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        """By default: any TP; EP when the kernel reads the batched format or takes an expert map."""
        if parallel.use_ep and cls.ACTIVATION_FORMAT == ActivationFormat.STANDARD and not cls.SUPPORTS_EXPERT_MAP:
            return fail(f"expert parallelism (ep_size={parallel.ep_size}) in the standard format needs an expert "
                        "map (remote experts as -1), which this kernel does not take")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        """Expert bias and the SwiGLU clamp limit."""
        return OK

    @classmethod
    def checks(cls, spec: LayerSpec, device: DeviceInfo) -> list[tuple[str, Check]]:
        """Every capability check, in order, with its name."""
        moe = spec.moe
        implemented = OK if cls.IMPLEMENTED else fail("not implemented in this version")
        fmt = (OK if spec.activation_format == cls.ACTIVATION_FORMAT else
               fail(f"needs the {cls.ACTIVATION_FORMAT.value} activation format, the layer uses "
                    f"{spec.activation_format.value}"))
        return [
            ("implemented", implemented),
            ("device", cls.supports_device(device)),
            ("scheme", cls.supports_scheme(spec.scheme, spec.act_dtype)),
            ("activation", cls.supports_activation(moe.activation)),
            ("routing", cls.supports_routing(moe.routing, moe.top_k, spec.logits_dtype)),
            ("parallel", cls.supports_parallel(spec.parallel)),
            ("format", fmt),
            ("shape", cls.supports_shape(spec)),
            ("extras", cls.supports_extras(spec.has_bias, spec.clamp_limit, moe.activation)),
        ]

    @classmethod
    def failures(cls, spec: LayerSpec, device: DeviceInfo) -> list[tuple[str, str]]:
        """`(check, reason)` of every failing check, in check order (empty when the class can run the layer).

        All checks run even after one fails, so a declared-but-unimplemented kernel still tells what else
        would stop it."""
        return [(name, check.reason) for name, check in cls.checks(spec, device) if not check.ok]

    @classmethod
    def is_supported(cls, spec: LayerSpec, device: DeviceInfo) -> Check:
        """`(True, "")`, or `(False, "<check>: <reason>; <check>: <reason>")` naming every failing check."""
        failed = cls.failures(spec, device)
        return fail("; ".join(f"{name}: {reason}" for name, reason in failed)) if failed else OK

    # ----- weights and compute -----
    def __init__(self, spec: LayerSpec, quant: MoEQuantConfig, device: torch.device) -> None:
        """Build the kernel for one layer, after its weights are final; allocate workspaces here."""
        if not self.IMPLEMENTED:
            raise NotImplementedError(f"{type(self).__name__} ({self.NAME}) is declared but not implemented in this "
                                      "version; use backend 'auto' to let the oracle pick one that is")
        self.spec = spec
        self.moe = spec.moe
        self.scheme = spec.scheme
        self.quant = quant
        self.device = device

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        """Pure converter from canonical experts to the tensors this kernel reads, on `device`."""
        raise NotImplementedError

    def self_check(self, weights: dict[str, torch.Tensor], correction_bias: torch.Tensor | None) -> None:
        """Called by the layer once its kernel and prepared weights exist: a kernel that cannot be tested in CI
        compares itself with EMULATION here and raises if they disagree. Default: nothing."""

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Modular experts: hidden_states [T, H], topk_weights [T, K] in a float dtype (float32, bfloat16 or
        float16, as the router returned them; every backend computes with them as float32), topk_ids [T, K]
        int32 local expert ids (-1: an expert another EP rank owns, skipped; only with SUPPORTS_EXPERT_MAP) ->
        [T, H] in hidden_states' dtype, the router-weighted sum of the chosen experts (0 for a token with none).
        Any other id is the caller's error. EMULATION and CPU, which read the ids on the host anyway, raise naming
        it. The GPU kernels would have to wait on the device to check, so they do not: TRITON leaves such a pair
        out like -1, MARLIN's output for its token is undefined, and neither reads or writes out of bounds."""
        raise NotImplementedError

    def check_routed(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """`apply`'s inputs have its shapes and kinds (their values are not read: that would wait on the device)."""
        h = self.moe.hidden_size
        if hidden_states.dim() != 2 or hidden_states.shape[1] != h:
            raise InvalidInputError(f"hidden_states must be [T, H={h}], got {list(hidden_states.shape)}")
        t = hidden_states.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.is_floating_point():
            raise InvalidInputError(f"topk_ids must be integer [T={t}, K], got {list(topk_ids.shape)} {topk_ids.dtype}")
        if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
            raise InvalidInputError(f"topk_weights must be float {list(topk_ids.shape)} like topk_ids, got "
                                    f"{list(topk_weights.shape)} {topk_weights.dtype}")

    def apply_batched(self, hidden_states: torch.Tensor, num_tokens: torch.Tensor,
                      weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batched experts: hidden_states [E_local, max_tokens, H], the first num_tokens[e] rows of expert e
        valid (num_tokens [E_local] int32) -> [E_local, max_tokens, H] in hidden_states' dtype, each valid row
        through its expert, unweighted (the prepare/finalize step applies router weights); rows past
        num_tokens[e] are zero."""
        raise NotImplementedError

    def apply_monolithic(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                         weights: dict[str, torch.Tensor], correction_bias: torch.Tensor | None) -> torch.Tensor:
        """Monolithic experts: route and compute in one call."""
        raise NotImplementedError


def batched_pairs(num_tokens: torch.Tensor, max_tokens: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched format as top-1 pairs over its flattened [E_local * max_tokens] rows: ids [E * M, 1] int32,
    row j of expert e -> e when j < num_tokens[e], else -1 (left out); router weights [E * M, 1] float32, 1."""
    e = num_tokens.shape[0]
    row = torch.arange(max_tokens, device=device)
    expert = torch.arange(e, dtype=torch.int32, device=device)
    ids = torch.where(row[None, :] < num_tokens.to(device)[:, None], expert[:, None], -1)
    return ids.reshape(e * max_tokens, 1).to(torch.int32), torch.ones(e * max_tokens, 1, dtype=torch.float32,
                                                                      device=device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in float64): the measure every check against EMULATION uses. NaN
    anywhere gives NaN, which fails every `error < tolerance` test."""
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))
