"""Run Triton kernels through the interpreter when there is no GPU. Import this before any wna16moe.kernels
module: triton decides at decoration time whether a kernel is interpreted."""

import os
from collections.abc import Callable, Sequence

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The interpreter computes bf16 tl.dot wrongly (triton 3.6): CPU runs use fp16, the GPU covers bf16 too.
DTYPES = (torch.bfloat16, torch.float16) if HAS_CUDA else (torch.float16,)


def replay_on_fresh_inputs(apply: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                           fresh: Sequence[torch.Tensor], *fixed: object) -> torch.Tensor:
    """Capture `apply(*inputs, *fixed)` in a CUDA graph once, copy `fresh` into the captured input buffers,
    replay: the graph's output for the fresh inputs (what serving does with a captured layer)."""
    static = [x.clone() for x in inputs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = apply(*static, *fixed)
    for buf, new in zip(static, fresh, strict=True):
        buf.copy_(new)
    graph.replay()
    return captured
