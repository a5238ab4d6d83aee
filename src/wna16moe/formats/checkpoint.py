"""Opening Hugging Face checkpoints: format detection, lazy (sharded) safetensors reading, expert naming,
and the MoE configuration read from `config.json`.

Expert tensors are accepted under any of these namings:
    model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.*                (Qwen, DeepSeek, GLM, ...)
    model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.*                      (Mixtral)
    model.layers.{L}.block_sparse_moe.experts.{e}.{gate_proj,up_proj,down_proj}.*   (Mixtral, linearized by
                                                                                     llm-compressor)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from wna16moe.config import Activation, MoEConfig, RoutingConfig, RoutingMethod
from wna16moe.errors import CheckpointError, InvalidInputError, UnsupportedError
from wna16moe.formats import awq, compressed_tensors, dense, gptq
from wna16moe.formats.common import Projection, TensorSource
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme


class CheckpointFormat(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"
    GPTQ = "gptq"  # v1 zero points (stored zero - 1)
    GPTQ_V2 = "gptq_v2"
    AWQ = "awq"
    DENSE = "dense"  # unquantized, quantized on load


@dataclass(frozen=True)
class ExpertNaming:
    """Where the experts of one layer live: `{block}.experts.{e}.{gate|up|down}.` under the layer."""

    block: str
    gate: str
    up: str
    down: str

    def projection_prefix(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{projection}."

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def correction_bias_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.e_score_correction_bias"


HF_NAMING = ExpertNaming("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMING = ExpertNaming("block_sparse_moe", "w1", "w3", "w2")
# llm-compressor's linearize_moe saves Mixtral experts under block_sparse_moe with the HF projection names.
MIXTRAL_LINEARIZED_NAMING = ExpertNaming("block_sparse_moe", "gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.")
_NAMINGS = {(n.block, n.gate): n for n in (HF_NAMING, MIXTRAL_NAMING, MIXTRAL_LINEARIZED_NAMING)}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_projection(fmt: CheckpointFormat, source: TensorSource, prefix: str, scheme: WeightScheme,
                    shape: tuple[int, int]) -> Projection:
    """One expert projection of shape [N, K] in canonical form."""
    if fmt == CheckpointFormat.COMPRESSED_TENSORS:
        return compressed_tensors.read_projection(source, prefix, scheme, shape)
    if fmt in (CheckpointFormat.GPTQ, CheckpointFormat.GPTQ_V2):
        return gptq.read_projection(source, prefix, scheme, shape, fmt.value)
    if fmt == CheckpointFormat.AWQ:
        return awq.read_projection(source, prefix, scheme, shape)
    return dense.read_projection(source, prefix, scheme, shape)


def write_projection(fmt: CheckpointFormat, projection: Projection, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Tensors of one expert projection in `fmt`, keyed by suffix."""
    if fmt == CheckpointFormat.COMPRESSED_TENSORS:
        return compressed_tensors.write_projection(projection, scheme)
    if fmt in (CheckpointFormat.GPTQ, CheckpointFormat.GPTQ_V2):
        return gptq.write_projection(projection, scheme, fmt.value)
    if fmt == CheckpointFormat.AWQ:
        return awq.write_projection(projection, scheme)
    return dense.write_projection(projection, scheme)


def quantization_config(fmt: CheckpointFormat, scheme: WeightScheme, ignore: list[str] | None = None
                        ) -> dict[str, Any] | None:
    """The `quantization_config` a checkpoint of `fmt` carries for `scheme` (None for dense)."""
    if fmt == CheckpointFormat.COMPRESSED_TENSORS:
        return compressed_tensors.write_config(scheme, ignore or [])
    if fmt in (CheckpointFormat.GPTQ, CheckpointFormat.GPTQ_V2):
        return gptq.write_config(scheme, fmt.value)
    if fmt == CheckpointFormat.AWQ:
        return awq.write_config(scheme)
    return None


