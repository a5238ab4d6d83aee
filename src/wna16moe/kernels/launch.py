"""Kernel launches that spend less host time than `kernel[grid](...)`.

Triton's launch path costs 50-80 µs of Python per kernel on the H200 machines' hosts (benchmarks/NOTES.md v56:
an eager qwen3-30b-a3b forward, five launches, took 260-600 µs of host time, so that at M = 2048 the GPU's 458 µs
waited on the host in some processes). Most of it goes to checks that cannot change between two launches of
one compiled kernel: the options' cache key as a string, the module globals the kernel read, launch hooks.

`launch` keys each compiled kernel by what Triton's own cache key holds: the kernel's binder's specialization of
every argument (types, 16-byte alignment, integers equal to 1 or divisible by 16, constexpr values) and the launch
options. The first launch of a key goes through Triton (compiling, checking, launching) and keeps the compiled
kernel it returns; later launches of the same key call its launcher directly. Interpreted kernels
(TRITON_INTERPRET=1) launch as before.

A `LaunchPlan` goes further for a whole forward of several launches (v57: what is left of an eager forward's host
time is mostly its callers' checks and Triton's binder). One forward runs under `recording()`: every launch is kept
as its compiled kernel, grid and argument values, and every temporary the forward allocates through `scratch` as
its shape and dtype. `Recording.plan` then names each tensor argument by the source it points at (the forward's
inputs, its weights, its temporaries); `LaunchPlan.run` allocates fresh temporaries and replays the launches with
the new pointers, skipping everything else. `PlanCache` keeps the plans of one function by key. A recording holds
no plan when any tensor argument is neither a source nor a temporary, when any torch operation other than an
allocation or a view ran inside it (its work would not be replayed), or when a kernel was interpreted.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_Out = TypeVar("_Out", torch.Tensor, tuple[torch.Tensor, ...])
_COMPILED: dict[tuple[Any, ...], CompiledKernel] = {}


class _Recordings(threading.local):
    """The recordings open in this thread, innermost last (a thread's launches never go to another's)."""

    def __init__(self) -> None:
        self.stack: list[Recording] = []


_RECORDINGS = _Recordings()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`: `kwargs` holds the constexprs and launch options, as there."""
    if not isinstance(kernel, JITFunction):  # (interpreted)
        if not _RECORDINGS.stack:
            kernel[grid](*args, **kwargs)
            return
        _RECORDINGS.stack[-1].refuse(f"{kernel} is not a compiled Triton kernel (interpreted?)")
        with _disable_current_modes():  # (the interpreter's own torch ops are the kernel's, not the forward's)
            kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    # (as JITFunction.run completes them: both are part of its cache key)
    options = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                   instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = kernel.device_caches[device][4]
    bound, specialization, launch_options = binder(*args, **options)
    key = (kernel, device, tuple(specialization), tuple(launch_options.items()))
    compiled = _COMPILED.get(key)
    values = bound.values()
    grid_3d = (*grid, 1, 1)[:3]
    if compiled is None:
        compiled = _COMPILED[key] = kernel[grid](*args, **kwargs)
    else:
        stream = driver.active.get_current_stream(device)
        hooks = _launch_hooks()
        metadata = None if hooks is None else compiled.launch_metadata(grid, stream, *values)
        _run_compiled(compiled, grid_3d, stream, values, metadata, hooks)
    if _RECORDINGS.stack:
        _RECORDINGS.stack[-1].add(compiled, grid_3d, list(values))


def _launch_hooks() -> tuple[Any, Any] | None:
    """Triton's launch hooks where any is set (profilers such as proton), else None: Triton 3.6 keeps them as
    chains that are never None, and calling empty ones costs host time on every launch."""
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return hooks if any(h is not None and getattr(h, "calls", True) for h in hooks) else None


def _run_compiled(compiled: CompiledKernel, grid: tuple[int, int, int], stream: int, values: Any,
                  metadata: Any = None, hooks: tuple[Any, Any] | None = None) -> None:
    """Call `compiled`'s launcher directly (as Triton's own launch does last)."""
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, metadata, *(hooks or (None, None)),
                 *values)


