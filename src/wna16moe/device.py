"""`DeviceInfo`: the facts about a machine that backend capability checks look at.

It is a plain value, so tests and `explain` can ask about any machine (`DeviceInfo.named("b200")`) as well
as the current one (`DeviceInfo.current()`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from wna16moe.errors import InvalidInputError

# Optional packages some backends need; `current()` records which are importable.
OPTIONAL_PACKAGES = ("triton", "flashinfer", "vllm_xpu_kernels")
# Pseudo-package present when a Marlin MoE op library is found (see `find_marlin_library`).
MARLIN_PROVIDER = "marlin"
MARLIN_LIBRARY_ENV = "WNA16MOE_MARLIN_LIB"
# The oldest Triton the kernels run on: the Gluon decode kernels and `kernels/launch.py` (Triton's binder, knobs)
# are written and tested against 3.6. An older Triton counts as absent, so the oracle says why it skips TRITON
# instead of the forward failing on an import.
MIN_TRITON = (3, 6)
NO_TRITON = f"Triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]} is not installed"
# Distributions that install the `triton` module (PyTorch's nightlies ship their own).
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")
# Pseudo-package present when the installed Triton has Intel's XPU backend (`triton.backends.intel`, shipped
# by Intel's Triton build); found without importing triton (see `has_triton_xpu_backend`).
TRITON_XPU_PROVIDER = "triton_xpu"
_MARLIN_LIBRARY = "_moe_C_stable_libtorch.abi3.so"


class Platform(str, Enum):
    CUDA = "cuda"
    ROCM = "rocm"
    XPU = "xpu"
    CPU = "cpu"


@dataclass(frozen=True)
class DeviceInfo:
    """platform, name, compute capability (CUDA/ROCm), memory and the importable optional packages."""

    platform: Platform
    name: str
    compute_capability: tuple[int, int] | None = None
    memory_bytes: int = 0
    packages: frozenset[str] = field(default_factory=frozenset)

    @property
    def sm(self) -> int | None:
        """Compute capability as one int (90 for sm_90), None off CUDA/ROCm."""
        if self.compute_capability is None:
            return None
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def has_package(self, package: str) -> bool:
        return package in self.packages

    @property
    def torch_device(self) -> torch.device:
        return torch.device({Platform.CUDA: "cuda", Platform.ROCM: "cuda", Platform.XPU: "xpu",
                             Platform.CPU: "cpu"}[self.platform])

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> DeviceInfo:
        """The machine this process runs on (the given device, else CUDA/XPU when present, else CPU)."""
        dev = torch.device(device) if device is not None else None
        if dev is None:
            if torch.cuda.is_available():
                dev = torch.device("cuda", torch.cuda.current_device())
            elif hasattr(torch, "xpu") and torch.xpu.is_available():
                dev = torch.device("xpu", 0)
            else:
                dev = torch.device("cpu")
        return _current(dev.type, dev.index)

    @classmethod
    def of(cls, device: DeviceInfo | str | None) -> DeviceInfo:
        """This machine (None), a device by name (`named`), or `device` itself."""
        if device is None:
            return cls.current()
        if isinstance(device, str):
            return cls.named(device)
        if not isinstance(device, DeviceInfo):
            raise InvalidInputError(f"device must be a DeviceInfo or a device name such as 'h100', got {device!r}")
        return device

    @classmethod
    def named(cls, name: str) -> DeviceInfo:
        """A well-known device by name (`h100`, `b200`, `cpu`, ...), with every optional package present
        unless the name says otherwise (`h100-bare`: no optional packages)."""
        key = name.lower()
        bare = key.endswith("-bare")
        key = key.removesuffix("-bare")
        if key not in NAMED_DEVICES:
            raise InvalidInputError(f"unknown device name {name!r}; known: {', '.join(sorted(NAMED_DEVICES))} "
                                    "(append -bare for a machine without optional packages)")
        info = NAMED_DEVICES[key]
        if bare:
            return DeviceInfo(info.platform, info.name, info.compute_capability, info.memory_bytes)
        return info


_ALL = frozenset((*OPTIONAL_PACKAGES, MARLIN_PROVIDER))
_GIB = 1 << 30
NAMED_DEVICES: dict[str, DeviceInfo] = {
    "h100": DeviceInfo(Platform.CUDA, "NVIDIA H100 80GB HBM3", (9, 0), 80 * _GIB, _ALL),
    "h200": DeviceInfo(Platform.CUDA, "NVIDIA H200", (9, 0), 141 * _GIB, _ALL),
    "a100": DeviceInfo(Platform.CUDA, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * _GIB, _ALL),
    "l40s": DeviceInfo(Platform.CUDA, "NVIDIA L40S", (8, 9), 48 * _GIB, _ALL),
    "t4": DeviceInfo(Platform.CUDA, "Tesla T4", (7, 5), 16 * _GIB, _ALL),
    "v100": DeviceInfo(Platform.CUDA, "Tesla V100-SXM2-32GB", (7, 0), 32 * _GIB, _ALL),
    "b200": DeviceInfo(Platform.CUDA, "NVIDIA B200", (10, 0), 180 * _GIB, _ALL),
    "b300": DeviceInfo(Platform.CUDA, "NVIDIA B300", (10, 3), 270 * _GIB, _ALL),
    "rtx5090": DeviceInfo(Platform.CUDA, "NVIDIA GeForce RTX 5090", (12, 0), 32 * _GIB, _ALL),
    "mi300x": DeviceInfo(Platform.ROCM, "AMD Instinct MI300X", (9, 4), 192 * _GIB, frozenset({"triton"})),
    "xpu": DeviceInfo(Platform.XPU, "Intel Data Center GPU Max 1550", None, 128 * _GIB,
                      frozenset({"triton", TRITON_XPU_PROVIDER, "vllm_xpu_kernels"})),
    "cpu": DeviceInfo(Platform.CPU, "CPU", None, 0, frozenset()),
}


@functools.cache
def _current(device_type: str, index: int | None) -> DeviceInfo:
    packages = {p for p in OPTIONAL_PACKAGES if importlib.util.find_spec(p) is not None}
    if "triton" in packages and not triton_recent_enough(installed_triton_version()):
        packages.remove("triton")
    if find_marlin_library() is not None:
        packages.add(MARLIN_PROVIDER)
    if has_triton_xpu_backend():
        packages.add(TRITON_XPU_PROVIDER)
    packages = frozenset(packages)
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index or 0)
        platform = Platform.ROCM if torch.version.hip else Platform.CUDA
        return DeviceInfo(platform, props.name, (props.major, props.minor), props.total_memory, packages)
    if device_type == "xpu":
        props = torch.xpu.get_device_properties(index or 0)
        return DeviceInfo(Platform.XPU, props.name, None, props.total_memory, packages)
    return DeviceInfo(Platform.CPU, "CPU", None, 0, packages)


def placement_after(fn: Callable[[torch.Tensor], torch.Tensor],
                    tensor: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device `tensor` would have after `fn` (what `nn.Module._apply` passes: `.to(...)`,
    `.half()`), found on an empty probe so that nothing is converted."""
    moved = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
    return moved.dtype, moved.device


def find_marlin_library() -> str | None:
    """Path of a Marlin MoE op library: `$WNA16MOE_MARLIN_LIB`, else vLLM's `_moe_C_stable_libtorch.abi3.so`
    inside an installed `vllm` package (found without importing vllm). None when there is none."""
    explicit = os.environ.get(MARLIN_LIBRARY_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, _MARLIN_LIBRARY)
        if os.path.isfile(candidate):
            return candidate
    return None


def installed_triton_version() -> str | None:
    """The installed Triton's version from its distribution's metadata (without importing it), or None."""
    for distribution in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def triton_recent_enough(version: str | None) -> bool:
    """Whether a Triton `version` ("3.6.0", "3.7.0+git1234") is at least MIN_TRITON; an unknown one is given the
    benefit of the doubt."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return found is None or (int(found[1]), int(found[2])) >= MIN_TRITON


def has_triton_xpu_backend() -> bool:
    """True when the importable `triton` package carries Intel's XPU backend (a `backends/intel` folder, which
    Triton's backend discovery loads as `triton.backends.intel`); checked without importing triton."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isdir(os.path.join(location, "backends", "intel"))
               for location in spec.submodule_search_locations)
