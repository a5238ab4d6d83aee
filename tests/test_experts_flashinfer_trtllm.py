"""FLASHINFER_TRTLLM: what the oracle and `wna16moe explain` say about it on simulated devices, and its self-check
against EMULATION (the guard that stands in for the hardware run it has never had), on CPU with FlashInfer's call
replaced by (a) a correct implementation built from EMULATION and (b) wrong ones.

The converter, its inverse and the arguments apply passes: test_experts_flashinfer.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import random_experts, relative_error, table_rows

from wna16moe import (
    BackendError,
    MoEConfig,
    ParallelConfig,
    RoutingConfig,
    RoutingMethod,
    WeightScheme,
    cli,
    make_wna16_moe_quant_config,
)
from wna16moe.device import DeviceInfo
from wna16moe.experts import flashinfer_trtllm as fi
from wna16moe.experts.base import OK, LayerSpec
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.flashinfer_trtllm import FlashInferTrtllmExperts, flashinfer_to_canonical, untied_router_logits
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import BACKEND_ENV, Backend, Verdict, explain
from wna16moe.routing import route
from wna16moe.shapes import model_shape

SCHEME = WeightScheme(4, 32)
CAVEAT = "caveat: never run on SM100 hardware by wna16moe's developers"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(fi, "_SELF_CHECKS", {})  # "once per process" would otherwise span tests


# ----- the oracle and `wna16moe explain` -------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """Kimi-K2's layer (H 7168, I 2048, E 384, top-8, DeepSeek-V3 routing, SiLU) with `scheme` on `device`:
    FLASHINFER_TRTLLM's verdict, the backend chosen, and text each failing check's reason must hold."""

    id: str
    device: str
    scheme: str
    verdict: Verdict
    chosen: Backend
    failed: dict[str, str] = field(default_factory=dict)
    fp16: bool = False


CASES = [
    Case("b200 g32: FlashInfer's kernel", "b200", "int4_g32_sym", Verdict.CHOSEN, Backend.FLASHINFER_TRTLLM),
    Case("b300 (sm_103) g32", "b300", "int4_g32_sym", Verdict.CHOSEN, Backend.FLASHINFER_TRTLLM),
    Case("b200 g128: the kernel reads group 32 only", "b200", "int4_g128_sym", Verdict.REJECTED, Backend.MARLIN,
         {"scheme": "weight scheme int4_g128_sym is not supported; the kernel reads only int4_g32_sym (int4, "
                    "symmetric, group_size 32, no act-order)"}),
    Case("b200 fp16 activations: bf16 only", "b200", "int4_g32_sym", Verdict.REJECTED, Backend.MARLIN,
         {"scheme": "activation dtype float16 is not supported; expected bfloat16",
          "routing": "router logits dtype float16 is not supported with deepseek_v3 routing"}, fp16=True),
    Case("b200 without the flashinfer package", "b200-bare", "int4_g32_sym", Verdict.REJECTED, Backend.EMULATION,
         {"device": "needs the flashinfer package (with TRT-LLM fused MoE), which is not importable"}),
    Case("h100 (sm_90): no MxInt4 kernel; TRITON first there", "h100", "int4_g32_sym", Verdict.REJECTED, Backend.TRITON,
         {"device": "needs compute capability sm_100 or sm_103 (the SM10x family), got sm_90"}),
]


def _kimi(case: Case) -> MoEConfig:
    config = model_shape("kimi-k2").moe_config()
    return MoEConfig(config.num_experts, config.top_k, config.hidden_size, config.intermediate_size,
                     config.activation, config.routing, torch.float16 if case.fp16 else torch.bfloat16)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_oracle_on_simulated_devices(case: Case) -> None:
    report = explain(_kimi(case), case.scheme, device=DeviceInfo.named(case.device))
    candidate = next(c for c in report.candidates if c.backend == Backend.FLASHINFER_TRTLLM)
    assert candidate.verdict == case.verdict, report.table()
    assert report.chosen is not None and report.chosen.backend == case.chosen
    failed = dict(candidate.failed)
    assert set(failed) == set(case.failed), candidate.reason
    for check, text in case.failed.items():
        assert text in failed[check]
    if case.verdict == Verdict.CHOSEN:
        assert candidate.reason == f"first in priority order whose checks all pass; {fi.CAVEAT}"
        assert CAVEAT in candidate.reason




@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain_cli_on_simulated_devices(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--shape", "kimi-k2", "--scheme", case.scheme, "--device", case.device]
    argv += ["--dtype", "fp16"] if case.fp16 else []
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    verdict, reason = table_rows(out)["flashinfer_trtllm", "FlashInferTrtllmExperts"]
    assert verdict == case.verdict.value
    for check, text in case.failed.items():
        assert f"{check}: " in reason and text in reason
    if case.verdict == Verdict.CHOSEN:
        assert CAVEAT in reason
    assert out.rstrip().splitlines()[-1].startswith(f"chosen: {case.chosen.value} (")
    assert cli.main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen"]["backend"] == case.chosen.value
    (row,) = [c for c in data["candidates"] if c["backend"] == "flashinfer_trtllm"]
    assert (row["verdict"], row["reason"]) == (verdict, reason)


# ----- the self-check, with FlashInfer's call replaced ---------------------------------------------------

_METHODS = {1: RoutingMethod.SOFTMAX, 2: RoutingMethod.DEEPSEEK_V3, 3: RoutingMethod.SIGMOID}


def emulated_kernel(*, routing_logits: torch.Tensor, routing_bias: torch.Tensor | None, hidden_states: torch.Tensor,
                    gemm1_weights: torch.Tensor, gemm1_weights_scale: torch.Tensor, gemm2_weights: torch.Tensor,
                    gemm2_weights_scale: torch.Tensor, num_experts: int, top_k: int, n_group: int | None,
                    topk_group: int | None, intermediate_size: int, local_expert_offset: int,
                    local_num_experts: int, routed_scaling_factor: float | None, routing_method_type: int,
                    **unused: Any) -> list[torch.Tensor]:
    """What trtllm_mxint4_block_scale_moe computes, as documented, built from routing and EMULATION on the
    weights read back from its layout: a correct kernel for the self-check to accept."""
    method = _METHODS[routing_method_type]
    routing = RoutingConfig(method, renormalize=method != RoutingMethod.SIGMOID, n_group=n_group or 1,
                            topk_group=topk_group or 1, routed_scaling_factor=routed_scaling_factor or 1.0,
                            has_correction_bias=routing_bias is not None)
    weights, ids = route(routing_logits, routing, top_k, routing_bias)
    experts = flashinfer_to_canonical({"w13": gemm1_weights, "w13_scale": gemm1_weights_scale, "w2": gemm2_weights,
                                       "w2_scale": gemm2_weights_scale})
    assert (local_expert_offset, local_num_experts) == (0, num_experts)
    assert experts.intermediate_size == intermediate_size
    spec = LayerSpec(MoEConfig(num_experts, top_k, hidden_states.shape[1], intermediate_size, routing=routing),
                     experts.scheme)
    quant = make_wna16_moe_quant_config(experts.w13.scales, experts.w2.scales, 32, 4)
    out = EmulationExperts(spec, quant, hidden_states.device).apply(
        hidden_states, weights, ids, EmulationExperts.prepare_weights(experts, hidden_states.device))
    return [out]


def _swap_gate_up(**kwargs: Any) -> list[torch.Tensor]:
    """A kernel that reads [gate; up] the other way round (the interleave misread)."""
    experts = flashinfer_to_canonical({"w13": kwargs["gemm1_weights"], "w13_scale": kwargs["gemm1_weights_scale"],
                                       "w2": kwargs["gemm2_weights"], "w2_scale": kwargs["gemm2_weights_scale"]})
    half = experts.intermediate_size
    w13 = torch.cat([experts.w13.codes[:, half:], experts.w13.codes[:, :half]], dim=1)
    scales = torch.cat([experts.w13.scales[:, half:], experts.w13.scales[:, :half]], dim=1)
    swapped = fi.prepare_flashinfer_weights(
        type(experts)(type(experts.w13)(experts.scheme, w13, scales), experts.w2), kwargs["hidden_states"].device)
    return emulated_kernel(**(kwargs | {"gemm1_weights": swapped["w13"], "gemm1_weights_scale": swapped["w13_scale"]}))


def _unswizzled_scales(**kwargs: Any) -> list[torch.Tensor]:
    """A kernel that reads the scales row-major (the 128x4 swizzle not applied)."""
    scales = kwargs["gemm2_weights_scale"]
    wrong = torch.stack([fi.swizzle_scales(s) for s in scales])
    return emulated_kernel(**(kwargs | {"gemm2_weights_scale": wrong}))


def _unscaled(**kwargs: Any) -> list[torch.Tensor]:
    """A kernel that drops routed_scaling_factor."""
    return emulated_kernel(**(kwargs | {"routed_scaling_factor": None}))


def _nan(**kwargs: Any) -> list[torch.Tensor]:
    return [torch.full_like(kwargs["hidden_states"], float("nan"))]


DEEPSEEK = RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, has_correction_bias=True)
ROUTINGS = {
    "renormalize": (RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True), 2),
    "deepseek_v3": (DEEPSEEK, 4),
    "llama4": (RoutingConfig(RoutingMethod.SIGMOID), 1),
}


class Calls:
    """Replaces `kernel_function` with `impl` and counts the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, impl: Callable[..., list[torch.Tensor]]) -> None:
        self.count = 0

        def counted(**kwargs: Any) -> list[torch.Tensor]:
            self.count += 1
            return impl(**kwargs)

        monkeypatch.setattr(fi, "kernel_function", lambda: counted)


