"""The modules the quantizer puts into a transformers model: `PackedExperts` for a layer's routed experts
and `WNA16Linear` for a quantized dense projection.

Both keep the checkpoint's own tensors as their parameters (the experts' per-expert tensors merged along a
leading expert dim), so `save_pretrained` writes the checkpoint back bit for bit. After loading,
`finalize` reads them into canonical form with the format readers (every check the readers make runs once,
here) and builds what the forward needs:

- `PackedExperts`: the layer's kernel, chosen by the oracle and built for this layer only. Its prepared
  weights are kept as non-persistent buffers, except for EMULATION, whose prepared weights would be the
  canonical codes (one byte per weight): it reads them from the checkpoint tensors at each forward instead,
  so the layer holds the packed size only. The forward turns HF's routing into the kernel's (three small
  ops, no host synchronization) and calls the kernel directly when running eagerly, through the custom op
  `wna16moe::hf_experts` (`wna16moe.hf.ops`) under torch.compile and tracing.
- `WNA16Linear`: the canonical codes, scales, zero points and group index (non-persistent buffers);
  the forward dequantizes them to float32 and multiplies, with no host synchronization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wna16moe.config import ActivationFormat, MoEConfig, ParallelConfig
from wna16moe.device import DeviceInfo, placement_after
from wna16moe.errors import BackendError, CheckpointError, InvalidInputError
from wna16moe.experts.base import Experts, LayerSpec
from wna16moe.formats.checkpoint import CheckpointFormat, ExpertNaming, read_experts, read_projection
from wna16moe.formats.common import DictSource
from wna16moe.hf.layout import TensorInfo
from wna16moe.hf.ops import register_runtime
from wna16moe.oracle import Backend, Report, Selection, Verdict, build_with_fallback, make_kernel, select_backend
from wna16moe.quantized import QuantizedExperts
from wna16moe.scheme import WeightScheme

# Marker HF puts on every tensor it assigned from the checkpoint (core_model_loading.set_param_for_module).
_LOADED_FLAG = "_is_hf_initialized"


def _refuse_casts(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], module_name: str) -> None:
    """A loaded module keeps the checkpoint's dtypes: `model.to(torch.float16)` would rewrite its stored tensors
    (`save_pretrained` no longer bit for bit) and the kernel's prepared ones behind its back. (transformers itself
    refuses `.half()` and `.float()` on quantized models, and `.to(dtype)` only for GPTQ and bitsandbytes.)"""
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None and tensor.is_floating_point():
            cast, _ = placement_after(fn, tensor)
            if cast != tensor.dtype:
                raise InvalidInputError(f"{module_name}.{name} keeps the checkpoint's {tensor.dtype}; casting the "
                                        f"model to {cast} after loading is not supported (modules before it may "
                                        f"already be cast): load it again with from_pretrained(..., dtype={cast})")


def _check_loaded(module: nn.Module, module_name: str, checkpoint: str, sources: dict[str, str]) -> None:
    """Raise a `CheckpointError` naming the first parameter no checkpoint tensor was loaded into (and
    freeze the others).

    `sources` maps each parameter name to the checkpoint tensor(s) it comes from, for the message."""
    for name, param in module.named_parameters(recurse=False):
        if param.is_meta or not getattr(param, _LOADED_FLAG, False):
            raise CheckpointError(checkpoint, f"{module_name}.{name}",
                                  f"was not filled from the checkpoint (it merges {sources.get(name, name)}); "
                                  "its memory is uninitialized, refusing to use it")
        param.requires_grad_(False)  # the loader makes float tensors trainable; quantized layers are not


@dataclass(frozen=True)
class ExpertsPlan:
    """How one layer's experts are stored in the checkpoint and held by `PackedExperts`.

    `gate_up` and `down` give, per stored name (suffix), the per-expert tensor of one gate (= up) and one
    down projection; `row_dim` the dim along which a gate and an up tensor concatenate.
    """

    module_name: str
    checkpoint: str
    layer: int
    naming: ExpertNaming
    fmt: CheckpointFormat
    scheme: WeightScheme
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gate_up: dict[str, TensorInfo]
    down: dict[str, TensorInfo]
    row_dim: dict[str, int]

    def param_shapes(self) -> dict[str, TensorInfo]:
        """The merged parameters: `w13_<suffix>` [E, gate ++ up] and `w2_<suffix>` [E, ...]."""
        out = {}
        for suffix, info in self.gate_up.items():
            shape = list(info.shape)
            shape[self.row_dim[suffix]] *= 2
            out[f"w13_{suffix}"] = TensorInfo((self.num_experts, *shape), info.dtype)
        for suffix, info in self.down.items():
            out[f"w2_{suffix}"] = TensorInfo((self.num_experts, *info.shape), info.dtype)
        return out

    def sources(self) -> dict[str, str]:
        """Checkpoint tensors (as a pattern over experts) behind each merged parameter."""
        def pattern(projection: str, suffix: str) -> str:
            return self.naming.projection_prefix(self.layer, 0, projection).replace(".0.", ".*.") + suffix

        out = {f"w13_{s}": f"{pattern(self.naming.gate, s)} and {pattern(self.naming.up, s)}" for s in self.gate_up}
        out.update({f"w2_{s}": pattern(self.naming.down, s) for s in self.down})
        return out

    def read(self, params: dict[str, torch.Tensor]) -> QuantizedExperts:
        """Canonical experts from the merged parameters, through the format's reader (views, no copies, until
        the reader unpacks)."""
        views: dict[str, torch.Tensor] = {}
        for expert in range(self.num_experts):
            for projection, half in ((self.naming.gate, 0), (self.naming.up, 1)):
                prefix = self.naming.projection_prefix(self.layer, expert, projection)
                for suffix in self.gate_up:
                    merged = params[f"w13_{suffix}"][expert]
                    dim = self.row_dim[suffix]
                    size = merged.shape[dim] // 2
                    views[prefix + suffix] = merged.narrow(dim, half * size, size)
            prefix = self.naming.projection_prefix(self.layer, expert, self.naming.down)
            for suffix in self.down:
                views[prefix + suffix] = params[f"w2_{suffix}"][expert]
        source = DictSource(views, f"{self.checkpoint} (as loaded into {self.module_name})")
        return read_experts(source, self.fmt, self.scheme, self.layer, self.naming, self.num_experts,
                            self.hidden_size, self.intermediate_size)


def select_modular(spec: LayerSpec, device: DeviceInfo, backend: Backend | None,
                   unbuildable: dict[Backend, str] | None = None) -> Selection:
    """The oracle's choice for an experts module that receives routed ids (HF routes before the experts).

    A monolithic kernel routes inside itself and cannot run behind HF's router; when the oracle picks one,
    the next candidate in priority order whose checks all pass is taken instead. `unbuildable`: as in
    `select_backend`."""
    selection = select_backend(spec, device=device, override=backend, unbuildable=unbuildable)
    if not selection.kernel.MONOLITHIC:
        return selection
    for candidate in selection.report.candidates:
        if candidate.verdict == Verdict.ELIGIBLE and candidate.kernel is not None and not candidate.kernel.MONOLITHIC:
            return select_backend(spec, device=device, override=candidate.backend, unbuildable=unbuildable)
    raise BackendError(f"{selection.backend.value} routes inside its kernel, which HF's experts modules cannot use, "
                       f"and no other backend can run this layer:\n{selection.report.table()}")


class _ExpertsRuntime:
    """One layer's kernel and how to feed it; registered with the custom op, owned by its module."""

    def __init__(self, plan: ExpertsPlan, kernel: Experts, names: list[str], reads_per_call: bool) -> None:
        """`names`: what the op's tensors are called, in order: the merged checkpoint parameters when
        `reads_per_call` (EMULATION), else the kernel's prepared weights."""
        self.plan = plan
        self.kernel = kernel
        self.device = kernel.device
        self.names = names
        self.reads_per_call = reads_per_call
        # EMULATION computes in float32 whatever the input dtype; other kernels take the layer's dtype.
        self.dtype: torch.dtype | None = None if reads_per_call else kernel.moe.dtype

    def apply(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              tensors: list[torch.Tensor]) -> torch.Tensor:
        """The custom op's body: `tensors` in the order of `names`."""
        if hidden_states.device != self.device:
            kernel = self.kernel
            raise BackendError(f"{self.plan.module_name}: its {kernel.NAME} kernel was built for {kernel.device}, "
                               f"but hidden_states are on {hidden_states.device}; load the model where it runs "
                               "(device_map=...) instead of moving it after loading")
        return self.run(hidden_states, topk_ids, topk_weights, dict(zip(self.names, tensors, strict=True)))

    def run(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            named: dict[str, torch.Tensor]) -> torch.Tensor:
        """The kernel on `hidden_states` (on the kernel's device, not checked here) -> [T, H] in its dtype."""
        kernel = self.kernel
        weights = kernel.prepare_weights(self.plan.read(named), kernel.device) if self.reads_per_call else named
        dtype = hidden_states.dtype
        x = hidden_states if self.dtype is None or dtype == self.dtype else hidden_states.to(self.dtype)
        out = kernel.apply(x, topk_weights, topk_ids, weights)
        return out if out.dtype == dtype else out.to(dtype)