def _allocate(shape: Sequence[int], dtype: torch.dtype, device: torch.device, zeroed: bool) -> torch.Tensor:
    return (torch.zeros if zeroed else torch.empty)(tuple(shape), dtype=dtype, device=device)


def scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device, zeroed: bool = False) -> torch.Tensor:
    """`torch.empty` (or `torch.zeros`) for a forward's temporaries: a `LaunchPlan` allocates them afresh."""
    tensor = _allocate(shape, dtype, device, zeroed)
    if _RECORDINGS.stack:
        _RECORDINGS.stack[-1].scratch.append((tensor, zeroed))
    return tensor


@dataclass(frozen=True)
class _PlannedLaunch:
    compiled: CompiledKernel
    grid: tuple[int, int, int]
    values: tuple[Any, ...]  # the recorded arguments, None at the tensors' positions
    tensors: tuple[tuple[int, int], ...]  # (position, index into the sources then the temporaries)


# Offsets of the temporaries that share one allocation: as aligned as the caching allocator's own blocks.
_SHARED_ALIGN = 512


class LaunchPlan:
    """The launches of one recorded forward, replayed on new sources (`Recording.plan`).

    Temporaries other than the outputs and the zeroed ones share one allocation per replay: the forward's
    temporaries all live until it returns anyway, and each allocation costs the host a few µs."""

    def __init__(self, launches: Sequence[_PlannedLaunch], temporaries: Sequence[tuple[tuple[int, ...], torch.dtype,
                 bool]], outputs: Sequence[int], num_sources: int, device: torch.device) -> None:
        self.launches = tuple(launches)
        self.temporaries = tuple(temporaries)  # (shape, dtype, zeroed)
        self.outputs = tuple(outputs)  # indices among the sources, then the temporaries
        self.device = device
        shared, size = [], 0
        for i, (shape, dtype, zeroed) in enumerate(self.temporaries):
            own = zeroed or num_sources + i in self.outputs
            shared.append(None if own else size)
            size += 0 if own else -(-math.prod(shape) * dtype.itemsize // _SHARED_ALIGN) * _SHARED_ALIGN
        self._shared_offsets = tuple(shared)
        self._shared_bytes = size

    def run(self, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """Replay on `sources` (as recorded: same shapes, dtypes, strides and alignment, the caller's key) and
        return the new outputs; None while a launch hook is set (profilers: launch through Triton)."""
        if _launch_hooks() is not None:
            return None
        shared = torch.empty(self._shared_bytes, dtype=torch.uint8, device=self.device) if self._shared_bytes else None
        base = 0 if shared is None else shared.data_ptr()
        tensors: list[torch.Tensor | None] = list(sources)
        pointers = [t.data_ptr() for t in sources]
        for (shape, dtype, zeroed), offset in zip(self.temporaries, self._shared_offsets, strict=True):
            if offset is None:
                tensor = _allocate(shape, dtype, self.device, zeroed)
                tensors.append(tensor)
                pointers.append(tensor.data_ptr())
            else:
                tensors.append(None)
                pointers.append(base + offset)
        stream = _current_stream(self.device)
        for planned in self.launches:
            values = list(planned.values)
            for position, index in planned.tensors:
                values[position] = pointers[index]
            _run_compiled(planned.compiled, planned.grid, stream, values)
        return tuple(tensors[i] for i in self.outputs)  # type: ignore[misc]  # (outputs have their own)


class Recording:
    """What one forward launched and allocated (`recording`)."""

    def __init__(self) -> None:
        self.launches: list[tuple[CompiledKernel, tuple[int, int, int], list[Any]]] = []
        self.scratch: list[tuple[torch.Tensor, bool]] = []
        self.refusals: list[str] = []  # (every reason, in order)

    @property
    def refused(self) -> str | None:
        """The first reason this recording holds no plan, or None."""
        return self.refusals[0] if self.refusals else None

    def refuse(self, why: str) -> None:
        self.refusals.append(why)

    def add(self, compiled: CompiledKernel, grid: tuple[int, int, int], values: list[Any]) -> None:
        """A launch of `compiled` on `grid` with its bound argument `values` (as `launch` passes them)."""
        self.launches.append((compiled, grid, values))

    def plan(self, sources: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> LaunchPlan | None:
        """The plan that replays this forward on new `sources` (the tensors it was given, in a fixed order) and
        returns its new `outputs` (temporaries); None where it cannot (`refused` says why)."""
        if not self.launches:
            self.refuse("nothing launched")
        if self.refused:
            return None
        tensors = [*sources, *(t for t, _ in self.scratch)]
        index: dict[int, int] = {}
        for i, tensor in enumerate(tensors):
            if tensor.numel() == 0 or tensor.data_ptr() in index:
                self.refuse(f"tensor {i} is empty or shares its storage with another")
                return None
            index[tensor.data_ptr()] = i
        launches = []
        for compiled, grid, values in self.launches:
            positions = []
            for position, value in enumerate(values):
                if isinstance(value, torch.Tensor):
                    if value.data_ptr() not in index:
                        self.refuse(f"argument {position} of {compiled.name} is not a source nor a temporary")
                        return None
                    positions.append((position, index[value.data_ptr()]))
            plain = tuple(None if isinstance(v, torch.Tensor) else v for v in values)
            launches.append(_PlannedLaunch(compiled, grid, plain, tuple(positions)))
        returned = [index.get(output.data_ptr(), -1) for output in outputs]
        if any(i < len(sources) or tensors[i] is not output for i, output in zip(returned, outputs, strict=True)):
            self.refuse("an output is not a temporary")
            return None
        return LaunchPlan(launches, [(tuple(t.shape), t.dtype, zeroed) for t, zeroed in self.scratch], returned,
                          len(sources), outputs[0].device)


_UNRECORDED = object()


class PlanCache:
    """Launch plans by key, for a function whose launches and temporaries follow from the key alone.

    `run(key, sources, forward)` replays the plan of `key` on `sources`, else runs `forward()` under a recording
    (it returns a tensor or a tuple of tensors, allocated through `scratch`) and keeps its plan, or None where it
    cannot be planned, in which case `forward()` runs every time. Cleared when it holds `capacity` keys: prefill
    sees many token counts, and a plan holds a few KB of launch arguments (a model keeps one cache per layer)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.plans: dict[Hashable, LaunchPlan | None] = {}

    def run(self, key: Hashable, sources: Sequence[torch.Tensor], forward: Callable[[], _Out]) -> _Out:
        plan = self.plans.get(key, _UNRECORDED)
        if plan is _UNRECORDED:
            if len(self.plans) >= self.capacity:
                self.plans.clear()
            with recording() as rec:
                out = forward()
            self.plans[key] = rec.plan(sources, out if isinstance(out, tuple) else (out,))
            return out
        replayed = None if plan is None else plan.run(sources)  # type: ignore[union-attr]
        if replayed is None:
            return forward()
        return replayed if len(replayed) > 1 else replayed[0]  # type: ignore[return-value]


def layout_key(*tensors: torch.Tensor | None) -> tuple[Any, ...]:
    """What a forward's launches depend on in its input tensors besides their pointers: shapes, dtypes, strides
    and 16-byte alignment (Triton specializes pointers on it)."""
    return tuple(None if t is None else (t.shape, t.dtype, t.stride(), t.data_ptr() % 16) for t in tensors)


def _current_stream(device: torch.device) -> int:
    return driver.active.get_current_stream(device.index)


# Torch operations a recorded forward may run: its temporaries and views of its inputs.
_REPLAYED_OPS = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.zeros.default,
                           torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default})


class _TorchOpsWatch(TorchDispatchMode):
    """Refuses the recording on any torch operation a plan would not replay."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in _REPLAYED_OPS:
            self.rec.refuse(f"the forward ran {func}")
        return func(*args, **(kwargs or {}))


@contextmanager
def recording() -> Iterator[Recording]:
    """Record the launches and temporaries of the forward run inside (see the module docstring)."""
    rec = Recording()
    _RECORDINGS.stack.append(rec)
    try:
        with _TorchOpsWatch(rec):
            yield rec
    finally:
        _RECORDINGS.stack.pop()
