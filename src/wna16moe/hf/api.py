"""Turning the quantizer takeover on and off, and asking a loaded model which kernels it runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.quantizers import auto

from wna16moe.errors import InvalidInputError
from wna16moe.hf.modules import PackedExperts, WNA16Linear
from wna16moe.hf.quantizer import METHODS, CheckpointQuantizationConfig, WNA16Quantizer
from wna16moe.oracle import Backend, Report, describe_device, describe_layer, parse_backend

# The stock entries of transformers' quantizer and config registries while ours are in place.
_stock: dict[str, tuple[Any, Any]] = {}


def is_enabled() -> bool:
    """True while `from_pretrained` loads compressed-tensors, GPTQ and AWQ checkpoints through wna16moe."""
    return bool(_stock)


def enable(backend: Backend | str = "auto") -> None:
    """Make `from_pretrained` load compressed-tensors, GPTQ and AWQ checkpoints through wna16moe.

    Replaces those three entries of `transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING` (and of
    `AUTO_QUANTIZATION_CONFIG_MAPPING`) until `disable()`. Calling it again only changes the backend.

    Parameters
    ----------
    backend : "auto" (the oracle chooses per layer, or $WNA16MOE_BACKEND) or a backend name forced on
        every experts layer; a layer it cannot run is a `BackendError` at load.
    """
    WNA16Quantizer.backend = backend if isinstance(backend, Backend) else parse_backend(backend, "backend")
    if _stock:
        return
    for method in METHODS:
        _stock[method] = (auto.AUTO_QUANTIZER_MAPPING.get(method), auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(method))
        auto.AUTO_QUANTIZER_MAPPING[method] = WNA16Quantizer
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = CheckpointQuantizationConfig


def disable() -> None:
    """Give the three methods back to transformers' own quantizers (a no-op when not enabled)."""
    for method, (quantizer, config) in _stock.items():
        pairs = ((auto.AUTO_QUANTIZER_MAPPING, quantizer), (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config))
        for mapping, stock in pairs:
            if stock is None:
                mapping.pop(method, None)
            else:
                mapping[method] = stock
    _stock.clear()
    WNA16Quantizer.backend = None


@contextmanager
def loading(backend: Backend | str = "auto") -> Iterator[None]:
    """`with wna16moe.hf.loading(): model = AutoModelForCausalLM.from_pretrained(path)`: `enable(backend)`
    for the block, then the previous state back (enabled or not, and its backend)."""
    was_enabled, previous = is_enabled(), WNA16Quantizer.backend
    enable(backend)
    try:
        yield
    finally:
        if was_enabled:
            WNA16Quantizer.backend = previous
        else:
            disable()


@dataclass(frozen=True)
class LayerExplanation:
    """One experts layer of a loaded model: its module path and the oracle's report."""

    name: str
    report: Report

    @property
    def backend(self) -> Backend:
        chosen = self.report.chosen
        if chosen is None:
            raise InvalidInputError(f"{self.name}: no backend was chosen")
        return chosen.backend


@dataclass(frozen=True)
class Explanation:
    """Every experts layer of a model with the chosen backend and why the others were not chosen, and the
    quantized dense layers (dequantize-and-multiply, no backend choice)."""

    layers: tuple[LayerExplanation, ...]
    dense_layers: tuple[str, ...]

    def __str__(self) -> str:
        if not self.layers:
            return "no wna16moe experts layers in this model"
        first = self.layers[0].report
        lines = [f"device  {describe_device(first.device)}", ""]
        for layer in self.layers:
            lines += [f"{layer.name}: {describe_layer(layer.report.spec)}", layer.report.table(), ""]
        lines.append(f"{len(self.dense_layers)} quantized dense layers (WNA16Linear: dequantize, then float32 matmul)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"layers": {layer.name: layer.report.as_dict() for layer in self.layers},
                "dense_layers": list(self.dense_layers)}


def explain(model: nn.Module) -> Explanation:
    """Per experts layer of a model loaded through wna16moe: the chosen backend and every other one's reason."""
    layers = tuple(LayerExplanation(name, module.report) for name, module in model.named_modules()
                   if isinstance(module, PackedExperts))
    dense = tuple(name for name, module in model.named_modules() if isinstance(module, WNA16Linear))
    if not layers and not dense:
        raise InvalidInputError(f"{type(model).__name__} has no wna16moe modules: load it with wna16moe.hf.enable() "
                                "(or inside wna16moe.hf.loading()) active")
    return Explanation(layers, dense)
