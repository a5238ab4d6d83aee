"""How expert weights are quantized: `WeightScheme`, with its short stable name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from wna16moe.errors import InvalidInputError, UnsupportedError

SUPPORTED_BITS = (4, 8)
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NAME_PATTERN = re.compile(r"int(?P<bits>0|[1-9]\d*)_(?:g(?P<group>0|[1-9]\d*)|ch)_(?P<zp>sym|zp)(?P<act>_actorder)?")


@dataclass(frozen=True)
class WeightScheme:
    """Group-wise integer quantization of expert weights.

    A weight row of K input elements is split into groups of `group_size` consecutive elements (the last
    group may be shorter); every group has one scale and, when `zero_point` is set, one integer zero
    point. Codes are unsigned, `0 <= q < 2**bits`; an element dequantizes to `(q - z) * scale`, with
    `z = 2**(bits - 1)` for symmetric schemes. With `act_order`, a per-layer `g_idx` maps each input
    element to its group instead (GPTQ `desc_act`).

    Parameters
    ----------
    bits : 4 or 8.
    group_size : elements per group, or None for one group per output channel (channel-wise).
    zero_point : True for asymmetric quantization with stored zero points.
    act_order : True when groups are given by a `g_idx` permutation.
    scale_dtype : dtype of the stored scales.
    """

    bits: int
    group_size: int | None
    zero_point: bool = False
    act_order: bool = False
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UnsupportedError(f"bits={self.bits} is not supported; expected one of {SUPPORTED_BITS}")
        # bool is an int subclass: group_size=True must not pass as 1.
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size <= 0):
            raise UnsupportedError(
                f"group_size={self.group_size!r} is not supported; expected a positive int or None (channel-wise)"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise UnsupportedError(f"scale_dtype={self.scale_dtype} is not supported; expected one of {SCALE_DTYPES}")

    @property
    def name(self) -> str:
        """Short stable name used in logs, reports and tuned configs, e.g. `int4_g128_zp`, `int8_ch_sym`."""
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        suffix = "_actorder" if self.act_order else ""
        return f"int{self.bits}_{group}_{'zp' if self.zero_point else 'sym'}{suffix}"

    @property
    def symmetric(self) -> bool:
        return not self.zero_point

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        """The implicit zero point of symmetric codes (8 for int4, 128 for int8)."""
        return 1 << (self.bits - 1)

    def num_groups(self, k: int) -> int:
        """Groups in a row of `k` input elements (the last may be partial)."""
        return 1 if self.group_size is None else math.ceil(k / self.group_size)

    def group_of(self, k: int) -> torch.Tensor:
        """Group index of each of `k` input elements, without act-order: int64 [k]."""
        if self.group_size is None:
            return torch.zeros(k, dtype=torch.int64)
        return torch.arange(k) // self.group_size

    def with_scale_dtype(self, scale_dtype: torch.dtype) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.zero_point, self.act_order, scale_dtype)

    @classmethod
    def of(cls, scheme: WeightScheme | str, setting: str = "scheme") -> WeightScheme:
        """`scheme` itself, or the scheme it names; an error naming `setting` for anything else."""
        if isinstance(scheme, WeightScheme):
            return scheme
        if isinstance(scheme, str):
            return cls.from_name(scheme)
        raise InvalidInputError(f"{setting} must be a WeightScheme or a scheme name such as 'int4_g128_sym', got "
                                f"{scheme!r}")

    @classmethod
    def from_name(cls, name: str, scale_dtype: torch.dtype = torch.bfloat16) -> WeightScheme:
        """Inverse of `name`: `WeightScheme.from_name("int4_g128_sym")`."""
        match = _NAME_PATTERN.fullmatch(name)
        if match is None:
            raise UnsupportedError(
                f"scheme name {name!r} is not valid; expected int<bits>_<g<group>|ch>_<sym|zp>[_actorder], "
                "e.g. int4_g128_sym, int8_ch_sym, int4_g32_zp"
            )
        group = match["group"]
        return cls(
            bits=int(match["bits"]),
            group_size=None if group is None else int(group),
            zero_point=match["zp"] == "zp",
            act_order=match["act"] is not None,
            scale_dtype=scale_dtype,
        )

    def __str__(self) -> str:
        return self.name