def read_experts(source: TensorSource, fmt: CheckpointFormat, scheme: WeightScheme, layer: int,
                 naming: ExpertNaming, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_ids: range | None = None) -> QuantizedExperts:
    """Read one layer's experts, expert by expert, into preallocated canonical buffers.

    `expert_ids`: the contiguous range of global experts to read (an expert-parallel rank's own, see
    `ParallelConfig.local_experts`); expert j of the result is `expert_ids[j]`. Other experts' tensors are
    not read. Default: all `num_experts`.
    """
    ids = range(num_experts) if expert_ids is None else expert_ids
    if ids.step != 1 or not 0 <= ids.start < ids.stop <= num_experts:
        raise InvalidInputError(f"expert_ids={ids} must be a non-empty contiguous range within [0, {num_experts})")
    e, h, i = len(ids), hidden_size, intermediate_size
    g13, g2 = scheme.num_groups(h), scheme.num_groups(i)
    w13 = _empty_weight(scheme, e, 2 * i, h, g13)
    w2 = _empty_weight(scheme, e, h, i, g2)
    for slot, expert in enumerate(ids):
        gate_prefix = naming.projection_prefix(layer, expert, naming.gate)
        up_prefix = naming.projection_prefix(layer, expert, naming.up)
        gate = read_projection(fmt, source, gate_prefix, scheme, (i, h))
        up = read_projection(fmt, source, up_prefix, scheme, (i, h))
        down = read_projection(fmt, source, naming.projection_prefix(layer, expert, naming.down), scheme, (h, i))
        if scheme.act_order and not torch.equal(gate.g_idx, up.g_idx):
            raise CheckpointError(source.name, f"{gate_prefix}g_idx / {up_prefix}g_idx",
                                  "gate and up projections have different act-order g_idx; the fused w13 needs one")
        _fill(w13, slot, slice(0, i), gate)
        _fill(w13, slot, slice(i, 2 * i), up)
        _fill(w2, slot, slice(0, h), down)
    return QuantizedExperts(QuantizedWeight(scheme, **w13), QuantizedWeight(scheme, **w2))


def write_experts(experts: QuantizedExperts, fmt: CheckpointFormat, layer: int,
                  naming: ExpertNaming = HF_NAMING) -> dict[str, torch.Tensor]:
    """All tensors of one layer's experts in `fmt`, keyed by their full checkpoint names."""
    out: dict[str, torch.Tensor] = {}
    i = experts.intermediate_size
    for expert in range(experts.num_experts):
        parts = ((naming.gate, experts.w13, slice(0, i)), (naming.up, experts.w13, slice(i, 2 * i)),
                 (naming.down, experts.w2, slice(None)))
        for name, weight, rows in parts:
            projection = Projection(
                weight.codes[expert, rows],
                weight.scales[expert, rows],
                None if weight.zeros is None else weight.zeros[expert, rows],
                # (a copy per projection: gate and up share one g_idx, and safetensors refuses shared storage)
                None if weight.g_idx is None else weight.g_idx[expert].clone(),
            )
            prefix = naming.projection_prefix(layer, expert, name)
            for suffix, tensor in write_projection(fmt, projection, experts.scheme).items():
                out[prefix + suffix] = tensor.contiguous()
    return out


def _empty_weight(scheme: WeightScheme, e: int, n: int, k: int, g: int) -> dict[str, torch.Tensor | None]:
    return {
        "codes": torch.empty(e, n, k, dtype=torch.uint8),
        "scales": torch.empty(e, n, g, dtype=scheme.scale_dtype),
        "zeros": torch.empty(e, n, g, dtype=torch.uint8) if scheme.zero_point else None,
        "g_idx": torch.empty(e, k, dtype=torch.int32) if scheme.act_order else None,
    }


def _fill(buffers: dict[str, torch.Tensor | None], expert: int, rows: slice, projection: Projection) -> None:
    buffers["codes"][expert, rows] = projection.codes
    buffers["scales"][expert, rows] = projection.scales
    if buffers["zeros"] is not None:
        buffers["zeros"][expert, rows] = projection.zeros
    if buffers["g_idx"] is not None:
        buffers["g_idx"][expert] = projection.g_idx


