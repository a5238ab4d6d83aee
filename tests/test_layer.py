"""WNA16MoE: forward against a float64 einsum over independently dequantized weights, weight refresh and
input validation."""

from __future__ import annotations

from collections.abc import Callable
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
    deepseek_config,
    dequantize_ref,
    random_experts,
    write_checkpoint,
)
from reference import (
    Routing,
    gelu_and_mul_ref,
    grouped_topk_ref,
    moe_forward_ref,
    sigmoid_topk_ref,
    silu_and_mul_ref,
    softmax_topk_ref,
    swiglu_oai_ref,
    unambiguous_logits,
)

from wna16moe import (
    Activation,
    InvalidInputError,
    MoEConfig,
    RoutingConfig,
    RoutingMethod,
    WeightScheme,
    open_checkpoint,
    oracle,
)
from wna16moe.errors import BackendError, UnsupportedError
from wna16moe.experts.cpu import CPUExperts
from wna16moe.formats import CheckpointFormat, quantization_config, write_experts
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import BACKEND_ENV, Backend
from wna16moe.quantized import QuantizedExperts

E, K, H, I = 8, 2, 64, 32  # noqa: E741 (I is the intermediate size)
# rtol of one rounding to the output dtype (plus float32 accumulation), atol relative to the output's scale.
RTOL = {torch.bfloat16: 2**-8, torch.float16: 2**-10}

