"""CPU backend: its packed formats against dequantization, its forward against EMULATION and the float64
reference on every scheme it supports, the oracle's CPU table, and the CPU benchmark on a tiny layer."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import (
    AWQ_W4_G32,
    CT_W4_G32_SYM,
    CT_W4_G128_ASYM,
    CT_W8_G128_SYM,
    GPTQ_W4_G32_DESCACT,
    SOURCE,
    dequantize_ref,
    random_experts,
    relative_error,
)
from reference import gelu_and_mul_ref, moe_forward_ref, silu_and_mul_ref, softmax_topk_ref, swiglu_oai_ref

from wna16moe import (
    Activation,
    InvalidInputError,
    MoEConfig,
    ParallelConfig,
    QuantizedExperts,
    UnsupportedError,
    WeightScheme,
    open_checkpoint,
)
from wna16moe.bench_cpu import bench_layer, cpu_model
from wna16moe.device import DeviceInfo
from wna16moe.experts import cpu
from wna16moe.experts.base import LayerSpec
from wna16moe.experts.cpu import CPUExperts, dequant_matmul, int4_kernel_group, prepare_cpu_weights
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import BACKEND_ENV, Backend, explain, select_backend
from wna16moe.routing import softmax_topk

CPU_DEVICE = torch.device("cpu")
# Relative Frobenius error of a bf16 kernel (bf16 GEMM outputs and intermediate) against float32/float64.
KERNEL_RTOL = 1e-2


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny layers run many small parallel regions, which stall for scheduler ticks
    on CPUs shared with other processes (BENCHMARKS.md); the kernels are the same at any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kernel_weights(prepared: dict[str, torch.Tensor], name: str, expert: int, k: int, group: int) -> torch.Tensor:
    """The int4 weights [N, K] the kernel multiplies by, read back through the kernel itself (identity input)."""
    eye = torch.eye(k, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, prepared[name][expert], group,
                                                      prepared[f"{name}_sz"][expert]).t()


def _in_kernel_order(reference: torch.Tensor, prepared: dict[str, torch.Tensor], name: str,
                     expert: int) -> torch.Tensor:
    """Canonical [N, K] weights with columns in the order the prepared codes hold them (act-order: group order)."""
    perm = prepared.get(f"{name}_perm")
    return reference if perm is None else reference[:, perm[expert]]


# ----- converter -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g128_sym", "int4_ch_sym", "int4_g64_sym_actorder"])
def test_int4_packing_reproduces_the_weights_exactly(name: str) -> None:
    """Symmetric int4 with bf16 scales: the kernel multiplies by exactly (q - 8) * s (one bf16 rounding of
    each product, which is exact here, shows no difference)."""
    experts = random_experts(WeightScheme.from_name(name), 3, 256, 128)
    prepared = prepare_cpu_weights(experts, CPU_DEVICE)
    for weight, key, k in ((experts.w13, "w13", 256), (experts.w2, "w2", 128)):
        reference = dequantize_ref(weight)
        group = int4_kernel_group(k, weight.scheme.group_size)
        for e in range(3):
            got = _kernel_weights(prepared, key, e, k, group)
            assert torch.equal(got, _in_kernel_order(reference[e], prepared, key, e).to(torch.bfloat16))
    if experts.scheme.act_order:
        perm = prepared["w13_perm"][1]
        assert torch.equal(experts.w13.g_idx[1].long()[perm], torch.arange(256) // 64)  # groups made contiguous


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["int4_g32_zp", "int4_ch_zp"])
def test_int4_zero_points_within_the_documented_bound(name: str, scale_dtype: torch.dtype) -> None:
    """W = (q - 8) * s + bf16((8 - z) * s): off by at most 2**-8 * |8 - z| * s (bf16's unit roundoff; plus
    2**-8 * |q - 8| * s when the scale is float16 and rounded to bf16, and the kernel's output rounding here);
    exact where |8 - z| is 0, 1, 2, 4 or 8 and the scale is bf16."""
    experts = random_experts(WeightScheme.from_name(name, scale_dtype), 2, 256, 128)
    prepared = prepare_cpu_weights(experts, CPU_DEVICE)
    weight = experts.w13
    reference = dequantize_ref(weight)
    group = int4_kernel_group(256, weight.scheme.group_size)
    g_of = weight.scheme.group_of(256)
    for e in range(2):
        got = _kernel_weights(prepared, "w13", e, 256, group).double()
        scale = weight.scales[e].double()[:, g_of]
        offset = (8 - weight.zeros[e].double()[:, g_of]).abs()
        # A float16 scale is rounded to bf16 on its own: (q - 8) times that rounding.
        scale_err = 0 if scale_dtype == torch.bfloat16 else 2**-8 * (weight.codes[e].double() - 8).abs() * scale
        bound = 2**-8 * offset * scale + 2**-8 * got.abs() + scale_err
        assert ((got - reference[e]).abs() <= bound).all()
        if scale_dtype == torch.bfloat16:
            exact = torch.isin(offset, torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0]))
            assert exact.any() and torch.equal(got[exact], reference[e][exact].to(torch.bfloat16).double())


@pytest.mark.parametrize("name", ["int8_ch_sym", "int8_g32_zp", "int8_g64_sym_actorder", "int8_ch_zp"])
def test_int8_layouts_reproduce_the_weights_exactly(name: str) -> None:
    scheme = WeightScheme.from_name(name)
    experts = random_experts(scheme, 2, 96, 48)
    prepared = prepare_cpu_weights(experts, CPU_DEVICE)
    weight, reference = experts.w13, dequantize_ref(experts.w13)
    eye = torch.eye(96, dtype=torch.bfloat16)
    for e in range(2):
        codes = prepared["w13"][e]
        assert codes.dtype == torch.int8
        assert torch.equal(codes.to(torch.int16) + 128,
                           _in_kernel_order(weight.codes[e].to(torch.int16), prepared, "w13", e))
        if cpu.uses_int8pack(scheme):
            got = torch.ops.aten._weight_int8pack_mm(eye, codes, prepared["w13_scales"][e]).t()
        else:
            zeros = prepared.get("w13_zeros")
            got = dequant_matmul(eye, codes, prepared["w13_scales"][e], None if zeros is None else zeros[e],
                                 scheme.group_size or 96).t()
        assert torch.equal(got, _in_kernel_order(reference[e], prepared, "w13", e).to(torch.bfloat16))


def test_dequant_matmul_chunks_rows_and_takes_partial_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "DEQUANT_CHUNK", 3 * 80)  # 3 rows of K=80 per chunk: 7 rows in 3 chunks
    codes = torch.randint(-128, 128, (7, 80), dtype=torch.int8)
    scales = torch.rand(7, 3).to(torch.bfloat16)  # groups of 32: the last one has 16 columns
    zeros = torch.randint(-128, 128, (7, 3), dtype=torch.int16)
    x = torch.randn(4, 80).to(torch.bfloat16)
    group = torch.arange(80) // 32
    w = ((codes.double() - zeros.double()[:, group]) * scales.double()[:, group]).to(torch.bfloat16)
    torch.testing.assert_close(dequant_matmul(x, codes, scales, zeros, 32), x @ w.t())


def test_converter_errors() -> None:
    experts = random_experts(WeightScheme.from_name("int4_g32_sym_actorder"), 2, 64, 32)
    with pytest.raises(InvalidInputError, match="prepares its weights on the CPU, got device meta"):
        prepare_cpu_weights(experts, torch.device("meta"))
    experts.w13.g_idx[1] = 0  # every column in group 0
    with pytest.raises(UnsupportedError, match="w13 g_idx of expert 1 does not split into groups of exactly 32"):
        prepare_cpu_weights(experts, CPU_DEVICE)
    with pytest.raises(UnsupportedError, match=r"int4_g32_sym with H=64, I=48 has no int4 CPU kernel group"):
        prepare_cpu_weights(random_experts(WeightScheme(4, 32), 2, 64, 48), CPU_DEVICE)


# ----- forward -----------------------------------------------------------------------------------------------

def _forward_case(scheme: WeightScheme, h: int, i: int, activation: Activation = Activation.SILU,
                  bias: bool = False, **quant_kwargs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CPU output, EMULATION output, float64 reference) on fresh random weights, tokens and routing."""
    e, k, t = 6, 2, 9
    experts = QuantizedExperts.quantize(torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1, scheme) \
        if not scheme.act_order else random_experts(scheme, e, h, i)
    biases = {"w1_bias": torch.randn(e, 2 * i) * 0.1, "w2_bias": torch.randn(e, h) * 0.1} if bias else {}
    quant = experts.quant_config(**biases, **quant_kwargs)
    spec = LayerSpec(MoEConfig(e, k, h, i, activation), scheme, has_bias=bias,
                     clamp_limit=quant_kwargs.get("gemm1_clamp_limit"))
    assert CPUExperts.is_supported(spec, DeviceInfo.named("cpu")).ok
    x = torch.randn(t, h).to(torch.bfloat16)
    topk_weights, topk_ids = softmax_topk(torch.randn(t, e), k, renormalize=True)
    out = CPUExperts(spec, quant, CPU_DEVICE).apply(x, topk_weights, topk_ids,
                                                    CPUExperts.prepare_weights(experts, CPU_DEVICE))
    emulated = EmulationExperts(spec, quant, CPU_DEVICE).apply(x, topk_weights, topk_ids,
                                                              EmulationExperts.prepare_weights(experts, CPU_DEVICE))
    refs = {Activation.SILU: partial(silu_and_mul_ref, limit=quant_kwargs.get("gemm1_clamp_limit")),
            Activation.GELU: gelu_and_mul_ref,
            Activation.SWIGLU_OAI: partial(swiglu_oai_ref, alpha=quant_kwargs.get("gemm1_alpha", 1.702),
                                           beta=quant_kwargs.get("gemm1_beta", 1.0),
                                           limit=quant_kwargs.get("gemm1_clamp_limit", 7.0))}
    want = moe_forward_ref(x, dequantize_ref(experts.w13), dequantize_ref(experts.w2), topk_weights, topk_ids,
                           refs[activation], biases.get("w1_bias"), biases.get("w2_bias"))
    return out, emulated, want


SCHEMES = ["int4_g32_sym", "int4_g64_zp", "int4_g128_sym", "int4_g256_zp", "int4_ch_sym", "int4_ch_zp",
           "int4_g32_sym_actorder", "int4_g128_zp_actorder", "int8_ch_sym", "int8_ch_zp", "int8_g128_sym",
           "int8_g32_zp", "int8_g64_sym_actorder"]


@pytest.mark.parametrize("name", SCHEMES)
def test_forward_matches_emulation_and_the_reference(name: str) -> None:
    out, emulated, want = _forward_case(WeightScheme.from_name(name), 256, 256)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert relative_error(out, want) < KERNEL_RTOL
    assert relative_error(out, emulated) < KERNEL_RTOL


@pytest.mark.parametrize(("activation", "bias", "params"), [
    (Activation.GELU, True, {}),
    (Activation.SILU, False, {"gemm1_clamp_limit": 0.3}),
    (Activation.SWIGLU_OAI, True, {"gemm1_clamp_limit": 0.4, "gemm1_alpha": 1.5, "gemm1_beta": 0.5}),
])
def test_forward_activations_bias_and_clamp(activation: Activation, bias: bool, params: dict) -> None:
    out, emulated, want = _forward_case(WeightScheme(4, 32, zero_point=True), 128, 64, activation, bias, **params)
    assert relative_error(out, want) < KERNEL_RTOL and relative_error(out, emulated) < KERNEL_RTOL


def test_forward_int8_partial_groups() -> None:
    out, emulated, want = _forward_case(WeightScheme(8, 64, zero_point=True), 200, 100)  # 200 = 3 * 64 + 8
    assert relative_error(out, want) < KERNEL_RTOL and relative_error(out, emulated) < KERNEL_RTOL


def test_forward_skips_remote_experts_and_rejects_bad_input() -> None:
    """Pairs with id -1 (experts another EP rank owns) add nothing; a token with none gets zeros."""
    scheme = WeightScheme(4, 32)
    experts = random_experts(scheme, 4, 64, 32)
    spec = LayerSpec(MoEConfig(4, 2, 64, 32), scheme)
    kernel = CPUExperts(spec, experts.quant_config(), CPU_DEVICE)
    weights = CPUExperts.prepare_weights(experts, CPU_DEVICE)
    x = torch.randn(3, 64).to(torch.bfloat16)
    topk_weights = torch.rand(3, 2)
    ids = torch.tensor([[0, -1], [-1, -1], [3, 1]], dtype=torch.int32)
    out = kernel.apply(x, topk_weights, ids, weights)
    only_local = kernel.apply(x[[0]], topk_weights[[0], :1], ids[[0], :1], weights)
    assert torch.equal(out[0], only_local[0]) and not out[1].any() and out[2].abs().sum() > 0
    with pytest.raises(InvalidInputError, match="hidden_states must be bfloat16 for the CPU backend"):
        kernel.apply(x.half(), topk_weights, ids, weights)
    with pytest.raises(InvalidInputError, match="topk_ids holds expert 4, but the layer has 4 experts"):
        kernel.apply(x, topk_weights, torch.full((3, 2), 4, dtype=torch.int32), weights)


# ----- intra-op threads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("work", "grain", "limit", "threads"), [
    (10, 100, 2, 1),   # less than one grain: one thread
    (0, 100, 4, 1),
    (250, 100, 4, 2),  # whole grains only
    (10**9, 100, 4, 4),  # never more than the caller's
    (10, 0, 3, 3),     # grain 0: every call gets all of them
])
def test_team_size(work: int, grain: int, limit: int, threads: int) -> None:
    assert cpu.team_size(work, grain, limit) == threads


