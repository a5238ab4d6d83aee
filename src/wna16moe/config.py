"""Frozen configuration of an MoE layer: shapes, activation, routing, parallelism and quantization.

Dimension legend: E experts, K top-k, H hidden, I intermediate (per expert), G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import torch

from wna16moe.errors import InvalidInputError, UnsupportedError


class Activation(str, Enum):
    """The gated activation between the two GEMMs; `x = [gate | up]` is GEMM1's [T, 2I] output.

    SILU:       silu(gate) * up
    GELU:       gelu(gate) * up, exact (erf) GELU
    GELU_TANH:  gelu(gate) * up, tanh approximation
    SWIGLU_OAI: gpt-oss SwiGLU on un-interleaved halves; with alpha, beta and limit from the quant config:
                g = min(gate, limit), u = clamp(up, -limit, limit), g * sigmoid(alpha * g) * (u + beta)
    """

    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    SWIGLU_OAI = "swiglu_oai"


class RoutingMethod(str, Enum):
    """How router logits [T, E] become top-k expert ids and weights (see `wna16moe.routing`).

    SOFTMAX:     softmax over all experts, keep the top-k probabilities (renormalized if asked).
    SIGMOID:     top-k logits, weight = sigmoid(logit) (Llama-4).
    DEEPSEEK_V3: sigmoid scores, `e_score_correction_bias` for the choice only, top-`topk_group` of
                 `n_group` groups (scored by their two best experts), then top-k; renormalized if asked
                 and multiplied by `routed_scaling_factor`.
    """

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    DEEPSEEK_V3 = "deepseek_v3"


class ActivationFormat(str, Enum):
    """How tokens reach the experts: STANDARD [T, H] plus top-k ids, or BATCHED [E_local, max_tokens, H]."""

    STANDARD = "standard"
    BATCHED = "batched"


_Member = TypeVar("_Member", bound=Enum)


def _member(enum: type[_Member], value: object, setting: str) -> _Member:
    """`value` as a member of `enum` (its value as a string is accepted too), or an error naming `setting`."""
    try:
        return enum(value)
    except ValueError:
        raise InvalidInputError(f"{setting} must be one of {', '.join(m.value for m in enum)}, got {value!r}") from None


@dataclass(frozen=True)
class RoutingConfig:
    method: RoutingMethod = RoutingMethod.SOFTMAX
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _member(RoutingMethod, self.method, "RoutingConfig.method"))
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise InvalidInputError(f"routing needs 1 <= topk_group <= n_group, got topk_group={self.topk_group}, "
                                    f"n_group={self.n_group}")
        if not math.isfinite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            raise InvalidInputError(f"routed_scaling_factor must be a positive number, got "
                                    f"{self.routed_scaling_factor}")


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and math of one MoE layer (global, before any parallel sharding)."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: Activation = Activation.SILU
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "activation", _member(Activation, self.activation, "MoEConfig.activation"))
        if not isinstance(self.routing, RoutingConfig):
            raise InvalidInputError(f"MoEConfig.routing must be a RoutingConfig, got {self.routing!r}")
        if self.top_k > self.num_experts:
            raise InvalidInputError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise UnsupportedError(f"activation dtype {self.dtype} is not supported; expected bfloat16 or float16")
        r = self.routing
        if r.method == RoutingMethod.DEEPSEEK_V3:
            if self.num_experts % r.n_group:
                raise InvalidInputError(f"num_experts={self.num_experts} is not a multiple of n_group={r.n_group}")
            reachable = r.topk_group * (self.num_experts // r.n_group)
            if self.top_k > reachable:
                raise InvalidInputError(f"top_k={self.top_k} exceeds the {reachable} experts of topk_group="
                                        f"{r.topk_group} groups")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor / expert / data parallel sizes, this process's ranks, and the EP activation format.

    A layer runs on `world_size = tp_size * ep_size` ranks, `rank = ep_rank * tp_size + tp_rank` (TP innermost).
    Experts are split over the EP ranks in contiguous ranges (`local_experts`); each expert's intermediate
    dimension I is split over the TP ranks. TP ranks always hold the same tokens. EP ranks hold the same tokens
    when dp_size is 1; with data-parallel attention (dp_size == ep_size, dp_rank == ep_rank) each EP rank and
    its TP group hold their own tokens, which an all-to-all sends to the experts' owners.

    `batched`: the experts read the BATCHED activation format ([E_local, max_tokens, H], what low-latency
    all-to-all dispatchers deliver) instead of the STANDARD one ([T, H] plus top-k ids).

    `max_tokens_per_rank` (data-parallel EP, standard format): the all-to-all exchanges fixed buffers of this
    many tokens per rank instead of exchanging counts first, so it needs no host synchronization and can be
    captured in a CUDA graph (`distributed.FixedAllToAll`); every rank must set the same value. A rank with more
    tokens raises, after taking its part in the step's collectives (so the other ranks finish it).
    """

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    batched: bool = False
    max_tokens_per_rank: int | None = None

    def __post_init__(self) -> None:
        for kind in ("tp", "ep", "dp"):
            size, rank = getattr(self, f"{kind}_size"), getattr(self, f"{kind}_rank")
            if size < 1 or not 0 <= rank < size:
                raise InvalidInputError(f"{kind}_rank={rank} must lie in [0, {kind}_size={size})")
        if self.max_tokens_per_rank is not None:
            if self.max_tokens_per_rank < 1:
                raise InvalidInputError(f"max_tokens_per_rank={self.max_tokens_per_rank} must be at least 1")
            if self.dp_size == 1 or self.batched:
                raise InvalidInputError("max_tokens_per_rank sizes the data-parallel all-to-all of the standard "
                                        f"format; this config has dp_size={self.dp_size}, batched={self.batched}")

    @property
    def use_ep(self) -> bool:
        return self.ep_size > 1

    @property
    def world_size(self) -> int:
        """Ranks one layer runs on: tp_size * ep_size."""
        return self.tp_size * self.ep_size

    @property
    def rank(self) -> int:
        """This process's rank among the layer's ranks: ep_rank * tp_size + tp_rank."""
        return self.ep_rank * self.tp_size + self.tp_rank

    @property
    def activation_format(self) -> ActivationFormat:
        return ActivationFormat.BATCHED if self.batched else ActivationFormat.STANDARD

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this EP rank owns: a contiguous range, the first E % ep_size ranks one
        expert more. Raises `InvalidInputError` when some rank would own none (num_experts < ep_size)."""
        return expert_range(num_experts, self.ep_size, self.ep_rank)


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The contiguous range of global expert ids EP rank `ep_rank` of `ep_size` owns (see ParallelConfig)."""
    if num_experts < ep_size:
        raise InvalidInputError(f"num_experts={num_experts} is fewer than ep_size={ep_size}: every EP rank needs at "
                                "least one expert; use a smaller ep_size")
    base, extra = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return range(start, start + base + (ep_rank < extra))


