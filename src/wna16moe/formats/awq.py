"""AWQ GEMM checkpoints (AutoAWQ / GPTQModel `version: gemm`), int4 with zero points.

Per expert projection of shape [N, K]:
    qweight  [K, N / 8] int32, packed along N with the interleaved slot order AWQ_ORDER
    qzeros   [G, N / 8] int32, packed the same way; zeros stored as is
    scales   [G, N] float16 or bfloat16
"""

from __future__ import annotations

from typing import Any

import torch

from wna16moe.errors import CheckpointError, UnsupportedError
from wna16moe.formats.common import Projection, TensorSource, check_scales, read_checked
from wna16moe.formats.packing import pack_int32, unpack_int32
from wna16moe.scheme import WeightScheme

QUANT_METHOD = "awq"
# Slot j of a word holds column AWQ_ORDER[j] of its 8 consecutive columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scheme_from_config(config: dict[str, Any], scale_dtype: torch.dtype) -> WeightScheme:
    version = str(config.get("version", config.get("format", "gemm"))).lower()
    if version != "gemm":
        raise UnsupportedError(f"AWQ version {version!r} is not supported; expected 'gemm'")
    if config.get("bits", 4) != 4:
        raise UnsupportedError(f"AWQ bits={config.get('bits')} is not supported; AWQ GEMM is 4-bit")
    zero_point = config.get("zero_point", True)
    if zero_point is not True:  # false, or a value such as "false" that only looks true
        raise UnsupportedError(f"AWQ zero_point={zero_point!r} is not supported; AWQ GEMM stores zero points "
                               "(zero_point: true)")
    group_size = config.get("group_size", -1)
    return WeightScheme(4, None if group_size in (-1, None) else group_size, zero_point=True,
                        scale_dtype=scale_dtype)


def scale_key(prefix: str) -> str:
    return prefix + "scales"


def read_projection(source: TensorSource, prefix: str, scheme: WeightScheme, shape: tuple[int, int]) -> Projection:
    n, k = shape
    g = scheme.num_groups(k)
    if n % 8:
        raise CheckpointError(source.name, prefix + "qweight", f"AWQ packs 8 output columns per word, but "
                                                               f"N = {n} is not a multiple of 8")
    qweight = read_checked(source, prefix + "qweight", (k, n // 8), (torch.int32,))
    codes = unpack_int32(qweight, 4, dim=1, size=n, order=AWQ_ORDER).t()
    scales = read_checked(source, scale_key(prefix), (g, n), _SCALE_DTYPES)
    if scales.dtype != scheme.scale_dtype:
        raise CheckpointError(source.name, scale_key(prefix), f"expected dtype {scheme.scale_dtype} like the "
                                                               f"other experts, got {scales.dtype}")
    scales = check_scales(source, scale_key(prefix), scales).t()
    qzeros = read_checked(source, prefix + "qzeros", (g, n // 8), (torch.int32,))
    zeros = unpack_int32(qzeros, 4, dim=1, size=n, order=AWQ_ORDER).t()
    return Projection(codes.contiguous(), scales.contiguous(), zeros.contiguous(), None)


def write_projection(projection: Projection, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    if projection.zeros is None or projection.g_idx is not None or scheme.bits != 4:
        raise UnsupportedError(f"AWQ GEMM stores int4 with zero points and no act-order, not {scheme.name}")
    return {
        "qweight": pack_int32(projection.codes.t(), 4, dim=1, order=AWQ_ORDER),
        "qzeros": pack_int32(projection.zeros.t(), 4, dim=1, order=AWQ_ORDER),
        "scales": projection.scales.t().contiguous(),
    }


def write_config(scheme: WeightScheme) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "bits": 4,
        "group_size": -1 if scheme.group_size is None else scheme.group_size,
        "zero_point": True,
        "version": "gemm",
    }
