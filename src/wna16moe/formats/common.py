"""What every checkpoint format module shares: the per-expert `Projection`, tensor sources and checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch

from wna16moe.config import scales_problem
from wna16moe.errors import CheckpointError
from wna16moe.quantized import g_idx_problem
from wna16moe.scheme import WeightScheme


class Projection(NamedTuple):
    """One expert's projection in canonical form (see `QuantizedWeight`, without the expert dim).

    codes [N, K] uint8; scales [N, G]; zeros [N, G] uint8 or None; g_idx [K] int32 or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None


class TensorSource(Protocol):
    """Where a reader gets tensors from: a checkpoint on disk or a dict in memory."""

    name: str

    def get(self, key: str) -> torch.Tensor: ...

    def has(self, key: str) -> bool: ...


class DictSource:
    """A `TensorSource` over an in-memory mapping (tests, round trips)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<in-memory tensors>") -> None:
        self.tensors = tensors
        self.name = name

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(self.name, key, "missing")
        return self.tensors[key]

    def has(self, key: str) -> bool:
        return key in self.tensors


def read_checked(source: TensorSource, key: str, shape: Sequence[int],
                 dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """`source.get(key)`, raising a `CheckpointError` unless it has `shape` and one of `dtypes`."""
    tensor = source.get(key)
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(source.name, key, f"expected shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise CheckpointError(source.name, key, f"expected dtype {names}, got {tensor.dtype}")
    return tensor


def check_scales(source: TensorSource, key: str, scales: torch.Tensor) -> torch.Tensor:
    """Reject non-finite or negative scales: they would dequantize to garbage."""
    problem = scales_problem(scales)
    if problem:
        raise CheckpointError(source.name, key, problem)
    return scales


def check_g_idx(source: TensorSource, key: str, g_idx: torch.Tensor, scheme: WeightScheme,
                num_groups: int) -> torch.Tensor:
    """An act-order g_idx must name existing groups, each used by at most `group_size` elements."""
    g_idx = g_idx.to(torch.int32)
    problem = g_idx_problem(g_idx, scheme, num_groups)
    if problem:
        raise CheckpointError(source.name, key, problem)
    return g_idx


def is_trivial_g_idx(g_idx: torch.Tensor, scheme: WeightScheme) -> bool:
    """True when g_idx is just consecutive groups (what formats store without act-order)."""
    return torch.equal(g_idx.long(), scheme.group_of(g_idx.numel()).to(g_idx.device))
