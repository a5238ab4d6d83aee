"""GPTQ checkpoints (AutoGPTQ / GPTQModel packing).

Per expert projection of shape [N, K], with P = 32 // bits:
    qweight  [K / P, N] int32, packed along K: slot j of word w holds row P*w + j, LSB first
    qzeros   [G, ceil(N / P)] int32, packed along N the same way
    scales   [G, N] float16
    g_idx    [K] int32, the group of each input row (unsorted with desc_act)
Zero points: `checkpoint_format` "gptq" (v1, the default) stores zero - 1, "gptq_v2" stores the zero.
Symmetric checkpoints store the implicit zero 2**(bits-1) (v1: 7 per nibble, 127 per byte).
"""

from __future__ import annotations

from typing import Any

import torch

from wna16moe.errors import CheckpointError, UnsupportedError
from wna16moe.formats.common import (
    Projection,
    TensorSource,
    check_g_idx,
    check_scales,
    is_trivial_g_idx,
    read_checked,
)
from wna16moe.formats.packing import codes_per_word, pack_int32, packed_size, unpack_int32
from wna16moe.scheme import WeightScheme

QUANT_METHOD = "gptq"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def checkpoint_format(config: dict[str, Any]) -> str:
    fmt = config.get("checkpoint_format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise UnsupportedError(f"GPTQ checkpoint_format {fmt!r} is not supported; expected one of {CHECKPOINT_FORMATS}")
    return fmt


def scheme_from_config(config: dict[str, Any], scale_dtype: torch.dtype) -> WeightScheme:
    checkpoint_format(config)
    group_size = config.get("group_size", -1)
    sym, desc_act = config.get("sym", True), config.get("desc_act", False)
    for key, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):  # the string "false" would read as true
            raise UnsupportedError(f"GPTQ {key}={value!r} is not supported; expected true or false")
    return WeightScheme(
        bits=config.get("bits"),
        group_size=None if group_size in (-1, None) else group_size,
        zero_point=not sym,
        act_order=desc_act,
        scale_dtype=scale_dtype,
    )


def scale_key(prefix: str) -> str:
    return prefix + "scales"


def read_projection(source: TensorSource, prefix: str, scheme: WeightScheme, shape: tuple[int, int],
                    fmt: str = "gptq") -> Projection:
    n, k = shape
    bits, per_word, g = scheme.bits, codes_per_word(scheme.bits), scheme.num_groups(k)
    if k % per_word:
        raise CheckpointError(source.name, prefix + "qweight", f"GPTQ packs {per_word} input rows per word, "
                                                               f"but K = {k} is not a multiple of {per_word}")
    qweight = read_checked(source, prefix + "qweight", (k // per_word, n), (torch.int32,))
    codes = unpack_int32(qweight, bits, dim=0, size=k).t()
    scales = read_checked(source, scale_key(prefix), (g, n), _SCALE_DTYPES)
    if scales.dtype != scheme.scale_dtype:
        raise CheckpointError(source.name, scale_key(prefix), f"expected dtype {scheme.scale_dtype} like the "
                                                               f"other experts, got {scales.dtype}")
    scales = check_scales(source, scale_key(prefix), scales).t()
    zeros_key = prefix + "qzeros"
    stored = unpack_int32(read_checked(source, zeros_key, (g, packed_size(n, bits)), (torch.int32,)),
                          bits, dim=1, size=n).t().to(torch.int16)
    if fmt == "gptq":
        stored = stored + 1
        if (stored > scheme.max_code).any():
            raise CheckpointError(source.name, zeros_key, f"a GPTQ v1 zero point of {scheme.max_code} means zero "
                                                          f"{scheme.max_code + 1}, which does not fit in {bits} bits")
    if scheme.zero_point:
        zeros = stored.to(torch.uint8)
    else:
        if (stored != scheme.symmetric_zero).any():
            raise CheckpointError(source.name, zeros_key, f"the checkpoint is symmetric (sym=true, "
                                                          f"checkpoint_format {fmt}) so every zero point must "
                                                          f"be {scheme.symmetric_zero}, found "
                                                          f"{sorted(set(stored.unique().tolist()))[:8]}")
        zeros = None
    g_idx = None
    g_key = prefix + "g_idx"
    if scheme.act_order:
        g_idx = check_g_idx(source, g_key, read_checked(source, g_key, (k,), (torch.int32, torch.int64)), scheme, g)
    elif source.has(g_key):
        stored_g_idx = read_checked(source, g_key, (k,), (torch.int32, torch.int64))
        if not is_trivial_g_idx(stored_g_idx, scheme):
            raise CheckpointError(source.name, g_key, "is not consecutive groups, but desc_act is false")
    return Projection(codes.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(), g_idx)


def write_projection(projection: Projection, scheme: WeightScheme, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """Tensors of one projection, keyed by suffix (`qweight`, ...), as GPTQModel writes them."""
    k = projection.codes.shape[1]
    zeros = projection.zeros
    if zeros is None:
        zeros = torch.full(projection.scales.shape, scheme.symmetric_zero, dtype=torch.uint8)
    stored = zeros.to(torch.int16)
    if fmt == "gptq":
        if (stored == 0).any():
            raise UnsupportedError("a zero point of 0 cannot be written in GPTQ v1 (it stores zero - 1); "
                                   "write checkpoint_format 'gptq_v2'")
        stored = stored - 1
    g_idx = projection.g_idx
    if g_idx is None:
        g_idx = scheme.group_of(k).to(torch.int32)
    return {
        "qweight": pack_int32(projection.codes.t(), scheme.bits, dim=0),
        "qzeros": pack_int32(stored.to(torch.uint8).t(), scheme.bits, dim=1),
        "scales": projection.scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def write_config(scheme: WeightScheme, fmt: str = "gptq") -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "bits": scheme.bits,
        "group_size": -1 if scheme.group_size is None else scheme.group_size,
        "desc_act": scheme.act_order,
        "sym": scheme.symmetric,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
    }