def _read_json(file: Path, checkpoint: str) -> dict[str, Any]:
    """A JSON object from `file`, or a `CheckpointError` naming the checkpoint and the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(checkpoint, file.name, f"is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(checkpoint, file.name, f"expected a JSON object, got {type(data).__name__}")
    return data


def _open_safetensors(file: Path, checkpoint: str) -> Any:
    try:
        return safe_open(file, "pt")
    except (SafetensorError, OSError) as error:  # truncated or corrupt header
        raise CheckpointError(checkpoint, file.name, f"is not a readable safetensors file: {error}") from error


class SafetensorsSource:
    """Lazy reader of a (possibly sharded) safetensors checkpoint: one tensor at a time, never the model."""

    def __init__(self, directory: Path) -> None:
        self.name = str(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index, self.name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(self.name, index.name, "has no 'weight_map' object")
            for key, file in weight_map.items():
                if not isinstance(file, str):
                    raise CheckpointError(self.name, index.name, f"weight_map[{key!r}] must be a shard file name, "
                                                                f"got {file!r}")
            self._file_of = {key: directory / file for key, file in weight_map.items()}
        else:
            single = directory / "model.safetensors"
            if not single.exists():
                raise CheckpointError(self.name, "model.safetensors", "missing (and no model.safetensors.index.json)")
            with _open_safetensors(single, self.name) as f:
                self._file_of = dict.fromkeys(f.keys(), single)
        self._handles: dict[Path, Any] = {}

    def names(self) -> Iterator[str]:
        return iter(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str) -> Any:
        file = self._file_of.get(key)
        if file is None:
            raise CheckpointError(self.name, key, "missing")
        if file not in self._handles:
            if not file.exists():
                raise CheckpointError(self.name, key, f"its shard {file.name} is missing")
            self._handles[file] = _open_safetensors(file, self.name)
        return self._handles[file]

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(key)
        try:
            return handle.get_tensor(key)
        except SafetensorError as error:  # the index names a shard that lacks the tensor
            raise CheckpointError(self.name, key, f"cannot be read from {self._file_of[key].name}: {error}") from error

    def tensor_nbytes(self, key: str) -> int:
        """Bytes of one stored tensor, from its header (nothing is read)."""
        sliced = self._handle(key).get_slice(key)
        dtype = sliced.get_dtype()
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(self.name, key, f"has safetensors dtype {dtype}, which this reader does not size")
        return math.prod(sliced.get_shape()) * _DTYPE_BYTES[dtype]

    def nbytes(self) -> int:
        return sum(file.stat().st_size for file in set(self._file_of.values()))


class Checkpoint:
    """A quantized (or dense) MoE checkpoint on disk; see `open_checkpoint`."""

    def __init__(self, path: str | Path, quantize_to: WeightScheme | str | None = None) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = read_config(self.path)
        self.source = SafetensorsSource(self.path)
        self._layers = self._index_layers()
        if not self._layers:
            raise CheckpointError(self.name, "model.layers.*.experts.*", "no MoE expert tensors found")
        self.format, self.scheme = self._detect_format(quantize_to)

    @property
    def name(self) -> str:
        return str(self.path)

    def _index_layers(self) -> dict[int, tuple[ExpertNaming, set[int]]]:
        layers: dict[int, tuple[ExpertNaming, set[int]]] = {}
        for key in self.source.names():
            match = _EXPERT_KEY.match(key)
            if match is None:
                continue
            style = MIXTRAL_NAMING.gate if match[4] in ("w1", "w3", "w2") else HF_NAMING.gate
            layer, naming = int(match[1]), _NAMINGS.get((match[2], style))
            if naming is None:
                raise CheckpointError(self.name, key, f"{match[2]} experts named {match[4]} follow no known naming")
            known = layers.setdefault(layer, (naming, set()))
            if known[0] != naming:
                raise CheckpointError(self.name, key, f"layer {layer} mixes expert namings {known[0].block}.*."
                                                      f"{known[0].gate} and {naming.block}.*.{naming.gate}")
            known[1].add(int(match[3]))
        return layers

    def _quantization_config(self) -> dict[str, Any] | None:
        qcfg = _setting(self.config, "quantization_config", dict, self.name)
        legacy = self.path / "quantize_config.json"
        if qcfg is None and legacy.exists():
            qcfg = _read_json(legacy, self.name)
        return qcfg

    def _detect_format(self, quantize_to: WeightScheme | str | None) -> tuple[CheckpointFormat, WeightScheme]:
        qcfg = self._quantization_config()
        first = self.moe_layer_indices()[0]
        naming = self._layers[first][0]
        gate_prefix = naming.projection_prefix(first, 0, naming.gate)
        if qcfg is None:
            if quantize_to is None:
                raise UnsupportedError(f"{self.name} is not quantized (no quantization_config); pass "
                                       "quantize_to=WeightScheme(...) or a scheme name such as 'int4_g128_sym' to "
                                       "quantize it on load")
            scheme = WeightScheme.of(quantize_to, "quantize_to")
            if scheme.act_order:
                raise UnsupportedError(f"quantize_to={scheme.name}: round-to-nearest cannot produce act-order (g_idx) "
                                       "weights; choose a scheme without _actorder")
            return CheckpointFormat.DENSE, scheme
        if quantize_to is not None:
            raise UnsupportedError(f"{self.name} is already quantized; quantize_to applies to dense checkpoints only")
        method = qcfg.get("quant_method")
        try:
            if method == compressed_tensors.QUANT_METHOD:
                dtype = self.source.get(compressed_tensors.scale_key(gate_prefix)).dtype
                return CheckpointFormat.COMPRESSED_TENSORS, compressed_tensors.scheme_from_config(
                    qcfg, gate_prefix.rstrip("."), dtype)
            if method == gptq.QUANT_METHOD:
                dtype = self.source.get(gptq.scale_key(gate_prefix)).dtype
                return CheckpointFormat(gptq.checkpoint_format(qcfg)), gptq.scheme_from_config(qcfg, dtype)
            if method == awq.QUANT_METHOD:
                dtype = self.source.get(awq.scale_key(gate_prefix)).dtype
                return CheckpointFormat.AWQ, awq.scheme_from_config(qcfg, dtype)
        except UnsupportedError as error:  # name the checkpoint whose quantization_config is at fault
            raise UnsupportedError(f"{self.name}: quantization_config ({method}): {error}") from error
        raise UnsupportedError(f"{self.name}: quant_method {method!r} is not supported; expected one of "
                               f"{compressed_tensors.QUANT_METHOD!r}, {gptq.QUANT_METHOD!r}, {awq.QUANT_METHOD!r}")

    def moe_layer_indices(self) -> list[int]:
        return sorted(self._layers)

    def _naming(self, layer: int) -> ExpertNaming:
        if type(layer) is not int:
            raise InvalidInputError(f"a layer index is an int, got {layer!r}")
        if layer not in self._layers:
            raise CheckpointError(self.name, f"model.layers.{layer}.*.experts.*",
                                  f"layer {layer} has no experts; MoE layers: {self.moe_layer_indices()}")
        naming, experts = self._layers[layer]
        expected = self.moe_config().num_experts
        if experts != set(range(expected)):
            missing = sorted(set(range(expected)) - experts)[:4]
            extra = sorted(experts - set(range(expected)))[:4]
            raise CheckpointError(self.name, naming.projection_prefix(layer, (missing or extra)[0], naming.gate) + "*",
                                  f"config says {expected} experts; missing experts {missing}, unexpected {extra}")
        return naming

    def load_layer(self, layer: int, experts: range | None = None) -> QuantizedExperts:
        """The quantized experts of MoE layer `layer` (only this layer is read); with `experts`, a contiguous
        range of global expert ids (an EP rank's `ParallelConfig.local_experts`), only those."""
        cfg = self.moe_config()
        return read_experts(self.source, self.format, self.scheme, layer, self._naming(layer), cfg.num_experts,
                            cfg.hidden_size, cfg.intermediate_size, experts)

    def router_weight(self, layer: int) -> torch.Tensor:
        """The router (gate) weight of `layer`: [E, H]."""
        cfg = self.moe_config()
        key = self._naming(layer).router_key(layer)
        weight = self.source.get(key)
        if tuple(weight.shape) != (cfg.num_experts, cfg.hidden_size) or not weight.is_floating_point():
            raise CheckpointError(self.name, key, f"expected a float [{cfg.num_experts}, {cfg.hidden_size}] router, "
                                                  f"got {list(weight.shape)} {weight.dtype}")
        if not torch.isfinite(weight).all():
            raise CheckpointError(self.name, key, "holds NaN or infinite values")
        return weight

    def correction_bias(self, layer: int) -> torch.Tensor | None:
        """DeepSeek-V3's `e_score_correction_bias` [E] of `layer`, or None when the checkpoint has none."""
        key = self._naming(layer).correction_bias_key(layer)
        if not self.source.has(key):
            return None
        bias = self.source.get(key)
        num_experts = self.moe_config().num_experts
        if tuple(bias.shape) != (num_experts,) or not bias.is_floating_point():
            raise CheckpointError(self.name, key, f"expected a float [{num_experts}] correction bias, got "
                                                  f"{list(bias.shape)} {bias.dtype}")
        if not torch.isfinite(bias).all():
            raise CheckpointError(self.name, key, "holds NaN or infinite values")
        return bias

    def moe_config(self) -> MoEConfig:
        """E, top-k, H, I, activation, routing and dtype, read from `config.json`."""
        return moe_config_from_hf(self.config, self.name)

    def nbytes_on_disk(self) -> int:
        """Size of all the checkpoint's safetensors files."""
        return self.source.nbytes()

    def expert_nbytes(self) -> int:
        """Bytes of every stored expert tensor (weights, scales, zero points, g_idx)."""
        return sum(self.source.tensor_nbytes(k) for k in self.source.names() if _EXPERT_KEY.match(k))


def read_config(path: str | Path) -> dict[str, Any]:
    """The `config.json` of checkpoint directory `path`, or a `CheckpointError` naming the checkpoint."""
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise CheckpointError(str(directory), "config.json", "missing")
    return _read_json(directory / "config.json", str(directory))


def open_checkpoint(path: str | Path, quantize_to: WeightScheme | str | None = None) -> Checkpoint:
    """Open a Hugging Face MoE checkpoint directory; its format is detected from `config.json`.

    Quantized checkpoints (compressed-tensors pack-quantized, GPTQ, AWQ GEMM) are read as stored. A dense
    (bf16/fp16) checkpoint needs `quantize_to`, the scheme to round-to-nearest its experts into on load.
    """
    return Checkpoint(path, quantize_to)


_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu": Activation.GELU,
                "gelu_pytorch_tanh": Activation.GELU_TANH, "gelu_new": Activation.GELU_TANH}
