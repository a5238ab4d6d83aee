"""Where a checkpoint's quantized tensors are, what they look like, and how HF modules map onto them.

Nothing here knows a bit layout: the stored shape and dtype of every tensor of a projection come from
running the format's own writer (`wna16moe.formats`) on a placeholder projection, and the checkpoint's
safetensors headers say which tensors exist (no tensor data is read).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from wna16moe.errors import CheckpointError, UnsupportedError
from wna16moe.formats import awq, compressed_tensors, gptq
from wna16moe.formats.checkpoint import CheckpointFormat, write_projection
from wna16moe.formats.common import Projection
from wna16moe.scheme import WeightScheme

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# A size change along the output dim that every packing (int32 words of 8 or 4 codes) keeps whole.
_PROBE_ROWS = 32


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, from its safetensors header."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointIndex:
    """The names, shapes and dtypes of every tensor of a (sharded) safetensors checkpoint, from headers only.

    Parameters
    ----------
    files : the checkpoint's safetensors files (what `from_pretrained` resolved).
    """

    def __init__(self, files: Sequence[str | Path]) -> None:
        if not files:
            raise UnsupportedError("wna16moe.hf loads safetensors checkpoints only; from_pretrained found no "
                                   "checkpoint files (a state_dict or a .bin checkpoint cannot be read)")
        self.name = str(Path(files[0]).parent)
        self._info: dict[str, TensorInfo] = {}
        self._suffixes: dict[str, set[str]] = defaultdict(set)
        for file in files:
            if not str(file).endswith(".safetensors"):
                raise UnsupportedError(f"{file}: wna16moe.hf reads .safetensors checkpoints only")
            try:
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        sliced = handle.get_slice(key)
                        dtype = _SAFETENSORS_DTYPES.get(sliced.get_dtype())
                        if dtype is None:
                            raise CheckpointError(self.name, key, f"has dtype {sliced.get_dtype()}, which torch "
                                                                  "cannot hold")
                        self._info[key] = TensorInfo(tuple(sliced.get_shape()), dtype)
                        prefix, _, suffix = key.rpartition(".")
                        self._suffixes[prefix + "."].add(suffix)
            except (SafetensorError, OSError) as error:
                raise CheckpointError(self.name, Path(file).name, f"is not a readable safetensors file: "
                                                                  f"{error}") from error

    def has(self, key: str) -> bool:
        return key in self._info

    def info(self, key: str) -> TensorInfo:
        if key not in self._info:
            raise CheckpointError(self.name, key, "missing")
        return self._info[key]

    def suffixes(self, prefix: str) -> set[str]:
        """Names stored directly under `prefix` (which ends with a dot): `{"qweight", "scales", ...}`."""
        return set(self._suffixes.get(prefix, ()))

    def keys(self) -> Iterable[str]:
        return self._info.keys()


def checkpoint_format(qcfg: dict[str, Any]) -> CheckpointFormat:
    """The format of a checkpoint from its `quantization_config`."""
    method = qcfg.get("quant_method")
    if method == compressed_tensors.QUANT_METHOD:
        return CheckpointFormat.COMPRESSED_TENSORS
    if method == gptq.QUANT_METHOD:
        return CheckpointFormat(gptq.checkpoint_format(qcfg))
    if method == awq.QUANT_METHOD:
        return CheckpointFormat.AWQ
    raise UnsupportedError(f"quant_method {method!r} is not supported by wna16moe.hf; expected one of "
                           f"{compressed_tensors.QUANT_METHOD!r}, {gptq.QUANT_METHOD!r}, {awq.QUANT_METHOD!r}")


def scale_suffix(fmt: CheckpointFormat) -> str:
    """The name every quantized projection of `fmt` stores its scales under (`weight_scale`, `scales`)."""
    if fmt == CheckpointFormat.COMPRESSED_TENSORS:
        return compressed_tensors.scale_key("")
    if fmt == CheckpointFormat.AWQ:
        return awq.scale_key("")
    return gptq.scale_key("")


def scheme_of(fmt: CheckpointFormat, qcfg: dict[str, Any], module: str, scale_dtype: torch.dtype) -> WeightScheme:
    """The scheme of checkpoint module `module` (a projection name without the trailing dot).

    compressed-tensors decides per module (config groups' `targets`, `ignore`); GPTQ and AWQ have one scheme.
    """
    try:
        if fmt == CheckpointFormat.COMPRESSED_TENSORS:
            return compressed_tensors.scheme_from_config(qcfg, module, scale_dtype)
        if fmt == CheckpointFormat.AWQ:
            return awq.scheme_from_config(qcfg, scale_dtype)
        if qcfg.get("dynamic"):
            raise UnsupportedError("per-module GPTQ overrides ('dynamic') are not supported")
        return gptq.scheme_from_config(qcfg, scale_dtype)
    except UnsupportedError as error:
        raise UnsupportedError(f"{module}: quantization_config ({fmt.value}): {error}") from error


@functools.lru_cache(maxsize=256)
def stored_layout(fmt: CheckpointFormat, scheme: WeightScheme, n: int, k: int) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor `fmt` stores for one [n, k] projection, from the format's writer."""
    g = scheme.num_groups(k)
    # The writers allocate and check values; the model is built under a meta-device context, so say CPU.
    with torch.device("cpu"):
        placeholder = Projection(
            torch.zeros(n, k, dtype=torch.uint8),
            torch.ones(n, g, dtype=scheme.scale_dtype),
            torch.full((n, g), scheme.symmetric_zero, dtype=torch.uint8) if scheme.zero_point else None,
            scheme.group_of(k).to(torch.int32) if scheme.act_order else None,
        )
        stored = write_projection(fmt, placeholder, scheme)
    return {suffix: TensorInfo(tuple(t.shape), t.dtype) for suffix, t in stored.items()}


@functools.lru_cache(maxsize=256)
def row_dims(fmt: CheckpointFormat, scheme: WeightScheme, n: int, k: int) -> dict[str, int]:
    """For each stored tensor of an [n, k] projection, the dim that follows the output rows (n), or 0 for
    tensors that do not (a stored shape, a g_idx): the dim along which gate and up concatenate."""
    base, probe = stored_layout(fmt, scheme, n, k), stored_layout(fmt, scheme, n + _PROBE_ROWS, k)
    dims = {}
    for suffix, info in base.items():
        changed = [d for d, (a, b) in enumerate(zip(info.shape, probe[suffix].shape, strict=True)) if a != b]
        dims[suffix] = changed[0] if changed else 0
    return dims


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def layer_index(module_name: str) -> int:
    """The decoder layer of a module path (`model.layers.3.mlp.experts` -> 3)."""
    match = _LAYER.search(module_name)
    if match is None:
        raise UnsupportedError(f"{module_name}: cannot find its decoder layer index (expected '...layers.N....'); "
                               "this architecture is not supported by wna16moe.hf")
    return int(match[2])


def in_layer_path(module_name: str) -> str:
    """The part of a module path after its decoder layer (`model.layers.3.mlp.experts` -> `mlp.experts`)."""
    match = _LAYER.search(module_name)
    if match is None:
        raise UnsupportedError(f"{module_name}: cannot find its decoder layer index (expected '...layers.N....'); "
                               "this architecture is not supported by wna16moe.hf")
    return module_name[match.end():]
