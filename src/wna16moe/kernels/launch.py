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
"""

from __future__ import annotations

from typing import Any

from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_COMPILED: dict[tuple[Any, ...], CompiledKernel] = {}


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`: `kwargs` holds the constexprs and launch options, as there."""
    if not isinstance(kernel, JITFunction):  # (interpreted)
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
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **kwargs)
        return
    stream = driver.active.get_current_stream(device)
    values = bound.values()
    grid_3d = (*grid, 1, 1)
    compiled.run(grid_3d[0], grid_3d[1], grid_3d[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *values)