_GROUPED_ROUTING_MODELS = ("deepseek_v3", "kimi_k2", "glm4_moe")
# The activation dtype of a model stored in each dtype: the kernels take 16-bit activations, so float32 runs in bf16.
_ACTIVATION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.bfloat16}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}


def _setting(config: dict[str, Any], key: str, kind: type, name: str, default: Any = None) -> Any:
    """`config[key]` if it is a `kind` (`default` when absent or null), else a `CheckpointError` naming the key."""
    value = config.get(key)
    if value is None:
        return default
    # A bool is an int to Python, and an int a fine float; but "false" is no bool, and 8.7 experts no int.
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        raise CheckpointError(name, "config.json", f"{key} must be {_KINDS[kind]}, got {value!r}")
    return float(value) if kind is float else value


def moe_config_from_hf(config: dict[str, Any], name: str = "config.json") -> MoEConfig:
    """Build a `MoEConfig` from a Hugging Face model config (Qwen-MoE, Mixtral, DeepSeek-V3, GLM-4.5, ...).

    Inconsistent values (top-k above E, experts not divisible into groups, ...) and values of the wrong type
    (a string where a count belongs, ...) raise a `CheckpointError` naming the config. A float32 model gets
    bfloat16 activations.
    """
    try:
        return _moe_config_from_hf(config, name)
    except InvalidInputError as error:
        raise CheckpointError(name, "config.json", str(error)) from error