def _layer_parts(routing: RoutingConfig, top_k: int, e: int = 16, h: int = 256, i: int = 256,
                 ) -> tuple[MoEConfig, Any, torch.Tensor | None]:
    config = MoEConfig(e, top_k, h, i, routing=routing)
    bias = torch.randn(e) * 0.5 if routing.has_correction_bias else None
    return config, random_experts(SCHEME, e, h, i), bias


def _kernel(config: MoEConfig, experts: Any) -> tuple[FlashInferTrtllmExperts, dict[str, torch.Tensor]]:
    quant = make_wna16_moe_quant_config(experts.w13.scales, experts.w2.scales, 32, 4)
    kernel = FlashInferTrtllmExperts(LayerSpec(config, SCHEME), quant, torch.device("cpu"))
    return kernel, FlashInferTrtllmExperts.prepare_weights(experts, torch.device("cpu"))


@pytest.mark.parametrize("routing", ROUTINGS, ids=list(ROUTINGS))
def test_self_check_accepts_a_correct_kernel(routing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch, emulated_kernel)
    config, experts, bias = _layer_parts(*ROUTINGS[routing])
    kernel, weights = _kernel(config, experts)
    state = torch.random.get_rng_state()
    kernel.self_check(weights, bias)
    assert kernel.checked and calls.count == 1
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: the caller's draws are unchanged
    twin, _ = _kernel(config, experts)
    twin.self_check(weights, bias)  # same configuration in this process: not run again
    assert twin.checked and calls.count == 1