ACTIVATION_REFS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.SILU: silu_and_mul_ref,
    Activation.GELU: gelu_and_mul_ref,
    Activation.GELU_TANH: partial(gelu_and_mul_ref, approximate="tanh"),
    Activation.SWIGLU_OAI: swiglu_oai_ref,  # gpt-oss defaults: alpha 1.702, beta 1, limit 7
}


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold the layer to one bf16 rounding of the float64 reference, which only the float32
    EMULATION backend meets; the CPU backend (bf16 GEMMs) is held to its own tolerance in test_experts_cpu.py."""
    monkeypatch.setenv(BACKEND_ENV, "emulation")


def reference_output(experts: QuantizedExperts, x: torch.Tensor, routing: Routing,
                     activation: Callable[[torch.Tensor], torch.Tensor], w13_bias: torch.Tensor | None = None,
                     w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    weights, ids, _ = routing
    return moe_forward_ref(x, dequantize_ref(experts.w13), dequantize_ref(experts.w2), weights, ids, activation,
                           w13_bias, w2_bias)


def assert_output(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    assert float(want.abs().max()) > 0.01  # a real signal, not zeros (T = 1 outputs reach ~0.05 in 1 of 300 draws)
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=1e-3 * float(want.abs().max()))


def softmax_routing(renormalize: bool = True) -> Callable[[torch.Tensor], Routing]:
    return lambda logits: softmax_topk_ref(logits, K, renormalize)


# ----- forward against the float64 reference ------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(Activation))  # SiLU, GELU exact and tanh, gpt-oss SwiGLU
@pytest.mark.parametrize("t", [1, 5, 64])  # decode (T=1), a few tokens, a batch where every expert is hit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward(dtype: torch.dtype, t: int, activation: Activation) -> None:
    experts = random_experts(WeightScheme(4, 16, zero_point=True), E, H, I)
    config = MoEConfig(E, K, H, I, activation, RoutingConfig(renormalize=True), dtype)
    layer = WNA16MoE(experts, config, device="cpu")
    x = torch.randn(t, H).to(dtype)
    logits = unambiguous_logits(t, E, softmax_routing())
    want = reference_output(experts, x, softmax_topk_ref(logits, K, True), ACTIVATION_REFS[activation])
    assert_output(layer(x, logits), want, dtype)


@pytest.mark.parametrize(
    "name",
    [
        "int4_g32_sym",  # uint4b8
        "int8_ch_sym",  # int8 channel-wise
        "int8_g16_zp",  # int8 zero points up to 255
        "int4_g16_sym_actorder",  # act-order g_idx
        "int4_ch_zp",  # one zero point per row
    ],
)
def test_forward_schemes(name: str) -> None:
    experts = random_experts(WeightScheme.from_name(name, torch.float16), E, H, I)
    config = MoEConfig(E, K, H, I, routing=RoutingConfig(renormalize=False))
    layer = WNA16MoE(experts, config, device="cpu", backend="emulation")
    x = torch.randn(9, H).to(torch.bfloat16)
    logits = unambiguous_logits(9, E, softmax_routing(False))
    want = reference_output(experts, x, softmax_topk_ref(logits, K, False), silu_and_mul_ref)
    assert_output(layer(x, logits), want, torch.bfloat16)


@pytest.mark.parametrize(
    ("activation", "params", "activation_ref"),
    [
        (Activation.SILU, {}, silu_and_mul_ref),  # biases only
        (Activation.SILU, {"gemm1_clamp_limit": 0.3}, partial(silu_and_mul_ref, limit=0.3)),  # clamped SiLU
        (Activation.SWIGLU_OAI, {"gemm1_clamp_limit": 0.4, "gemm1_alpha": 1.5, "gemm1_beta": 0.5},
         partial(swiglu_oai_ref, alpha=1.5, beta=0.5, limit=0.4)),  # gpt-oss: biases, alpha, beta and limit
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_with_biases(dtype: torch.dtype, activation: Activation, params: dict,
                             activation_ref: Callable[[torch.Tensor], torch.Tensor]) -> None:
    experts = random_experts(WeightScheme(4, 32), E, H, I)
    w13_bias, w2_bias = torch.randn(E, 2 * I) * 0.5, torch.randn(E, H).to(dtype) * 0.5
    config = MoEConfig(E, K, H, I, activation, RoutingConfig(renormalize=True), dtype)
    layer = WNA16MoE(experts, config, device="cpu", w13_bias=w13_bias, w2_bias=w2_bias, **params)
    x = torch.randn(17, H).to(dtype)
    logits = unambiguous_logits(17, E, softmax_routing())
    want = reference_output(experts, x, softmax_topk_ref(logits, K, True), activation_ref, w13_bias, w2_bias)
    assert_output(layer(x, logits), want, dtype)
    # The biases matter: without them the reference is far off.
    without = reference_output(experts, x, softmax_topk_ref(logits, K, True), activation_ref)
    assert not torch.allclose(layer(x, logits).double(), without, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("t", [1, 24])
def test_forward_deepseek_routing(t: int) -> None:
    """DeepSeek-V3 routing with e_score_correction_bias, n_group, topk_group and routed_scaling_factor."""
    e, k = 16, 4
    routing = RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=4, topk_group=2,
                            routed_scaling_factor=2.5, has_correction_bias=True)
    experts = random_experts(WeightScheme(4, 32, zero_point=True), e, H, I)
    bias = torch.randn(e) * 0.3
    layer = WNA16MoE(experts, MoEConfig(e, k, H, I, routing=routing), device="cpu", correction_bias=bias)

    def ref(logits: torch.Tensor) -> Routing:
        return grouped_topk_ref(logits, k, 4, 2, bias, True, 2.5)

    x = torch.randn(t, H).to(torch.bfloat16)
    logits = unambiguous_logits(t, e, ref)
    assert_output(layer(x, logits), reference_output(experts, x, ref(logits), silu_and_mul_ref), torch.bfloat16)


def test_forward_sigmoid_routing() -> None:
    routing = RoutingConfig(RoutingMethod.SIGMOID)
    experts = random_experts(WeightScheme(8, 32), E, H, I)
    layer = WNA16MoE(experts, MoEConfig(E, 1, H, I, routing=routing), device="cpu")

    def ref(logits: torch.Tensor) -> Routing:
        return sigmoid_topk_ref(logits, 1, False)

    x = torch.randn(11, H).to(torch.bfloat16)
    logits = unambiguous_logits(11, E, ref)
    assert_output(layer(x, logits), reference_output(experts, x, ref(logits), silu_and_mul_ref), torch.bfloat16)


def test_empty_batch() -> None:
    layer = WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I), device="cpu")
    out = layer(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, E))
    assert out.shape == (0, H) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["emulation", "cpu"])
@pytest.mark.parametrize("grad_input", ["hidden_states", "router_logits"])
def test_backward_is_refused_by_name(backend: str, grad_input: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference only: a loss through the layer raises at backward instead of leaving its inputs without the
    layer's gradient (the CPU kernels' results came out detached); the forward is the plain one. Under no_grad
    nothing is recorded."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    layer = WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I), device="cpu")
    x = torch.randn(5, H).to(torch.bfloat16)
    logits = torch.randn(5, E)
    with torch.no_grad():
        plain = layer(x, logits)
    inputs = {"hidden_states": x.clone(), "router_logits": logits.clone()}
    inputs[grad_input].requires_grad_()
    out = layer(inputs["hidden_states"], inputs["router_logits"])
    assert out.requires_grad and torch.equal(out.detach(), plain)
    with pytest.raises(UnsupportedError, match="WNA16MoE computes no gradients"):
        (out.float().square().sum() + inputs[grad_input].float().sum()).backward()
    with torch.no_grad():
        assert not layer(inputs["hidden_states"], inputs["router_logits"]).requires_grad


# ----- from real checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "layer_idx", "quantize_to"),
    [
        (CT_W4_G32_SYM, 0, None),  # compressed-tensors int4 sym
        (CT_W4_G128_ASYM, 1, None),  # compressed-tensors int4 zero points
        (CT_W8_G128_SYM, 0, None),  # compressed-tensors int8
        (GPTQ_W4_G32_DESCACT, 1, None),  # GPTQ desc_act
        (AWQ_W4_G32, 0, None),  # AWQ GEMM
        (SOURCE, 1, "int8_g64_zp"),  # dense bf16, quantized on load
    ],
)
def test_from_checkpoint(path: Path, layer_idx: int, quantize_to: str | None) -> None:
    ckpt = open_checkpoint(path, quantize_to=quantize_to)
    layer = WNA16MoE.from_checkpoint(path, layer_idx, quantize_to=quantize_to, device="cpu")
    assert layer.scheme == ckpt.scheme
    x = (torch.randn(6, 256) * 10).to(torch.bfloat16)  # the random-init fixtures have small weights
    logits = x.float() @ ckpt.router_weight(layer_idx).float().t()  # the model's own router
    routing = softmax_topk_ref(logits, 2, False)  # qwen3_moe fixture: norm_topk_prob false
    clear = routing[2] > 1e-4  # tokens without a near-tie between the 2nd and 3rd expert
    assert clear.any()
    want = reference_output(ckpt.load_layer(layer_idx), x, routing, silu_and_mul_ref)
    assert_output(layer(x, logits)[clear], want[clear], torch.bfloat16)


def test_from_deepseek_checkpoint(tmp_path: Path) -> None:
    """from_checkpoint passes the checkpoint's e_score_correction_bias to routing."""
    scheme = WeightScheme(4, 32, scale_dtype=torch.float16)
    experts = random_experts(scheme, 16, H, I)
    bias = torch.randn(16) * 0.3
    tensors = write_experts(experts, CheckpointFormat.COMPRESSED_TENSORS, layer=1)
    tensors["model.layers.1.mlp.gate.weight"] = torch.randn(16, H, dtype=torch.bfloat16)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = bias
    config = deepseek_config(hidden=H, intermediate=I) | {
        "quantization_config": quantization_config(CheckpointFormat.COMPRESSED_TENSORS, scheme)}
    path = write_checkpoint(tmp_path / "dsv3", config, tensors)
    layer = WNA16MoE.from_checkpoint(path, 1, device="cpu")
    assert torch.equal(layer.correction_bias, bias)

    def ref(logits: torch.Tensor) -> Routing:
        return grouped_topk_ref(logits, 4, 4, 2, bias, True, 2.5)

    x = torch.randn(8, H).to(torch.bfloat16)
    logits = unambiguous_logits(8, 16, ref)
    assert_output(layer(x, logits), reference_output(experts, x, ref(logits), silu_and_mul_ref), torch.bfloat16)


