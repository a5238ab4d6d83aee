"""The oracle: which backend and kernel class runs a layer on a device, and why every other one does not.

Walks the platform's priority list (PRIORITY below); within a backend, its kernel classes in order. The
first class whose capability checks all pass wins. Where the shipped measurements (`wna16moe.tuning`) timed
TRITON and MARLIN in one run on this card, layer shape and scheme, the faster of the two takes the earlier
of their two slots, and the report says so. Checks are classmethods: nothing is instantiated to ask.
A user may force a backend by argument or by the environment variable WNA16MOE_BACKEND; if it cannot run,
that is an error carrying the failing checks, never a silent fallback.

`explain` returns the verdict on every backend and kernel class (as data, and as a table); `select_backend`
returns the winner with that report; `make_kernel` builds the winner for one layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import torch

from wna16moe.config import ActivationFormat, MoEConfig, MoEQuantConfig, ParallelConfig
from wna16moe.device import DeviceInfo, Platform
from wna16moe.errors import BackendError, InvalidInputError
from wna16moe.experts.base import Experts, LayerSpec, dtype_label
from wna16moe.experts.cpu import CPUExperts
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.flashinfer_trtllm import FlashInferTrtllmExperts
from wna16moe.experts.marlin import BatchedMarlinExperts, MarlinExperts
from wna16moe.experts.triton import BatchedTritonExperts, TritonExperts
from wna16moe.experts.xpu import XPUExperts
from wna16moe.scheme import WeightScheme
from wna16moe.tuning import ShapeKey, triton_vs_marlin, tuned_card

logger = logging.getLogger("wna16moe")
BuiltT = TypeVar("BuiltT")

# Forces a backend by name (e.g. WNA16MOE_BACKEND=emulation) for every layer built without an explicit
# override; "auto" or unset lets the oracle choose. Read at each selection, so tests can set it.
BACKEND_ENV = "WNA16MOE_BACKEND"


class Backend(str, Enum):
    FLASHINFER_TRTLLM = "flashinfer_trtllm"
    MARLIN = "marlin"
    BATCHED_MARLIN = "batched_marlin"
    TRITON = "triton"
    BATCHED_TRITON = "batched_triton"
    XPU = "xpu"
    CPU = "cpu"
    EMULATION = "emulation"


# Kernel classes of each backend, tried in order; filled by `register_backend` below. A backend without an
# entry is reported "not implemented in this version".
BACKEND_CLASSES: dict[Backend, tuple[type[Experts], ...]] = {}


def register_backend(backend: Backend, classes: tuple[type[Experts], ...]) -> None:
    """Declare the kernel classes of `backend`, tried in the given order (replaces an earlier declaration).

    Raises `InvalidInputError` unless every class is an `Experts` subclass whose NAME is the backend's name.
    """
    if not classes:
        raise InvalidInputError(f"register_backend({backend.value!r}) needs at least one kernel class")
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Experts)):
            raise InvalidInputError(f"register_backend({backend.value!r}): {cls!r} is not an Experts subclass")
        if backend.value != cls.NAME:
            raise InvalidInputError(f"register_backend({backend.value!r}): {cls.__name__}.NAME is {cls.NAME!r}; "
                                    f"expected {backend.value!r}")
    BACKEND_CLASSES[backend] = tuple(classes)


register_backend(Backend.FLASHINFER_TRTLLM, (FlashInferTrtllmExperts,))
register_backend(Backend.MARLIN, (MarlinExperts,))
register_backend(Backend.BATCHED_MARLIN, (BatchedMarlinExperts,))
register_backend(Backend.TRITON, (TritonExperts,))
register_backend(Backend.BATCHED_TRITON, (BatchedTritonExperts,))
register_backend(Backend.XPU, (XPUExperts,))
register_backend(Backend.CPU, (CPUExperts,))
register_backend(Backend.EMULATION, (EmulationExperts,))


def platform_key(device: DeviceInfo) -> str:
    """Row of PRIORITY for `device`."""
    if device.platform == Platform.CUDA:
        sm = device.sm or 0
        if sm in (100, 103):
            return "cuda_sm100"
        if sm == 90:
            return "cuda_sm90"
        return "cuda_sm80" if 80 <= sm < 100 else "cuda_other"
    return device.platform.value


# Priority per platform: the first backend whose checks pass wins. Each backend's own device check still
# applies (e.g. FLASHINFER_TRTLLM needs the flashinfer package, MARLIN the Marlin op library), so a row
# lists what may run there, fastest first. EMULATION, the reference, runs anywhere and closes every row.
#   cuda_sm100: B200/B300 (sm_100/sm_103), where FlashInfer's fused MxInt4 kernel exists.
#   cuda_sm90:  H100/H200 (sm_90). TRITON first: on an H200 it ran ahead of MARLIN at every int4 row of four
#               model shapes x M = 1..8192 (1.07-2.47x) and by 1.02-1.34x per shape for W8A16
#               (benchmarks/BENCHMARKS.md Session 13); the batched formats, not measured, keep MARLIN first.
#   cuda_sm80:  A100 to L40S (sm_80..sm_89), where TRITON has never been measured: MARLIN first.
#   cuda_other: older (sm_70/75) and other families (sm_12x); MARLIN/TRITON device checks draw the line.
#   rocm:       no Marlin build; TRITON is the fast path.
#   xpu:        Intel's own kernel first, then TRITON and BATCHED_TRITON (Intel's Triton backend).
#   cpu:        PyTorch's packed int4/int8 CPU matmuls per expert (experts/cpu.py).
PRIORITY: dict[str, tuple[Backend, ...]] = {
    "cuda_sm100": (Backend.FLASHINFER_TRTLLM, Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.TRITON,
                   Backend.BATCHED_TRITON, Backend.EMULATION),
    "cuda_sm90": (Backend.TRITON, Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.BATCHED_TRITON, Backend.EMULATION),
    "cuda_sm80": (Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.TRITON, Backend.BATCHED_TRITON, Backend.EMULATION),
    "cuda_other": (Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.TRITON, Backend.BATCHED_TRITON,
                   Backend.EMULATION),
    "rocm": (Backend.TRITON, Backend.BATCHED_TRITON, Backend.EMULATION),
    "xpu": (Backend.XPU, Backend.TRITON, Backend.BATCHED_TRITON, Backend.EMULATION),
    "cpu": (Backend.CPU, Backend.EMULATION),
}


class Verdict(str, Enum):
    """CHOSEN: runs the layer. ELIGIBLE: every check passes, but another candidate was taken. REJECTED: a check
    fails (the reason says which)."""

    CHOSEN = "chosen"
    ELIGIBLE = "eligible"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Candidate:
    """One kernel class the oracle looked at (kernel None: the backend has no classes yet), and its verdict.

    `failed` holds `(check, reason)` for every failing capability check; `reason` is the verdict in words.
    """

    backend: Backend
    kernel: type[Experts] | None
    verdict: Verdict
    reason: str
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def chosen(self) -> bool:
        return self.verdict == Verdict.CHOSEN

    @property
    def kernel_name(self) -> str:
        return "-" if self.kernel is None else self.kernel.__name__


@dataclass(frozen=True)
class Report:
    """The verdict on every backend and kernel class for one layer on one device, in priority order
    (backends outside this platform's priority list come last)."""

    spec: LayerSpec
    device: DeviceInfo
    platform: str
    override: Backend | None
    candidates: tuple[Candidate, ...]

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def table(self) -> str:
        """The candidates as an aligned text table: backend, kernel, verdict, reason."""
        rows = [("backend", "kernel", "verdict", "reason")]
        rows += [(c.backend.value, c.kernel_name, c.verdict.value, c.reason) for c in self.candidates]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form of the report."""
        chosen = self.chosen
        return {
            "layer": describe_layer(self.spec),
            "scheme": self.spec.scheme.name,
            "device": {"name": self.device.name, "platform": self.device.platform.value,
                       "compute_capability": self.device.compute_capability,
                       "packages": sorted(self.device.packages)},
            "priority": {"platform": self.platform, "order": [b.value for b in PRIORITY[self.platform]]},
            "override": None if self.override is None else self.override.value,
            "chosen": None if chosen is None else {"backend": chosen.backend.value, "kernel": chosen.kernel_name},
            "candidates": [{"backend": c.backend.value, "kernel": c.kernel_name, "verdict": c.verdict.value,
                            "reason": c.reason, "failed_checks": [{"check": n, "reason": r} for n, r in c.failed]}
                           for c in self.candidates],
        }


@dataclass(frozen=True)
class Selection:
    """The chosen backend and kernel class, with the report of every candidate."""

    backend: Backend
    kernel: type[Experts]
    report: Report

    @property
    def spec(self) -> LayerSpec:
        return self.report.spec

    @property
    def device(self) -> DeviceInfo:
        return self.report.device

    def table(self) -> str:
        return self.report.table()


def parse_backend(name: str, setting: str = "backend") -> Backend | None:
    """`Backend` for `name` (case-insensitive), None for "auto"; `setting` names the source in errors."""
    key = name.strip().lower()
    if key == "auto":
        return None
    try:
        return Backend(key)
    except ValueError:
        valid = ", ".join(b.value for b in Backend)
        raise InvalidInputError(f"{setting}={name!r} is not a backend; valid names: auto, {valid}") from None


def layer_spec(layer: LayerSpec | MoEConfig, scheme: WeightScheme | str | None = None, *,
               parallel: ParallelConfig | None = None, activation_format: ActivationFormat | None = None,
               has_bias: bool | None = None, clamp_limit: float | None = None,
               router_logits_dtype: torch.dtype | None = None) -> LayerSpec:
    """A `LayerSpec` from either a `LayerSpec` (alone) or a `MoEConfig` and a `WeightScheme` (or its name)
    plus optional layer facts; unset facts take LayerSpec's defaults (the activation format: the one the
    parallel config implies)."""
    extras = {"parallel": parallel, "activation_format": activation_format, "has_bias": has_bias,
              "clamp_limit": clamp_limit, "router_logits_dtype": router_logits_dtype}
    given = {k: v for k, v in extras.items() if v is not None}
    if isinstance(layer, LayerSpec):
        if scheme is not None or given:
            raise InvalidInputError(f"pass either a LayerSpec alone or a MoEConfig with a scheme and keywords; got a "
                                    f"LayerSpec plus {sorted(given) + (['scheme'] if scheme is not None else [])}")
        return layer
    if not isinstance(layer, MoEConfig):
        raise InvalidInputError(f"expected a LayerSpec or a MoEConfig, got {type(layer).__name__}")
    if scheme is None:
        raise InvalidInputError("a MoEConfig needs a weight scheme: select_backend(moe_config, scheme, ...)")
    return LayerSpec(layer, WeightScheme.of(scheme), **given)


def describe_layer(spec: LayerSpec) -> str:
    """One line naming everything the checks look at."""
    moe, par, routing = spec.moe, spec.parallel, spec.moe.routing
    shard = f" (I/tp={spec.intermediate_per_shard})" if par.tp_size > 1 else ""
    route = routing.method.value + (" renormalized" if routing.renormalize else "")
    extras = [f"bias={spec.has_bias}"] + ([f"clamp_limit={spec.clamp_limit}"] if spec.clamp_limit is not None else [])
    return (f"E={moe.num_experts} top_k={moe.top_k} H={moe.hidden_size} I={moe.intermediate_size}{shard}, "
            f"{spec.scheme.name}, {moe.activation.value}, {route}, {dtype_label(moe.dtype)} "
            f"(router logits {dtype_label(spec.logits_dtype)}), tp={par.tp_size} ep={par.ep_size} dp={par.dp_size}, "
            f"{spec.activation_format.value} format, {', '.join(extras)}")


def describe_device(device: DeviceInfo) -> str:
    arch = f" sm_{device.sm}" if device.sm is not None else ""
    packages = ", ".join(sorted(device.packages)) or "none"
    return f"{device.name} ({device.platform.value}{arch}; optional packages: {packages})"


def _candidates(backend: Backend, spec: LayerSpec,
                device: DeviceInfo) -> list[tuple[type[Experts] | None, list[tuple[str, str]]]]:
    classes = BACKEND_CLASSES.get(backend)
    if not classes:
        return [(None, [("implemented", "not implemented in this version")])]
    return [(cls, cls.failures(spec, device)) for cls in classes]


@dataclass(frozen=True)
class Measured:
    """TRITON and MARLIN timed in one run on this card and layer shape (the shipped table, `wna16moe.tuning`)."""

    faster: Backend
    slower: Backend
    ratio: float  # slower's time / faster's time, geometric mean over `tokens`
    tokens: list[int]

    def text(self) -> str:
        return (f"{self.faster.value} measured {self.ratio:.2f}x faster than {self.slower.value} on this card and "
                f"shape (geometric mean over M = {', '.join(map(str, self.tokens))}; wna16moe/tuned_triton.json)")


def _measured(spec: LayerSpec, device: DeviceInfo) -> Measured | None:
    """The shipped same-run comparison of TRITON and MARLIN for this layer on this card, if any."""
    if device.platform != Platform.CUDA:
        return None
    found = triton_vs_marlin(device.name, ShapeKey.of(spec), spec.scheme.name)
    if found is None:
        return None
    speedup, tokens = found
    if speedup >= 1.0:
        return Measured(Backend.TRITON, Backend.MARLIN, speedup, tokens)
    return Measured(Backend.MARLIN, Backend.TRITON, 1.0 / speedup, tokens)


def _launch_configs(spec: LayerSpec, device: DeviceInfo) -> str:
    """Where TRITON's launch configurations for this layer come from on this card (`wna16moe.tuning`)."""
    source = tuned_card(device.name, ShapeKey.of(spec), device.compute_capability)
    if source == device.name:
        return "launch configurations tuned on this card for this shape"
    if source is not None:
        return f"launch configurations tuned on {source} for this shape (it stands in for sm_{device.sm} cards)"
    return "launch configurations from default_config (no tuned entries for this card and shape)"