WRONG = {"gate/up swapped": _swap_gate_up, "scales unswizzled": _unswizzled_scales,
         "routed scaling dropped": _unscaled, "NaN": _nan}


@pytest.mark.parametrize("wrong", WRONG, ids=list(WRONG))
def test_self_check_rejects_a_wrong_kernel(wrong: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch, WRONG[wrong])
    config, experts, bias = _layer_parts(*ROUTINGS["deepseek_v3"])
    kernel, weights = _kernel(config, experts)
    message = (r"flashinfer_trtllm \(FlashInfer's trtllm_mxint4_block_scale_moe\) failed its self-check on cpu: .* "
               r"relative error of (nan|\d\.\d+(e[+-]\d+)?) \(at most 0.03 expected\), .* This backend has never been "
               r"run on hardware .* WNA16MOE_BACKEND")
    with pytest.raises(BackendError, match=message):
        kernel.apply_monolithic(torch.randn(2, 256).to(torch.bfloat16), torch.randn(2, 16).to(torch.bfloat16),
                                weights, bias)
    assert not kernel.checked and calls.count == 1  # the real call never ran
    again, _ = _kernel(config, experts)
    with pytest.raises(BackendError, match=message):  # the verdict is kept for the configuration
        again.self_check(weights, bias)
    assert calls.count == 1


def test_self_check_reports_a_failing_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cubin(**kwargs: Any) -> list[torch.Tensor]:
        raise RuntimeError("no kernel image is available for execution on the device")

    Calls(monkeypatch, no_cubin)
    config, experts, bias = _layer_parts(*ROUTINGS["deepseek_v3"])
    kernel, weights = _kernel(config, experts)
    message = r"failed its self-check on cpu: the call on 4 tokens .* raised RuntimeError: no kernel image .* " \
              r"WNA16MOE_BACKEND=marlin"
    with pytest.raises(BackendError, match=message):
        kernel.self_check(weights, bias)
    assert not kernel.checked