def _moe_config_from_hf(config: dict[str, Any], name: str) -> MoEConfig:
    text = _setting(config, "text_config", dict, name, config)

    def need(*keys: str) -> int:
        for key in keys:
            value = _setting(text, key, int, name)
            if value is not None:
                return value
        raise CheckpointError(name, "config.json", f"has none of {list(keys)}")

    model_type = _setting(text, "model_type", str, name, "")
    act_name = text.get("hidden_act", "silu")
    if not isinstance(act_name, str) or act_name not in _ACTIVATIONS:
        raise UnsupportedError(f"{name}: hidden_act {act_name!r} is not supported; expected one of "
                               f"{list(_ACTIVATIONS)}")
    if model_type in _GROUPED_ROUTING_MODELS:
        routing = RoutingConfig(
            RoutingMethod.DEEPSEEK_V3,
            renormalize=_setting(text, "norm_topk_prob", bool, name, True),
            n_group=_setting(text, "n_group", int, name, 1),
            topk_group=_setting(text, "topk_group", int, name, 1),
            routed_scaling_factor=_setting(text, "routed_scaling_factor", float, name, 1.0),
            has_correction_bias=text.get("topk_method", "noaux_tc") == "noaux_tc",
        )
    elif model_type.startswith("llama4"):
        routing = RoutingConfig(RoutingMethod.SIGMOID)
    else:  # Qwen-MoE, Mixtral and most others: softmax top-k; Mixtral always renormalizes.
        routing = RoutingConfig(RoutingMethod.SOFTMAX,
                                renormalize=_setting(text, "norm_topk_prob", bool, name, model_type == "mixtral"))
    dtype_key = "dtype" if text.get("dtype") is not None else "torch_dtype"  # transformers 5 spells it dtype
    dtype_name = _setting(text, dtype_key, str, name, "bfloat16").removeprefix("torch.")
    if dtype_name not in _ACTIVATION_DTYPES:
        raise CheckpointError(name, "config.json", f"{dtype_key} {dtype_name!r} is not a model dtype; expected one "
                                                   f"of {list(_ACTIVATION_DTYPES)}")
    return MoEConfig(
        num_experts=need("num_experts", "num_local_experts", "n_routed_experts"),
        top_k=need("num_experts_per_tok", "moe_topk"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("moe_intermediate_size", "intermediate_size"),
        activation=_ACTIVATIONS[act_name],
        routing=routing,
        dtype=_ACTIVATION_DTYPES[dtype_name],
    )
