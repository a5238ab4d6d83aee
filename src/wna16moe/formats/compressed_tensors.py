"""compressed-tensors `pack-quantized` checkpoints (llm-compressor).

Per expert projection of shape [N, K]:
    weight_packed      [N, ceil(K / P)] int32, packed along K, LSB first, codes stored as q + 2**(bits-1)
    weight_scale       [N, G] float
    weight_shape       [2] int = [N, K]
    weight_zero_point  [ceil(N / P), G] int32, packed along N (asymmetric only), same +2**(bits-1) offset
    weight_g_idx       [K] int (actorder "group" only)
P = 32 // bits. The stored codes are exactly our canonical unsigned codes; dequant is (q - z) * scale.
"""

from __future__ import annotations

import re
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
from wna16moe.formats.packing import pack_int32, packed_size, unpack_int32
from wna16moe.scheme import WeightScheme

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
_INT_TYPES = (torch.int32, torch.int64)


def _matches(target: str, module_name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    # Class-name targets ("Linear") match every expert projection: experts are linear layers.
    return target == module_name or target == "Linear"


def scheme_from_config(config: dict[str, Any], module_name: str, scale_dtype: torch.dtype) -> WeightScheme:
    """The scheme of `module_name` (an expert projection) in a compressed-tensors `quantization_config`."""
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list):
        raise UnsupportedError(f"ignore must be a list of module names or patterns, got {ignore!r}")
    if any(_matches(pattern, module_name) for pattern in ignore if pattern != "Linear"):
        raise UnsupportedError(f"{module_name} is listed in the checkpoint's 'ignore': its experts are not "
                               "quantized; open it as a dense checkpoint with quantize_to=...")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise UnsupportedError(f"config_groups must be an object of named groups, got {groups!r}")
    for group_name, group in groups.items():
        if not isinstance(group, dict):
            raise UnsupportedError(f"config group {group_name} must be an object, got {group!r}")
        targets = group.get("targets", [])
        if not isinstance(targets, list):
            raise UnsupportedError(f"targets (config group {group_name}) must be a list, got {targets!r}")
        if not any(_matches(target, module_name) for target in targets):
            continue
        fmt = group.get("format") or config.get("format")
        if fmt != FORMAT:
            raise UnsupportedError(f"compressed-tensors format {fmt!r} (config group {group_name}) is not "
                                   f"supported; expected {FORMAT!r}")
        if group.get("input_activations"):
            raise UnsupportedError(f"config group {group_name} quantizes activations; only weight-only "
                                   "(W4A16/W8A16) schemes are supported")
        weights = group.get("weights") or {}
        if not isinstance(weights, dict):
            raise UnsupportedError(f"weights (config group {group_name}) must be an object, got {weights!r}")
        if weights.get("type", "int") != "int":
            raise UnsupportedError(f"weights type {weights.get('type')!r} (config group {group_name}) is not "
                                   "supported; expected 'int'")
        strategy = weights.get("strategy")
        if strategy == "group":
            group_size = weights.get("group_size")
            if group_size is None:  # channel-wise comes from the strategy only, never from a missing size
                raise UnsupportedError(f"weights strategy 'group' (config group {group_name}) needs a group_size, "
                                       "got none")
        elif strategy == "channel":
            group_size = None
        else:
            raise UnsupportedError(f"weights strategy {strategy!r} (config group {group_name}) is not supported; "
                                   "expected 'group' or 'channel'")
        symmetric = weights.get("symmetric", True)
        if not isinstance(symmetric, bool):  # the string "false" would read as true
            raise UnsupportedError(f"weights symmetric={symmetric!r} (config group {group_name}) is not supported; "
                                   "expected true or false")
        actorder = weights.get("actorder")
        if actorder not in (None, "weight", "static", "group"):
            raise UnsupportedError(f"actorder {actorder!r} (config group {group_name}) is not supported")
        return WeightScheme(
            bits=weights.get("num_bits"),
            group_size=group_size,
            zero_point=not symmetric,
            # "weight"/"static" reorder columns before quantizing and store no g_idx.
            act_order=actorder == "group",
            scale_dtype=scale_dtype,
        )
    raise UnsupportedError(f"no compressed-tensors config group targets {module_name}")


def scale_key(prefix: str) -> str:
    return prefix + "weight_scale"


def read_projection(source: TensorSource, prefix: str, scheme: WeightScheme, shape: tuple[int, int]) -> Projection:
    n, k = shape
    bits, g = scheme.bits, scheme.num_groups(k)
    stored_shape = read_checked(source, prefix + "weight_shape", (2,), _INT_TYPES)
    if stored_shape.tolist() != [n, k]:
        raise CheckpointError(source.name, prefix + "weight_shape", f"expected [{n}, {k}], got {stored_shape.tolist()}")
    packed = read_checked(source, prefix + "weight_packed", (n, packed_size(k, bits)), (torch.int32,))
    codes = unpack_int32(packed, bits, dim=1, size=k)
    scales = check_scales(source, scale_key(prefix),
                          read_checked(source, scale_key(prefix), (n, g), (scheme.scale_dtype,)))
    zeros = None
    zp_key = prefix + "weight_zero_point"
    if scheme.zero_point or source.has(zp_key):
        zp = read_checked(source, zp_key, (packed_size(n, bits), g), (torch.int32,))
        zeros = unpack_int32(zp, bits, dim=0, size=n)
        if not scheme.zero_point:  # (stored beside symmetric weights: dropped only if it changes nothing)
            if (zeros != scheme.symmetric_zero).any():
                raise CheckpointError(source.name, zp_key, f"the config says symmetric, so every zero point must "
                                                           f"be {scheme.symmetric_zero}, found "
                                                           f"{sorted(set(zeros.unique().tolist()))[:8]}")
            zeros = None
    g_idx = None
    g_key = prefix + "weight_g_idx"
    if scheme.act_order:
        g_idx = check_g_idx(source, g_key, read_checked(source, g_key, (k,), _INT_TYPES), scheme, g)
    elif source.has(g_key) and not is_trivial_g_idx(read_checked(source, g_key, (k,), _INT_TYPES), scheme):
        raise CheckpointError(source.name, g_key, "is not consecutive groups, but the config's actorder is not "
                                                  "'group'")
    return Projection(codes.contiguous(), scales.contiguous(), zeros, g_idx)


def write_projection(projection: Projection, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Tensors of one projection, keyed by suffix (`weight_packed`, ...), as llm-compressor writes them."""
    n, k = projection.codes.shape
    out = {
        "weight_packed": pack_int32(projection.codes, scheme.bits, dim=1),
        "weight_scale": projection.scales.clone(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if projection.zeros is not None:
        out["weight_zero_point"] = pack_int32(projection.zeros, scheme.bits, dim=0)
    if projection.g_idx is not None:
        out["weight_g_idx"] = projection.g_idx.to(torch.int32)
    return out


def write_config(scheme: WeightScheme, ignore: list[str]) -> dict[str, Any]:
    """A `quantization_config` for `scheme` applied to every Linear except `ignore`."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": FORMAT,
                "weights": {
                    "num_bits": scheme.bits,
                    "type": "int",
                    "symmetric": scheme.symmetric,
                    "strategy": "channel" if scheme.group_size is None else "group",
                    "group_size": scheme.group_size,
                    "actorder": "group" if scheme.act_order else None,
                    "dynamic": False,
                },
                "input_activations": None,
            }
        },
        "ignore": ignore,
    }
