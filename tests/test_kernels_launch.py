"""`kernels/launch.py`: launches that reuse a compiled kernel must stay exactly as correct as Triton's own, whatever
the arguments' specialization (alignment, sizes equal to 1 or divisible by 16) does between two launches."""

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA

import wna16moe.kernels.cast as cast_module
import wna16moe.kernels.launch as launcher
from wna16moe.kernels.cast import cast


def _sources() -> list[torch.Tensor]:
    """Float32 sources whose pointers and sizes specialize differently: 16-byte aligned or not (a view one
    element in), one element, 16, 17, each drawn fresh."""
    flat = torch.randn(4097, device=DEVICE) * 100
    return [flat[:4096], flat[1:], flat[:1], flat[1:2], flat[:16], flat[1:18]]


def test_launch_is_correct_as_specializations_alternate() -> None:
    # every source twice, interleaved: on a GPU the second round reuses the first round's compiled kernels
    sources = _sources()
    for src in sources + sources:
        out = cast(src, torch.float16)
        assert torch.equal(out, src.to(torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_keeps_a_compiled_kernel_per_specialization() -> None:
    def cast_entries() -> int:
        return sum(key[0] is cast_module._cast_kernel for key in launcher._COMPILED)

    aligned, misaligned = (torch.randn(4097, device=DEVICE)[s] for s in (slice(0, 4096), slice(1, 4097)))
    cast(aligned, torch.bfloat16)
    before = cast_entries()
    cast(aligned + 1, torch.bfloat16)  # (same specialization, another buffer)
    assert cast_entries() == before
    cast(misaligned, torch.bfloat16)  # a pointer off 16 bytes: another compiled kernel
    assert cast_entries() == before + 1
    out = cast(misaligned, torch.bfloat16)
    assert torch.equal(out, misaligned.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_captured_in_a_graph_replays_on_new_data() -> None:
    src = torch.randn(3000, device=DEVICE)
    cast(src, torch.bfloat16)  # (compiled and kept before the capture: the capture takes the direct path)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cast(src, torch.bfloat16)
    fresh = torch.randn(3000, device=DEVICE) * 7
    src.copy_(fresh)
    graph.replay()
    assert torch.equal(out, fresh.to(torch.bfloat16))