def _explain(spec: LayerSpec, device: DeviceInfo, override: Backend | None,
             unbuildable: dict[Backend, str] | None = None) -> Report:
    platform = platform_key(device)
    in_priority = PRIORITY[platform]
    order = list(in_priority) + [b for b in Backend if b not in in_priority]
    measured = _measured(spec, device) if {Backend.MARLIN, Backend.TRITON} <= set(in_priority) else None
    if measured is not None:  # the faster of the two takes the earlier of their two slots
        first, second = sorted((order.index(Backend.MARLIN), order.index(Backend.TRITON)))
        order[first], order[second] = measured.faster, measured.slower
    candidates: list[Candidate] = []
    winner: Backend | None = None
    for backend in order:
        for cls, failed in _candidates(backend, spec, device):
            if unbuildable and backend in unbuildable and not failed:
                failed = [("build", f"passed its checks but could not be built here: {unbuildable[backend]}")]
            listed = backend in in_priority
            wanted = backend == override if override is not None else listed
            if failed:
                reason = "; ".join(f"{name}: {why}" for name, why in failed)
                if not listed and override != backend:
                    reason = f"not in the {platform} priority list; {reason}"
                candidates.append(Candidate(backend, cls, Verdict.REJECTED, reason, tuple(failed)))
            elif wanted and winner is None:
                winner = backend
                why = "requested, and every check passes" if override is not None else (
                    "first in priority order whose checks all pass")
                if override is None and measured is not None and backend == measured.faster:
                    why = f"{why}; {measured.text()}"
                if cls.TUNED and device.platform == Platform.CUDA:
                    why = f"{why}; {_launch_configs(spec, device)}"
                if cls.CAVEAT:
                    why = f"{why}; {cls.CAVEAT}"
                candidates.append(Candidate(backend, cls, Verdict.CHOSEN, why))
            else:
                if wanted and measured is not None and backend == measured.slower and winner == measured.faster:
                    why = f"every check passes, but {measured.text()}"
                elif wanted:  # an earlier class (of this backend, or of an earlier one in the list) won
                    why = "every check passes, but a higher-priority kernel was chosen"
                elif override is not None:
                    why = f"every check passes, but {override.value!r} was requested"
                else:
                    why = f"every check passes, but not in the {platform} priority list"
                candidates.append(Candidate(backend, cls, Verdict.ELIGIBLE, why))
    return Report(spec, device, platform, override, tuple(candidates))


