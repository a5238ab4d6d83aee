"""What `wna16moe generate` and `wna16moe check` do with a checkpoint loaded through transformers."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from wna16moe.device import DeviceInfo
from wna16moe.errors import InvalidInputError
from wna16moe.experts.base import LayerSpec, relative_error
from wna16moe.hf.api import loading
from wna16moe.hf.modules import PackedExperts
from wna16moe.oracle import PRIORITY, Backend, Verdict, make_kernel, select_backend
from wna16moe.quantized import QuantizedExperts


def default_device() -> str:
    return str(DeviceInfo.current().torch_device)


def load_model(path: str | Path, backend: str = "auto", device: str | None = None,
               dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`from_pretrained` through wna16moe on `device` (default: the accelerator, else CPU).

    Kernels are built for the device the weights load on, so an accelerator is given as `device_map`
    (transformers needs `accelerate` for that); CPU loads need nothing more."""
    target = device or default_device()
    with loading(backend):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                    device_map=None if target == "cpu" else target)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


@dataclass(frozen=True)
class Generation:
    """Generated ids (and text with a tokenizer), the speed and the memory of one `generate` call."""

    prompt_tokens: int
    new_ids: list[int]
    text: str | None
    seconds: float
    model_bytes: int
    experts_bytes: int
    experts_bf16_bytes: int
    peak_bytes: int
    peak_kind: str

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else float("inf")


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def generate(model: nn.Module, path: str | Path, prompt: str | None, prompt_ids: list[int] | None,
             max_new_tokens: int, cache: str = "static") -> Generation:
    """Greedy `generate` from a text prompt (needs the checkpoint's tokenizer) or from token ids."""
    if (prompt is None) == (prompt_ids is None):
        raise InvalidInputError("give either a text prompt or prompt token ids (not both)")
    device = next(model.parameters()).device
    tokenizer = None
    if prompt is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"{path} has no usable tokenizer ({error}); pass --prompt-ids instead") from error
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        if ids.numel() == 0:
            raise InvalidInputError(f"the tokenizer found in {path} encodes {prompt!r} to no tokens; pass "
                                    "--prompt-ids instead")
    else:
        ids = torch.tensor([prompt_ids], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    # One unpadded prompt: every position is attended. Without a mask, generate would mask the prompt's tokens
    # that equal the pad token id (often a real token, e.g. end-of-text) and compute the wrong continuation.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         cache_implementation=cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new_ids = out[0, ids.shape[1]:].tolist()
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    bf16 = sum(m.plan.num_experts * 3 * m.plan.hidden_size * m.plan.intermediate_size * 2 for m in experts)
    peak, kind = _peak_memory(device)
    return Generation(ids.shape[1], new_ids, None if tokenizer is None else tokenizer.decode(new_ids), seconds,
                      module_bytes(model), sum(module_bytes(m) for m in experts), bf16, peak, kind)


@dataclass(frozen=True)
class CheckResult:
    """One backend against EMULATION on one experts layer: errors relative to EMULATION's output."""

    layer: str
    backend: str
    kernel: str
    max_abs_error: float
    relative_error: float
    ok: bool


def _routing(model: nn.Module, name: str, hidden: torch.Tensor, top_k: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and weights from the layer's own router (`gate` beside the experts), else random."""
    router = getattr(model.get_submodule(name.rpartition(".")[0]), "gate", None)
    if router is not None:
        routed = router(hidden)
        if isinstance(routed, tuple) and len(routed) == 3:
            return routed[2], routed[1]
    num_experts = model.get_submodule(name).plan.num_experts
    scores = torch.rand(hidden.shape[0], num_experts, generator=generator).to(hidden.device)
    weights, ids = scores.softmax(-1).topk(top_k, dim=-1)
    return ids, weights


def _apply(backend: Backend, spec: LayerSpec, device: DeviceInfo, experts: QuantizedExperts, hidden: torch.Tensor,
           weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 output of a fresh `backend` kernel for the layer, built from its canonical experts."""
    kernel = make_kernel(select_backend(spec, device=device, override=backend), experts.quant_config(), hidden.device)
    return kernel.apply(hidden, weights, ids, kernel.prepare_weights(experts, hidden.device)).float()


@torch.no_grad()
def check_model(model: nn.Module, tokens: int = 32, seed: int = 0, tolerance: float = 2e-2) -> list[CheckResult]:
    """Every backend of this platform's priority list that can run each experts layer, against EMULATION on
    random hidden states routed by the layer's router. A backend passes when its relative (Frobenius) error
    is below `tolerance`."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for name, module in model.named_modules():
        if not isinstance(module, PackedExperts):
            continue
        spec = module.report.spec
        device = next(module.parameters()).device
        info = DeviceInfo.current(device)
        experts = module.canonical()
        hidden = torch.randn(tokens, spec.moe.hidden_size, generator=generator).to(device, spec.act_dtype)
        ids, weights = _routing(model, name, hidden, spec.moe.top_k, generator)
        ids, weights = ids.to(torch.int32), weights.float()

        reference = _apply(Backend.EMULATION, spec, info, experts, hidden, weights, ids)
        # What the oracle would consider here: this platform's priority list (not, say, TRITON on a CPU
        # under TRITON_INTERPRET), modular kernels whose checks all pass.
        report = module.report
        others = [c for c in report.candidates
                  if c.verdict in (Verdict.CHOSEN, Verdict.ELIGIBLE) and c.kernel is not None
                  and not c.kernel.MONOLITHIC and c.backend != Backend.EMULATION
                  and c.backend in PRIORITY[report.platform]]
        for candidate in {c.backend: c for c in others}.values():
            out = _apply(candidate.backend, spec, info, experts, hidden, weights, ids)
            error = (out - reference).double()
            relative = relative_error(out, reference)
            results.append(CheckResult(name, candidate.backend.value, candidate.kernel_name,
                                       float(error.abs().max()), relative, relative < tolerance))
    return results


def generation_report(result: Generation) -> dict[str, Any]:
    """JSON-ready facts of a `Generation`."""
    return {"prompt_tokens": result.prompt_tokens, "new_tokens": len(result.new_ids), "new_ids": result.new_ids,
            "text": result.text, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
            "model_bytes": result.model_bytes, "experts_bytes": result.experts_bytes,
            "experts_bf16_bytes": result.experts_bf16_bytes, "peak_bytes": result.peak_bytes,
            "peak_kind": result.peak_kind}