# ----- load_experts ---------------------------------------------------------------------------------------------

def test_load_experts_refreshes_in_place() -> None:
    scheme = WeightScheme(4, 32, zero_point=True)
    first, second = random_experts(scheme, E, H, I), random_experts(scheme, E, H, I)
    layer = WNA16MoE(first, MoEConfig(E, K, H, I), device="cpu")
    x = torch.randn(12, H).to(torch.bfloat16)
    logits = unambiguous_logits(12, E, softmax_routing(False))
    routing = softmax_topk_ref(logits, K, False)
    before = layer(x, logits)
    assert_output(before, reference_output(first, x, routing, silu_and_mul_ref), torch.bfloat16)
    pointers = {name: t.data_ptr() for name, t in layer.prepared_weights().items()}
    kernel = layer.kernel

    layer.load_experts(second)

    assert {name: t.data_ptr() for name, t in layer.prepared_weights().items()} == pointers
    assert layer.kernel is kernel  # not rebuilt
    for have, want in ((layer.quant.w1_scale, second.w13.scales), (layer.quant.w2_zp, second.w2.zeros)):
        assert torch.equal(have, want)  # the quant config describes the new weights
    assert layer.kernel.quant is layer.quant
    after = layer(x, logits)
    assert not torch.allclose(before, after)
    assert_output(after, reference_output(second, x, routing, silu_and_mul_ref), torch.bfloat16)