@dataclass(frozen=True, eq=False)
class MoEQuantConfig:
    """Quantization parameters of a W4A16/W8A16 MoE layer; build it with `make_wna16_moe_quant_config`.

    Scales and zero points are canonical: w1 (gate+up) [E, 2I, G1], w2 [E, H, G2]. `group_size` is -1 for
    channel-wise. Biases: w1_bias [E, 2I], w2_bias [E, H]. `a*_gscale` are per-expert [E] (or scalar)
    activation global scales; `gemm1_*` parameterize the SwiGLU clamp.
    """

    w1_scale: torch.Tensor
    w2_scale: torch.Tensor
    group_size: int
    num_bits: int
    w1_zp: torch.Tensor | None = None
    w2_zp: torch.Tensor | None = None
    w1_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    a1_gscale: torch.Tensor | None = None
    a2_gscale: torch.Tensor | None = None
    gemm1_clamp_limit: float | None = None
    gemm1_alpha: float | None = None
    gemm1_beta: float | None = None

    @property
    def has_zero_points(self) -> bool:
        return self.w1_zp is not None

    @property
    def has_bias(self) -> bool:
        return self.w1_bias is not None or self.w2_bias is not None


def make_wna16_moe_quant_config(
    w1_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int,
    num_bits: int,
    w1_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    a1_gscale: torch.Tensor | None = None,
    a2_gscale: torch.Tensor | None = None,
    gemm1_clamp_limit: float | None = None,
    gemm1_alpha: float | None = None,
    gemm1_beta: float | None = None,
) -> MoEQuantConfig:
    """Validate and freeze the quantization parameters of a W4A16/W8A16 MoE layer.

    Parameters
    ----------
    w1_scale : [E, 2I, G1] float, G1 = ceil(H / group_size) (1 when channel-wise).
    w2_scale : [E, H, G2] float, G2 = ceil(I / group_size).
    group_size : elements per group, or -1 for channel-wise.
    num_bits : 4 or 8.
    w1_zp, w2_zp : integer zero points shaped like their scales, both or neither.
    w1_bias, w2_bias : [E, 2I] and [E, H] float.
    a1_gscale, a2_gscale : positive activation global scales, scalar or [E].
    gemm1_clamp_limit, gemm1_alpha, gemm1_beta : SwiGLU parameters (limit > 0).
    """
    if type(num_bits) is not int or num_bits not in (4, 8):
        raise UnsupportedError(f"num_bits={num_bits!r} is not supported; expected 4 or 8")
    if type(group_size) is not int or (group_size != -1 and group_size <= 0):
        raise UnsupportedError(f"group_size={group_size!r} is not supported; expected -1 or a positive int")
    _check_float(w1_scale, "w1_scale", 3)
    _check_float(w2_scale, "w2_scale", 3)
    e, two_i, g1 = w1_scale.shape
    _, h, g2 = w2_scale.shape
    if w2_scale.shape[0] != e or two_i % 2 or not e * two_i * h:
        raise InvalidInputError(f"w1_scale [E, 2I, G1] and w2_scale [E, H, G2] disagree: {list(w1_scale.shape)} vs "
                                f"{list(w2_scale.shape)}")
    i = two_i // 2
    expected_g1 = 1 if group_size == -1 else math.ceil(h / group_size)
    expected_g2 = 1 if group_size == -1 else math.ceil(i / group_size)
    if (g1, g2) != (expected_g1, expected_g2):
        raise InvalidInputError(f"with group_size={group_size}, H={h} and I={i} the scales need G1={expected_g1} and "
                                f"G2={expected_g2} groups, got w1_scale {list(w1_scale.shape)} and w2_scale "
                                f"{list(w2_scale.shape)}")
    for scale, name in ((w1_scale, "w1_scale"), (w2_scale, "w2_scale")):
        problem = scales_problem(scale)
        if problem:
            raise InvalidInputError(f"{name} {problem}")
    if (w1_zp is None) != (w2_zp is None):
        raise InvalidInputError("give both w1_zp and w2_zp or neither")
    for zp, scale, name in ((w1_zp, w1_scale, "w1_zp"), (w2_zp, w2_scale, "w2_zp")):
        if zp is None:
            continue
        if (not isinstance(zp, torch.Tensor) or zp.shape != scale.shape or zp.is_floating_point()
                or zp.dtype == torch.bool):
            got = f"{list(zp.shape)} {zp.dtype}" if isinstance(zp, torch.Tensor) else repr(zp)
            raise InvalidInputError(f"{name} must be an integer tensor shaped like its scale {list(scale.shape)}, "
                                    f"got {got}")
        if zp.numel() and (int(zp.min()) < 0 or int(zp.max()) >= 1 << num_bits):
            raise InvalidInputError(f"{name} values must lie in [0, {1 << num_bits}) for {num_bits}-bit weights")
    for bias, shape, name in ((w1_bias, (e, two_i), "w1_bias"), (w2_bias, (e, h), "w2_bias")):
        if bias is not None:
            _check_float(bias, name, 2)
            if tuple(bias.shape) != shape:
                raise InvalidInputError(f"{name} must be {list(shape)}, got {list(bias.shape)}")
            if not torch.isfinite(bias).all():
                raise InvalidInputError(f"{name} holds NaN or infinite values")
    for gscale, name in ((a1_gscale, "a1_gscale"), (a2_gscale, "a2_gscale")):
        if gscale is None:
            continue
        if (not isinstance(gscale, torch.Tensor) or not gscale.is_floating_point() or gscale.dim() > 1
                or (gscale.dim() == 1 and gscale.shape[0] != e)):
            got = f"{list(gscale.shape)} {gscale.dtype}" if isinstance(gscale, torch.Tensor) else repr(gscale)
            raise InvalidInputError(f"{name} must be a float tensor, scalar or [E={e}], got {got}")
        if not (torch.isfinite(gscale).all() and (gscale > 0).all()):
            raise InvalidInputError(f"{name} must be positive and finite")
    for value, name in ((gemm1_clamp_limit, "gemm1_clamp_limit"), (gemm1_alpha, "gemm1_alpha"),
                        (gemm1_beta, "gemm1_beta")):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    if gemm1_clamp_limit is not None and not gemm1_clamp_limit > 0:
        raise InvalidInputError(f"gemm1_clamp_limit must be > 0, got {gemm1_clamp_limit}")
    return MoEQuantConfig(w1_scale, w2_scale, group_size, num_bits, w1_zp, w2_zp, w1_bias, w2_bias, a1_gscale,
                          a2_gscale, gemm1_clamp_limit, gemm1_alpha, gemm1_beta)


def scales_problem(scales: torch.Tensor) -> str | None:
    """Why `scales` would dequantize to garbage (NaN, infinite or negative values), or None."""
    if not torch.isfinite(scales).all():
        return "holds NaN or infinite scales"
    if (scales < 0).any():
        return "holds negative scales"
    return None


def _check_float(tensor: torch.Tensor, name: str, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims or not tensor.is_floating_point():
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InvalidInputError(f"{name} must be a {dims}-D float tensor, got {shape}")