def explain(layer: LayerSpec | MoEConfig, scheme: WeightScheme | str | None = None, *,
            device: DeviceInfo | str | None = None, override: Backend | str | None = None,
            parallel: ParallelConfig | None = None, activation_format: ActivationFormat | None = None,
            has_bias: bool | None = None, clamp_limit: float | None = None,
            router_logits_dtype: torch.dtype | None = None) -> Report:
    """Every backend and kernel class in priority order, chosen, eligible or rejected with the reason.

    Takes a `LayerSpec`, or a `MoEConfig` and a scheme with the optional layer facts (see `layer_spec`).
    `device` (a `DeviceInfo` or the name of one, `DeviceInfo.named`) defaults to this machine. Unlike
    `select_backend` it never raises for a layer nothing can run and does not read $WNA16MOE_BACKEND: with
    `override`, only that backend may be chosen, and a report whose `chosen` is None says why it cannot.
    """
    spec = layer_spec(layer, scheme, parallel=parallel, activation_format=activation_format, has_bias=has_bias,
                      clamp_limit=clamp_limit, router_logits_dtype=router_logits_dtype)
    forced = override if isinstance(override, Backend) or override is None else parse_backend(override, "override")
    return _explain(spec, DeviceInfo.of(device), forced)


def select_backend(layer: LayerSpec | MoEConfig, scheme: WeightScheme | str | None = None, *,
                   device: DeviceInfo | str | None = None, override: Backend | str | None = None,
                   parallel: ParallelConfig | None = None, activation_format: ActivationFormat | None = None,
                   has_bias: bool | None = None, clamp_limit: float | None = None,
                   router_logits_dtype: torch.dtype | None = None,
                   unbuildable: dict[Backend, str] | None = None) -> Selection:
    """The backend and kernel class for a layer on `device` (default: this machine).

    Call as `select_backend(spec)` or `select_backend(moe_config, scheme, parallel=..., ...)`. `override`
    (else $WNA16MOE_BACKEND; "auto" or unset lets the oracle choose) forces a backend: an unknown name is an
    `InvalidInputError` listing the valid ones, and a backend that cannot run the layer is a `BackendError`
    naming every failing check and the backends that could. `unbuildable`: backends whose kernel failed to
    build on this machine (e.g. a Marlin library that does not load), with the error; they are rejected with it.
    """
    spec = layer_spec(layer, scheme, parallel=parallel, activation_format=activation_format, has_bias=has_bias,
                      clamp_limit=clamp_limit, router_logits_dtype=router_logits_dtype)
    device = DeviceInfo.of(device)
    setting = "override"
    if override is None and os.environ.get(BACKEND_ENV):
        override, setting = os.environ[BACKEND_ENV], BACKEND_ENV
    forced = override if isinstance(override, Backend) or override is None else parse_backend(override, setting)
    report = _explain(spec, device, forced, unbuildable)
    chosen = report.chosen
    if chosen is not None and chosen.kernel is not None:
        _log_decision(report, chosen)
        return Selection(chosen.backend, chosen.kernel, report)
    if forced is None:
        raise BackendError(f"no backend can run this layer ({describe_layer(spec)}) on {device.name}:\n"
                           f"{report.table()}")
    reasons = "; ".join(f"{c.kernel_name}: {c.reason}" for c in report.candidates if c.backend == forced)
    able = sorted({c.backend.value for c in report.candidates if c.verdict == Verdict.ELIGIBLE})
    raise BackendError(f"{setting}={forced.value!r} cannot run this layer ({describe_layer(spec)}) on {device.name}: "
                       f"{reasons}. Backends that can: {', '.join(able) or 'none'}; use 'auto' to let the oracle "
                       "choose")


