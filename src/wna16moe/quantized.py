"""The canonical in-memory form of one MoE layer's quantized experts.

Dimension legend: E experts, N output rows, K input elements, G groups per row, H hidden, I intermediate.
Every checkpoint reader produces this form and every backend converter starts from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from wna16moe.config import MoEQuantConfig, make_wna16_moe_quant_config, scales_problem
from wna16moe.errors import InvalidInputError, UnsupportedError
from wna16moe.scheme import WeightScheme


def g_idx_problem(g_idx: torch.Tensor, scheme: WeightScheme, num_groups: int) -> str | None:
    """Why an act-order g_idx [..., K] is not one (a group that does not exist, or one holding more than
    group_size elements in a row of it), or None."""
    if not g_idx.numel():
        return None
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= num_groups:
        return f"group indices must lie in [0, {num_groups}), got [{low}, {high}]"
    if scheme.group_size is not None:
        rows = g_idx.reshape(-1, g_idx.shape[-1]).long()
        row_offsets = torch.arange(rows.shape[0], device=rows.device)[:, None] * num_groups  # (one count per row)
        fullest = int(torch.bincount((rows + row_offsets).flatten(), minlength=rows.shape[0] * num_groups).max())
        if fullest > scheme.group_size:
            return f"a group holds {fullest} elements, more than group_size {scheme.group_size}"
    return None


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One projection of every expert of a layer, unpacked.

    Parameters
    ----------
    codes : [E, N, K] uint8, unsigned codes in [0, 2**bits).
    scales : [E, N, G] scheme.scale_dtype.
    zeros : [E, N, G] uint8 zero points in [0, 2**bits), or None for a symmetric scheme
        (implicit zero 2**(bits - 1)).
    g_idx : [E, K] int32 group of each input element (act-order), or None for consecutive groups.
    """

    scheme: WeightScheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = self.scheme
        if self.codes.dim() != 3 or self.codes.dtype != torch.uint8:
            raise InvalidInputError(f"codes must be [E, N, K] uint8, got {tuple(self.codes.shape)} {self.codes.dtype}")
        e, n, k = self.codes.shape
        g = s.num_groups(k)
        _expect(self.scales, "scales", (e, n, g), s.scale_dtype)
        if s.zero_point:
            if self.zeros is None:
                raise InvalidInputError(f"scheme {s.name} has zero points but zeros is None")
            _expect(self.zeros, "zeros", (e, n, g), torch.uint8)
        elif self.zeros is not None:
            raise InvalidInputError(f"scheme {s.name} is symmetric but zeros were given")
        if s.act_order:
            if self.g_idx is None:
                raise InvalidInputError(f"scheme {s.name} uses act-order but g_idx is None")
            _expect(self.g_idx, "g_idx", (e, k), torch.int32)
        elif self.g_idx is not None:
            raise InvalidInputError(f"scheme {s.name} has no act-order but g_idx was given")

    def check_values(self, name: str) -> None:
        """Raise `InvalidInputError` naming the tensor (`name`: w13 or w2) where a value is out of range: a code or
        zero point past 2**bits - 1 (backends would read different bits of it), a scale or act-order group that
        `scales_problem` / `g_idx_problem` rejects. One pass over each tensor: for a layer's build, not for every
        forward."""
        s = self.scheme
        for label, codes in (("codes", self.codes), ("zeros", self.zeros)):
            if codes is not None and codes.numel() and s.bits < 8 and int(codes.max()) > s.max_code:
                raise InvalidInputError(f"{name} {label} must lie in [0, {s.max_code}] for {s.bits}-bit weights, "
                                        f"found {int(codes.max())}")
        problem = scales_problem(self.scales)
        if problem:
            raise InvalidInputError(f"{name} scales: {problem}")
        problem = None if self.g_idx is None else g_idx_problem(self.g_idx, s, s.num_groups(self.codes.shape[2]))
        if problem:
            raise InvalidInputError(f"{name} g_idx: {problem}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self, expert: int) -> torch.Tensor:
        """Group of each input element of `expert`: int64 [K]."""
        if self.g_idx is not None:
            return self.g_idx[expert].long()
        return self.scheme.group_of(self.codes.shape[2]).to(self.codes.device)

    def group_order(self, expert: int, name: str, consumer: str) -> torch.Tensor:
        """Act-order: the input columns of `expert` sorted by group (int64 [K]), for kernels that need each
        group as a contiguous run of group_size columns; raises `UnsupportedError` naming the weight (`name`)
        and the `consumer` when the groups are not exactly that after sorting."""
        g_idx = self.g_idx[expert].long()
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], self.scheme.group_of(g_idx.numel()).to(g_idx.device)):
            raise UnsupportedError(f"{name} g_idx of expert {expert} does not split into groups of exactly "
                                   f"{self.scheme.group_size} columns; {consumer} cannot run it")
        return order

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """float32 [E, N, K] weights, or [N, K] for one `expert`: `(q - z) * scale` per group."""
        if expert is None:
            return torch.stack([self.dequantize(e) for e in range(self.codes.shape[0])])
        group = self.group_index(expert)
        scale = self.scales[expert].float()[:, group]
        zero = float(self.scheme.symmetric_zero) if self.zeros is None else self.zeros[expert].float()[:, group]
        return (self.codes[expert].float() - zero) * scale

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedWeight(self.scheme, self.codes.to(device), self.scales.to(device), move(self.zeros),
                               move(self.g_idx))


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """The quantized experts of one MoE layer.

    w13 holds the fused gate and up projections, gate rows first: [E, 2I, H]. w2 is the down projection:
    [E, H, I]. Both share one `WeightScheme`.
    """

    w13: QuantizedWeight
    w2: QuantizedWeight

    def __post_init__(self) -> None:
        if self.w13.scheme != self.w2.scheme:
            raise InvalidInputError(f"w13 and w2 schemes differ: {self.w13.scheme} vs {self.w2.scheme}")
        e, two_i, h = self.w13.shape
        if two_i % 2:
            raise InvalidInputError(f"w13 must be [E, 2I, H] with gate rows then up rows, got {self.w13.shape}")
        if self.w2.shape != (e, h, two_i // 2):
            raise InvalidInputError(f"w2 must be [E, H, I] = {(e, h, two_i // 2)}, got {self.w2.shape}")

    @property
    def scheme(self) -> WeightScheme:
        return self.w13.scheme

    def check_values(self) -> None:
        """`QuantizedWeight.check_values` of both projections."""
        self.w13.check_values("w13")
        self.w2.check_values("w2")

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (w13 [E, 2I, H], w2 [E, H, I])."""
        return self.w13.dequantize(), self.w2.dequantize()

    def quant_config(self, **extras: Any) -> MoEQuantConfig:
        """The kernels' `MoEQuantConfig` of these weights (scales, zero points, group size, bits), plus `extras`
        for `make_wna16_moe_quant_config` (biases, activation global scales, SwiGLU parameters)."""
        group = -1 if self.scheme.group_size is None else self.scheme.group_size
        return make_wna16_moe_quant_config(self.w13.scales, self.w2.scales, group, self.scheme.bits, self.w13.zeros,
                                           self.w2.zeros, **extras)

    def to(self, device: torch.device | str) -> QuantizedExperts:
        return QuantizedExperts(self.w13.to(device), self.w2.to(device))

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, scheme: WeightScheme) -> QuantizedExperts:
        """Round-to-nearest quantization of float weights w13 [E, 2I, H] and w2 [E, H, I]."""
        return cls(quantize_rtn(w13, scheme), quantize_rtn(w2, scheme))


def quantize_rtn(weight: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of float `weight` [E, N, K] into `scheme`.

    Symmetric: `scale = absmax / ((2**bits - 1) / 2)`, so the full code range is used and every element is
    within half a step. Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, 2**bits - 1].
    Scales are rounded up to `scale_dtype` (never down, which would clip the extreme elements), and codes are
    computed against the scale as stored, so every element stays within half a step of its group's scale.
    """
    if scheme.act_order:
        raise UnsupportedError("round-to-nearest cannot produce act-order (g_idx) weights; use a GPTQ checkpoint")
    if weight.dim() != 3 or not weight.is_floating_point():
        raise InvalidInputError(f"weight must be a float [E, N, K] tensor, got {tuple(weight.shape)} {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise InvalidInputError("weight holds NaN or infinite values; refusing to quantize")
    e, n, k = weight.shape
    g = scheme.num_groups(k)
    gs = k if scheme.group_size is None else scheme.group_size
    padded = torch.zeros(e, n, g * gs, dtype=torch.float32, device=weight.device)
    padded[..., :k] = weight.float()
    grouped = padded.view(e, n, g, gs)
    if scheme.symmetric:
        scale = grouped.abs().amax(-1) / (scheme.max_code / 2)
    else:
        low = grouped.amin(-1).clamp(max=0)
        high = grouped.amax(-1).clamp(min=0)
        scale = (high - low) / scheme.max_code
    exact = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = exact.to(scheme.scale_dtype)
    # Round the stored scale up where the cast rounded it down (bf16 keeps 8 significant bits): a smaller
    # scale would push the group's extreme elements past the code range, and clamping them costs up to
    # (2**bits - 1) * 2**-9 extra steps (~0.5 step for int8 with bf16 scales). It also keeps scales that
    # underflow float16 positive.
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    if not torch.isfinite(scale).all():
        raise InvalidInputError(f"weight holds values too large for {scheme.scale_dtype} scales (largest "
                                f"{float(weight.abs().max()):.3g}); use a wider scale dtype")
    stored_scale = scale.float().unsqueeze(-1)
    if scheme.symmetric:
        zeros = None
        zero = float(scheme.symmetric_zero)
    else:
        zeros = torch.round(-low / scale.float()).clamp(0, scheme.max_code).to(torch.uint8)
        zero = zeros.float().unsqueeze(-1)
    codes = torch.round(grouped / stored_scale + zero).clamp(0, scheme.max_code).to(torch.uint8)
    codes = codes.view(e, n, g * gs)[..., :k].contiguous()
    return QuantizedWeight(scheme, codes, scale, zeros)


def _expect(tensor: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise InvalidInputError(f"{name} must be {list(shape)} {dtype}, got {list(tensor.shape)} {tensor.dtype}")
