"""Run Triton kernels through the interpreter when there is no GPU. Import this before any wna16moe.kernels
module: triton decides at decoration time whether a kernel is interpreted. Also the TRITON tests' shared
helpers: random experts, TRITON beside EMULATION on the same inputs, a CUDA-graph replay, launches recorded."""

import os
from collections.abc import Callable, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The interpreter computes bf16 tl.dot wrongly (triton 3.6): CPU runs use fp16, the GPU covers bf16 too.
DTYPES = (torch.bfloat16, torch.float16) if HAS_CUDA else (torch.float16,)

# (imported after TRITON_INTERPRET is set)
from wna16moe import MoEConfig, QuantizedExperts, WeightScheme  # noqa: E402
from wna16moe.experts.base import LayerSpec  # noqa: E402
from wna16moe.experts.emulation import EmulationExperts  # noqa: E402
from wna16moe.experts.triton import TritonConfig, TritonExperts  # noqa: E402
from wna16moe.routing import softmax_topk  # noqa: E402


def random_experts(e: int, h: int, i: int, scheme: WeightScheme, device: torch.device = DEVICE) -> QuantizedExperts:
    """Random float weights quantized by round-to-nearest (fresh each call)."""
    return QuantizedExperts.quantize(torch.randn(e, 2 * i, h, device=device) * 0.1,
                                     torch.randn(e, h, i, device=device) * 0.1, scheme)


def triton_beside_emulation(experts: QuantizedExperts, cfg: MoEConfig, **quant_kwargs: object) -> tuple[
        TritonExperts, dict[str, torch.Tensor], EmulationExperts, dict[str, torch.Tensor]]:
    """A TRITON layer and an EMULATION layer of the same experts, each with its prepared weights."""
    spec = LayerSpec(cfg, experts.scheme)
    quant = experts.quant_config(**quant_kwargs)
    return (TritonExperts(spec, quant, DEVICE), TritonExperts.prepare_weights(experts, DEVICE),
            EmulationExperts(spec, quant, DEVICE), EmulationExperts.prepare_weights(experts, DEVICE))


def outputs_on_fresh_tokens(kernel: TritonExperts, weights: dict[str, torch.Tensor], emulation: EmulationExperts,
                            emu_weights: dict[str, torch.Tensor], t: int,
                            config: TritonConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRITON's output (with `config`, else its own choice) and EMULATION's for t fresh random tokens routed by a
    renormalized softmax top-k (`triton_beside_emulation`'s four)."""
    cfg = kernel.spec.moe
    x = torch.randn(t, cfg.hidden_size, dtype=cfg.dtype, device=DEVICE)
    topk_weights, ids = softmax_topk(torch.randn(t, cfg.num_experts, device=DEVICE), cfg.top_k, renormalize=True)
    return kernel.apply(x, topk_weights, ids, weights, config), emulation.apply(x, topk_weights, ids, emu_weights)


def triton_and_emulation(experts: QuantizedExperts, cfg: MoEConfig, t: int, config: TritonConfig | None = None,
                         **quant_kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """TRITON's output (with `config`, else its own choice) and EMULATION's for t fresh random tokens."""
    return outputs_on_fresh_tokens(*triton_beside_emulation(experts, cfg, **quant_kwargs), t, config)


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


def record_launches(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[tuple[int, int], tuple, dict]]:
    """The grid, arguments and keywords of every launch of kernel `name` by `moe_gemm`, recorded instead of
    run."""
    import wna16moe.kernels.moe_gemm as launcher

    launches = []

    class Recorder:
        def __getitem__(self, grid: tuple[int, int]) -> Callable[..., None]:  # kernel[grid](...)
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(launcher, name, Recorder())
    return launches
