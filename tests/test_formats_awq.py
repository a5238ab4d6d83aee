"""AWQ GEMM (int4, zero points, interleaved nibbles): the real fixture against its bf16 source, an independent
decoder, writer/reader round trips and corrupted checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    AWQ_W4_G32,
    INTERMEDIATE,
    NUM_EXPERTS,
    FixtureCopy,
    TensorEdit,
    assert_round_trip,
    dequantize_ref,
    edit_config,
    edit_tensors,
    load_source_experts,
    random_experts,
    relative_error,
    unpack_words,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from wna16moe import CheckpointError, UnsupportedError, WeightScheme, open_checkpoint
from wna16moe.formats import (
    HF_NAMING,
    MIXTRAL_NAMING,
    CheckpointFormat,
    DictSource,
    Projection,
    awq,
    write_experts,
)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Slot j of a word holds column INTERLEAVE[j] of its 8 columns (anchor_system_vllm.md §3.2), written out here
# rather than imported from the code under test.
INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]
# Measured relative Frobenius error vs the bf16 source: 0.107-0.130 (AWQ also rescales the weights it
# quantizes, so only a relative bound makes sense). Linear nibble order gives 1.25, gate/up swapped 1.42.
AWQ_BOUND = 0.16


def decode_layer(path: Path, layer: int, order: list[int] | None = INTERLEAVE, group_size: int = 32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand decoder of AWQ GEMM tensors: float64 w13 [E, 2I, H], w2 [E, H, I]; `order=None` is the wrong,
    linear nibble order."""
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    with safe_open(path / "model.safetensors", "pt") as f:
        for projection in PROJECTIONS:
            for expert in range(NUM_EXPERTS):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{projection}."
                codes = unpack_words(f.get_tensor(prefix + "qweight"), 4, order).double()  # [K, N]
                zeros = unpack_words(f.get_tensor(prefix + "qzeros"), 4, order).double()  # [G, N]
                scales = f.get_tensor(prefix + "scales").double()  # [G, N]
                group = torch.arange(codes.shape[0]) // group_size
                parts[projection].append(((codes - zeros[group]) * scales[group]).t())
    w13 = torch.cat([torch.stack(parts["gate_proj"]), torch.stack(parts["up_proj"])], dim=1)
    return w13, torch.stack(parts["down_proj"])


# ----- the real fixture -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])  # both MoE layers
def test_fixture_matches_bf16_source(layer: int) -> None:
    ckpt = open_checkpoint(AWQ_W4_G32)
    assert ckpt.format == CheckpointFormat.AWQ
    assert ckpt.scheme == WeightScheme(4, 32, zero_point=True, scale_dtype=torch.bfloat16)
    experts = ckpt.load_layer(layer)
    src13, src2 = load_source_experts(layer)
    for weight, source in ((experts.w13, src13), (experts.w2, src2)):
        error = relative_error(dequantize_ref(weight), source)
        assert 0.05 < error < AWQ_BOUND, f"relative error {error:.4f}"
    assert experts.w13.zeros is not None and len(experts.w13.zeros.unique()) > 2  # real, varied zero points


def test_fixture_matches_independent_decoder() -> None:
    experts = open_checkpoint(AWQ_W4_G32).load_layer(1)
    w13, w2 = decode_layer(AWQ_W4_G32, 1)
    torch.testing.assert_close(dequantize_ref(experts.w13), w13, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_ref(experts.w2), w2, rtol=0, atol=0)


@pytest.mark.parametrize(
    "wrong",
    [
        "linear_order",  # nibbles read in linear order instead of AWQ's interleave
        "swap_gate_up",  # gate rows where up rows belong
    ],
)
def test_wrong_layout_gives_a_much_larger_error(wrong: str) -> None:
    src13, _ = load_source_experts(0)
    right, _ = decode_layer(AWQ_W4_G32, 0)
    w13, _ = decode_layer(AWQ_W4_G32, 0, order=None if wrong == "linear_order" else INTERLEAVE)
    if wrong == "swap_gate_up":
        w13 = w13.roll(INTERMEDIATE, dims=1)
    assert relative_error(right, src13) < AWQ_BOUND
    assert relative_error(w13, src13) > 1.0
    assert relative_error(w13, src13) > 5 * relative_error(right, src13)


