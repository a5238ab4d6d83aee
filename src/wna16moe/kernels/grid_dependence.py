"""Programmatic dependent launch (Hopper and later): a grid launched with `launch_pdl=True` may start while the
grid before it still runs, so one kernel's launch and first loads overlap the previous kernel's tail.

The rule every such kernel follows: before `await_prior_grids` it reads only what was final before the
previous kernel started (weights; for GEMM2, the blocks and router ids made before GEMM1) and writes nothing
(a buffer it writes may be memory the previous kernel still reads: the caching allocator reuses it in stream
order). It lets its own dependents launch (`release_dependents`) only after its wait, so that a dependent's
early reads see every kernel up to the one before its predecessor complete.

Where it releases them is a launch setting (`TritonConfig.pdl`, the kernels' PDL): 1 once its main loop is
done, 2 right after its wait (0: a plain launch, no wait). Released at the wait, the next kernel's launch and
first loads hide best (qwen3-30b-a3b M = 1: 23.2 -> 21.8 µs), but at mixtral M = 1 and 8 the dependents
waiting beside the running kernel slowed the forward (M = 1: 66.3 -> 69.7 µs; after the loop 64.6;
benchmarks/NOTES.md v28). 3 breaks the rule where that is safe: a kernel whose dependent reads nothing before
its own wait that this kernel's predecessor writes may release before it waits (the K-split GEMM1's activation
pass: GEMM2 reads only weights and blocks before its wait, all final before GEMM1 started), so that the
dependent's launch and first loads overlap the predecessor, not only this kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def await_prior_grids():
    """Wait until the previous grid has finished and its writes are visible (a no-op for a grid launched
    without the attribute)."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents():
    """Let the next grid launch once every program of this one has called this (or exited)."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def enter_dependent(PDL: tl.constexpr):
    """Where a kernel launched with PDL (1, 2 or 3) may first touch what earlier kernels wrote: wait for them,
    and with 2 (release at the wait) let the next kernel launch; with 3 (release early: only where the module
    docstring allows it) let it launch first, then wait."""
    if PDL == 3:
        release_dependents()
    if PDL:
        await_prior_grids()
        if PDL == 2:
            release_dependents()


@triton.jit
def leave_main_loop(PDL: tl.constexpr):
    """After a kernel's main loop: with PDL 1 (release after the loop) let the next kernel launch."""
    if PDL == 1:
        release_dependents()


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def chained_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependents: CUDA sm90+ (the PTX does not exist
    before), not the interpreter; WNA16MOE_PDL=0 turns it off (for A/B runs)."""
    if device.type != "cuda" or torch.version.cuda is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return os.environ.get("WNA16MOE_PDL") != "0" and _hopper_or_later(index)


def launch_options(pdl: int) -> dict[str, bool]:
    """The launch keyword for a kernel that waits with `await_prior_grids` unless `pdl` is 0."""
    return {"launch_pdl": True} if pdl else {}
