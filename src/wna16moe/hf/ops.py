"""The experts forward as a torch.library custom op, so `torch.compile(fullgraph=True)` and CUDA graphs see
one opaque call with a fake (meta) implementation.

A custom op takes tensors and plain values, never Python objects, so each experts module registers its
runtime (its own kernel object, never shared) here under an integer handle and passes the handle with the
tensors the kernel reads. The registry holds runtimes weakly: a deleted model frees its kernels.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch

from wna16moe.errors import BackendError, no_gradients


class ExpertsRuntime(Protocol):
    """What the op calls: one MoE layer's kernel applied to routed tokens."""

    def apply(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              tensors: list[torch.Tensor]) -> torch.Tensor: ...


_RUNTIMES: weakref.WeakValueDictionary[int, ExpertsRuntime] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register_runtime(runtime: ExpertsRuntime) -> int:
    """Register `runtime` (the caller keeps it alive) and return its handle for `experts`."""
    handle = next(_HANDLES)
    _RUNTIMES[handle] = runtime
    return handle


def _runtime(handle: int) -> ExpertsRuntime:
    runtime = _RUNTIMES.get(handle)
    if runtime is None:
        raise BackendError(f"wna16moe experts runtime {handle} is gone: its model was deleted, or the module was "
                           "never finalized by the wna16moe quantizer")
    return runtime


@torch.library.custom_op("wna16moe::hf_experts", mutates_args=())
def experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            tensors: list[torch.Tensor], handle: int) -> torch.Tensor:
    """Routed experts of one layer: hidden_states [T, H], topk_ids [T, K] int32 (-1: a pair to skip, given only
    to kernels that take an expert map), topk_weights [T, K] float32, the layer's weight tensors, the layer's
    runtime handle -> [T, H] in hidden_states' dtype.

    The body runs the layer's kernel eagerly; what it does inside (the EMULATION reference synchronizes with
    the host) is invisible to the compiler. Plain eager forwards skip the op and call the runtime directly
    (`wna16moe.hf.modules`): its dispatch costs host time and gives them nothing."""
    return _runtime(handle).apply(hidden_states, topk_ids, topk_weights, tensors)


@experts.register_fake
def _experts_fake(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  tensors: list[torch.Tensor], handle: int) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def _refuse_backward(ctx: object, grad: torch.Tensor) -> None:
    raise no_gradients("wna16moe's quantized experts module")


# (without it, torch's own error: "no autograd formula"; inputs requiring grad take the op, `hf.modules`)
experts.register_autograd(_refuse_backward)
