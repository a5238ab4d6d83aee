"""`WNA16Quantizer`: the transformers `HfQuantizer` that loads compressed-tensors, GPTQ and AWQ checkpoints
into wna16moe modules, and `CheckpointQuantizationConfig`, which carries the checkpoint's own
`quantization_config` unchanged (so a saved model's config.json is the original one).

What is quantized is decided from the checkpoint itself, never guessed: a module is replaced when the
checkpoint stores its scales (`weight_scale` / `scales`) and the `quantization_config` gives it a scheme
(compressed-tensors: a config group targets it and `ignore` does not list it). Experts modules whose
tensors are plain `weight`s stay HF's and load as usual; a quantized tensor no module can take is an error.

Hook order in `from_pretrained` (5.17 to 5.23): `_process_model_before_weight_loading(model,
checkpoint_files=...)` swaps modules on the meta device; `update_weight_conversions` (one argument in
5.17, two in 5.23) adds converters merging per-expert tensors into our parameters; the weights load;
`_process_model_after_weight_loading` checks and finalizes every module on its final device.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.core_model_loading import (
    Concatenate,
    ConversionOps,
    MergeModulelist,
    SplitModulelist,
    WeightConverter,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from wna16moe.config import MoEConfig
from wna16moe.errors import CheckpointError, UnsupportedError
from wna16moe.formats.checkpoint import (
    HF_NAMING,
    MIXTRAL_LINEARIZED_NAMING,
    MIXTRAL_NAMING,
    CheckpointFormat,
    ExpertNaming,
    moe_config_from_hf,
)
from wna16moe.hf.layout import (
    CheckpointIndex,
    TensorInfo,
    checkpoint_format,
    in_layer_path,
    layer_index,
    row_dims,
    scale_suffix,
    scheme_of,
    stored_layout,
)
from wna16moe.hf.modules import ExpertsPlan, LinearPlan, PackedExperts, WNA16Linear
from wna16moe.oracle import Backend
from wna16moe.scheme import WeightScheme

logger = logging.getLogger("wna16moe")

METHODS = ("compressed-tensors", "gptq", "awq")
_NAMINGS = (HF_NAMING, MIXTRAL_NAMING, MIXTRAL_LINEARIZED_NAMING)


class CheckpointQuantizationConfig(QuantizationConfigMixin):
    """A checkpoint's `quantization_config`, kept verbatim; `quant_method` selects the quantizer."""

    def __init__(self, **config: Any) -> None:
        method = config.get("quant_method")
        if method not in METHODS:
            raise UnsupportedError(f"quant_method {method!r} is not handled by wna16moe.hf; expected one of {METHODS}")
        self.source = copy.deepcopy(config)
        self.quant_method = method

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.source)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def get_loading_attributes(self) -> dict[str, Any]:
        return {}


