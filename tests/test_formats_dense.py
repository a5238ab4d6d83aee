"""Dense (bf16/fp16/fp32) checkpoints, quantized on load by round-to-nearest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    CT_W4_G32_SYM,
    SOURCE,
    FixtureCopy,
    TensorEdit,
    dequantize_ref,
    edit_tensors,
    load_source_experts,
    random_experts,
    step_ref,
)
from hypothesis import given
from hypothesis import strategies as st

from wna16moe import CheckpointError, QuantizedExperts, UnsupportedError, WeightScheme, open_checkpoint
from wna16moe.formats import HF_NAMING, CheckpointFormat, DictSource, read_experts, write_experts


@pytest.mark.parametrize(
    "name",
    [
        "int4_g128_sym",  # the README's example
        "int4_g32_zp",  # asymmetric
        "int8_ch_sym",  # int8 channel-wise
        "int8_g64_zp",  # int8 asymmetric, groups
    ],
)
def test_bf16_fixture_quantized_on_load(name: str) -> None:
    """Every element within half a step of the source weight (the stored bf16 weight is the exact input)."""
    ckpt = open_checkpoint(SOURCE, quantize_to=name)
    assert ckpt.format == CheckpointFormat.DENSE and ckpt.scheme.name == name
    experts = ckpt.load_layer(1)
    src13, src2 = load_source_experts(1)
    for weight, source in ((experts.w13, src13), (experts.w2, src2)):
        error = (dequantize_ref(weight) - source.double()).abs() / step_ref(weight)
        assert float(error.max()) <= 0.5 + 1e-4
        assert float(error.max()) > 0.4  # it is quantized, not passed through


def test_quantize_to_accepts_a_scheme_object() -> None:
    scheme = WeightScheme(8, 32, scale_dtype=torch.float16)
    ckpt = open_checkpoint(SOURCE, quantize_to=scheme)
    assert ckpt.scheme == scheme
    assert ckpt.load_layer(0).w13.scales.dtype == torch.float16


def test_reader_is_round_to_nearest_of_the_stored_weights() -> None:
    """Reading a dense layer gives exactly QuantizedExperts.quantize of the stacked float weights."""
    e, h, i = 3, 48, 40
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    tensors = {}
    for expert in range(e):
        tensors[HF_NAMING.projection_prefix(0, expert, "gate_proj") + "weight"] = w13[expert, :i]
        tensors[HF_NAMING.projection_prefix(0, expert, "up_proj") + "weight"] = w13[expert, i:]
        tensors[HF_NAMING.projection_prefix(0, expert, "down_proj") + "weight"] = w2[expert]
    scheme = WeightScheme(4, 16, zero_point=True)
    got = read_experts(DictSource(tensors), CheckpointFormat.DENSE, scheme, 0, HF_NAMING, e, h, i)
    want = QuantizedExperts.quantize(w13, w2, scheme)
    for a, b in ((got.w13, want.w13), (got.w2, want.w2)):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@given(name=st.sampled_from(["int4_g32_sym", "int4_ch_zp", "int8_g64_sym", "int8_g32_zp"]),
       e=st.integers(1, 2), h=st.integers(1, 80), i=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_writer_stores_the_dequantized_weight(name: str, e: int, h: int, i: int, seed: int) -> None:
    """write_experts(DENSE) stores each projection's dequantized weight in bf16, in [N, K] layout."""
    scheme = WeightScheme.from_name(name)
    experts = random_experts(scheme, e, h, i, torch.Generator().manual_seed(seed))
    tensors = write_experts(experts, CheckpointFormat.DENSE, 2)
    d13, d2 = dequantize_ref(experts.w13), dequantize_ref(experts.w2)
    for expert in range(e):
        gate = tensors[HF_NAMING.projection_prefix(2, expert, "gate_proj") + "weight"]
        up = tensors[HF_NAMING.projection_prefix(2, expert, "up_proj") + "weight"]
        down = tensors[HF_NAMING.projection_prefix(2, expert, "down_proj") + "weight"]
        assert gate.dtype == torch.bfloat16 and gate.shape == (i, h) and down.shape == (h, i)
        assert torch.equal(gate, d13[expert, :i].to(torch.bfloat16))
        assert torch.equal(up, d13[expert, i:].to(torch.bfloat16))
        assert torch.equal(down, d2[expert].to(torch.bfloat16))
    # Reading back quantizes the stored weight again (not bit-exact: scales are recomputed), within half a step.
    back = read_experts(DictSource(tensors), CheckpointFormat.DENSE, scheme, 2, HF_NAMING, e, h, i)
    stored = torch.stack([torch.cat([tensors[HF_NAMING.projection_prefix(2, x, "gate_proj") + "weight"],
                                     tensors[HF_NAMING.projection_prefix(2, x, "up_proj") + "weight"]])
                          for x in range(e)]).double()
    assert float(((dequantize_ref(back.w13) - stored).abs() / step_ref(back.w13)).max()) <= 0.5 + 1e-4


# ----- bad input ------------------------------------------------------------------------------------------------

KEY = "model.layers.1.mlp.experts.4.down_proj.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "NaN"),  # a NaN row
        (lambda t: t.index_fill(1, torch.tensor([0]), float("inf")), "infinite"),  # an inf column
        (lambda t: t.to(torch.int32), "expected dtype"),  # integer weights
        (lambda t: t.t().contiguous(), r"expected shape \[256, 128\], got \[128, 256\]"),  # transposed
        (lambda t: None, "missing"),  # dropped
    ],
)
def test_corrupted_weight(fixture_copy: FixtureCopy, edit: TensorEdit, message: str) -> None:
    copy = fixture_copy(SOURCE)

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        new = edit(tensors[KEY])
        if new is None:
            del tensors[KEY]
        else:
            tensors[KEY] = new

    edit_tensors(copy, corrupt)
    ckpt = open_checkpoint(copy, quantize_to="int4_g32_sym")
    ckpt.load_layer(0)  # untouched layer
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.load_layer(1)
    assert info.value.tensor == KEY and str(copy) in str(info.value)


@pytest.mark.parametrize(
    ("path", "quantize_to", "message"),
    [
        (SOURCE, None, "not quantized"),  # a dense checkpoint needs a target scheme
        (SOURCE, "int4_g128", "not valid"),  # malformed scheme name
        (SOURCE, "int3_g128_sym", "bits=3"),  # unsupported bits
        (SOURCE, "int4_g32_sym_actorder", "act-order"),  # RTN cannot make a g_idx
        (CT_W4_G32_SYM, "int4_g32_sym", "already quantized"),  # quantize_to on a quantized checkpoint
    ],
)
def test_quantize_to_rejects(path: Path, quantize_to: str | None, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        open_checkpoint(path, quantize_to=quantize_to).load_layer(0)


def test_act_order_target_is_rejected_at_open() -> None:
    with pytest.raises(UnsupportedError, match="act-order"):
        open_checkpoint("tests/data/qwen3moe-bf16", quantize_to="int4_g32_sym_actorder")