def test_apply_checks_first_then_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel used without the layer checks itself at its first call, then only calls."""
    calls = Calls(monkeypatch, emulated_kernel)
    config, experts, bias = _layer_parts(*ROUTINGS["deepseek_v3"])
    kernel, weights = _kernel(config, experts)
    x, logits = torch.randn(3, 256).to(torch.bfloat16), torch.randn(3, 16).to(torch.bfloat16)
    out = kernel.apply_monolithic(x, logits, weights, bias)
    assert calls.count == 2 and kernel.checked
    assert torch.equal(kernel.apply_monolithic(x, logits, weights, bias), out) and calls.count == 3


def _can_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the oracle accept this CPU for FLASHINFER_TRTLLM, so the layer builds it (the call is replaced)."""
    monkeypatch.setattr(FlashInferTrtllmExperts, "supports_device", classmethod(lambda cls, device: OK))


def test_the_layer_checks_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    _can_run_here(monkeypatch)
    calls = Calls(monkeypatch, emulated_kernel)
    config, experts, bias = _layer_parts(*ROUTINGS["deepseek_v3"])
    layer = WNA16MoE(experts, config, device="cpu", backend="flashinfer_trtllm", correction_bias=bias)
    assert layer.backend == Backend.FLASHINFER_TRTLLM and layer.kernel.checked and calls.count == 1
    second = WNA16MoE(experts, config, device="cpu", backend="flashinfer_trtllm", correction_bias=bias)
    assert second.kernel.checked and calls.count == 1
    x = torch.randn(5, 256).to(torch.bfloat16)
    logits = untied_router_logits(config.routing, config.top_k, 16, bias, torch.bfloat16, 5, torch.Generator())
    out = layer(x, logits)
    assert calls.count == 2
    reference = WNA16MoE(experts, config, device="cpu", backend="emulation", correction_bias=bias)(x, logits)
    assert relative_error(out, reference) < 1e-2


def test_the_layer_refuses_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    _can_run_here(monkeypatch)
    Calls(monkeypatch, _swap_gate_up)
    config, experts, _ = _layer_parts(*ROUTINGS["renormalize"])
    with pytest.raises(BackendError, match=r"failed its self-check .* WNA16MOE_BACKEND"):
        WNA16MoE(experts, config, device="cpu", backend="flashinfer_trtllm")


def test_self_check_under_tensor_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    """I/tp is what the kernel and the reference see (TP rank 0's shard of a 512-wide layer)."""
    calls = Calls(monkeypatch, emulated_kernel)
    config = MoEConfig(8, 2, 256, 512, routing=ROUTINGS["renormalize"][0])
    experts = random_experts(SCHEME, 8, 256, 256)
    quant = make_wna16_moe_quant_config(experts.w13.scales, experts.w2.scales, 32, 4)
    kernel = FlashInferTrtllmExperts(LayerSpec(config, SCHEME, ParallelConfig(tp_size=2)), quant, torch.device("cpu"))
    kernel.self_check(FlashInferTrtllmExperts.prepare_weights(experts, torch.device("cpu")), None)
    assert kernel.checked and calls.count == 1


def test_untied_router_logits_keep_top_k_gaps_of_twice_the_margin() -> None:
    """Plain top-k on logits: a kept row's chosen and unchosen logits are at least 2 x SELF_CHECK_MARGIN apart, so no
    move of up to the margin per logit splits it (fails with the Gaussian probes used before: CI, session 52)."""
    k = 4
    routing = RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True)
    for seed in range(8):
        logits = untied_router_logits(routing, k, 32, None, torch.float32, 8, torch.Generator().manual_seed(seed))
        top = logits.topk(k + 1, dim=1).values
        assert (top[:, k - 1] - top[:, k]).min() >= 2 * fi.SELF_CHECK_MARGIN, seed


@pytest.mark.parametrize("routing", ROUTINGS, ids=list(ROUTINGS))
def test_untied_router_logits(routing: str) -> None:
    """Rows whose chosen experts survive the bf16 rounding of the correction bias and small logit moves."""
    config, _, bias = _layer_parts(*ROUTINGS[routing])
    logits = untied_router_logits(config.routing, config.top_k, 16, bias, torch.bfloat16, 4,
                                  torch.Generator().manual_seed(1))
    assert logits.shape == (4, 16) and logits.dtype == torch.bfloat16
    ids = route(logits, config.routing, config.top_k, bias)[1].sort(dim=1).values
    if bias is not None:
        rounded = bias.to(torch.bfloat16).float()
        assert torch.equal(route(logits, config.routing, config.top_k, rounded)[1].sort(dim=1).values, ids)
    moved = route(logits.float() + 0.01 * torch.randn(logits.shape), config.routing, config.top_k, bias)[1]
    assert torch.equal(moved.sort(dim=1).values, ids)