def test_load_experts_rejects_other_schemes_and_shapes() -> None:
    layer = WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I), device="cpu")
    with pytest.raises(InvalidInputError, match="int4_g32_zp"):
        layer.load_experts(random_experts(WeightScheme(4, 32, zero_point=True), E, H, I))
    with pytest.raises(InvalidInputError, match=r"\(E, H, I\)"):
        layer.load_experts(random_experts(WeightScheme(4, 32), E, H, 2 * I))


# ----- bad input ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_layer() -> WNA16MoE:
    return WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I), device="cpu")


@pytest.mark.parametrize(
    ("hidden", "logits", "message"),
    [
        (torch.randn(H).bfloat16(), torch.randn(1, E), r"hidden_states must be \[T, H=64\]"),  # 1-D
        (torch.randn(2, 3, H).bfloat16(), torch.randn(6, E), r"hidden_states must be \[T, H=64\]"),  # 3-D
        (torch.randn(4, H + 1).bfloat16(), torch.randn(4, E), r"got \[4, 65\]"),  # wrong H
        (torch.randn(4, H), torch.randn(4, E), "must be torch.bfloat16"),  # float32 input
        (torch.randn(4, H).half(), torch.randn(4, E), "got torch.float16"),  # fp16 into a bf16 layer
        (torch.randn(4, H).bfloat16(), torch.randn(5, E), r"router_logits must be \[T=4, E=8\]"),  # wrong T
        (torch.randn(4, H).bfloat16(), torch.randn(4, E - 1), r"got \[4, 7\]"),  # wrong E
        (torch.randn(4, H).bfloat16(), torch.randn(4 * E), r"router_logits must be"),  # flat logits
        (torch.randn(4, H, device="meta").bfloat16(), torch.randn(4, E), "hidden_states is on meta, the layer on cpu"),
        (torch.randn(4, H).bfloat16(), torch.randn(4, E, device="meta"), "router_logits is on meta"),
    ],
)
def test_forward_rejects(small_layer: WNA16MoE, hidden: torch.Tensor, logits: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        small_layer(hidden, logits)


def test_construction_rejects_mismatched_experts() -> None:
    experts = random_experts(WeightScheme(4, 32), E, H, I)
    with pytest.raises(InvalidInputError, match=r"experts are \(E, H, I\) = \(8, 64, 32\)"):
        WNA16MoE(experts, MoEConfig(E, K, H, 2 * I), device="cpu")
    with pytest.raises(InvalidInputError, match=r"w13_bias must be \[E=8, 64\]"):
        WNA16MoE(experts, MoEConfig(E, K, H, I), device="cpu", w13_bias=torch.randn(E, I))


@pytest.mark.parametrize("backend", ["cpu", "emulation"])
@pytest.mark.parametrize(
    ("t_weights", "t_ids", "message"),
    [
        ((3, 3), (3, 2), r"topk_weights must be float \[3, 2\] like topk_ids, got \[3, 3\]"),  # one weight too many
        ((2, 2), (2, 2), r"topk_ids must be integer \[T=3, K\], got \[2, 2\]"),  # a token without routing
    ],
)
def test_kernel_apply_rejects_routing_of_other_shapes(backend: str, t_weights: tuple[int, int],
                                                      t_ids: tuple[int, int], message: str) -> None:
    """The experts' own entry (what an engine calls with its router's output) checks shapes, not values."""
    layer = WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I), device="cpu",
                     backend=backend)
    ids = torch.randint(0, E, t_ids, dtype=torch.int32)
    with pytest.raises(InvalidInputError, match=message):
        layer.kernel.apply(torch.randn(3, H).bfloat16(), torch.rand(t_weights), ids, layer.prepared_weights())


def _experts_with(projection: str, field: str, edit: Callable[[torch.Tensor], None]) -> QuantizedExperts:
    experts = random_experts(WeightScheme(4, 32, act_order=True), E, H, I)
    edit(getattr(getattr(experts, projection), field))
    return experts


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        (_experts_with("w13", "codes", lambda t: t[1, 2, 3].fill_(16)), r"w13 codes must lie in \[0, 15\]"),
        (_experts_with("w2", "scales", lambda t: t[0, 0, 0].fill_(float("nan"))), "w2 scales: holds NaN"),
        (_experts_with("w2", "g_idx", lambda t: t[3, 0].fill_(-1)), r"w2 g_idx: group indices must lie in \[0, 1\)"),
        (_experts_with("w13", "g_idx", lambda t: t[5].zero_()), "w13 g_idx: a group holds 64 elements"),
    ],
)
def test_construction_rejects_values_out_of_range(experts: QuantizedExperts, message: str) -> None:
    """Backends read such values differently (a code's low nibble, or an index past the scales): an error first,
    at construction and at a reload."""
    with pytest.raises(InvalidInputError, match=message):
        WNA16MoE(experts, MoEConfig(E, K, H, I), device="cpu", backend="emulation")
    layer = WNA16MoE(random_experts(experts.scheme, E, H, I), MoEConfig(E, K, H, I), device="cpu",
                     backend="emulation")
    with pytest.raises(InvalidInputError, match=message):
        layer.load_experts(experts)