@pytest.fixture
def two_threads() -> Iterator[None]:
    if cpu._omp_set_num_threads() is None:
        pytest.skip("torch does not run its intra-op work on OpenMP here: the team size is left alone")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_team_size_follows_the_work_and_is_restored(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small experts run on one intra-op thread, large ones (here: any, with GEMM_GRAIN 1) on the caller's two;
    the output is the same bits either way, and the caller's setting is back afterwards, also after an error."""
    scheme = WeightScheme(4, 32)
    experts = random_experts(scheme, 4, 256, 128)
    kernel = CPUExperts(LayerSpec(MoEConfig(4, 2, 256, 128), scheme), experts.quant_config(), CPU_DEVICE)
    weights = CPUExperts.prepare_weights(experts, CPU_DEVICE)
    seen: list[int] = []
    expert = CPUExperts._expert

    def recording(self: CPUExperts, *args: object) -> None:
        seen.append(torch.get_num_threads())
        expert(self, *args)

    monkeypatch.setattr(CPUExperts, "_expert", recording)
    x = torch.randn(5, 256).to(torch.bfloat16)
    topk_weights, topk_ids = softmax_topk(torch.randn(5, 4), 2, renormalize=True)
    small = kernel.apply(x, topk_weights, topk_ids, weights)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setattr(cpu, "GEMM_GRAIN", 1)
    large = kernel.apply(x, topk_weights, topk_ids, weights)
    assert set(seen) == {2} and torch.equal(small, large)
    with pytest.raises(InvalidInputError, match="topk_ids holds expert 4"):
        kernel.apply(x, topk_weights, torch.full_like(topk_ids, 4), weights)
    assert torch.get_num_threads() == 2


FIXTURES = [(CT_W4_G32_SYM, 0, None), (CT_W4_G128_ASYM, 1, None), (CT_W8_G128_SYM, 0, None),
            (GPTQ_W4_G32_DESCACT, 1, None), (AWQ_W4_G32, 0, None), (SOURCE, 1, "int4_g64_sym")]


@pytest.mark.parametrize(("path", "layer_idx", "quantize_to"), FIXTURES, ids=[f[0].name for f in FIXTURES])
def test_the_oracle_runs_every_fixture_on_the_cpu_backend(path: Path, layer_idx: int, quantize_to: str | None) -> None:
    ckpt = open_checkpoint(path, quantize_to=quantize_to)
    layer = WNA16MoE.from_checkpoint(path, layer_idx, quantize_to=quantize_to, device="cpu")
    assert layer.backend == Backend.CPU
    x = (torch.randn(6, 256) * 10).to(torch.bfloat16)
    logits = x.float() @ ckpt.router_weight(layer_idx).float().t()
    weights, ids, margin = softmax_topk_ref(logits, 2, False)
    clear = margin > 1e-4  # tokens without a near-tie between the 2nd and 3rd expert
    experts = ckpt.load_layer(layer_idx)
    want = moe_forward_ref(x, dequantize_ref(experts.w13), dequantize_ref(experts.w2), weights, ids,
                           silu_and_mul_ref)
    assert clear.any() and relative_error(layer(x, logits)[clear], want[clear]) < KERNEL_RTOL


# ----- capability checks and the oracle's CPU table --------------------------------------------------------

TINY = MoEConfig(8, 2, 256, 128)


@pytest.mark.parametrize(("layer", "failed"), [
    (LayerSpec(TINY, WeightScheme.from_name("int4_g32_sym")), {}),
    (LayerSpec(MoEConfig(8, 2, 256, 128, dtype=torch.float16), WeightScheme.from_name("int4_g32_sym")),
     {"scheme": "activation dtype float16 is not supported; expected bfloat16"}),
    (LayerSpec(TINY, WeightScheme.from_name("int4_g16_sym")),
     {"scheme": "int4 group_size 16 is not supported; expected channel-wise or one of 32, 64, 128, 256 (the groups "
                "of aten._weight_int4pack_mm_for_cpu)"}),
    (LayerSpec(MoEConfig(8, 2, 272, 136), WeightScheme.from_name("int4_g32_sym")),
     {"shape": "H and I/tp must be multiples of group_size 32, got H=272, I/tp=136"}),
    (LayerSpec(MoEConfig(8, 2, 272, 128), WeightScheme.from_name("int4_ch_zp")),
     {"shape": "channel-wise int4 needs H and I/tp to be multiples of 32 (the int4 kernel's smallest group), got "
               "H=272, I/tp=128"}),
    (LayerSpec(MoEConfig(8, 2, 200, 100), WeightScheme.from_name("int8_g16_zp_actorder")), {}),
    (LayerSpec(MoEConfig(8, 2, 256, 192), WeightScheme.from_name("int8_g64_sym"), ParallelConfig(tp_size=2)),
     {"shape": "I/tp=96 (intermediate_size=192, tp_size=2) is not a multiple of group_size 64: a quantization "
               "group would straddle two TP shards; use a tp_size that keeps I/tp a multiple of 64, or expert "
               "parallelism (ep_size) instead of tensor parallelism"}),
    (LayerSpec(MoEConfig(8, 2, 256, 128, Activation.GELU), WeightScheme.from_name("int4_g32_sym"), clamp_limit=5.0),
     {"extras": "the SwiGLU clamp limit is supported only with silu, swiglu_oai, got gelu"}),
    (LayerSpec(MoEConfig(8, 2, 256, 128, Activation.SWIGLU_OAI), WeightScheme.from_name("int4_g32_sym"),
               has_bias=True, clamp_limit=7.0), {}),
])
def test_capabilities(layer: LayerSpec, failed: dict[str, str]) -> None:
    assert dict(CPUExperts.failures(layer, DeviceInfo.named("cpu"))) == failed


def test_device_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = LayerSpec(TINY, WeightScheme.from_name("int4_g32_sym"))
    assert dict(CPUExperts.failures(layer, DeviceInfo.named("h100"))) == {
        "device": "runs on the CPU only, got NVIDIA H100 80GB HBM3 (cuda)"}
    monkeypatch.setattr(cpu, "OPS", (*cpu.OPS, "_no_such_op_for_cpu"))
    reason = dict(CPUExperts.failures(layer, DeviceInfo.named("cpu")))["device"]
    assert reason == f"this torch build ({torch.__version__}) lacks aten._no_such_op_for_cpu"


@pytest.mark.parametrize(("scheme", "config", "chosen"), [
    ("int4_g32_sym", TINY, Backend.CPU),
    ("int4_g128_zp", TINY, Backend.CPU),
    ("int8_g128_sym", TINY, Backend.CPU),
    ("int4_g32_sym_actorder", TINY, Backend.CPU),
    ("int4_g16_sym", MoEConfig(8, 2, 256, 128), Backend.EMULATION),  # no int4 kernel group of 16
    ("int4_g32_sym", MoEConfig(8, 2, 256, 128, dtype=torch.float16), Backend.EMULATION),
])
def test_cpu_priority(scheme: str, config: MoEConfig, chosen: Backend) -> None:
    """On a CPU the oracle takes CPU before EMULATION wherever CPU's checks pass."""
    assert select_backend(config, scheme, device=DeviceInfo.named("cpu")).backend == chosen
    report = explain(config, scheme, device=DeviceInfo.named("cpu"))
    emulation = next(c for c in report.candidates if c.backend == Backend.EMULATION)
    assert emulation.verdict.value == ("eligible" if chosen == Backend.CPU else "chosen")


# ----- benchmark -----------------------------------------------------------------------------------------------

def test_bench_layer_on_a_tiny_layer() -> None:
    lines: list[str] = []
    rows = bench_layer(MoEConfig(8, 2, 256, 128), WeightScheme(4, 32), [1, 3], 1, lines.append)
    assert [r["M"] for r in rows] == [1, 3]
    for row in rows:
        assert row["cpu_ms"] > 0 and row["emulation_ms"] > 0 and row["rel_err_vs_emulation"] < KERNEL_RTOL
        assert row["speedup"] == pytest.approx(row["emulation_ms"] / row["cpu_ms"], rel=0.05, abs=0.01)
    assert lines[0].startswith("CPU weights prepared in") and "M=3" in lines[-1]
    assert cpu_model()


@pytest.mark.parametrize("backend", [CPUExperts, EmulationExperts])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_weights_in_a_narrow_float_dtype(backend: type, dtype: torch.dtype) -> None:
    # Routers often return bf16/fp16 weights (`Experts.apply` takes any float dtype): the result is the one for
    # the same values in float32, not a cast's truncation or an error.
    e, k, h, i, t = 6, 2, 128, 64, 7
    scheme = WeightScheme.from_name("int4_g32_sym")
    experts = QuantizedExperts.quantize(torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1, scheme)
    spec = LayerSpec(MoEConfig(e, k, h, i), scheme)
    kernel = backend(spec, experts.quant_config(), CPU_DEVICE)
    weights = backend.prepare_weights(experts, CPU_DEVICE)
    x = torch.randn(t, h).to(torch.bfloat16)
    topk_weights, topk_ids = softmax_topk(torch.randn(t, e), k, renormalize=True)
    narrow = topk_weights.to(dtype)
    out = kernel.apply(x, narrow, topk_ids, weights)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.equal(out, kernel.apply(x, narrow.float(), topk_ids, weights))
    want = moe_forward_ref(x, dequantize_ref(experts.w13), dequantize_ref(experts.w2), narrow.float(), topk_ids,
                           silu_and_mul_ref, None, None)
    assert relative_error(out, want) < KERNEL_RTOL