_logged: set[tuple[str, str, str, str, bool]] = set()


def _log_decision(report: Report, chosen: Candidate) -> None:
    """Log a decision once per distinct (device, scheme, backend, kernel, forced), not once per layer."""
    key = (report.device.name, report.spec.scheme.name, chosen.backend.value, chosen.kernel_name,
           report.override is not None)
    if key not in _logged:
        _logged.add(key)
        how = "requested" if report.override is not None else "auto"
        logger.info("wna16moe: %s on %s -> %s (%s, %s)", report.spec.scheme.name, report.device.name,
                    chosen.backend.value, chosen.kernel_name, how)


def build_with_fallback(select: Callable[[dict[Backend, str]], Selection],
                        build: Callable[[Selection], BuiltT]) -> tuple[Selection, BuiltT]:
    """`build(select({}))`; when the chosen kernel cannot be built on this machine (`build` raises
    `BackendError`: a Marlin library that does not load, a failed self-check) and was not requested, select
    again with it marked unbuildable (rejected with its error in the report), and so on. A requested backend's
    error propagates: it is never silently replaced."""
    unbuildable: dict[Backend, str] = {}
    while True:
        selection = select(unbuildable)
        try:
            return selection, build(selection)
        except BackendError as error:
            if selection.report.override is not None:
                raise
            unbuildable[selection.backend] = str(error)
            logger.warning("wna16moe: %s could not be built here (%s); choosing again without it",
                           selection.backend.value, error)