@pytest.mark.parametrize(
    ("activation", "params", "message"),
    [
        (Activation.SILU, {"gemm1_alpha": 1.702}, "gemm1_alpha and gemm1_beta apply to the swiglu_oai activation only"),
        (Activation.GELU, {"gemm1_beta": 0.5}, "the layer's is gelu"),
        (Activation.GELU_TANH, {"gemm1_clamp_limit": 7.0}, "gemm1_clamp_limit applies to swiglu_oai and silu only"),
    ],
)
def test_construction_rejects_swiglu_parameters_another_activation_ignores(activation: Activation, params: dict,
                                                                           message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        WNA16MoE(random_experts(WeightScheme(4, 32), E, H, I), MoEConfig(E, K, H, I, activation=activation),
                 device="cpu", **params)


def test_construction_rejects_a_nan_correction_bias() -> None:
    routing = RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=4, topk_group=2, has_correction_bias=True)
    bias = torch.randn(16)
    bias[5] = float("nan")  # (NaN compares above everything: every token would pick expert 5)
    with pytest.raises(InvalidInputError, match="correction_bias holds NaN"):
        WNA16MoE(random_experts(WeightScheme(4, 32), 16, H, I), MoEConfig(16, 4, H, I, routing=routing),
                 device="cpu", correction_bias=bias)


def test_casts_and_moves_are_refused(small_layer: WNA16MoE) -> None:
    """`model.half()` or `.to(other device)` would convert the prepared weights behind the kernel's back."""
    for move in (lambda m: m.half(), lambda m: m.float(), lambda m: m.to("meta")):
        with pytest.raises(InvalidInputError, match="WNA16MoE keeps its prepared weights as built"):
            move(small_layer)
    x, logits = torch.randn(3, H).bfloat16(), torch.randn(3, E)
    before = small_layer(x, logits)
    assert small_layer.to("cpu") is small_layer and small_layer.bfloat16() is small_layer  # no change: fine
    assert torch.equal(small_layer(x, logits), before)


def test_deepseek_layer_needs_its_correction_bias() -> None:
    routing = RoutingConfig(RoutingMethod.DEEPSEEK_V3, n_group=4, topk_group=2, has_correction_bias=True)
    layer = WNA16MoE(random_experts(WeightScheme(4, 32), 16, H, I), MoEConfig(16, 4, H, I, routing=routing),
                     device="cpu")
    with pytest.raises(InvalidInputError, match="e_score_correction_bias"):
        layer(torch.randn(2, H).bfloat16(), torch.randn(2, 16))


# ----- a chosen kernel that cannot be built here -------------------------------------------------------------

class _CPUWithoutItsLibrary(CPUExperts):
    """The CPU backend as if its op library failed to load on this machine."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise BackendError("the op library /opt/lib.so does not load: undefined symbol")


def test_a_kernel_that_cannot_be_built_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                                  ) -> None:
    monkeypatch.delenv(BACKEND_ENV)  # the oracle chooses here (this module's fixture forces EMULATION)
    monkeypatch.setattr(oracle, "BACKEND_CLASSES", dict(oracle.BACKEND_CLASSES))
    oracle.register_backend(Backend.CPU, (_CPUWithoutItsLibrary,))
    experts = random_experts(WeightScheme(4, 32), E, H, I)
    config = MoEConfig(E, K, H, I)  # bf16: the CPU backend's checks pass, so it is chosen first
    with caplog.at_level("WARNING", logger="wna16moe"):
        layer = WNA16MoE(experts, config, device="cpu")
    assert layer.backend == Backend.EMULATION
    cpu = next(c for c in layer.selection.report.candidates if c.backend == Backend.CPU)
    assert cpu.verdict.value == "rejected"
    assert cpu.reason == "build: passed its checks but could not be built here: the op library /opt/lib.so does not " \
                         "load: undefined symbol"
    assert "cpu could not be built here" in caplog.text
    x = torch.randn(3, H).to(torch.bfloat16)
    assert torch.isfinite(layer(x, torch.randn(3, E))).all()
    # Requested, it is an error: never a silent substitute.
    with pytest.raises(BackendError, match="does not load"):
        WNA16MoE(experts, config, device="cpu", backend="cpu")
