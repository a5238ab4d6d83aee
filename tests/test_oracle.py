"""The oracle: backend declarations, priority, overrides, reports, and per-layer kernels.

No GPU is needed: devices are `DeviceInfo.named(...)` descriptors. TRITON and BATCHED_TRITON are written
elsewhere and may or may not be registered; every assertion here holds either way (where TRITON could win,
the expected backend is "TRITON or EMULATION", and TRITON's own reasons are never asserted).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from wna16moe import oracle
from wna16moe.config import (
    Activation,
    ActivationFormat,
    MoEConfig,
    MoEQuantConfig,
    ParallelConfig,
    RoutingConfig,
    RoutingMethod,
    make_wna16_moe_quant_config,
)
from wna16moe.device import DeviceInfo
from wna16moe.errors import BackendError, InvalidInputError
from wna16moe.experts.base import OK, Check, Experts, LayerSpec
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.flashinfer_trtllm import FlashInferTrtllmExperts
from wna16moe.experts.marlin import BatchedMarlinExperts
from wna16moe.experts.xpu import XPUExperts
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import (
    BACKEND_CLASSES,
    BACKEND_ENV,
    PRIORITY,
    Backend,
    Selection,
    Verdict,
    explain,
    make_kernel,
    platform_key,
    register_backend,
    select_backend,
)
from wna16moe.scheme import WeightScheme
from wna16moe.shapes import model_shape

FIXTURE = Path(__file__).parent / "data" / "qwen3moe-w4a16-g32-sym"
# The tiny Qwen3-MoE of tests/data: softmax top-2 without renormalization, H=256, I=128.
TINY = MoEConfig(8, 2, 256, 128)
# Where TRITON may win (its own checks decide), the oracle falls back to EMULATION.
FAST: set[Backend | None] = {Backend.TRITON, Backend.EMULATION}
# Where MARLIN's checks pass on a device with the Marlin library, it is first in line (after FlashInfer on SM10x).
MARLIN_WINS: set[Backend | None] = {Backend.MARLIN}
# Where BATCHED_MARLIN cannot run, a batched layer goes to BATCHED_TRITON when its checks pass, else to nothing:
# EMULATION runs the standard format only.
BATCHED: set[Backend | None] = {Backend.BATCHED_TRITON, None}
FI, MARLIN, BMARLIN, CPU, XPU = (Backend.FLASHINFER_TRTLLM, Backend.MARLIN, Backend.BATCHED_MARLIN, Backend.CPU,
                                 Backend.XPU)
NOT_IMPL = {"implemented": "not implemented in this version"}
BATCHED_FMT = {"format": "needs the batched activation format, the layer uses standard"}


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def moe(shape: str | MoEConfig, **changes: object) -> MoEConfig:
    base = shape if isinstance(shape, MoEConfig) else model_shape(shape).moe_config()
    return dataclasses.replace(base, **changes)


def spec(shape: str | MoEConfig, scheme: str, *, tp: int = 1, ep: int = 1, batched: bool = False,
         bias: bool = False, clamp: float | None = None, logits: torch.dtype | None = None,
         **moe_changes: object) -> LayerSpec:
    return LayerSpec(moe(shape, **moe_changes), WeightScheme.from_name(scheme), ParallelConfig(tp_size=tp, ep_size=ep),
                     ActivationFormat.BATCHED if batched else ActivationFormat.STANDARD, has_bias=bias,
                     clamp_limit=clamp, router_logits_dtype=logits)


@dataclass(frozen=True)
class Case:
    """`device` x `layer` -> the chosen backend is in `chosen`; each backend in `rejected` is rejected by
    exactly the named checks, each reason containing the given text."""

    id: str
    device: str
    layer: LayerSpec
    chosen: set[Backend | None]
    rejected: dict[Backend, dict[str, str]] = field(default_factory=dict)


CASES = [
    # ----- FLASHINFER_TRTLLM on SM10x -----
    Case("b200 kimi-k2 g32: FlashInfer's kernel takes it", "b200",
         spec("kimi-k2", "int4_g32_sym"), {FI}, {BMARLIN: BATCHED_FMT}),
    Case("b300 (sm_103) deepseek-v3 g32 with fp32 router logits (allowed for DeepSeekV3)", "b300",
         spec("deepseek-v3", "int4_g32_sym", logits=torch.float32), {FI}),
    Case("b200 llama-4-scout g32: sigmoid top-1 is Llama-4 routing", "b200",
         spec("llama-4-scout", "int4_g32_sym"), {FI}),
    Case("b200 qwen3-30b g32: softmax renormalized is Renormalize routing", "b200",
         spec("qwen3-30b-a3b", "int4_g32_sym"), {FI}),
    Case("b200 g128: FlashInfer reads group 32 only, Marlin takes it", "b200",
         spec("kimi-k2", "int4_g128_sym"), MARLIN_WINS,
         {FI: {"scheme": "weight scheme int4_g128_sym is not supported; the kernel reads only "
                                    "int4_g32_sym"}}),
    Case("b200 zero points", "b200", spec("kimi-k2", "int4_g32_zp"), MARLIN_WINS,
         {FI: {"scheme": "weight scheme int4_g32_zp is not supported"}}),
    Case("b200 fp16 activations (and so fp16 router logits): FlashInfer is bf16 only", "b200",
         spec("kimi-k2", "int4_g32_sym", dtype=torch.float16), MARLIN_WINS,
         {FI: {"scheme": "activation dtype float16 is not supported; expected bfloat16",
                          "routing": "router logits dtype float16 is not supported with deepseek_v3 routing; "
                                     "expected bfloat16, float32"}}),
    Case("b200 SwiGLU-OAI is not aliased to the kernel's plain SiLU", "b200",
         spec("kimi-k2", "int4_g32_sym", activation=Activation.SWIGLU_OAI), MARLIN_WINS,
         {FI: {"activation": "activation swiglu_oai is not supported: the kernel computes plain "
                                        "silu(gate) * up"}}),
    Case("b200 GELU", "b200", spec("kimi-k2", "int4_g32_sym", activation=Activation.GELU), MARLIN_WINS,
         {FI: {"activation": "activation gelu is not supported; expected silu"}}),
    Case("b200 EP: no expert map in the fused kernel, nor in MARLIN's apply yet", "b200",
         spec("kimi-k2", "int4_g32_sym", ep=2), FAST,
         {FI: {"parallel": "expert parallelism (ep_size=2) is not supported"},
          MARLIN: {"parallel": "expert parallelism (ep_size=2) is not supported"}}),
    Case("b200 expert bias", "b200", spec("kimi-k2", "int4_g32_sym", bias=True), MARLIN_WINS,
         {FI: {"extras": "expert bias is not supported"}}),
    Case("b200 SiLU with a clamp limit: FlashInfer would drop it, Marlin applies it", "b200",
         spec("kimi-k2", "int4_g32_sym", clamp=7.0), MARLIN_WINS,
         {FI: {"extras": "the SwiGLU clamp limit (7.0) is not supported"}}),
    Case("b200 fp32 logits with softmax routing", "b200",
         spec("qwen3-30b-a3b", "int4_g32_sym", logits=torch.float32), MARLIN_WINS,
         {FI: {"routing": "router logits dtype float32 is not supported with softmax routing; expected "
                                     "bfloat16"}}),
    Case("b200 softmax without renormalization (the tiny fixture) and H, I below 256", "b200",
         spec(TINY, "int4_g32_sym"), MARLIN_WINS,
         {FI: {"routing": "softmax routing without renormalization is not supported",
                          "shape": "got H=256, I/tp=128"}}),
    Case("b200 sigmoid with top_k 2 is not Llama-4 routing", "b200",
         spec("llama-4-scout", "int4_g32_sym", top_k=2), MARLIN_WINS,
         {FI: {"routing": "sigmoid routing is supported only as Llama-4 routing (top_k=1, no "
                                     "renormalization), got top_k=2"}}),
    Case("b200 deepseek-v3 routing without renormalization", "b200",
         spec("kimi-k2", "int4_g32_sym",
              routing=RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=False, routed_scaling_factor=2.827)),
         MARLIN_WINS, {FI: {"routing": "deepseek_v3 routing without renormalization is not supported"}}),
    Case("b200 routed_scaling_factor outside DeepSeekV3 routing", "b200",
         spec("qwen3-30b-a3b", "int4_g32_sym",
              routing=RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True, routed_scaling_factor=2.0)),
         MARLIN_WINS,
         {FI: {"routing": "routed_scaling_factor=2.0 is supported only with deepseek_v3 routing"}}),
    Case("b200 tp=16 leaves I/tp=128 < 256", "b200", spec("kimi-k2", "int4_g32_sym", tp=16), MARLIN_WINS,
         {FI: {"shape": "H and I/tp must be multiples of 256"}}),
    Case("b200 without flashinfer and the Marlin library", "b200-bare", spec("kimi-k2", "int4_g32_sym"), FAST,
         {FI: {"device": "needs the flashinfer package"},
          MARLIN: {"device": "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)"}}),
    Case("rtx5090 (sm_120) is not the SM10x family", "rtx5090", spec("kimi-k2", "int4_g32_sym"), MARLIN_WINS,
         {FI: {"device": "needs compute capability sm_100 or sm_103 (the SM10x family), got sm_120"}}),
    # ----- TRITON first on sm_90 (H100/H200), MARLIN next; the batched formats keep BATCHED_MARLIN first -----
    Case("h100 int4 with zero points: TRITON, MARLIN eligible after it", "h100", spec(TINY, "int4_g128_zp"), FAST),
    Case("h100 int8 with zero points: TRITON (no uint8+zp type in Marlin)", "h100", spec(TINY, "int8_g128_zp"),
         FAST, {MARLIN: {"scheme": "int8 with zero points is not supported"}}),
    Case("h100 batched format: BATCHED_MARLIN, ahead of BATCHED_TRITON", "h100",
         spec("mixtral", "int4_g128_sym", batched=True), {BMARLIN},
         {MARLIN: {"format": "needs the standard activation format, the layer uses batched"}}),
    Case("h100 without the Marlin library: TRITON as before", "h100-bare", spec("mixtral", "int4_g128_sym"), FAST,
         {MARLIN: {"device": "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)"}}),
    # ----- MARLIN / BATCHED_MARLIN first on sm_80..89 and older -----
    Case("a100 mixtral int4 g128", "a100", spec("mixtral", "int4_g128_sym"), MARLIN_WINS,
         {BMARLIN: BATCHED_FMT,
          FI: {"device": "got sm_80", "scheme": "int4_g128_sym is not supported"}}),
    Case("a100 int4 with zero points", "a100", spec(TINY, "int4_g128_zp"), MARLIN_WINS),
    Case("a100 int8 symmetric channel-wise", "a100", spec(TINY, "int8_ch_sym"), MARLIN_WINS),
    Case("a100 int8 with zero points: no uint8+zp type in Marlin", "a100", spec(TINY, "int8_g128_zp"), FAST,
         {MARLIN: {"scheme": "int8 with zero points is not supported"}}),
    Case("a100 act-order", "a100", spec(TINY, "int4_g32_sym_actorder"), FAST,
         {MARLIN: {"scheme": "act-order (g_idx) is not supported"}}),
    Case("a100 group 256", "a100", spec("mixtral", "int4_g256_sym"), FAST,
         {MARLIN: {"scheme": "group_size 256 is not supported; expected one of channel-wise, 32, 64, "
                                        "128"}}),
    Case("a100 qwen3-30b tp=4 g128: I/tp=192 would split a group, in every kernel", "a100",
         spec("qwen3-30b-a3b", "int4_g128_sym", tp=4), {None},
         {MARLIN: {"shape": "I/tp=192 is not a multiple of group_size 128"},
          Backend.EMULATION: {"shape": "or expert parallelism (ep_size) instead of tensor parallelism"}}),
    Case("a100 qwen3-30b tp=4 g64: I/tp=192 fits", "a100", spec("qwen3-30b-a3b", "int4_g64_sym", tp=4),
         MARLIN_WINS),
    Case("a100 I/tp=352 with g32: padded to 384, no group split", "a100",
         spec(MoEConfig(8, 2, 1024, 704), "int4_g32_sym", tp=2), MARLIN_WINS),
    Case("a100 H=2880 is not a multiple of 128", "a100",
         spec(MoEConfig(32, 4, 2880, 2880, Activation.SWIGLU_OAI), "int4_g32_sym"), FAST,
         {MARLIN: {"shape": "H=2880 is not a multiple of 128"}}),
    Case("a100 batched format: BATCHED_MARLIN, ahead of BATCHED_TRITON", "a100",
         spec("mixtral", "int4_g128_sym", batched=True), {BMARLIN},
         {MARLIN: {"format": "needs the standard activation format, the layer uses batched"}}),
    Case("a100 batched EP=8: local experts only, no expert map needed", "a100",
         spec("deepseek-v3", "int4_g128_sym", batched=True, ep=8), {BMARLIN},
         {MARLIN: {"format": "needs the standard activation format",
                   "parallel": "expert parallelism (ep_size=8) is not supported"}}),
    Case("a100 batched GELU: the activation runs in torch on the flattened rows, no masking needed", "a100",
         spec("mixtral", "int4_g128_sym", batched=True, activation=Activation.GELU), {BMARLIN},
         {MARLIN: {"format": "needs the standard activation format"}}),
    Case("a100 batched without the Marlin library", "a100-bare", spec("mixtral", "int4_g128_sym", batched=True),
         BATCHED, {BMARLIN: {"device": "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)"}}),
    Case("a100 batched int8 channel-wise with bias", "a100",
         spec(TINY, "int8_ch_sym", batched=True, bias=True), {BMARLIN}),
    Case("a100 GELU with a clamp limit", "a100", spec(TINY, "int4_g32_sym", activation=Activation.GELU, clamp=7.0),
         FAST, {MARLIN: {"extras": "the SwiGLU clamp limit is supported only with silu, swiglu_oai, got "
                                              "gelu"}}),
    Case("a100 with bias and EP: MARLIN takes the bias, not EP yet", "a100",
         spec("mixtral", "int4_g128_sym", bias=True, ep=8), FAST,
         {MARLIN: {"parallel": "expert parallelism (ep_size=8) is not supported"}}),
    Case("a100 without the Marlin library", "a100-bare", spec("mixtral", "int4_g128_sym"), FAST,
         {MARLIN: {"device": "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)"}}),
    Case("t4 (sm_75) is Marlin's oldest (float16 only)", "t4", spec("mixtral", "int4_g128_sym", dtype=torch.float16),
         MARLIN_WINS),
    Case("v100 (sm_70) is too old for Marlin", "v100", spec("mixtral", "int4_g128_sym"), FAST,
         {MARLIN: {"device": "needs compute capability sm_75 or newer, got sm_70"}}),
    Case("mi300x: no Marlin on ROCm", "mi300x", spec("mixtral", "int4_g128_sym"), FAST,
         {MARLIN: {"device": "Marlin has no ROCm, XPU or CPU build"}}),
    # ----- CPU -----
    Case("cpu fixture int4 g32", "cpu", spec(TINY, "int4_g32_sym"), {CPU}),
    Case("cpu int4 zero points", "cpu", spec(TINY, "int4_g128_zp"), {CPU}),
    Case("cpu int8", "cpu", spec(TINY, "int8_g128_sym"), {CPU}),
    Case("cpu act-order", "cpu", spec(TINY, "int4_g32_sym_actorder"), {CPU}),
    Case("cpu deepseek routing: the layer routes, the CPU kernels are modular", "cpu",
         spec("deepseek-v3", "int4_g128_sym"), {CPU}),
    Case("cpu EP: remote experts (-1) are skipped", "cpu", spec(TINY, "int4_g32_sym", ep=2), {CPU}),
    Case("cpu GELU and a clamp limit", "cpu", spec(TINY, "int4_g32_sym", activation=Activation.GELU, clamp=5.0),
         {Backend.EMULATION},
         {CPU: {"extras": "the SwiGLU clamp limit is supported only with silu, swiglu_oai, got gelu"}}),
    Case("cpu fp16 activations", "cpu", spec(TINY, "int4_g32_sym", dtype=torch.float16), {Backend.EMULATION},
         {CPU: {"scheme": "activation dtype float16 is not supported; expected bfloat16"}}),
    # ----- XPU -----
    Case("xpu int4 g32", "xpu", spec(TINY, "int4_g32_sym"), FAST, {XPU: NOT_IMPL}),
    Case("xpu zero points", "xpu", spec(TINY, "int4_g128_zp"), FAST,
         {XPU: NOT_IMPL | {"scheme": "zero points are not supported"}}),
    Case("xpu channel-wise", "xpu", spec(TINY, "int4_ch_sym"), FAST,
         {XPU: NOT_IMPL | {"scheme": "group_size channel-wise is not supported; expected one of 32, 128"}}),
    Case("xpu int8", "xpu", spec(TINY, "int8_g128_sym"), FAST, {XPU: NOT_IMPL | {"scheme": "int8 weights"}}),
    Case("xpu batched", "xpu", spec(TINY, "int4_g128_sym", batched=True), BATCHED,
         {XPU: NOT_IMPL | {"format": "needs the standard activation format"}}),
    Case("xpu SwiGLU-OAI with clamp and bias", "xpu",
         spec(TINY, "int4_g32_sym", activation=Activation.SWIGLU_OAI, clamp=7.0, bias=True), FAST, {XPU: NOT_IMPL}),
    Case("xpu SiLU with clamp", "xpu", spec(TINY, "int4_g32_sym", clamp=7.0), FAST,
         {XPU: NOT_IMPL | {"extras": "the SwiGLU clamp limit is supported only with swiglu_oai, got silu"}}),
    Case("xpu without vllm_xpu_kernels", "xpu-bare", spec(TINY, "int4_g32_sym"), FAST,
         {XPU: NOT_IMPL | {"device": "needs the vllm_xpu_kernels package"}}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_selection_table(case: Case) -> None:
    device = DeviceInfo.named(case.device)
    report = explain(case.layer, device=device)
    chosen = report.chosen
    assert (chosen.backend if chosen else None) in case.chosen, report.table()
    for backend, expected in case.rejected.items():
        candidate = next(c for c in report.candidates if c.backend == backend)
        assert candidate.verdict == Verdict.REJECTED, report.table()
        failed = dict(candidate.failed)
        assert set(failed) == set(expected), f"{backend.value}: {candidate.reason}"
        for check, text in expected.items():
            assert text in failed[check], f"{backend.value} {check}: {failed[check]!r} lacks {text!r}"
            assert f"{check}: {failed[check]}" in candidate.reason
    # select_backend agrees with explain, and fails with the whole table when nothing can run the layer.
    if chosen is None:
        with pytest.raises(BackendError, match="no backend can run this layer") as err:
            select_backend(case.layer, device=device)
        assert report.table() in str(err.value)
    else:
        selection = select_backend(case.layer, device=device)
        assert (selection.backend, selection.kernel) == (chosen.backend, chosen.kernel)


@pytest.mark.parametrize("device", ["b200", "b300", "h100", "h100-bare", "a100", "l40s", "t4", "v100", "rtx5090",
                                    "mi300x", "xpu", "cpu"])
def test_report_invariants(device: str) -> None:
    """Priority order first, every backend and class present, one winner, nothing eligible ahead of it."""
    info = DeviceInfo.named(device)
    report = explain(spec("mixtral", "int4_g128_sym"), device=info)
    order = PRIORITY[platform_key(info)]
    backends = [c.backend for c in report.candidates]
    assert list(dict.fromkeys(backends)) == list(order) + [b for b in Backend if b not in order]
    for backend in Backend:
        classes = BACKEND_CLASSES.get(backend)
        kernels = [c.kernel for c in report.candidates if c.backend == backend]
        assert kernels == (list(classes) if classes else [None])
    winners = [i for i, c in enumerate(report.candidates) if c.chosen]
    assert len(winners) == 1
    assert report.candidates[winners[0]].backend in order
    assert all(c.verdict == Verdict.REJECTED for c in report.candidates[:winners[0]])
    assert all(c.verdict != Verdict.CHOSEN for c in report.candidates[winners[0] + 1:])


def test_devices_by_name() -> None:
    """`device` takes a DeviceInfo or its name; anything else is named in the error."""
    by_name = explain(TINY, "int4_g32_sym", device="h100")
    assert by_name.device == DeviceInfo.named("h100")
    assert select_backend(TINY, "int4_g32_sym", device="cpu").backend == Backend.CPU
    with pytest.raises(InvalidInputError, match=r"device must be a DeviceInfo or a device name .* got 4"):
        explain(TINY, "int4_g32_sym", device=4)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="scheme must be a WeightScheme or a scheme name"):
        explain(TINY, 4)  # type: ignore[arg-type]


def test_explain_says_where_tritons_launch_configurations_come_from() -> None:
    """Tuned on this card, borrowed from the card measured for its compute capability, or default_config."""
    def triton_reason(shape: str | MoEConfig, device: str) -> str:
        report = explain(spec(shape, "int4_g128_sym"), device=DeviceInfo.named(device))
        assert report.chosen is not None and report.chosen.backend == Backend.TRITON, report.table()
        return report.chosen.reason

    assert triton_reason("deepseek-v3", "h200").endswith("launch configurations tuned on this card for this shape")
    assert triton_reason("deepseek-v3", "h100").endswith(
        "launch configurations tuned on NVIDIA H200 for this shape (it stands in for sm_90 cards)")
    assert triton_reason(MoEConfig(16, 4, 1024, 512), "h100").endswith(
        "launch configurations from default_config (no tuned entries for this card and shape)")
    assert "launch configurations" not in triton_reason("mixtral", "mi300x")  # (no tuned table off CUDA)


def test_backends_outside_the_priority_list_say_so() -> None:
    report = explain(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("cpu"))
    marlin = next(c for c in report.candidates if c.backend == MARLIN)
    assert marlin.reason.startswith("not in the cpu priority list; device: needs a CUDA device (sm_75+), got CPU (cpu)")
    cpu = next(c for c in report.candidates if c.backend == CPU)
    assert cpu.verdict == Verdict.CHOSEN
    assert cpu.reason == "first in priority order whose checks all pass"


def test_unregistered_backends_are_not_implemented() -> None:
    report = explain(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("h100"))
    for backend in Backend:
        if backend in BACKEND_CLASSES:
            continue
        (candidate,) = [c for c in report.candidates if c.backend == backend]
        assert candidate.kernel is None and candidate.kernel_name == "-"
        assert candidate.verdict == Verdict.REJECTED
        assert candidate.reason == "implemented: not implemented in this version"


def test_declared_kernels_cannot_run() -> None:
    """A class with IMPLEMENTED=False fails "implemented" first, and building it raises."""
    layer = spec("kimi-k2", "int4_g32_sym")
    declared = [cls for classes in BACKEND_CLASSES.values() for cls in classes if not cls.IMPLEMENTED]
    assert XPUExperts in declared
    assert BatchedMarlinExperts not in declared and FlashInferTrtllmExperts not in declared
    quant = _quant_for(TINY, WeightScheme(4, 32))
    for cls in declared:
        assert cls.failures(layer, DeviceInfo.named("b200"))[0] == ("implemented", "not implemented in this version")
        with pytest.raises(NotImplementedError, match="declared but not implemented in this version"):
            cls(layer, quant, torch.device("cpu"))


def test_priority_of_the_marlin_kernels() -> None:
    """The priority table: FlashInfer before Marlin on SM10x, TRITON before Marlin on sm_90 (measured faster on
    an H200), Marlin (BATCHED_MARLIN for the batched format) first on sm_80..89, never where its device check
    fails."""
    assert select_backend(spec("mixtral", "int4_g128_sym"), device=DeviceInfo.named("a100")).backend == MARLIN
    for device in ("h100", "a100"):
        assert select_backend(spec("mixtral", "int4_g128_sym", batched=True),
                              device=DeviceInfo.named(device)).backend == BMARLIN
    assert select_backend(spec("mixtral", "int4_g128_sym"), device=DeviceInfo.named("a100-bare")).backend in FAST
    hopper = explain(spec("mixtral", "int4_g128_sym"), device=DeviceInfo.named("h100"))
    assert hopper.chosen is not None and hopper.chosen.backend == Backend.TRITON
    assert next(c for c in hopper.candidates if c.backend == MARLIN).verdict == Verdict.ELIGIBLE
    report = explain(spec("kimi-k2", "int4_g32_sym"), device=DeviceInfo.named("b200"))
    assert report.chosen is not None and report.chosen.backend == FI
    marlin = next(c for c in report.candidates if c.backend == MARLIN)
    assert (marlin.verdict, marlin.reason) == (Verdict.ELIGIBLE,
                                               "every check passes, but a higher-priority kernel was chosen")
    assert select_backend(spec("kimi-k2", "int4_g128_sym"), device=DeviceInfo.named("b200")).backend == MARLIN


class _FakeTriton(Experts):
    """Stands in for the TRITON backend: CUDA sm_80+ only."""

    NAME = "triton"

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        return OK if (device.sm or 0) >= 80 and device.platform.value == "cuda" else Check(False, "needs sm_80+")


class _FakeTritonSecond(_FakeTriton):
    """A second TRITON class, tried after the first."""


def test_registered_backend_takes_its_priority_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oracle, "BACKEND_CLASSES", dict(BACKEND_CLASSES))
    register_backend(Backend.TRITON, (_FakeTriton, _FakeTritonSecond))
    report = explain(spec("mixtral", "int4_g128_sym"), device=DeviceInfo.named("h100-bare"))
    assert report.chosen is not None and report.chosen.kernel is _FakeTriton
    verdicts = {c.kernel_name: (c.verdict, c.reason) for c in report.candidates}
    assert verdicts["_FakeTritonSecond"] == verdicts["EmulationExperts"] == (
        Verdict.ELIGIBLE, "every check passes, but a higher-priority kernel was chosen")
    forced = explain(spec("mixtral", "int4_g128_sym"), device=DeviceInfo.named("h100-bare"), override="triton")
    verdicts = {c.kernel_name: (c.verdict, c.reason) for c in forced.candidates}
    assert verdicts["_FakeTriton"] == (Verdict.CHOSEN, "requested, and every check passes")
    assert verdicts["_FakeTritonSecond"][1] == "every check passes, but a higher-priority kernel was chosen"
    assert verdicts["EmulationExperts"][1] == "every check passes, but 'triton' was requested"
    # Not in the CPU priority list: eligible or not, it is never chosen there.
    cpu = explain(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("cpu"))
    assert cpu.chosen is not None and cpu.chosen.backend == CPU


@pytest.mark.parametrize(("classes", "message"), [
    ((), "needs at least one kernel class"),
    ((int,), "is not an Experts subclass"),
    ((EmulationExperts,), "EmulationExperts.NAME is 'emulation'; expected 'triton'"),
])
def test_register_backend_validates(monkeypatch: pytest.MonkeyPatch, classes: tuple, message: str) -> None:
    monkeypatch.setattr(oracle, "BACKEND_CLASSES", dict(BACKEND_CLASSES))
    with pytest.raises(InvalidInputError, match=message):
        register_backend(Backend.TRITON, classes)


# ----- the kernel class protocol ----------------------------------------------------------------------------

CHECK_HOOKS = ("supports_device", "supports_scheme", "supports_activation", "supports_routing", "supports_parallel",
               "supports_shape", "supports_extras")


def _all_classes() -> list[tuple[Backend, type[Experts]]]:
    return [(backend, cls) for backend, classes in BACKEND_CLASSES.items() for cls in classes]


@pytest.mark.parametrize(("backend", "cls"), _all_classes(), ids=[cls.__name__ for _, cls in _all_classes()])
def test_kernel_class_protocol(backend: Backend, cls: type[Experts]) -> None:
    assert backend.value == cls.NAME
    assert isinstance(getattr(inspect.getmodule(cls), "NAME", None), str)  # each backend file names itself
    for hook in (*CHECK_HOOKS, "checks", "failures", "is_supported", "prepare_weights"):
        assert isinstance(inspect.getattr_static(cls, hook), classmethod), f"{cls.__name__}.{hook}"
    assert callable(cls.apply) and callable(cls.apply_monolithic)
    if cls.MONOLITHIC:
        # A monolithic kernel routes itself, so it must declare its routing methods and logit dtypes.
        assert any("supports_routing" in vars(k) for k in cls.__mro__ if k is not Experts)


def test_checks_never_instantiate(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Experts, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{type(self).__name__} was instantiated by a capability check")

    for _, cls in _all_classes():
        monkeypatch.setattr(cls, "__init__", refuse)
    for case in CASES:
        for _, cls in _all_classes():
            cls.checks(case.layer, DeviceInfo.named(case.device))
        explain(case.layer, device=DeviceInfo.named(case.device))


# ----- call forms --------------------------------------------------------------------------------------------

def test_select_backend_call_forms_agree() -> None:
    device = DeviceInfo.named("h100")
    config, scheme = moe("qwen3-30b-a3b"), WeightScheme.from_name("int4_g64_sym")
    parallel = ParallelConfig(tp_size=4)
    by_spec = select_backend(LayerSpec(config, scheme, parallel, has_bias=True), device=device)
    by_pair = select_backend(config, scheme, device=device, parallel=parallel, has_bias=True)
    by_name = select_backend(config, "int4_g64_sym", device=device, parallel=parallel, has_bias=True)
    assert by_spec.spec == by_pair.spec == by_name.spec
    assert (by_spec.backend, by_spec.kernel) == (by_pair.backend, by_pair.kernel) == (by_name.backend, by_name.kernel)
    assert explain(config, scheme, device=device, parallel=parallel, has_bias=True).table() == by_spec.table()


def test_select_backend_call_form_errors() -> None:
    layer = spec(TINY, "int4_g32_sym")
    with pytest.raises(InvalidInputError, match=r"either a LayerSpec alone .* plus \['has_bias', 'scheme'\]"):
        select_backend(layer, WeightScheme(4, 32), has_bias=True)
    with pytest.raises(InvalidInputError, match="a MoEConfig needs a weight scheme"):
        select_backend(TINY)
    with pytest.raises(InvalidInputError, match="intermediate_size=128 is not divisible by tp_size=3"):
        select_backend(TINY, "int4_g32_sym", parallel=ParallelConfig(tp_size=3))


# ----- overrides ---------------------------------------------------------------------------------------------

def test_override_unknown_name() -> None:
    with pytest.raises(InvalidInputError, match=r"override='cutlass' is not a backend; valid names: auto, "
                                                r"flashinfer_trtllm, marlin, batched_marlin, triton, batched_triton, "
                                                r"xpu, cpu, emulation"):
        select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("h100"), override="cutlass")


def test_override_unknown_name_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "deep_gemm")
    with pytest.raises(InvalidInputError, match=r"WNA16MOE_BACKEND='deep_gemm' is not a backend; valid names: auto"):
        select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("h100"))


def test_override_wrong_device() -> None:
    with pytest.raises(BackendError) as err:
        select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("h100"), override="xpu")
    message = str(err.value)
    assert message.startswith("override='xpu' cannot run this layer (E=8 top_k=2 H=256 I=128, int4_g32_sym, silu")
    assert "on NVIDIA H100 80GB HBM3: XPUExperts: implemented: not implemented in this version; device: needs an " \
           "Intel XPU, got NVIDIA H100 80GB HBM3 (cuda)" in message
    assert "Backends that can: emulation" in message and "use 'auto' to let the oracle choose" in message


def test_override_incompatible_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    # On an H100 with the Marlin library the scheme is the only thing in Marlin's way.
    monkeypatch.setenv(BACKEND_ENV, "Marlin")
    with pytest.raises(BackendError) as err:
        select_backend(spec(TINY, "int8_g128_zp"), device=DeviceInfo.named("h100"))
    assert ("WNA16MOE_BACKEND='marlin' cannot run this layer (E=8 top_k=2 H=256 I=128, int8_g128_zp"
            in str(err.value))
    assert ("MarlinExperts: scheme: int8 with zero points is not supported (Marlin has no uint8 + zero-point type)"
            in str(err.value))


def test_override_not_implemented() -> None:
    with pytest.raises(BackendError, match=r"override='xpu' cannot run .* XPUExperts: "
                                           r"implemented: not implemented in this version\. Backends that can"):
        select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("xpu"), override=Backend.XPU)


def test_override_batched_marlin() -> None:
    selection = select_backend(spec("kimi-k2", "int4_g32_sym", batched=True), device=DeviceInfo.named("b200"),
                               override=Backend.BATCHED_MARLIN)
    assert (selection.backend, selection.kernel) == (BMARLIN, BatchedMarlinExperts)
    with pytest.raises(BackendError, match=r"override='batched_marlin' cannot run .* BatchedMarlinExperts: format: "
                                           r"needs the batched activation format, the layer uses standard"):
        select_backend(spec("kimi-k2", "int4_g32_sym"), device=DeviceInfo.named("b200"),
                       override=Backend.BATCHED_MARLIN)


def test_override_that_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, device = spec(TINY, "int4_g32_sym"), DeviceInfo.named("h100")
    selection = select_backend(layer, device=device, override="EMULATION")
    assert (selection.backend, selection.kernel) == (Backend.EMULATION, EmulationExperts)
    assert selection.report.override == Backend.EMULATION
    assert selection.report.chosen is not None
    assert selection.report.chosen.reason == "requested, and every check passes"
    # The argument wins over the environment; "auto" in either lets the oracle choose.
    monkeypatch.setenv(BACKEND_ENV, "xpu")
    assert select_backend(layer, device=device, override=Backend.EMULATION).backend == Backend.EMULATION
    assert select_backend(layer, device=device, override="auto").report.override is None
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert select_backend(layer, device=device).report.override is None


# ----- report, logging --------------------------------------------------------------------------------------

def test_report_table_and_dict() -> None:
    report = explain(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("cpu"))
    lines = report.table().splitlines()
    assert lines[0].split() == ["backend", "kernel", "verdict", "reason"]
    assert len(lines) == 1 + len(report.candidates)
    assert lines[1].split()[:3] == ["cpu", "CPUExperts", "chosen"]
    data = report.as_dict()
    assert data["chosen"] == {"backend": "cpu", "kernel": "CPUExperts"}
    assert data["priority"] == {"platform": "cpu", "order": ["cpu", "emulation"]}
    assert data["candidates"][0]["failed_checks"] == []
    xpu = next(c for c in data["candidates"] if c["backend"] == "xpu")
    assert xpu["failed_checks"][0] == {"check": "implemented", "reason": "not implemented in this version"}


def test_decision_logged_once_per_distinct_decision(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(oracle, "_logged", set())
    device = DeviceInfo.named("cpu")
    with caplog.at_level(logging.INFO, logger="wna16moe"):
        for _ in range(3):  # three layers, one decision
            select_backend(spec(TINY, "int4_g32_sym"), device=device)
        select_backend(spec(TINY, "int8_g128_sym"), device=device)  # another scheme: another decision
    messages = [r.getMessage() for r in caplog.records if r.name == "wna16moe"]
    assert messages == ["wna16moe: int4_g32_sym on CPU -> cpu (CPUExperts, auto)",
                        "wna16moe: int8_g128_sym on CPU -> cpu (CPUExperts, auto)"]


# ----- kernels ---------------------------------------------------------------------------------------------

def _quant_for(config: MoEConfig, scheme: WeightScheme, bias: bool = False) -> MoEQuantConfig:
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    g1, g2 = scheme.num_groups(h), scheme.num_groups(i)
    zp = scheme.zero_point
    return make_wna16_moe_quant_config(
        torch.ones(e, 2 * i, g1), torch.ones(e, h, g2), scheme.group_size or -1, scheme.bits,
        torch.zeros(e, 2 * i, g1, dtype=torch.int32) if zp else None,
        torch.zeros(e, h, g2, dtype=torch.int32) if zp else None,
        torch.zeros(e, 2 * i) if bias else None, torch.zeros(e, h) if bias else None)


def test_make_kernel_builds_a_new_kernel_each_call() -> None:
    selection = select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("cpu"))
    quant = _quant_for(TINY, WeightScheme(4, 32))
    first, second = (make_kernel(selection, quant, torch.device("cpu")) for _ in range(2))
    assert first is not second
    assert first.spec is selection.spec and first.quant is quant


@pytest.mark.parametrize(("scheme", "bias", "message"), [
    (WeightScheme(8, 32), False, "num_bits: quant config has 8, the selection was made for 4"),
    (WeightScheme(4, 128), False, "group_size: quant config has 128, the selection was made for 32"),
    (WeightScheme(4, 32, zero_point=True), False, "zero points: quant config has True, the selection was made for "
                                                  "False"),
    (WeightScheme(4, 32), True, "bias: quant config has True, the selection was made for False"),
])
def test_make_kernel_rejects_a_different_quant_config(scheme: WeightScheme, bias: bool, message: str) -> None:
    selection = select_backend(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("cpu"))
    with pytest.raises(InvalidInputError, match=f"cannot build CPUExperts for int4_g32_sym: {message}"):
        make_kernel(selection, _quant_for(TINY, scheme, bias), torch.device("cpu"))


def test_make_kernel_refuses_a_declared_kernel() -> None:
    report = explain(spec(TINY, "int4_g32_sym"), device=DeviceInfo.named("h100"))
    forged = Selection(XPU, XPUExperts, report)
    with pytest.raises(NotImplementedError, match="XPUExperts"):
        make_kernel(forged, _quant_for(TINY, WeightScheme(4, 32)), torch.device("cpu"))


def test_two_layers_never_share_a_kernel() -> None:
    first = WNA16MoE.from_checkpoint(FIXTURE, layer_idx=0, device="cpu")
    second = WNA16MoE.from_checkpoint(FIXTURE, layer_idx=1, device="cpu")
    same_layer_again = WNA16MoE.from_checkpoint(FIXTURE, layer_idx=0, device="cpu")
    kernels = [first.kernel, second.kernel, same_layer_again.kernel]
    assert len({id(k) for k in kernels}) == 3
    assert len({id(k.quant) for k in kernels}) == 3
    assert first.backend == CPU and first.kernel.quant is first.quant
