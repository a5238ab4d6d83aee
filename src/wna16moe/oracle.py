"""The oracle: which backend and kernel class runs a layer on a device, and why every other one does not.

Walks the platform's priority list (PRIORITY below); within a backend, its kernel classes in order. The
first class whose capability checks all pass wins. A user may force a backend by argument or by the
environment variable WNA16MOE_BACKEND; if it cannot run, that is an error carrying the failing check,
never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum

import torch

from wna16moe.config import MoEQuantConfig
from wna16moe.device import DeviceInfo, Platform
from wna16moe.errors import BackendError, InvalidInputError
from wna16moe.experts.base import Check, Experts, LayerSpec
from wna16moe.experts.emulation import EmulationExperts

logger = logging.getLogger("wna16moe")

# Forces a backend by name (e.g. WNA16MOE_BACKEND=emulation); "auto" or unset lets the oracle choose.
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


# Kernel classes of each backend, tried in order.
BACKEND_CLASSES: dict[Backend, tuple[type[Experts], ...]] = {
    Backend.EMULATION: (EmulationExperts,),
}


def register_backend(backend: Backend, classes: tuple[type[Experts], ...]) -> None:
    """Declare the kernel classes of `backend` (each backend module calls this once at import)."""
    BACKEND_CLASSES[backend] = classes


def platform_key(device: DeviceInfo) -> str:
    """Row of PRIORITY for `device`."""
    if device.platform == Platform.CUDA:
        sm = device.sm or 0
        if sm in (100, 103):
            return "cuda_sm100"
        return "cuda_sm80" if 80 <= sm < 100 else "cuda_other"
    return device.platform.value


# Priority per platform: the first backend whose checks pass wins.
PRIORITY: dict[str, tuple[Backend, ...]] = {
    "cuda_sm100": (Backend.FLASHINFER_TRTLLM, Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.TRITON,
                   Backend.BATCHED_TRITON, Backend.EMULATION),
    "cuda_sm80": (Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.TRITON, Backend.BATCHED_TRITON, Backend.EMULATION),
    "cuda_other": (Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.EMULATION),
    "rocm": (Backend.TRITON, Backend.BATCHED_TRITON, Backend.EMULATION),
    "xpu": (Backend.XPU, Backend.TRITON, Backend.EMULATION),
    "cpu": (Backend.CPU, Backend.EMULATION),
}


@dataclass(frozen=True)
class Candidate:
    """One kernel class the oracle looked at, and its verdict."""

    backend: Backend
    kernel: type[Experts] | None
    chosen: bool
    reason: str

    @property
    def kernel_name(self) -> str:
        return "-" if self.kernel is None else self.kernel.__name__


@dataclass(frozen=True)
class Selection:
    """The chosen backend and kernel class, with the report of every candidate."""

    backend: Backend
    kernel: type[Experts]
    spec: LayerSpec
    device: DeviceInfo
    report: tuple[Candidate, ...]

    def table(self) -> str:
        return format_report(self.report)


def parse_backend(name: str) -> Backend:
    try:
        return Backend(name.lower())
    except ValueError:
        valid = ", ".join(b.value for b in Backend)
        raise InvalidInputError(f"unknown backend {name!r}; valid names: auto, {valid}") from None


def _evaluate(backend: Backend, spec: LayerSpec, device: DeviceInfo) -> list[tuple[type[Experts] | None, Check]]:
    classes = BACKEND_CLASSES.get(backend)
    if not classes:
        return [(None, Check(False, "implemented: not implemented in this version"))]
    return [(cls, cls.is_supported(spec, device)) for cls in classes]


def explain(spec: LayerSpec, device: DeviceInfo | None = None) -> tuple[Candidate, ...]:
    """Every backend and kernel class in priority order, chosen or rejected with the reason.

    Backends not in this platform's priority list are reported too, after the others.
    """
    device = device or DeviceInfo.current()
    order = list(PRIORITY[platform_key(device)])
    order += [b for b in Backend if b not in order]
    in_priority = set(PRIORITY[platform_key(device)])
    report: list[Candidate] = []
    chosen = False
    for backend in order:
        for cls, check in _evaluate(backend, spec, device):
            reason = check.reason
            if backend not in in_priority:
                reason = f"not in the {platform_key(device)} priority list" + (f"; {reason}" if reason else "")
            win = check.ok and not chosen and backend in in_priority
            if check.ok and not win and backend in in_priority:
                reason = "a higher-priority kernel was chosen"
            chosen = chosen or win
            report.append(Candidate(backend, cls, win, "chosen" if win else reason))
    return tuple(report)


def select_backend(spec: LayerSpec, *, device: DeviceInfo | None = None,
                   override: Backend | str | None = None) -> Selection:
    """The backend and kernel class for `spec` on `device` (default: this machine).

    `override` (or $WNA16MOE_BACKEND) forces a backend; if none of its classes can run the layer, a
    `BackendError` names the failing check.
    """
    device = device or DeviceInfo.current()
    if override is None:
        override = os.environ.get(BACKEND_ENV) or None
    report = explain(spec, device)
    if override is not None and str(getattr(override, "value", override)).lower() != "auto":
        forced = override if isinstance(override, Backend) else parse_backend(override)
        results = _evaluate(forced, spec, device)
        for cls, check in results:
            if check.ok and cls is not None:
                return Selection(forced, cls, spec, device, report)
        reasons = "; ".join(f"{'-' if cls is None else cls.__name__}: {check.reason}" for cls, check in results)
        raise BackendError(f"backend {forced.value!r} was requested but cannot run this layer "
                           f"({spec.scheme.name}, {spec.moe.activation.value}) on {device.name}: {reasons}")
    for candidate in report:
        if candidate.chosen and candidate.kernel is not None:
            _log_decision(candidate, spec, device)
            return Selection(candidate.backend, candidate.kernel, spec, device, report)
    raise BackendError(f"no backend can run this layer on {device.name}:\n{format_report(report)}")


_logged: set[tuple[str, str, str]] = set()


def _log_decision(candidate: Candidate, spec: LayerSpec, device: DeviceInfo) -> None:
    """Log a decision once per distinct (device, scheme, kernel), not once per layer."""
    key = (device.name, spec.scheme.name, candidate.kernel_name)
    if key not in _logged:
        _logged.add(key)
        logger.info("wna16moe: %s on %s -> %s (%s)", spec.scheme.name, device.name, candidate.backend.value,
                    candidate.kernel_name)


def make_kernel(selection: Selection, quant: MoEQuantConfig, device: torch.device) -> Experts:
    """Build the selected kernel for one layer (call after the layer's weights are final)."""
    return selection.kernel(selection.spec, quant, device)


def format_report(report: tuple[Candidate, ...]) -> str:
    """The report as an aligned text table."""
    rows = [("backend", "kernel", "verdict")]
    rows += [(c.backend.value, c.kernel_name, c.reason) for c in report]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)
