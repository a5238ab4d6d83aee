"""FLASHINFER_TRTLLM: the MxInt4 weight converter against index arithmetic written here from the documented
layout (and against FlashInfer's own pure-torch helpers where flashinfer imports), its inverse,
and the arguments apply passes to FlashInfer's API. The oracle, `explain` and the self-check against
EMULATION: test_experts_flashinfer_trtllm.py.

The kernel itself needs an SM100 GPU, which CI and our H100s are not: nothing here runs it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from conftest import random_experts

from wna16moe import (
    InvalidInputError,
    MoEConfig,
    ParallelConfig,
    RoutingConfig,
    RoutingMethod,
    UnsupportedError,
    WeightScheme,
    make_wna16_moe_quant_config,
)
from wna16moe.device import DeviceInfo
from wna16moe.experts.base import LayerSpec
from wna16moe.experts.flashinfer_trtllm import (
    FlashInferTrtllmExperts,
    flashinfer_to_canonical,
    gemm1_row_sources,
    prepare_flashinfer_weights,
    swizzle_scales,
    unswizzle_scales,
)
from wna16moe.oracle import BACKEND_ENV

SCHEME = WeightScheme(4, 32)
# FlashInfer's srcToDstBlk32RowMap as documented: source row t of a 32-row block goes to row MAP32[t].
MAP32 = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
         4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


# ----- the layout, step by step as documented (plain loops) --------------------------------------------------

def _gated_then_shuffled(rows: list[Any], gated: bool) -> list[Any]:
    """[gate; up] rows -> ([up; gate], interleaved up_i, gate_i if gated) -> epilogue shuffle."""
    if gated:
        half = len(rows) // 2
        up_gate = rows[half:] + rows[:half]
        rows = []
        for i in range(half):
            rows += [up_gate[i], up_gate[half + i]]
    out: list[Any] = [None] * len(rows)
    for block in range(0, len(rows), 32):
        for t in range(32):
            out[block + MAP32[t]] = rows[block + t]
    return out


def _expected_bytes(codes: torch.Tensor, gated: bool) -> torch.Tensor:
    """Canonical codes [N, K] -> [K/256, N, 128] bytes: rows permuted, signed nibbles (two's complement of
    q - 8, input 2j low), 128-byte K blocks."""
    n, k = codes.shape
    rows = _gated_then_shuffled([codes[r] for r in range(n)], gated)
    out = torch.empty(k // 256, n, 128, dtype=torch.uint8)
    for r, row in enumerate(rows):
        signed = torch.remainder(row.to(torch.int16) - 8, 16)
        packed = (signed[0::2] + 16 * signed[1::2]).to(torch.uint8)
        for block in range(k // 256):
            out[block, r] = packed[128 * block:128 * (block + 1)]
    return out


def _expected_scales(scales: torch.Tensor, gated: bool) -> torch.Tensor:
    """Canonical scales [N, G] -> rows permuted, then each (r, c) at the 128x4 swizzle's offset, as [N, G]."""
    n, g = scales.shape
    rows = _gated_then_shuffled([scales[r] for r in range(n)], gated)
    flat = torch.empty(n * g, dtype=scales.dtype)
    for r, row in enumerate(rows):
        for c in range(g):
            offset = (c % 4) + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (r // 128) * 128 * g
            flat[offset] = row[c]
    return flat.view(n, g)


def test_converter_matches_the_documented_layout() -> None:
    e, h, i = 2, 512, 256
    experts = random_experts(SCHEME, e, h, i)
    prepared = prepare_flashinfer_weights(experts, torch.device("cpu"))
    assert prepared["w13"].shape == (e, h // 256, 2 * i, 128) and prepared["w13"].dtype == torch.uint8
    assert prepared["w2"].shape == (e, i // 256, h, 128)
    assert prepared["w13_scale"].shape == (e, 2 * i, h // 32) and prepared["w13_scale"].dtype == torch.bfloat16
    for expert in range(e):
        assert torch.equal(prepared["w13"][expert], _expected_bytes(experts.w13.codes[expert], gated=True))
        assert torch.equal(prepared["w2"][expert], _expected_bytes(experts.w2.codes[expert], gated=False))
        assert torch.equal(prepared["w13_scale"][expert], _expected_scales(experts.w13.scales[expert], gated=True))
        assert torch.equal(prepared["w2_scale"][expert], _expected_scales(experts.w2.scales[expert], gated=False))


def test_first_rows_by_hand() -> None:
    """Kernel row p of w13 (I = 256, gate rows 0..255, up rows 256..511): interleaved row j = shuffle source of
    p; j even is up_{j/2}, odd is gate_{j/2}. p=0 <- j=0 (up_0), p=1 <- j=4 (up_2), p=8 <- j=1 (gate_0),
    p=31 <- j=31 (gate_15), p=32 <- j=32 (up_16)."""
    sources = gemm1_row_sources(512)
    assert sources[[0, 1, 2, 8, 9, 31, 32]].tolist() == [256, 258, 260, 0, 2, 15, 272]
    assert sorted(sources.tolist()) == list(range(512))


@pytest.mark.parametrize(("h", "i"), [(256, 256), (512, 768), (1024, 256)])
def test_inverse_gives_the_canonical_experts_back(h: int, i: int) -> None:
    experts = random_experts(SCHEME, 3, h, i)
    back = flashinfer_to_canonical(prepare_flashinfer_weights(experts, torch.device("cpu")))
    for got, want in ((back.w13, experts.w13), (back.w2, experts.w2)):
        assert got.scheme == want.scheme
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("cols", [4, 8, 28])
def test_scale_swizzle_round_trip(cols: int) -> None:
    scales = torch.randn(256, cols).to(torch.bfloat16)
    swizzled = swizzle_scales(scales).flatten()
    for r, c in ((0, 1), (1, 0), (32, 0), (127, cols - 1), (128, 2), (255, cols - 1)):
        offset = (c % 4) + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (r // 128) * 128 * cols
        assert swizzled[offset] == scales[r, c]
    assert torch.equal(unswizzle_scales(swizzled.view(256, cols)), scales)


def test_fp16_scales_are_rounded_to_bf16() -> None:
    experts = random_experts(WeightScheme(4, 32, scale_dtype=torch.float16), 1, 256, 256)
    back = flashinfer_to_canonical(prepare_flashinfer_weights(experts, torch.device("cpu")))
    assert torch.equal(back.w2.scales, experts.w2.scales.to(torch.bfloat16))
    assert torch.equal(back.w2.codes, experts.w2.codes)


def test_converter_errors() -> None:
    with pytest.raises(UnsupportedError, match="holds int4_g32_sym weights only, got int4_g128_sym"):
        prepare_flashinfer_weights(random_experts(WeightScheme(4, 128), 1, 256, 256), torch.device("cpu"))
    with pytest.raises(UnsupportedError, match="needs H and I to be multiples of 256, got H=256, I=128"):
        prepare_flashinfer_weights(random_experts(SCHEME, 1, 256, 128), torch.device("cpu"))
    with pytest.raises(InvalidInputError, match=r"need R % 128 == 0 and C % 4 == 0 .* got \[96, 8\]"):
        swizzle_scales(torch.zeros(96, 8))
    with pytest.raises(InvalidInputError, match="lack 'w2_scale'"):
        flashinfer_to_canonical({"w13": torch.zeros(1), "w13_scale": torch.zeros(1), "w2": torch.zeros(1)})


def _flashinfer_helpers() -> types.SimpleNamespace:
    """FlashInfer's pure-torch layout helpers, or a skip where flashinfer does not import (CI, CPU machines
    without its CUDA-side dependencies)."""
    try:
        from flashinfer.fused_moe.core import (
            _maybe_get_cached_w3_w1_permute_indices,
            convert_to_block_layout,
            get_w2_permute_indices_with_cache,
        )
    except Exception as error:  # ImportError, or its import-time device probing failing
        pytest.skip(f"flashinfer does not import here ({type(error).__name__}): checked against index arithmetic")
    return types.SimpleNamespace(w13_indices=_maybe_get_cached_w3_w1_permute_indices, block=convert_to_block_layout,
                                 w2_indices=get_w2_permute_indices_with_cache)


def test_converter_matches_flashinfers_own_helpers() -> None:
    helpers = _flashinfer_helpers()
    experts = random_experts(SCHEME, 2, 512, 256)
    prepared = prepare_flashinfer_weights(experts, torch.device("cpu"))
    cache: dict = {}
    for expert in range(2):
        gate_up = experts.w13.codes[expert]
        up_gate = torch.cat([gate_up[256:], gate_up[:256]])
        signed = up_gate ^ 8
        packed = signed[:, 0::2] | (signed[:, 1::2] << 4)
        rows = helpers.w13_indices(cache, packed, 128)
        assert torch.equal(prepared["w13"][expert], helpers.block(packed[rows].contiguous(), 128))
        signed2 = experts.w2.codes[expert] ^ 8
        packed2 = signed2[:, 0::2] | (signed2[:, 1::2] << 4)
        rows2 = helpers.w2_indices(cache, packed2, 128)
        assert torch.equal(prepared["w2"][expert], helpers.block(packed2[rows2].contiguous(), 128))


# ----- apply: the arguments FlashInfer's API receives --------------------------------------------------------

def _fake_trtllm_mxint4_block_scale_moe(
    routing_logits: torch.Tensor, routing_bias: torch.Tensor | None, hidden_states: torch.Tensor,
    gemm1_weights: torch.Tensor, gemm1_weights_scale: torch.Tensor, gemm1_alpha: torch.Tensor | None,
    gemm1_beta: torch.Tensor | None, gemm1_clamp_limit: torch.Tensor | None, gemm2_weights: torch.Tensor,
    gemm2_weights_scale: torch.Tensor, num_experts: int, top_k: int, n_group: int | None, topk_group: int | None,
    intermediate_size: int, local_expert_offset: int, local_num_experts: int,
    routed_scaling_factor: float | None, routing_method_type: int = 0, do_finalize: bool = True,
    enable_pdl: bool | None = None, output: torch.Tensor | None = None, tune_max_num_tokens: int = 8192,
    norm_topk_prob: bool = True, routing_replay_out: torch.Tensor | None = None,
    valid_hidden_size: int | None = None, valid_intermediate_size: int | None = None,
) -> list[torch.Tensor]:
    """FlashInfer 0.7.2's trtllm_mxint4_block_scale_moe signature (flashinfer/fused_moe/core.py); records the
    call and returns [output] like the real one with do_finalize=True."""
    _fake_trtllm_mxint4_block_scale_moe.calls.append(dict(locals()))
    return [torch.full_like(hidden_states, 3.0)]


@pytest.fixture
def fake_flashinfer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    _fake_trtllm_mxint4_block_scale_moe.calls = calls  # type: ignore[attr-defined]
    package, fused_moe = types.ModuleType("flashinfer"), types.ModuleType("flashinfer.fused_moe")
    fused_moe.trtllm_mxint4_block_scale_moe = _fake_trtllm_mxint4_block_scale_moe  # type: ignore[attr-defined]
    package.fused_moe = fused_moe  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", fused_moe)
    return calls


def _kernel(config: MoEConfig, tp: int = 1) -> tuple[FlashInferTrtllmExperts, dict[str, torch.Tensor]]:
    experts = random_experts(SCHEME, config.num_experts, config.hidden_size, config.intermediate_size // tp)
    quant = make_wna16_moe_quant_config(experts.w13.scales, experts.w2.scales, 32, 4)
    spec = LayerSpec(config, SCHEME, ParallelConfig(tp_size=tp))
    kernel = FlashInferTrtllmExperts(spec, quant, torch.device("cpu"))
    kernel.checked = True  # the self-check is tested in test_experts_flashinfer_trtllm.py; here only the call
    return kernel, FlashInferTrtllmExperts.prepare_weights(experts, torch.device("cpu"))


@pytest.mark.parametrize(("routing", "top_k", "logits_dtype", "expected"), [
    (RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True), 4, torch.bfloat16,
     {"routing_method_type": 1, "n_group": None, "topk_group": None, "routed_scaling_factor": None}),
    (RoutingConfig(RoutingMethod.SIGMOID), 1, torch.bfloat16,
     {"routing_method_type": 3, "n_group": None, "topk_group": None, "routed_scaling_factor": None}),
    (RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                   has_correction_bias=True), 4, torch.float32,
     {"routing_method_type": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
])
def test_apply_passes_the_routing_and_layer(fake_flashinfer: list[dict[str, Any]], routing: RoutingConfig, top_k: int,
                                            logits_dtype: torch.dtype, expected: dict[str, Any]) -> None:
    config = MoEConfig(8, top_k, 256, 512, routing=routing)
    kernel, weights = _kernel(config, tp=2)
    assert FlashInferTrtllmExperts.is_supported(
        LayerSpec(config, SCHEME, router_logits_dtype=logits_dtype), DeviceInfo.named("b200")).ok
    x = torch.randn(3, 256).to(torch.bfloat16)
    logits = torch.randn(3, 8).to(logits_dtype)
    bias = torch.randn(8) if routing.has_correction_bias else None
    out = kernel.apply_monolithic(x, logits, weights, bias)
    assert torch.equal(out, torch.full_like(x, 3.0))
    (call,) = fake_flashinfer
    assert {key: call[key] for key in expected} == expected
    assert call["routing_logits"] is logits and call["hidden_states"] is x
    if bias is None:
        assert call["routing_bias"] is None
    else:
        assert call["routing_bias"].dtype == torch.bfloat16 and torch.equal(call["routing_bias"], bias.bfloat16())
    for name, key in (("gemm1_weights", "w13"), ("gemm1_weights_scale", "w13_scale"), ("gemm2_weights", "w2"),
                      ("gemm2_weights_scale", "w2_scale")):
        assert call[name] is weights[key]
    assert (call["num_experts"], call["top_k"], call["intermediate_size"]) == (8, top_k, 256)  # I / tp
    assert (call["local_expert_offset"], call["local_num_experts"]) == (0, 8)
    assert (call["gemm1_alpha"], call["gemm1_beta"], call["gemm1_clamp_limit"]) == (None, None, None)
    assert call["tune_max_num_tokens"] == 8192 and call["do_finalize"] is True