def test_fixture_tensor_layout() -> None:
    with safe_open(AWQ_W4_G32 / "model.safetensors", "pt") as f:
        prefix = "model.layers.0.mlp.experts.0.down_proj."
        assert f.get_slice(prefix + "qweight").get_shape() == [128, 256 // 8]  # [K, N / 8]: packed along N
        assert f.get_slice(prefix + "qzeros").get_shape() == [128 // 32, 256 // 8]
        assert f.get_slice(prefix + "scales").get_shape() == [128 // 32, 256]
        assert f.get_slice(prefix + "scales").get_dtype() == "BF16"


# ----- writer / reader round trips ----------------------------------------------------------------------------

@given(
    group=st.sampled_from([32, 64, 128, None]),  # group-wise and channel-wise
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    e=st.integers(1, 3),
    h_groups=st.integers(1, 3),  # H and I are whole numbers of groups (and so of 8-column words)
    i_groups=st.integers(1, 2),
    layer=st.integers(0, 3),
    mixtral=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_exact(group: int | None, dtype: torch.dtype, e: int, h_groups: int, i_groups: int,
                                 layer: int, mixtral: bool, seed: int) -> None:
    scheme = WeightScheme(4, group, zero_point=True, scale_dtype=dtype)
    per_group = 24 if group is None else group  # channel-wise: any multiple of 8
    h, i = h_groups * per_group, i_groups * per_group
    naming = MIXTRAL_NAMING if mixtral else HF_NAMING
    experts = random_experts(scheme, e, h, i, torch.Generator().manual_seed(seed))
    tensors = assert_round_trip(experts, CheckpointFormat.AWQ, layer, naming)
    prefix = naming.projection_prefix(layer, 0, naming.down)  # down: [N=H, K=I]
    assert tensors[prefix + "qweight"].shape == (i, h // 8)
    assert tensors[prefix + "qzeros"].shape == (scheme.num_groups(i), h // 8)
    assert tensors[prefix + "scales"].shape == (scheme.num_groups(i), h)


@pytest.mark.parametrize("group", [32, 64, 128, None])  # group-wise and channel-wise
def test_round_trip_every_scheme(group: int | None) -> None:
    size = 24 if group is None else group
    experts = random_experts(WeightScheme(4, group, zero_point=True, scale_dtype=torch.float16), 2, 2 * size, size)
    assert_round_trip(experts, CheckpointFormat.AWQ, 1)


def test_interleaved_packing_known_answer() -> None:
    """Columns 0..7 holding codes 0..7: slot j holds column INTERLEAVE[j], so the nibbles read 0,2,4,6,1,3,5,7."""
    scheme = WeightScheme(4, None, zero_point=True, scale_dtype=torch.float16)
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)  # [N=8, K=1]
    projection = Projection(codes, torch.ones(8, 1, dtype=torch.float16), codes.clone(), None)
    out = awq.write_projection(projection, scheme)
    assert out["qweight"].tolist() == [[0x75316420]]
    assert out["qzeros"].tolist() == [[0x75316420]]
    back = awq.read_projection(DictSource(out), "", scheme, (8, 1))
    assert back.codes.tolist() == codes.tolist() and back.zeros.tolist() == codes.tolist()


@pytest.mark.parametrize(
    "scheme",
    [
        WeightScheme(4, 32, scale_dtype=torch.float16),  # symmetric: AWQ stores zero points
        WeightScheme(8, 32, zero_point=True, scale_dtype=torch.float16),  # 8-bit
        WeightScheme(4, 32, zero_point=True, act_order=True, scale_dtype=torch.float16),  # act-order
    ],
)
def test_writer_rejects_what_awq_cannot_store(scheme: WeightScheme) -> None:
    experts = random_experts(scheme, 1, 64, 32)
    with pytest.raises(UnsupportedError, match="AWQ GEMM stores int4 with zero points"):
        write_experts(experts, CheckpointFormat.AWQ, 0)


# ----- config and bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bits": 8, "group_size": 128, "version": "gemm"}, "bits=8"),  # AWQ GEMM is 4-bit
        ({"bits": 4, "group_size": 128, "version": "gemv"}, "'gemv'"),  # another packing
        ({"bits": 4, "group_size": 128, "version": "gemm", "zero_point": False}, "zero_point"),  # symmetric AWQ
        ({"bits": 4, "group_size": 128, "zero_point": "false"}, "zero_point='false'"),  # a string, not read as true
    ],
)
def test_scheme_from_config_rejects(config: dict, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        awq.scheme_from_config(config, torch.float16)


def test_scheme_from_config() -> None:
    assert awq.scheme_from_config({"bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM"},
                                  torch.float16) == WeightScheme(4, 128, zero_point=True, scale_dtype=torch.float16)
    assert awq.scheme_from_config({"bits": 4, "group_size": -1}, torch.bfloat16).group_size is None


def test_n_must_fill_words() -> None:
    scheme = WeightScheme(4, 32, zero_point=True, scale_dtype=torch.float16)
    with pytest.raises(CheckpointError, match="not a multiple of 8"):
        awq.read_projection(DictSource({}), "x.", scheme, (100, 64))


KEY = "model.layers.0.mlp.experts.6.gate_proj."


@pytest.mark.parametrize(
    ("tensor", "edit", "message"),
    [
        ("qzeros", lambda t: None, "missing"),  # zero points dropped
        ("qweight", lambda t: t[:, :8], r"expected shape \[256, 16\], got \[256, 8\]"),  # packed width != N/8
        ("qweight", lambda t: t.to(torch.int16), "expected dtype torch.int32"),  # narrowed words
        ("scales", lambda t: t[:4], r"expected shape \[8, 128\]"),  # G != K/32
        ("scales", lambda t: t.to(torch.float16), "expected dtype torch.bfloat16"),  # differs from the others
        ("scales", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "NaN"),  # NaN scales
        ("qzeros", lambda t: t.t().contiguous(), r"expected shape \[8, 16\], got \[16, 8\]"),  # transposed
    ],
)
def test_corrupted_tensor(fixture_copy: FixtureCopy, tensor: str, edit: TensorEdit, message: str) -> None:
    copy = fixture_copy(AWQ_W4_G32)

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        new = edit(tensors[KEY + tensor])
        if new is None:
            del tensors[KEY + tensor]
        else:
            tensors[KEY + tensor] = new

    edit_tensors(copy, corrupt)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(copy).load_layer(0)
    assert str(copy) in str(info.value) and KEY + tensor in str(info.value)


def test_corrupted_config(fixture_copy: FixtureCopy) -> None:
    copy = fixture_copy(AWQ_W4_G32)
    edit_config(copy, lambda c: c["quantization_config"].update({"bits": 3}))
    with pytest.raises(UnsupportedError, match="bits=3") as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)
