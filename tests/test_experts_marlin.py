"""MARLIN and BATCHED_MARLIN: provider discovery, capability checks and the oracle's decisions (CPU), the
forward's glue against EMULATION through a CPU stand-in for the op, and the kernel against EMULATION (GPU,
marker gpu).

CPU: simulated devices (`DeviceInfo.named`) and a machine without a provider; the layout converters have
their own file, tests/test_marlin_layout.py. The glue tests run `marlin_moe_forward` and
`BatchedMarlinExperts.apply_batched` with `reference_marlin_gemm` in place of the op.

GPU (marker gpu; skipped without CUDA or without a Marlin op provider): MARLIN against EMULATION for int4
symmetric g32 / g128 / channel-wise, int4 zero-point g128 and int8 g128, at M = 1 ... 8192 in bf16 and fp16,
with CUDA-graph capture and replay (M = 1 included), every block size, biases and activations, and real
checkpoints through the layer; BATCHED_MARLIN on uneven per-expert token counts (empty and full experts, NaN
padding rows), with biases, and a single-rank batched layer; relative Frobenius error below 1e-2.

How to get the provider for a GPU run (vLLM's Marlin MoE op library; never committed, never a dependency):

    .venv/bin/pip download vllm==0.33.0 --no-deps -d build/vllm-wheel        # build/ is git-ignored
    unzip -o -j build/vllm-wheel/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl \
        vllm/_moe_C_stable_libtorch.abi3.so -d build/marlin                 # 45.7 MB, the only file needed
    rm -r build/vllm-wheel

then carry `build/marlin` to the GPU machine (the device tool's `carry=["build/marlin"]`) and run there, in
the environment of the earlier GPU runs (torch 2.11.0+cu130, triton 3.6.0; the library needs torch >= 2.11
built for CUDA 13):

    export WNA16MOE_MARLIN_LIB=$PWD/build/marlin/_moe_C_stable_libtorch.abi3.so
    export CUDA_CACHE_MAXSIZE=4294967296   # keep the JIT-compiled sm_80 PTX between processes (Hopper)
    python -m pytest -m gpu -q tests/test_experts_marlin.py

On Hopper the first kernel of each (weight type, dtype) JIT-compiles vLLM's sm_80 PTX for tens of seconds
(logged as a warm-up when the kernel is built); a first run may need most of a 10-minute command.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA, replay_on_fresh_inputs

from wna16moe import Activation, MoEConfig, ParallelConfig, QuantizedExperts, WeightScheme, open_checkpoint
from wna16moe.config import ActivationFormat, MoEQuantConfig
from wna16moe.device import MARLIN_LIBRARY_ENV, DeviceInfo, Platform, find_marlin_library
from wna16moe.errors import BackendError, InvalidInputError
from wna16moe.experts import marlin
from wna16moe.experts.base import Experts, LayerSpec, batched_pairs, relative_error
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.marlin import (
    NO_PROVIDER,
    BatchedMarlinExperts,
    MarlinExperts,
    block_size_for,
    marlin_moe_forward,
    padded_w13_bias,
)
from wna16moe.experts.marlin_layout import (
    scalar_type_id,
    unpack_weight,
    unpack_zero_points,
    unpermute_scales,
    weight_type,
)
from wna16moe.kernels.moe_align import align_workspace
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import Backend, explain, select_backend
from wna16moe.routing import softmax_topk
from wna16moe.shapes import model_shape

DATA = Path(__file__).parent / "data"
TINY = MoEConfig(8, 2, 256, 128)
HAS_PROVIDER = HAS_CUDA and find_marlin_library() is not None
NEEDS_PROVIDER = pytest.mark.skipif(not HAS_PROVIDER, reason=f"needs CUDA and a Marlin op provider ({NO_PROVIDER})")
# The glue tests run a stand-in op on CPU tensors; the glue's alignment is a Triton kernel, which takes CPU tensors
# only through the interpreter (set where there is no CUDA). On a GPU machine the gpu tests run the real op.
CPU_GLUE = pytest.mark.skipif(HAS_CUDA, reason="CPU tensors through the Triton alignment: interpreter only")


def _spec(shape: str | MoEConfig, scheme: str, *, tp: int = 1, ep: int = 1, batched: bool = False,
          **changes: object) -> LayerSpec:
    base = shape if isinstance(shape, MoEConfig) else model_shape(shape).moe_config()
    return LayerSpec(replace(base, **changes), WeightScheme.from_name(scheme), ParallelConfig(tp_size=tp, ep_size=ep),
                     ActivationFormat.BATCHED if batched else ActivationFormat.STANDARD)


def _marlin_failures(layer: LayerSpec, device: DeviceInfo) -> dict[str, str]:
    report = explain(layer, device=device)
    (candidate,) = [c for c in report.candidates if c.backend == Backend.MARLIN]
    return dict(candidate.failed)


# ----- oracle decisions on simulated devices ---------------------------------------------------------------

CHOSEN = [
    # device, layer -- MARLIN wins (first on sm_75..89 and SM10x after FlashInfer; on sm_90 TRITON is first):
    # every scheme, group size and activation the kernel takes
    ("a100", _spec("mixtral", "int4_g128_sym")),
    ("a100", _spec("qwen3-30b-a3b", "int4_g128_zp")),
    ("a100", _spec("deepseek-v3", "int8_g128_sym")),
    ("a100", _spec(TINY, "int4_ch_sym")),
    ("a100", _spec(TINY, "int4_ch_zp", dtype=torch.float16)),
    ("a100", _spec(TINY, "int8_ch_sym", activation=Activation.GELU_TANH)),
    ("a100", _spec("kimi-k2", "int4_g32_sym")),
    ("l40s", _spec(MoEConfig(32, 4, 2944, 2912, Activation.SWIGLU_OAI), "int4_g32_sym")),  # I padded 2912 -> 2944
    ("a100", _spec(MoEConfig(8, 2, 1024, 704), "int4_g32_sym", tp=2)),  # I/tp=352 padded to 384
    ("t4", _spec("mixtral", "int4_g128_sym", dtype=torch.float16)),
    ("b200", _spec("kimi-k2", "int4_g128_sym")),  # FlashInfer reads g32 only
    ("rtx5090", _spec("qwen3-30b-a3b", "int4_g32_sym")),
]


@pytest.mark.parametrize(("device", "layer"), CHOSEN,
                         ids=[f"{d}-{s.scheme.name}-H{s.moe.hidden_size}" for d, s in CHOSEN])
def test_marlin_is_chosen(device: str, layer: LayerSpec) -> None:
    report = explain(layer, device=DeviceInfo.named(device))
    assert report.chosen is not None and report.chosen.backend == Backend.MARLIN, report.table()
    assert select_backend(layer, device=DeviceInfo.named(device)).kernel is MarlinExperts


REJECTED = [
    # device, layer, {check: text in its reason}
    ("h100-bare", _spec("mixtral", "int4_g128_sym"), {"device": NO_PROVIDER}),
    ("t4", _spec("mixtral", "int4_g128_sym"),
     {"device": "bfloat16 activations need sm_80+ (vLLM builds Marlin's sm_75 kernels for float16 only)"}),
    ("v100", _spec("mixtral", "int4_g128_sym", dtype=torch.float16),
     {"device": "needs compute capability sm_75 or newer, got sm_70"}),
    ("mi300x", _spec("mixtral", "int4_g128_sym"), {"device": "Marlin has no ROCm, XPU or CPU build"}),
    ("cpu", _spec(TINY, "int4_g32_sym"), {"device": "needs a CUDA device (sm_75+), got CPU (cpu)"}),
    ("h100", _spec(TINY, "int4_g32_sym_actorder"), {"scheme": "act-order (g_idx) is not supported"}),
    ("h100", _spec(TINY, "int8_g32_zp"), {"scheme": "int8 with zero points is not supported"}),
    ("h100", _spec("mixtral", "int4_g256_sym"),
     {"scheme": "group_size 256 is not supported; expected one of channel-wise, 32, 64, 128"}),
    ("h100", _spec(MoEConfig(32, 4, 2880, 2880), "int4_g32_sym"), {"shape": "H=2880 is not a multiple of 128"}),
    ("h100", _spec("qwen3-30b-a3b", "int4_g128_sym", tp=4),
     {"shape": "I/tp=192 is not a multiple of group_size 128"}),
    ("h100", _spec("mixtral", "int4_g128_sym", ep=2),
     {"parallel": "expert parallelism (ep_size=2) is not supported yet"}),
    ("h100", _spec("mixtral", "int4_g128_sym", batched=True),
     {"format": "needs the standard activation format, the layer uses batched"}),
    # every failing check is reported, not only the first
    ("v100", _spec(MoEConfig(8, 2, 200, 64), "int8_g64_zp"),
     {"device": "sm_70", "scheme": "int8 with zero points", "shape": "H=200"}),
]


@pytest.mark.parametrize(("device", "layer", "expected"), REJECTED,
                         ids=[f"{d}-{next(iter(e))}-{s.scheme.name}" for d, s, e in REJECTED])
def test_marlin_is_rejected_with_reasons(device: str, layer: LayerSpec, expected: dict[str, str]) -> None:
    failed = _marlin_failures(layer, DeviceInfo.named(device))
    assert set(failed) == set(expected), failed
    for check, text in expected.items():
        assert text in failed[check], (check, failed[check])


def test_no_provider_reason_is_exact() -> None:
    failed = _marlin_failures(_spec("mixtral", "int4_g128_sym"), DeviceInfo.named("h100-bare"))
    assert failed == {"device": "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)"}


def test_provider_without_triton() -> None:
    device = DeviceInfo(Platform.CUDA, "NVIDIA H100 80GB HBM3", (9, 0), packages=frozenset({"marlin"}))
    failed = _marlin_failures(_spec("mixtral", "int4_g128_sym"), device)
    assert failed == {"device": "Triton >= 3.6 is not installed (MARLIN aligns tokens with wna16moe's Triton kernel)"}


def test_batched_marlin_is_chosen_for_the_batched_format() -> None:
    # Implemented now: every check passes under EP in this format (local experts only, no expert map), on
    # sm_80+ with the provider; BATCHED_MARLIN precedes BATCHED_TRITON in PRIORITY.
    for shape, scheme, ep in (("mixtral", "int4_g128_sym", 2), ("qwen3-30b-a3b", "int4_g64_zp", 4),
                              ("deepseek-v3", "int8_g128_sym", 8)):
        layer = _spec(shape, scheme, batched=True, ep=ep)
        for device in ("h100", "a100", "h200"):
            assert BatchedMarlinExperts.failures(layer, DeviceInfo.named(device)) == [], (shape, device)
            report = explain(layer, device=DeviceInfo.named(device))
            assert report.chosen is not None and report.chosen.backend == Backend.BATCHED_MARLIN, report.table()
            assert report.chosen.reason == "first in priority order whose checks all pass"
            assert select_backend(layer, device=DeviceInfo.named(device)).kernel is BatchedMarlinExperts
    assert BatchedMarlinExperts.ACTIVATION_FORMAT == ActivationFormat.BATCHED
    # every activation MARLIN takes: the activation runs in torch on the flattened rows, no masking needed
    gelu = _spec("mixtral", "int4_g128_sym", batched=True, activation=Activation.GELU)
    assert select_backend(gelu, device=DeviceInfo.named("h100")).backend == Backend.BATCHED_MARLIN


@pytest.mark.parametrize(("device", "layer", "expected"), [
    ("h100-bare", _spec("mixtral", "int4_g128_sym", batched=True, ep=2), {"device": NO_PROVIDER}),
    ("mi300x", _spec("mixtral", "int4_g128_sym", batched=True), {"device": "Marlin has no ROCm, XPU or CPU build"}),
    ("t4", _spec("mixtral", "int4_g128_sym", batched=True), {"device": "bfloat16 activations need sm_80+"}),
    ("h100", _spec("mixtral", "int4_g128_sym"), {"format": "needs the batched activation format, the layer uses "
                                                           "standard"}),
    ("h100", _spec(TINY, "int4_g32_sym_actorder", batched=True), {"scheme": "act-order (g_idx) is not supported"}),
])
def test_batched_marlin_is_rejected_with_reasons(device: str, layer: LayerSpec, expected: dict[str, str]) -> None:
    failed = dict(BatchedMarlinExperts.failures(layer, DeviceInfo.named(device)))
    assert set(failed) == set(expected), failed
    for check, text in expected.items():
        assert text in failed[check], (check, failed[check])


@pytest.mark.parametrize(("tokens", "top_k", "experts", "block"), [
    (1, 8, 128, 8), (32, 2, 8, 16), (96, 2, 8, 32), (144, 2, 8, 48), (192, 2, 8, 64), (8192, 8, 128, 64)])
def test_block_size_rule(tokens: int, top_k: int, experts: int, block: int) -> None:
    # vLLM's rule: the first of 8, 16, 32, 48, 64 whose expected rows per expert fill it below 90%.
    assert block_size_for(tokens, top_k, experts) == block


# ----- provider discovery and loading ---------------------------------------------------------------------

def test_library_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / "libmarlin.so"
    monkeypatch.setenv(MARLIN_LIBRARY_ENV, str(library))
    assert find_marlin_library() is None  # named but missing
    library.write_bytes(b"")
    assert find_marlin_library() == str(library)


def test_library_inside_an_installed_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found without importing vllm: a package directory with the library file is enough.
    package = tmp_path / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('vllm must not be imported')\n")
    monkeypatch.delenv(MARLIN_LIBRARY_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_marlin_library() is None
    (package / "_moe_C_stable_libtorch.abi3.so").write_bytes(b"")
    assert find_marlin_library() == str(package / "_moe_C_stable_libtorch.abi3.so")


def _tiny_experts(scheme: str = "int4_g32_sym", e: int = 8, h: int = 256, i: int = 128,
                  device: torch.device | str = "cpu") -> QuantizedExperts:
    """Random float weights quantized by round-to-nearest (fresh each call)."""
    return QuantizedExperts.quantize(torch.randn(e, 2 * i, h, device=device) * 0.1,
                                     torch.randn(e, h, i, device=device) * 0.1, WeightScheme.from_name(scheme))


@pytest.mark.skipif(HAS_PROVIDER, reason="this machine has a provider")
def test_building_without_a_provider_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MARLIN_LIBRARY_ENV, raising=False)
    monkeypatch.setattr(marlin, "find_marlin_library", lambda: None)
    experts = _tiny_experts()
    with pytest.raises(BackendError, match=r"^no Marlin op provider found \(install vllm or set "
                                           r"WNA16MOE_MARLIN_LIB\)$"):
        MarlinExperts(LayerSpec(TINY, experts.scheme), experts.quant_config(), torch.device("cuda"))


@pytest.mark.skipif(HAS_PROVIDER, reason="this machine has a provider")
def test_a_library_that_does_not_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "_moe_C_stable_libtorch.abi3.so"
    junk.write_text("not a shared object")
    monkeypatch.setenv(MARLIN_LIBRARY_ENV, str(junk))
    experts = _tiny_experts()
    with pytest.raises(BackendError, match=f"the Marlin op library {junk} does not load: .*torch >= 2.11"):
        MarlinExperts(LayerSpec(TINY, experts.scheme), experts.quant_config(), torch.device("cuda"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_forcing_marlin_here_names_the_device_check() -> None:
    with pytest.raises(BackendError, match="MarlinExperts: device: needs a CUDA device"):
        WNA16MoE(_tiny_experts(), TINY, device="cpu", backend="marlin")


# ----- the forward's glue on CPU, through a float32 stand-in for the op -------------------------------------

# vLLM 0.33 scalar_types.<name>.id -> (bits, zero points).
TYPE_IDS = {1125899907892224: (4, False), 1125899906843648: (4, True), 1125899923621888: (8, False)}


def reference_marlin_gemm(a: torch.Tensor, c: torch.Tensor, b_q_weight: torch.Tensor, b_bias: torch.Tensor | None,
                          b_scales: torch.Tensor, a_scales: torch.Tensor | None, global_scale: torch.Tensor | None,
                          b_zeros: torch.Tensor | None, workspace: torch.Tensor, sorted_ids: torch.Tensor,
                          expert_ids: torch.Tensor, num_padded: torch.Tensor, topk_weights: torch.Tensor,
                          block: int, top_k: int, mul_topk_weights: bool, type_id: int, size_m: int, size_n: int,
                          size_k: int, use_atomic_add: bool, use_fp32_reduce: bool, is_zp_float: bool,
                          thread_k: int, thread_n: int, blocks_per_sm: int) -> torch.Tensor:
    """moe_wna16_marlin_gemm as vLLM's fused_marlin_moe uses it, in float32: for each valid row r
    (r < size_m * top_k) of each used block, c[r] = a[r // top_k] @ W[expert]^T, times topk_weights.flat[r]
    when mul_topk_weights; W decoded from the Marlin layout by the inverse converters. Checks the arguments
    the way the op does (ops.cu)."""
    bits, zero_point = TYPE_IDS[type_id]
    assert a.shape == (size_m, size_k) and a.is_contiguous() and a.dtype in (torch.bfloat16, torch.float16)
    assert c.shape == (size_m * top_k, size_n) and c.dtype == a.dtype
    assert b_q_weight.shape[1] * 16 == size_k and b_q_weight.shape[2] // 16 * (32 // bits) == size_n
    assert b_scales.dtype == a.dtype and b_scales.shape[2] == size_n and size_k % b_scales.shape[1] == 0
    assert (b_zeros is not None) == zero_point and b_bias is None and a_scales is None and global_scale is None
    assert workspace.dtype == torch.int32 and topk_weights.dtype == torch.float32 and block in marlin.BLOCK_SIZES
    assert (use_atomic_add, use_fp32_reduce, is_zp_float, thread_k, thread_n, blocks_per_sm) == (
        False, True, False, -1, -1, -1)
    group = size_k // b_scales.shape[1]
    decoded: dict[int, torch.Tensor] = {}
    for blk in range(int(num_padded) // block):
        expert = int(expert_ids[blk])
        if expert not in decoded:
            codes = unpack_weight(b_q_weight[expert], bits, size_n, size_k).float()
            scales = unpermute_scales(b_scales[expert]).float().repeat_interleave(group, dim=1)
            zeros = (unpack_zero_points(b_zeros[expert], bits, size_n).float().repeat_interleave(group, dim=1)
                     if zero_point else 2.0 ** (bits - 1))
            decoded[expert] = (codes - zeros) * scales
        for row in sorted_ids[blk * block:(blk + 1) * block].tolist():
            if row < size_m * top_k:
                out = a[row // top_k].float() @ decoded[expert].t()
                c[row] = out * topk_weights.reshape(-1)[row] if mul_topk_weights else out
    return c


BF16, FP16 = torch.bfloat16, torch.float16
GLUE_CASES = [
    # scheme, activation, E, H, I, T, top-k, bias, clamp, dtype, block sizes -- what it exercises
    ("int4_g32_sym", Activation.SILU, 4, 128, 96, 5, 2, False, None, BF16, (8, 64)),  # I padded 96 -> 128 per half
    ("int4_g128_zp", Activation.GELU, 4, 256, 128, 3, 2, True, None, FP16, (8,)),     # zero points, biases
    ("int4_ch_sym", Activation.SWIGLU_OAI, 3, 128, 40, 6, 3, True, 7.0, BF16, (16,)), # channel-wise, 40 -> 64
    ("int8_g64_sym", Activation.GELU_TANH, 4, 128, 64, 1, 4, False, None, FP16, (8,)),  # int8, T = 1, top-k = E
    ("int4_g64_sym", Activation.SILU, 6, 128, 64, 9, 1, True, 0.5, FP16, (48,)),   # top-k 1, SiLU clamp
]


@CPU_GLUE
@pytest.mark.parametrize(("scheme", "act", "e", "h", "i", "t", "k", "bias", "clamp", "dtype", "blocks"), GLUE_CASES,
                         ids=[c[0] for c in GLUE_CASES])
def test_forward_glue_against_emulation(scheme: str, act: Activation, e: int, h: int, i: int, t: int, k: int,
                                        bias: bool, clamp: float | None, dtype: torch.dtype,
                                        blocks: tuple[int, ...]) -> None:
    # Alignment, padding, per-half biases, activation, router weights and the top-k sum, with the op replaced
    # by the stand-in above: everything MARLIN does around the kernel, against EMULATION.
    experts = _tiny_experts(scheme, e, h, i)
    biases = dict(w1_bias=torch.randn(e, 2 * i), w2_bias=torch.randn(e, h)) if bias else {}
    quant = experts.quant_config(gemm1_clamp_limit=clamp, **biases)
    spec = LayerSpec(MoEConfig(e, k, h, i, activation=act, dtype=dtype), experts.scheme, has_bias=bias,
                     clamp_limit=clamp)
    x = torch.randn(t, h, dtype=dtype)
    tw, ids = softmax_topk(torch.randn(t, e), k, renormalize=True)
    ref = EmulationExperts(spec, quant, torch.device("cpu")).apply(x, tw, ids,
                                                                   EmulationExperts.prepare_weights(experts, "cpu"))
    w13_bias = padded_w13_bias(biases["w1_bias"], experts.scheme.group_size) if bias else None
    weights = MarlinExperts.prepare_weights(experts, torch.device("cpu"))
    type_id = scalar_type_id(weight_type(experts.scheme))
    for block in blocks:
        out = marlin_moe_forward(reference_marlin_gemm, torch.zeros(4, dtype=torch.int32), type_id, x, tw, ids, weights,
                                 block, act, quant, w13_bias, None if not bias else biases["w2_bias"])
        assert out.dtype == dtype and out.shape == (t, h)
        assert relative_error(out, ref) < 1e-2, block


def test_forward_rejects_a_block_size_the_op_does_not_take() -> None:
    experts = _tiny_experts("int4_g64_sym", 2, 128, 64)
    weights = MarlinExperts.prepare_weights(experts, torch.device("cpu"))
    with pytest.raises(InvalidInputError, match=r"block_size=24 is not one the Marlin op takes"):
        marlin_moe_forward(reference_marlin_gemm, torch.zeros(4, dtype=torch.int32), 0, torch.zeros(1, 128),
                           torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), weights, 24, Activation.SILU,
                           experts.quant_config(), None, None)


@CPU_GLUE
def test_forward_glue_skips_left_out_pairs() -> None:
    # skip_negative: -1 pairs (left out by the alignment, as under an expert map) add exactly 0, biases included;
    # a token with no pair left gets 0. EMULATION skips -1 pairs too.
    e, h, i, t, k = 4, 128, 64, 7, 3
    experts = _tiny_experts("int4_g64_zp", e, h, i)
    biases = dict(w1_bias=torch.randn(e, 2 * i), w2_bias=torch.randn(e, h))
    quant = experts.quant_config(**biases)
    spec = LayerSpec(MoEConfig(e, k, h, i, dtype=FP16), experts.scheme, has_bias=True)
    x = torch.randn(t, h, dtype=FP16)
    tw, ids = softmax_topk(torch.randn(t, e), k, renormalize=True)
    ids[torch.rand(t, k) < 0.4] = -1
    ids[2] = -1
    ref = EmulationExperts(spec, quant, torch.device("cpu")).apply(x, tw, ids,
                                                                   EmulationExperts.prepare_weights(experts, "cpu"))
    out = marlin_moe_forward(reference_marlin_gemm, torch.zeros(4, dtype=torch.int32),
                             scalar_type_id(weight_type(experts.scheme)), x, tw, ids,
                             MarlinExperts.prepare_weights(experts, torch.device("cpu")), 8, Activation.SILU, quant,
                             padded_w13_bias(biases["w1_bias"], experts.scheme.group_size), biases["w2_bias"],
                             skip_negative=True)
    assert torch.equal(out[2], torch.zeros(h, dtype=FP16))
    assert relative_error(out, ref) < 1e-2


def _cpu_kernel(cls: type[MarlinExperts], spec: LayerSpec, quant: MoEQuantConfig) -> MarlinExperts:
    """`cls` built on the CPU around the stand-in op: the attributes `MarlinExperts.__init__` sets, without
    CUDA, a provider or the warm-up (the base __init__ still refuses a declared-only class)."""
    kernel = cls.__new__(cls)
    Experts.__init__(kernel, spec, quant, torch.device("cpu"))
    kernel.gemm_op = reference_marlin_gemm
    kernel.workspace = torch.zeros(4, dtype=torch.int32)
    kernel.align_work = align_workspace(spec.moe.num_experts, torch.device("cpu"))  # (the glue tests pass all E)
    kernel.type_name = weight_type(spec.scheme)
    kernel.type_id = scalar_type_id(kernel.type_name)
    kernel.w13_bias = None if quant.w1_bias is None else padded_w13_bias(quant.w1_bias, spec.scheme.group_size)
    kernel.w2_bias = None if quant.w2_bias is None else quant.w2_bias.float().contiguous()
    return kernel


def _poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every floating-point torch.empty NaN-filled (until the monkeypatch context ends): a buffer row the
    op never writes then shows up instead of passing as the zeros fresh CPU memory often holds."""
    real = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[call-overload]
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


BATCHED_GLUE_CASES = [
    # scheme, activation, E_local, H, I, max_tokens, num_tokens, bias, clamp, dtype, block sizes (None: vLLM's rule)
    ("int4_g32_sym", Activation.SILU, 4, 128, 96, 5, (3, 0, 5, 1), False, None, BF16, (None, 8, 64)),  # expert 2 full
    ("int4_g128_zp", Activation.GELU, 3, 256, 128, 7, (0, 7, 2), True, None, FP16, (None, 16)),  # zero points, biases
    ("int8_g64_sym", Activation.SWIGLU_OAI, 5, 128, 64, 4, (1, 1, 0, 4, 2), True, 7.0, BF16, (None, 32)),  # int8
    ("int4_ch_sym", Activation.GELU_TANH, 2, 128, 40, 6, (6, 0), False, None, FP16, (None, 48)),  # channel-wise
    ("int4_g64_sym", Activation.SILU, 6, 128, 64, 3, (0, 0, 2, 0, 3, 0), True, 0.5, FP16, (None,)),  # mostly empty
    ("int4_g32_zp", Activation.SILU, 3, 128, 64, 1, (0, 1, 0), False, None, BF16, (None,)),  # one token in all
]


@CPU_GLUE
@pytest.mark.parametrize(("scheme", "act", "e", "h", "i", "m", "counts", "bias", "clamp", "dtype", "blocks"),
                         BATCHED_GLUE_CASES, ids=[f"{c[0]}-{c[1].value}" for c in BATCHED_GLUE_CASES])
def test_batched_apply_glue_against_emulation(monkeypatch: pytest.MonkeyPatch, scheme: str, act: Activation, e: int,
                                              h: int, i: int, m: int, counts: tuple[int, ...], bias: bool,
                                              clamp: float | None, dtype: torch.dtype,
                                              blocks: tuple[int | None, ...]) -> None:
    # BatchedMarlinExperts.apply_batched with the op replaced by the stand-in: each valid row through its expert
    # (unweighted, biases included) as EMULATION computes it; padding rows exactly 0 although their input rows
    # are NaN and every buffer the forward allocates with torch.empty starts as NaN.
    experts = _tiny_experts(scheme, e, h, i)
    biases = dict(w1_bias=torch.randn(e, 2 * i), w2_bias=torch.randn(e, h)) if bias else {}
    quant = experts.quant_config(gemm1_clamp_limit=clamp, **biases)
    moe = MoEConfig(e, 2, h, i, activation=act, dtype=dtype)
    num_tokens = torch.tensor(counts, dtype=torch.int32)
    x = torch.full((e, m, h), float("nan"), dtype=dtype)  # rows past num_tokens are garbage
    for expert, n in enumerate(counts):
        x[expert, :n] = torch.randn(n, h, dtype=dtype)
    rows = torch.cat([x[expert, :n] for expert, n in enumerate(counts)])
    row_ids = torch.cat([torch.full((n, 1), expert, dtype=torch.int32) for expert, n in enumerate(counts)])
    emulation = EmulationExperts(LayerSpec(moe, experts.scheme, has_bias=bias, clamp_limit=clamp), quant,
                                 torch.device("cpu"))
    ref = emulation.apply(rows, torch.ones(rows.shape[0], 1), row_ids,
                          EmulationExperts.prepare_weights(experts, "cpu"))
    spec = LayerSpec(moe, experts.scheme, ParallelConfig(ep_size=2, batched=True), has_bias=bias, clamp_limit=clamp)
    kernel = _cpu_kernel(BatchedMarlinExperts, spec, quant)
    weights = BatchedMarlinExperts.prepare_weights(experts, torch.device("cpu"))
    for block in blocks:
        with monkeypatch.context() as patch:
            _poisoned_empty(patch)
            out = kernel.apply_batched(x, num_tokens, weights, block_size=block)
        assert out.dtype == dtype and out.shape == (e, m, h)
        for expert, n in enumerate(counts):
            assert torch.equal(out[expert, n:], torch.zeros(m - n, h, dtype=dtype)), (block, expert)
        valid = torch.cat([out[expert, :n] for expert, n in enumerate(counts)])
        assert relative_error(valid, ref) < 1e-2, block


@CPU_GLUE
def test_batched_padding_needs_the_zeroed_output() -> None:
    # The poisoning above catches what skip_negative fixes: without it, GEMM2 leaves the rows of the left-out
    # (padding) pairs unwritten, and they come out as whatever torch.empty held.
    e, h, i, m = 3, 128, 64, 4
    experts = _tiny_experts("int4_g64_sym", e, h, i)
    ids, ones = batched_pairs(torch.tensor([2, 0, 4], dtype=torch.int32), m, torch.device("cpu"))
    assert ids.view(e, m).tolist() == [[0, 0, -1, -1], [-1, -1, -1, -1], [2, 2, 2, 2]]
    x = torch.randn(e * m, h, dtype=FP16)
    weights = MarlinExperts.prepare_weights(experts, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        _poisoned_empty(patch)
        for skip in (False, True):
            out = marlin_moe_forward(reference_marlin_gemm, torch.zeros(4, dtype=torch.int32),
                                     scalar_type_id(weight_type(experts.scheme)), x, ones, ids, weights, 8,
                                     Activation.SILU, experts.quant_config(), None, None,
                                     skip_negative=skip).view(e, m, h)
            padding = torch.cat([out[0, 2:], out[1]])
            assert torch.isfinite(out[0, :2]).all() and torch.isfinite(out[2]).all()
            assert (torch.equal(padding, torch.zeros_like(padding)) if skip else torch.isnan(padding).all())


# ----- GPU: the kernel against EMULATION --------------------------------------------------------------------

GPU_SHAPES = [
    # name, E, top-k, H, I, scheme
    ("qwen3-30b-a3b int4 g128 sym", 128, 8, 2048, 768, "int4_g128_sym"),
    ("qwen3-30b-a3b int4 g128 zp", 128, 8, 2048, 768, "int4_g128_zp"),
    ("kimi-k2 (E=16) int4 g32 sym", 16, 8, 7168, 2048, "int4_g32_sym"),
    ("deepseek-v3 (E=16) int8 g128", 16, 8, 7168, 2048, "int8_g128_sym"),
    ("mixtral (E=8) int4 channel-wise", 8, 2, 4096, 14336, "int4_ch_sym"),
    ("I padded 352 -> 384, int4 g32 sym", 16, 4, 1024, 352, "int4_g32_sym"),
    ("I padded 352 -> 384, int4 g32 zp", 16, 4, 1024, 352, "int4_g32_zp"),
]
GPU_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)


@pytest.mark.gpu
@NEEDS_PROVIDER
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("name", "e", "k", "h", "i", "scheme"), GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_marlin_matches_emulation(name: str, e: int, k: int, h: int, i: int, scheme: str,
                                      dtype: torch.dtype) -> None:
    experts = _tiny_experts(scheme, e, h, i, DEVICE)  # bf16 scales: fp16 runs convert them per forward
    weights = MarlinExperts.prepare_weights(experts, DEVICE)
    emu_weights = EmulationExperts.prepare_weights(experts, DEVICE)
    spec = LayerSpec(MoEConfig(e, k, h, i, dtype=dtype), experts.scheme)
    kernel = MarlinExperts(spec, experts.quant_config(), DEVICE)
    emulation = EmulationExperts(spec, experts.quant_config(), DEVICE)
    for t in GPU_TOKENS:
        x = torch.randn(t, h, dtype=dtype, device=DEVICE)
        tw, ids = _routing(t, e, k)
        out = kernel.apply(x, tw, ids, weights)
        assert out.dtype == dtype and out.shape == (t, h) and torch.isfinite(out).all()
        assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2, (name, dtype, t)
        x2 = torch.randn(t, h, dtype=dtype, device=DEVICE)
        tw2, ids2 = _routing(t, e, k)
        captured = replay_on_fresh_inputs(kernel.apply, (x, tw, ids), (x2, tw2, ids2), weights)
        expected = emulation.apply(x2, tw2, ids2, emu_weights)
        assert relative_error(captured, expected) < 1e-2, (name, dtype, t, "graph")


@pytest.mark.gpu
@NEEDS_PROVIDER
@pytest.mark.parametrize("block", marlin.BLOCK_SIZES)
def test_gpu_every_block_size(block: int) -> None:
    e, k, h, i, t = 16, 4, 1024, 512, 40
    experts = _tiny_experts("int4_g64_zp", e, h, i, DEVICE)
    spec = LayerSpec(MoEConfig(e, k, h, i, dtype=torch.bfloat16), experts.scheme)
    kernel = MarlinExperts(spec, experts.quant_config(), DEVICE)
    x = torch.randn(t, h, dtype=torch.bfloat16, device=DEVICE)
    tw, ids = _routing(t, e, k)
    ref = EmulationExperts(spec, experts.quant_config(), DEVICE).apply(x, tw, ids,
                                                                 EmulationExperts.prepare_weights(experts, DEVICE))
    out = kernel.apply(x, tw, ids, MarlinExperts.prepare_weights(experts, DEVICE), block_size=block)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@NEEDS_PROVIDER
@pytest.mark.parametrize(("activation", "clamp"), [(Activation.SILU, 0.5), (Activation.GELU, None),
                                                   (Activation.GELU_TANH, None), (Activation.SWIGLU_OAI, 7.0)])
def test_gpu_bias_and_activations(activation: Activation, clamp: float | None) -> None:
    e, k, h, i, t = 8, 2, 512, 160, 33  # I padded 160 -> 192: the w13 bias is padded per half too
    experts = _tiny_experts("int4_g32_sym", e, h, i, DEVICE)
    quant = experts.quant_config(w1_bias=torch.randn(e, 2 * i, device=DEVICE), w2_bias=torch.randn(e, h, device=DEVICE),
                   gemm1_clamp_limit=clamp)
    spec = LayerSpec(MoEConfig(e, k, h, i, activation=activation, dtype=torch.float16), experts.scheme,
                     has_bias=True, clamp_limit=clamp)
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    tw, ids = _routing(t, e, k)
    ref = EmulationExperts(spec, quant, DEVICE).apply(x, tw, ids, EmulationExperts.prepare_weights(experts, DEVICE))
    out = MarlinExperts(spec, quant, DEVICE).apply(x, tw, ids, MarlinExperts.prepare_weights(experts, DEVICE))
    assert relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@NEEDS_PROVIDER
@pytest.mark.parametrize("fixture", ["qwen3moe-w4a16-g32-sym", "qwen3moe-w4a16-g128-asym", "qwen3moe-w8a16-g128-sym",
                                     "qwen3moe-awq-gemm-w4-g32"])
def test_gpu_layer_on_fixtures(fixture: str) -> None:
    ckpt = open_checkpoint(DATA / fixture)
    experts = ckpt.load_layer(1)
    cfg = replace(ckpt.moe_config(), dtype=torch.bfloat16)
    ref = WNA16MoE(experts, cfg, device=DEVICE, backend="emulation")
    # forced: on Hopper the oracle prefers TRITON by the shipped measurements (test_oracle.py)
    layer = WNA16MoE(experts, cfg, device=DEVICE, backend="marlin")
    assert layer.backend == Backend.MARLIN
    x = torch.randn(9, cfg.hidden_size, dtype=torch.bfloat16, device=DEVICE)
    logits = x.float() @ ckpt.router_weight(1).float().to(DEVICE).t()
    assert relative_error(layer(x, logits), ref(x, logits)) < 1e-2


@pytest.mark.gpu
@NEEDS_PROVIDER
def test_gpu_warm_up_is_logged_once_per_scheme(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(marlin, "_warmed", set())
    experts = _tiny_experts("int8_g128_sym", device=DEVICE)
    spec = LayerSpec(replace(TINY, dtype=torch.float16), experts.scheme)
    with caplog.at_level(logging.INFO, logger="wna16moe"):
        MarlinExperts(spec, experts.quant_config(), DEVICE)
        MarlinExperts(spec, experts.quant_config(), DEVICE)
    messages = [r.getMessage() for r in caplog.records if "warming up the Marlin MoE kernels" in r.getMessage()]
    assert len(messages) == 1 and "int8_g128_sym (uint8b128, float16)" in messages[0]
    assert "CUDA_CACHE_MAXSIZE" in messages[0]


# vLLM-sized local expert counts under EP, with uneven per-expert token counts: empty experts, one full
# (max_tokens), and decode-sized to prefill-sized buffers.
GPU_BATCHED_SHAPES = [
    # name, E_local, H, I, scheme
    ("qwen3-30b-a3b EP=8 (E_local=16) int4 g128 sym", 16, 2048, 768, "int4_g128_sym"),
    ("kimi-k2 EP=16 (E_local=24) int4 g32 sym", 24, 7168, 2048, "int4_g32_sym"),
    ("deepseek-v3 EP=16 (E_local=16) int8 g128", 16, 7168, 2048, "int8_g128_sym"),
    ("I padded 352 -> 384, int4 g32 zp", 8, 1024, 352, "int4_g32_zp"),
]
GPU_MAX_TOKENS = (1, 7, 64, 512)


def _uneven_counts(e: int, m: int) -> torch.Tensor:
    """num_tokens [e] int32 in [0, m]: expert 0 empty, expert 1 full, the rest random."""
    counts = torch.randint(0, m + 1, (e,), dtype=torch.int32)
    counts[0], counts[1] = 0, m
    return counts


@pytest.mark.gpu
@NEEDS_PROVIDER
@pytest.mark.parametrize(("name", "e", "h", "i", "scheme"), GPU_BATCHED_SHAPES, ids=[s[0] for s in GPU_BATCHED_SHAPES])
def test_gpu_batched_marlin_matches_emulation(name: str, e: int, h: int, i: int, scheme: str) -> None:
    experts = _tiny_experts(scheme, e, h, i, DEVICE)
    weights = BatchedMarlinExperts.prepare_weights(experts, DEVICE)
    emu_weights = EmulationExperts.prepare_weights(experts, DEVICE)
    for dtype in (torch.bfloat16, torch.float16):
        moe = MoEConfig(e, 2, h, i, dtype=dtype)
        kernel = BatchedMarlinExperts(LayerSpec(moe, experts.scheme, ParallelConfig(batched=True)),
                                      experts.quant_config(), DEVICE)
        emulation = EmulationExperts(LayerSpec(moe, experts.scheme), experts.quant_config(), DEVICE)
        for m in GPU_MAX_TOKENS:
            counts = _uneven_counts(e, m)
            x = torch.full((e, m, h), float("nan"), dtype=dtype, device=DEVICE)  # padding rows are garbage
            for expert, n in enumerate(counts.tolist()):
                x[expert, :n] = torch.randn(n, h, dtype=dtype, device=DEVICE)
            out = kernel.apply_batched(x, counts.to(DEVICE), weights)
            assert out.dtype == dtype and out.shape == (e, m, h)
            rows = torch.cat([x[expert, :n] for expert, n in enumerate(counts.tolist())])
            ids = torch.cat([torch.full((n, 1), expert, dtype=torch.int32, device=DEVICE)
                             for expert, n in enumerate(counts.tolist())])
            ref = emulation.apply(rows, torch.ones(rows.shape[0], 1, device=DEVICE), ids, emu_weights)
            for expert, n in enumerate(counts.tolist()):
                assert torch.equal(out[expert, n:], torch.zeros_like(out[expert, n:])), (name, dtype, m, expert)
            valid = torch.cat([out[expert, :n] for expert, n in enumerate(counts.tolist())])
            assert torch.isfinite(valid).all() and relative_error(valid, ref) < 1e-2, (name, dtype, m)


@pytest.mark.gpu
@NEEDS_PROVIDER
def test_gpu_batched_marlin_with_biases() -> None:
    e, h, i, m = 8, 512, 160, 9  # I padded 160 -> 192
    experts = _tiny_experts("int4_g32_sym", e, h, i, DEVICE)
    quant = experts.quant_config(w1_bias=torch.randn(e, 2 * i, device=DEVICE), w2_bias=torch.randn(e, h, device=DEVICE),
                   gemm1_clamp_limit=7.0)
    moe = MoEConfig(e, 2, h, i, activation=Activation.SWIGLU_OAI, dtype=torch.bfloat16)
    kernel = BatchedMarlinExperts(LayerSpec(moe, experts.scheme, ParallelConfig(batched=True), has_bias=True,
                                            clamp_limit=7.0), quant, DEVICE)
    counts = _uneven_counts(e, m)
    x = torch.full((e, m, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    for expert, n in enumerate(counts.tolist()):
        x[expert, :n] = torch.randn(n, h, dtype=torch.bfloat16, device=DEVICE)
    out = kernel.apply_batched(x, counts.to(DEVICE), BatchedMarlinExperts.prepare_weights(experts, DEVICE))
    emulation = EmulationExperts(LayerSpec(moe, experts.scheme, has_bias=True, clamp_limit=7.0), quant, DEVICE)
    emu_weights = EmulationExperts.prepare_weights(experts, DEVICE)
    for expert, n in enumerate(counts.tolist()):
        assert torch.equal(out[expert, n:], torch.zeros_like(out[expert, n:]))
        if n:
            ids = torch.full((n, 1), expert, dtype=torch.int32, device=DEVICE)
            ref = emulation.apply(x[expert, :n], torch.ones(n, 1, device=DEVICE), ids, emu_weights)
            assert relative_error(out[expert, :n], ref) < 1e-2, expert


@pytest.mark.gpu
@NEEDS_PROVIDER
def test_gpu_single_rank_batched_layer_picks_batched_marlin() -> None:
    # ParallelConfig(batched=True) on one rank: Batched(NoParallel) around the oracle's choice, BATCHED_MARLIN.
    ckpt = open_checkpoint(DATA / "qwen3moe-w4a16-g32-sym")
    experts = ckpt.load_layer(1)
    cfg = replace(ckpt.moe_config(), dtype=torch.bfloat16)
    layer = WNA16MoE(experts, cfg, device=DEVICE, parallel=ParallelConfig(batched=True))
    assert layer.backend == Backend.BATCHED_MARLIN
    reference = WNA16MoE(experts, cfg, device=DEVICE, backend="emulation")
    for t in (1, 9, 300):
        x = torch.randn(t, cfg.hidden_size, dtype=torch.bfloat16, device=DEVICE)
        logits = x.float() @ ckpt.router_weight(1).float().to(DEVICE).t()
        logits[: t // 2, 3] += 10.0  # skew: half the tokens pick expert 3 first
        assert relative_error(layer(x, logits), reference(x, logits)) < 1e-2, t