def _direct_call(hidden_states: torch.Tensor, device: torch.device) -> bool:
    """True when the experts forward may call its runtime directly instead of through the custom op: plain
    eager execution on real tensors of the kernel's device, with nothing to record for autograd.

    The op's dispatch (autograd and backend kernels in Python, a dynamo-disable wrapper, the aliasing check)
    costs several small torch ops' worth of host time per layer; it buys nothing outside tracing and
    compilation, which still see the op (dynamo reads `is_compiling` first and never evaluates the rest).
    Anything else (fake, meta or subclass tensors, tracing or torch-function modes, inputs requiring grad,
    a device other than the kernel's) takes the op path, which behaves as before."""
    return (not torch.compiler.is_compiling() and type(hidden_states) is torch.Tensor
            and hidden_states.device == device and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()
            and not (hidden_states.requires_grad and torch.is_grad_enabled()))


class PackedExperts(nn.Module):
    """A layer's quantized routed experts in the checkpoint's own packing, in place of HF's `*Experts`.

    `forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, the signature HF's
    sparse MoE blocks call. Parameters are created on the meta device (they are filled by the loader).
    """

    def __init__(self, plan: ExpertsPlan) -> None:
        super().__init__()
        self.plan = plan
        self.num_experts = plan.num_experts
        for name, info in plan.param_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(info.shape, dtype=info.dtype, device="meta"),
                                                       requires_grad=False))
        self.selection: Selection | None = None
        self._runtime: _ExpertsRuntime | None = None
        self._handle: int | None = None
        self._op_names: list[str] = []
        # (kernel name, module attribute) of the op's tensors, and whether they are parameters (else buffers).
        self._op_keys: tuple[tuple[str, str], ...] = ()
        self._op_params = False
        # Routed id -> kernel id, indexed by the id clamped to [-1, E] (-1 wraps to the last entry, like E).
        self._id_table: torch.Tensor | None = None
        self._valid_table: torch.Tensor | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedExperts:
        if self.selection is not None:  # (loaded: before that, transformers places and casts the meta tensors)
            _refuse_casts(self, fn, self.plan.module_name)
        return super()._apply(fn, recurse)

    @property
    def report(self) -> Report:
        """The oracle's verdict on every backend for this layer (after loading)."""
        if self.selection is None:
            raise BackendError(f"{self.plan.module_name} has no kernel yet: it is built after the weights load")
        return self.selection.report

    def canonical(self) -> QuantizedExperts:
        """The layer's experts in canonical form, read from its checkpoint tensors."""
        return self.plan.read(dict(self.named_parameters(recurse=False)))

    def spec(self, config: MoEConfig, dtype: torch.dtype) -> LayerSpec:
        """The facts the oracle checks, for activations of `dtype` (float32 models are checked as bfloat16)."""
        moe = MoEConfig(self.plan.num_experts, config.top_k, self.plan.hidden_size, self.plan.intermediate_size,
                        config.activation, config.routing,
                        dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
        return LayerSpec(moe, self.plan.scheme, ParallelConfig(), ActivationFormat.STANDARD)

    @torch.no_grad()
    def finalize(self, config: MoEConfig, dtype: torch.dtype, backend: Backend | None) -> None:
        """Check every parameter was loaded, choose and build this layer's kernel, register it with the op."""
        plan = self.plan
        _check_loaded(self, plan.module_name, plan.checkpoint, plan.sources())
        experts = self.canonical()
        device = next(iter(self.parameters())).device
        spec = self.spec(config, dtype)
        info = DeviceInfo.current(device)
        selection, kernel = build_with_fallback(lambda unbuildable: select_modular(spec, info, backend, unbuildable),
                                                lambda chosen: make_kernel(chosen, experts.quant_config(), device))
        reads_per_call = selection.backend == Backend.EMULATION
        if reads_per_call:
            names = [name for name, _ in self.named_parameters(recurse=False)]
            self._op_names = names
        else:
            prepared = kernel.prepare_weights(experts, device)
            names = list(prepared)
            for name, tensor in prepared.items():
                self.register_buffer(f"kernel_{name}", tensor, persistent=False)
            self._op_names = [f"kernel_{name}" for name in names]
        self._op_keys = tuple(zip(names, self._op_names, strict=True))
        self._op_params = reads_per_call
        # Ids outside [0, E) (expert-parallel sentinels) must contribute nothing: kernels that take an expert
        # map skip -1; the others get expert 0 with router weight 0.
        e = plan.num_experts
        skips = kernel.SUPPORTS_EXPERT_MAP
        self._id_table = torch.tensor([*range(e), -1 if skips else 0], dtype=torch.int32, device=device)
        self._valid_table = None if skips else torch.tensor([True] * e + [False], device=device)
        self.selection = selection
        self._runtime = _ExpertsRuntime(plan, kernel, names, reads_per_call)
        self._handle = register_runtime(self._runtime)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        runtime = self._runtime
        if runtime is None:
            raise BackendError(f"{self.plan.module_name} has no kernel: it is built by the wna16moe quantizer after "
                               "from_pretrained loads the weights")
        ids, weights = self._route(top_k_index, top_k_weights)
        if _direct_call(hidden_states, runtime.device):
            store = self._parameters if self._op_params else self._buffers
            return runtime.run(hidden_states, ids, weights, {name: store[key] for name, key in self._op_keys})
        tensors = [getattr(self, name) for name in self._op_names]
        return torch.ops.wna16moe.hf_experts(hidden_states, ids, weights, tensors, self._handle)

    def _route(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's routed ids [T, K] (any integer dtype) and weights -> the kernel's int32 ids and float32 weights,
        ids outside [0, E) made harmless: -1 for kernels that skip it, else expert 0 with weight 0.

        Three small ops at decode (clamp, table lookup, float), with no host synchronization."""
        table = self._id_table
        if table.device != top_k_index.device:  # a misplaced (the runtime says so) or meta call
            table = table.to(top_k_index.device)
        clamped = top_k_index.clamp(-1, self.num_experts)
        ids = torch.take(table, clamped)
        weights = top_k_weights.float()
        if self._valid_table is not None:
            weights = torch.where(torch.take(self._valid_table.to(table.device), clamped), weights, 0.0)
        return ids, weights

    def extra_repr(self) -> str:
        p = self.plan
        backend = "-" if self.selection is None else self.selection.backend.value
        return (f"E={p.num_experts}, H={p.hidden_size}, I={p.intermediate_size}, {p.fmt.value} {p.scheme.name}, "
                f"backend={backend}")


@dataclass(frozen=True)
class LinearPlan:
    """How one dense projection is stored in the checkpoint (`prefix` ends with a dot)."""

    module_name: str
    checkpoint: str
    prefix: str
    fmt: CheckpointFormat
    scheme: WeightScheme
    in_features: int
    out_features: int
    stored: dict[str, TensorInfo]


class WNA16Linear(nn.Module):
    """A quantized `nn.Linear` holding the checkpoint's tensors under their checkpoint names.

    Parameters
    ----------
    plan : the stored tensors of this projection.
    bias : the original layer's bias (meta), or None.
    """

    def __init__(self, plan: LinearPlan, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.plan = plan
        self.in_features = plan.in_features
        self.out_features = plan.out_features
        for suffix, info in plan.stored.items():
            self.register_parameter(suffix, nn.Parameter(torch.empty(info.shape, dtype=info.dtype, device="meta"),
                                                         requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(torch.empty_like(bias, device="meta"), requires_grad=False)
        self._ready = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WNA16Linear:
        if self._ready:  # (as PackedExperts)
            _refuse_casts(self, fn, self.plan.module_name)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def finalize(self) -> None:
        """Check every tensor was loaded and read it into canonical form (the reader's checks run here)."""
        plan = self.plan
        _check_loaded(self, plan.module_name, plan.checkpoint,
                      {name: plan.prefix + name for name, _ in self.named_parameters(recurse=False)})
        source = DictSource({plan.prefix + s: getattr(self, s) for s in plan.stored},
                            f"{plan.checkpoint} (as loaded into {plan.module_name})")
        projection = read_projection(plan.fmt, source, plan.prefix, plan.scheme,
                                     (plan.out_features, plan.in_features))
        group = projection.g_idx.long() if projection.g_idx is not None else plan.scheme.group_of(plan.in_features)
        device = projection.codes.device
        # Prefixed: the checkpoint's own names (GPTQ `scales`) are parameters of this module.
        self.register_buffer("canonical_codes", projection.codes, persistent=False)
        self.register_buffer("canonical_scales", projection.scales, persistent=False)
        self.register_buffer("canonical_zeros", projection.zeros, persistent=False)
        self.register_buffer("canonical_group", group.to(device), persistent=False)
        self._ready = True

    def dequantized(self) -> torch.Tensor:
        """float32 [out_features, in_features]: (code - zero) * scale of each element's group."""
        group = self.canonical_group
        scale = self.canonical_scales.float().index_select(1, group)
        if self.canonical_zeros is None:
            return (self.canonical_codes.float() - self.plan.scheme.symmetric_zero) * scale
        return (self.canonical_codes.float() - self.canonical_zeros.float().index_select(1, group)) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise BackendError(f"{self.plan.module_name} is not ready: it is finalized by the wna16moe quantizer "
                               "after from_pretrained loads the weights")
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.dequantized(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.plan.fmt.value} {self.plan.scheme.name}")
