"""`WNA16MoE`: an nn.Module running one quantized MoE layer with the kernel the oracle picks.

The layer owns its prepared weights (as buffers) and its own kernel instance, built once after the weights
are final and never shared with another layer. `load_experts` refreshes the weights in place, so device
pointers stay stable for CUDA graphs.

Parallel layers (`parallel=ParallelConfig(...)`, see `wna16moe.distributed`): the layer keeps this rank's
experts and TP shard only, and its forward runs prepare (dispatch) -> experts -> finalize (combine, reduce),
so every rank's output is the whole layer's output for the tokens it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from wna16moe.config import (
    Activation,
    ActivationFormat,
    MoEConfig,
    MoEQuantConfig,
    ParallelConfig,
)
from wna16moe.device import DeviceInfo, placement_after
from wna16moe.distributed import (
    MoEGroups,
    NoParallel,
    PrepareFinalize,
    make_prepare_finalize,
    shard_biases,
    shard_experts,
)
from wna16moe.errors import InvalidInputError, UnsupportedError, no_gradients
from wna16moe.experts.base import Experts, LayerSpec
from wna16moe.formats import open_checkpoint
from wna16moe.oracle import Backend, Selection, build_with_fallback, make_kernel, select_backend
from wna16moe.quantized import QuantizedExperts
from wna16moe.routing import route
from wna16moe.scheme import WeightScheme


class WNA16MoE(nn.Module):
    """One MoE layer with int4/int8 experts: `forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]`.

    Parameters
    ----------
    experts : the layer's quantized experts (canonical form, full I): all E of them, or under expert
        parallelism just this rank's range (`Checkpoint.load_layer(layer, parallel.local_experts(E))`).
    config : shapes, activation, routing and activation dtype (bfloat16 or float16), global (unsharded).
    device : where the layer runs (default: CUDA/XPU if present, else CPU).
    backend : force a backend by name or `Backend` (default: $WNA16MOE_BACKEND, else the oracle's choice).
    parallel : this rank's tensor / expert / data parallel config (default: one rank). Its activation format
        (`batched`) decides which kernels qualify.
    groups : the process groups (`MoEGroups.create(parallel)`, collective: create once, pass to every layer);
        default: created here.
    w13_bias, w2_bias : optional expert biases [E, 2I] and [E, H] (global).
    correction_bias : DeepSeek-V3 `e_score_correction_bias` [E] for routing.
    gemm1_clamp_limit, gemm1_alpha, gemm1_beta : SwiGLU parameters.
    """

    def __init__(self, experts: QuantizedExperts, config: MoEConfig, *, device: torch.device | str | None = None,
                 backend: Backend | str | None = None, parallel: ParallelConfig | None = None,
                 groups: MoEGroups | None = None, w13_bias: torch.Tensor | None = None,
                 w2_bias: torch.Tensor | None = None, correction_bias: torch.Tensor | None = None,
                 gemm1_clamp_limit: float | None = None, gemm1_alpha: float | None = None,
                 gemm1_beta: float | None = None) -> None:
        super().__init__()
        parallel = parallel or ParallelConfig()
        _check_matches(experts, config, parallel)
        experts.check_values()
        _check_activation_parameters(config.activation, gemm1_clamp_limit, gemm1_alpha, gemm1_beta)
        if correction_bias is not None and not torch.isfinite(correction_bias).all():
            raise InvalidInputError("correction_bias holds NaN or infinite values (it would steer every token to "
                                    "one expert)")
        info = DeviceInfo.current(device)
        self.device_info = info
        target = torch.device(device) if device is not None else info.torch_device
        # (where inputs must be: a CUDA layer without an index runs on the device current now)
        self._device = torch.device("cuda", torch.cuda.current_device()) if target == torch.device("cuda") else target
        self.config = config
        self.parallel = parallel
        spec = LayerSpec(config, experts.scheme, parallel, has_bias=w13_bias is not None or w2_bias is not None,
                         clamp_limit=gemm1_clamp_limit, router_logits_dtype=config.dtype)
        local = shard_experts(experts, parallel, config.num_experts)
        w13_bias, w2_bias = shard_biases(w13_bias, w2_bias, experts, parallel, config.num_experts)
        self.quant: MoEQuantConfig = local.quant_config(
            w1_bias=None if w13_bias is None else w13_bias.to(target),
            w2_bias=None if w2_bias is None else w2_bias.to(target),
            gemm1_clamp_limit=gemm1_clamp_limit, gemm1_alpha=gemm1_alpha, gemm1_beta=gemm1_beta)
        self.register_buffer("correction_bias", None if correction_bias is None else correction_bias.to(target))
        self.prepare_finalize: PrepareFinalize = make_prepare_finalize(
            parallel, config.num_experts, groups or MoEGroups.create(parallel), target)

        # A chosen kernel can still fail to build here (a Marlin library that does not load, a FlashInfer
        # self-check): unless it was requested, the oracle chooses again without it.
        def build(selection: Selection) -> tuple[dict[str, torch.Tensor], Experts]:
            weights = selection.kernel.prepare_weights(local, target)
            kernel = make_kernel(selection, self.quant, target)
            if kernel.MONOLITHIC and not isinstance(self.prepare_finalize, NoParallel):
                raise UnsupportedError(f"{type(kernel).__name__} routes inside the kernel and cannot run behind the "
                                       f"{type(self.prepare_finalize).__name__} dispatch (dp_size={parallel.dp_size}, "
                                       f"batched={parallel.batched})")
            kernel.self_check(weights, self.correction_bias)
            return weights, kernel

        selection, (weights, kernel) = build_with_fallback(
            lambda unbuildable: select_backend(spec, device=info, override=backend, unbuildable=unbuildable), build)
        self.selection: Selection = selection
        self.kernel = kernel
        for name, tensor in weights.items():
            self.register_buffer(name, tensor)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WNA16MoE:
        # The kernel and its prepared weights were built for one device and their own dtypes: a cast
        # (`model.half()`) or a move (`.to("cuda")`) would leave the kernel reading what it was not built for.
        for name, buffer in self._buffers.items():
            if buffer is not None:
                dtype, device = placement_after(fn, buffer)
                if (dtype, device) != (buffer.dtype, buffer.device):
                    raise InvalidInputError(
                        f"WNA16MoE keeps its prepared weights as built ({name}: {buffer.dtype} on {buffer.device}); "
                        f"a cast or move to {dtype} on {device} would not reach its kernel: build the layer with the "
                        "device and MoEConfig(dtype=...) it should run with")
        return super()._apply(fn, recurse)

    @property
    def scheme(self) -> WeightScheme:
        return self.selection.spec.scheme

    @property
    def backend(self) -> Backend:
        return self.selection.backend

    def prepared_weights(self) -> dict[str, torch.Tensor]:
        # (the layer's own buffers, read from the module's dict: named_buffers' walk costs every eager forward
        # several µs of host time; the layer has no submodules)
        return {name: buf for name, buf in self._buffers.items() if name != "correction_bias" and buf is not None}

    @torch.no_grad()
    def load_experts(self, experts: QuantizedExperts) -> None:
        """Replace the weights in place (same shapes and scheme; all experts or this EP rank's, as at
        construction): buffers keep their addresses, so captured CUDA graphs stay valid and the kernel is not
        rebuilt."""
        if experts.scheme != self.scheme:
            raise InvalidInputError(f"new experts use scheme {experts.scheme}, the layer was built for {self.scheme}")
        _check_matches(experts, self.config, self.parallel)
        experts.check_values()
        local = shard_experts(experts, self.parallel, self.config.num_experts)
        current = self.prepared_weights()
        prepared = self.selection.kernel.prepare_weights(local, self.kernel.device)
        for name, tensor in prepared.items():
            if name not in current or current[name].shape != tensor.shape:
                raise InvalidInputError(f"prepared tensor {name} changed shape; build a new layer instead")
        for name, tensor in prepared.items():
            current[name].copy_(tensor)
        # The quant config describes the weights the layer holds (biases and SwiGLU parameters stay).
        self.quant = replace(self.quant, w1_scale=local.w13.scales, w2_scale=local.w2.scales, w1_zp=local.w13.zeros,
                             w2_zp=local.w2.zeros)
        self.kernel.quant = self.quant

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = self._forward(hidden_states, router_logits)
        if torch.is_grad_enabled() and (hidden_states.requires_grad or router_logits.requires_grad):
            # (the kernels' results come out detached: a loss through the layer would give its inputs no
            # gradient, silently; EMULATION's torch ops would give one, so they are detached too, alike)
            out = _Inference.apply(out.detach(), hidden_states, router_logits)
        return out

    def _forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if hidden_states.dim() != 2 or hidden_states.shape[1] != cfg.hidden_size:
            raise InvalidInputError(f"hidden_states must be [T, H={cfg.hidden_size}], got {list(hidden_states.shape)}")
        if hidden_states.dtype != cfg.dtype:
            raise InvalidInputError(f"hidden_states must be {cfg.dtype} (the layer's dtype), got {hidden_states.dtype}")
        if router_logits.shape != (hidden_states.shape[0], cfg.num_experts):
            raise InvalidInputError(f"router_logits must be [T={hidden_states.shape[0]}, E={cfg.num_experts}], got "
                                    f"{list(router_logits.shape)}")
        for name, tensor in (("hidden_states", hidden_states), ("router_logits", router_logits)):
            device = tensor.device
            if device != self._device and (device.type != self._device.type or self._device.index is not None):
                raise InvalidInputError(f"{name} is on {device}, the layer on {self._device}")
        weights = self.prepared_weights()
        if self.kernel.MONOLITHIC:
            out = self.kernel.apply_monolithic(hidden_states, router_logits, weights, self.correction_bias)
            return self.prepare_finalize.reduce(out)  # type: ignore[attr-defined]  # NoParallel (checked at init)
        topk_weights, topk_ids = route(router_logits, cfg.routing, cfg.top_k, self.correction_bias)
        expert_input = self.prepare_finalize.prepare(hidden_states, topk_weights, topk_ids)
        if expert_input.empty:  # no token reached this rank's experts; finalize still communicates
            output = torch.zeros_like(expert_input.hidden)
        elif self.kernel.ACTIVATION_FORMAT == ActivationFormat.BATCHED:
            output = self.kernel.apply_batched(expert_input.hidden, expert_input.num_tokens, weights)
        else:
            output = self.kernel.apply(expert_input.hidden, expert_input.topk_weights, expert_input.topk_ids, weights)
        return self.prepare_finalize.finalize(output, expert_input)

    @classmethod
    def from_checkpoint(cls, path: str | Path, layer_idx: int, *, quantize_to: WeightScheme | str | None = None,
                        parallel: ParallelConfig | None = None, **kwargs: object) -> WNA16MoE:
        """Build layer `layer_idx` of a checkpoint (its experts and routing config). Under expert parallelism
        only this rank's experts are read."""
        ckpt = open_checkpoint(path, quantize_to=quantize_to)
        config = ckpt.moe_config()
        experts = ckpt.load_layer(layer_idx, None if parallel is None else parallel.local_experts(config.num_experts))
        return cls(experts, config, parallel=parallel, correction_bias=ckpt.correction_bias(layer_idx),
                   **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        c = self.config
        p = self.parallel
        parallel = f", tp={p.tp_size} ep={p.ep_size} dp={p.dp_size}" if p.world_size > 1 or p.batched else ""
        return (f"E={c.num_experts}, top_k={c.top_k}, H={c.hidden_size}, I={c.intermediate_size}, "
                f"scheme={self.scheme.name}, backend={self.backend.value}{parallel}")


class _Inference(torch.autograd.Function):
    """The layer's result, given a backward that refuses (`errors.no_gradients`). The layer's inputs are passed
    only so that the node hangs off them: a loss through the result reaches it."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, result: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return result.view_as(result)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> None:
        raise no_gradients("WNA16MoE")


def _check_activation_parameters(activation: Activation, clamp_limit: float | None, alpha: float | None,
                                 beta: float | None) -> None:
    """SwiGLU's alpha and beta belong to SWIGLU_OAI and its clamp to it and SILU: given to another activation
    they would be ignored."""
    if activation != Activation.SWIGLU_OAI and (alpha is not None or beta is not None):
        raise InvalidInputError(f"gemm1_alpha and gemm1_beta apply to the swiglu_oai activation only, the layer's is "
                                f"{activation.value}")
    if activation not in (Activation.SWIGLU_OAI, Activation.SILU) and clamp_limit is not None:
        raise InvalidInputError(f"gemm1_clamp_limit applies to swiglu_oai and silu only, the layer's activation is "
                                f"{activation.value}")


def _check_matches(experts: QuantizedExperts, config: MoEConfig, parallel: ParallelConfig) -> None:
    """Experts match the config: same H and I, and all E experts or this EP rank's range."""
    local = len(parallel.local_experts(config.num_experts))
    got = (experts.hidden_size, experts.intermediate_size)
    want = (config.hidden_size, config.intermediate_size)
    if got != want or experts.num_experts not in (config.num_experts, local):
        expected = f"E={config.num_experts}" + (f" (or this EP rank's {local})" if local != config.num_experts else "")
        raise InvalidInputError(f"experts are (E, H, I) = {(experts.num_experts, *got)} but the config says "
                                f"{expected}, (H, I) = {want}")