def make_kernel(selection: Selection, quant: MoEQuantConfig, device: torch.device) -> Experts:
    """Build the selected kernel for one layer (call once per layer, after its weights are final).

    The MoE and parallel configs are the ones in `selection.spec`, which the capability checks saw, so a
    kernel is never built for a layer it was not checked against. Every call returns a new object: layers
    never share kernel state. Raises `InvalidInputError` when `quant` disagrees with the selected scheme
    (bits, group size, zero points) or with the spec's bias and clamp limit.
    """
    spec = selection.spec
    scheme = spec.scheme
    group = -1 if scheme.group_size is None else scheme.group_size
    mismatches = [
        f"{name}: quant config has {got}, the selection was made for {want}"
        for name, got, want in (
            ("num_bits", quant.num_bits, scheme.bits),
            ("group_size", quant.group_size, group),
            ("zero points", quant.has_zero_points, scheme.zero_point),
            ("bias", quant.has_bias, spec.has_bias),
            ("gemm1_clamp_limit", quant.gemm1_clamp_limit, spec.clamp_limit),
        ) if got != want
    ]
    if mismatches:
        raise InvalidInputError(f"cannot build {selection.kernel.__name__} for {scheme.name}: {'; '.join(mismatches)}; "
                                "select again with the layer's real facts")
    return selection.kernel(spec, quant, device)