def _is_fused_experts(module: nn.Module) -> bool:
    """HF 5.x experts: one module per layer with 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and not getattr(module, "is_transposed", False)
            and getattr(module, "is_concatenated", True) and getattr(module, "has_gate", True)
            and not getattr(module, "has_bias", False))


class WNA16Quantizer(HfQuantizer):
    """Loads pre-quantized compressed-tensors (pack-quantized), GPTQ and AWQ (GEMM) checkpoints.

    Routed experts become `PackedExperts` (kernel chosen per layer by the oracle), quantized `nn.Linear`s
    become `WNA16Linear`. `backend` (set by `wna16moe.hf.enable`/`loading`) forces one backend for every
    experts layer; None lets the oracle choose (or $WNA16MOE_BACKEND).
    """

    requires_calibration = True
    backend: ClassVar[Backend | None] = None

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.chosen_backend = type(self).backend
        self.format: CheckpointFormat | None = None
        self.experts_plans: dict[str, ExpertsPlan] = {}
        self.linear_plans: dict[str, LinearPlan] = {}
        self.float_dtypes: dict[str, torch.dtype] = {}

    # ----- the hooks transformers calls -----
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise UnsupportedError("wna16moe.hf cannot offload layers to disk (device_map has 'disk')")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        source = getattr(self.quantization_config, "source", None)
        if source is None:
            raise UnsupportedError(f"{type(self.quantization_config).__name__} reached the wna16moe quantizer; it "
                                   "needs the checkpoint's quantization_config (call wna16moe.hf.enable() before "
                                   "from_pretrained and pass no quantization_config)")
        index = CheckpointIndex(checkpoint_files or [])
        self.format = checkpoint_format(source)
        claimed: set[str] = set()
        for name, module in list(model.named_modules()):
            if _is_fused_experts(module):
                plan = self._experts_plan(name, module, index, source)
                if plan is not None:
                    model.set_submodule(name, PackedExperts(plan))
                    self.experts_plans[name] = plan
                    claimed.update(plan.naming.projection_prefix(plan.layer, e, p) for e in range(plan.num_experts)
                                   for p in (plan.naming.gate, plan.naming.up, plan.naming.down))
            elif isinstance(module, nn.Linear) and index.has(f"{name}.{scale_suffix(self.format)}"):
                plan = self._linear_plan(name, module, index, source)
                model.set_submodule(name, WNA16Linear(plan, module.bias))
                self.linear_plans[name] = plan
                claimed.add(plan.prefix)
        self.float_dtypes = {name: param.dtype for name, param in model.named_parameters()
                             if param.is_floating_point() and not isinstance(
                                 model.get_submodule(name.rpartition(".")[0]), (PackedExperts, WNA16Linear))}
        marker = "." + scale_suffix(self.format)
        for key in index.keys():  # noqa: SIM118 (not a dict)
            if key.endswith(marker) and key[: -len(marker)] + "." not in claimed:
                raise UnsupportedError(f"{index.name}: tensor '{key}' is quantized, but its module is neither an "
                                       "nn.Linear nor a routed-experts module that wna16moe.hf replaces; this "
                                       "checkpoint cannot be loaded without losing it")
        return model

    def update_weight_conversions(self, weight_conversions: list[Any], model: nn.Module | None = None) -> list[Any]:
        """Ours first (a key takes the first converter that matches), then the model's own ones, which still
        load experts the checkpoint keeps unquantized. One signature for 5.17 (one argument) and 5.23."""
        ours: list[WeightConverter] = []
        seen: set[tuple[str, str]] = set()
        for name, plan in self.experts_plans.items():
            # `mlp.experts.*.gate_proj.X`, as the model's own converters write it. Where the model renames the
            # checkpoint's block (Mixtral: `block_sparse_moe` -> `mlp`), the pattern starts at `.experts`, as
            # Mixtral's converters do: 5.17 renames before it reverses converters on save, so a pattern that
            # names the block would lose the key's prefix.
            stored_as = plan.naming.projection_prefix(plan.layer, 0, plan.naming.gate).rsplit(".", 3)[0]
            block = in_layer_path(name) if stored_as == name else "." + name.rpartition(".")[2]
            for suffix in plan.gate_up:
                if (block, f"w13_{suffix}") not in seen:
                    seen.add((block, f"w13_{suffix}"))
                    ours.append(WeightConverter(
                        [f"{block}.*.{plan.naming.gate}.{suffix}", f"{block}.*.{plan.naming.up}.{suffix}"],
                        f"{block}.w13_{suffix}",
                        [_MergeExperts(dim=0), Concatenate(dim=plan.row_dim[suffix] + 1)]))
            for suffix in plan.down:
                if (block, f"w2_{suffix}") not in seen:
                    seen.add((block, f"w2_{suffix}"))
                    ours.append(WeightConverter([f"{block}.*.{plan.naming.down}.{suffix}"], f"{block}.w2_{suffix}",
                                                [_MergeExperts(dim=0)]))
        return ours + list(weight_conversions)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self._restore_float_dtypes(model)
        text_config = model.config.get_text_config()
        moe: MoEConfig | None = None
        dtype = model.dtype
        for module in model.modules():
            if isinstance(module, PackedExperts):
                if moe is None:
                    moe = moe_config_from_hf(text_config.to_dict(), f"{type(model).__name__} config")
                module.finalize(moe, dtype, self.chosen_backend)
            elif isinstance(module, WNA16Linear):
                module.finalize()
        logger.info("wna16moe.hf: %d experts layers and %d dense layers loaded from %s (%s)",
                    len(self.experts_plans), len(self.linear_plans),
                    getattr(model.config, "name_or_path", "?"), self.format.value if self.format else "?")
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    @torch.no_grad()
    def _restore_float_dtypes(self, model: nn.Module) -> None:
        """Give every float parameter outside our modules the dtype the model was built with.

        transformers 5.17 keeps the checkpoint's dtype for every renamed key of a pre-quantized checkpoint
        (Mixtral's `block_sparse_moe.gate` -> `mlp.gate` stays bfloat16 in a float32 model); 5.23 casts them.
        Parameters the model keeps in float32 on purpose (`_keep_in_fp32_modules*`) are left alone."""
        kept = [*(getattr(model, "_keep_in_fp32_modules", None) or []),
                *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]
        for name, param in model.named_parameters():
            dtype = self.float_dtypes.get(name)
            if dtype is not None and param.dtype != dtype and not any(k in name for k in kept):
                param.data = param.data.to(dtype)

    # ----- planning -----
    def _experts_plan(self, name: str, module: nn.Module, index: CheckpointIndex,
                      qcfg: dict[str, Any]) -> ExpertsPlan | None:
        """The plan for the experts module `name`, or None when the checkpoint stores them unquantized."""
        fmt = self.format
        layer = layer_index(name)
        num_experts, two_i, hidden = module.gate_up_proj.shape
        intermediate = two_i // 2
        marker = scale_suffix(fmt)
        naming = _find_naming(index, layer)
        if naming is None:
            return None
        quantized = [index.has(naming.projection_prefix(layer, e, p) + marker) for e in range(num_experts)
                     for p in (naming.gate, naming.up, naming.down)]
        if not any(quantized):
            return None
        gate0 = naming.projection_prefix(layer, 0, naming.gate)
        scheme = scheme_of(fmt, qcfg, gate0.rstrip("."), index.info(gate0 + marker).dtype)
        gate_up = _stored(index, fmt, scheme, gate0, intermediate, hidden)
        down0 = naming.projection_prefix(layer, 0, naming.down)
        down = _stored(index, fmt, scheme, down0, hidden, intermediate)
        for expert in range(num_experts):
            for projection, expected in ((naming.gate, gate_up), (naming.up, gate_up), (naming.down, down)):
                prefix = naming.projection_prefix(layer, expert, projection)
                if scheme_of(fmt, qcfg, prefix.rstrip("."), index.info(gate0 + marker).dtype) != scheme:
                    raise UnsupportedError(f"{prefix.rstrip('.')}: its quantization scheme differs from "
                                           f"{gate0.rstrip('.')} ({scheme.name}); one experts layer needs one scheme")
                _expect_same(index, prefix, expected)
        return ExpertsPlan(name, index.name, layer, naming, fmt, scheme, num_experts, hidden, intermediate,
                           gate_up, down, row_dims(fmt, scheme, intermediate, hidden))

    def _linear_plan(self, name: str, module: nn.Linear, index: CheckpointIndex, qcfg: dict[str, Any]) -> LinearPlan:
        fmt = self.format
        prefix = name + "."
        scheme = scheme_of(fmt, qcfg, name, index.info(prefix + scale_suffix(fmt)).dtype)
        stored = _stored(index, fmt, scheme, prefix, module.out_features, module.in_features)
        if module.bias is not None and not index.has(prefix + "bias"):
            raise CheckpointError(index.name, prefix + "bias", f"missing, but {name} has a bias")
        return LinearPlan(name, index.name, prefix, fmt, scheme, module.in_features, module.out_features, stored)


class _MergeExperts(MergeModulelist):
    """Stacks the per-expert tensors; saving reverses it with `_SplitExperts`."""

    @property
    def reverse_op(self) -> ConversionOps:
        return _SplitExperts(self.dim)


class _SplitExperts(SplitModulelist):
    """Unstacks a merged tensor into one tensor per expert, removing only the expert dim.

    transformers 5.17's `SplitModulelist` squeezes every size-1 dim, which turns a channel-wise
    `down_proj.weight_scale` [H, 1] into [H] on save; 5.23 squeezes the split dim only, as this does."""

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                **kwargs: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for source_pattern, tensors in input_dict.items():
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            pieces = torch.unbind(tensor, dim=self.dim)
            targets = self.get_target_patterns(input_dict, source_pattern, target_patterns, len(pieces))
            out.update(zip(targets, pieces, strict=True))
        return out

    @property
    def reverse_op(self) -> ConversionOps:
        return _MergeExperts(self.dim)


def _find_naming(index: CheckpointIndex, layer: int) -> ExpertNaming | None:
    """The expert naming the checkpoint uses in `layer` (HF, Mixtral, linearized Mixtral), or None."""
    for naming in _NAMINGS:
        if index.suffixes(naming.projection_prefix(layer, 0, naming.gate)):
            return naming
    return None


def _stored(index: CheckpointIndex, fmt: CheckpointFormat, scheme: WeightScheme, prefix: str, n: int,
            k: int) -> dict[str, TensorInfo]:
    """The tensors of the [n, k] projection stored under `prefix`: the writer's names that the checkpoint
    has, with the writer's shapes and the checkpoint's dtypes (the reader checks them after loading).

    A name the format does not write would be dropped on save, so it is an error here."""
    layout = stored_layout(fmt, scheme, n, k)
    present = index.suffixes(prefix)
    unknown = sorted(present - set(layout) - {"bias"})
    if unknown:
        raise UnsupportedError(f"{index.name}: tensor '{prefix}{unknown[0]}' is not part of a {fmt.value} "
                               f"{scheme.name} projection (expected {sorted(layout)}); it cannot be loaded")
    stored = {}
    for suffix, expected in layout.items():
        if suffix not in present:
            continue
        info = index.info(prefix + suffix)
        if info.shape != expected.shape:
            raise CheckpointError(index.name, prefix + suffix, f"expected shape {list(expected.shape)} for a "
                                                               f"[{n}, {k}] {scheme.name} projection, got "
                                                               f"{list(info.shape)}")
        stored[suffix] = TensorInfo(expected.shape, info.dtype)
    return stored


def _expect_same(index: CheckpointIndex, prefix: str, expected: dict[str, TensorInfo]) -> None:
    """Every expert stores what expert 0 stores, with the same shapes and dtypes."""
    for suffix, info in expected.items():
        key = prefix + suffix
        if not index.has(key):
            raise CheckpointError(index.name, key, "missing (the other experts of this layer have it)")
        found = index.info(key)
        if found != info:
            raise CheckpointError(index.name, key, f"expected {list(info.shape)} {info.dtype} like expert 0, got "
                                                   f"{list(found.shape)} {found.dtype}")
    extra = sorted(index.suffixes(prefix) - set(expected))
    if extra:
        raise CheckpointError(index.name, prefix + extra[0], "unexpected: expert 0 of this layer has no such tensor")
