"""GPTQ (GPTQModel / AutoGPTQ packing): the real desc_act fixture against its bf16 source, an independent
decoder, v1/v2 writer/reader round trips and corrupted checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    GPTQ_W4_G32_DESCACT,
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
    gptq,
)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Measured relative Frobenius error of the fixture's experts vs the bf16 source: 0.117-0.129 (GPTQ on 16
# random calibration samples). A wrong layout gives 0.28 (g_idx ignored) to 1.4 (gate/up swapped).
GPTQ_BOUND = 0.16


def decode_layer(path: Path, layer: int, bits: int = 4, use_g_idx: bool = True, v1: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand decoder of GPTQ tensors: float64 w13 [E, 2I, H] and w2 [E, H, I].

    `use_g_idx=False` (consecutive groups) and `v1=False` (zeros read as stored) are deliberately wrong for
    this fixture."""
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    with safe_open(path / "model.safetensors", "pt") as f:
        for projection in PROJECTIONS:
            for expert in range(NUM_EXPERTS):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{projection}."
                qweight = f.get_tensor(prefix + "qweight")  # [K / P, N], packed along K
                scales = f.get_tensor(prefix + "scales").double()  # [G, N]
                codes = unpack_words(qweight.t().contiguous(), bits).double()  # [N, K]
                zeros = unpack_words(f.get_tensor(prefix + "qzeros"), bits).double()  # [G, N]
                if v1:
                    zeros = zeros + 1
                k = codes.shape[1]
                g_idx = f.get_tensor(prefix + "g_idx").long() if use_g_idx else torch.arange(k) // 32
                parts[projection].append((codes - zeros[g_idx].t()) * scales[g_idx].t())
    w13 = torch.cat([torch.stack(parts["gate_proj"]), torch.stack(parts["up_proj"])], dim=1)
    return w13, torch.stack(parts["down_proj"])


# ----- the real fixture -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])  # both MoE layers
def test_fixture_matches_bf16_source(layer: int) -> None:
    ckpt = open_checkpoint(GPTQ_W4_G32_DESCACT)
    assert ckpt.format == CheckpointFormat.GPTQ  # checkpoint_format "gptq": v1 zeros
    assert ckpt.scheme == WeightScheme(4, 32, act_order=True, scale_dtype=torch.float16)
    experts = ckpt.load_layer(layer)
    src13, src2 = load_source_experts(layer)
    # desc_act: the g_idx really is a permutation of groups, not k // 32.
    g_idx = experts.w13.g_idx
    assert g_idx is not None and not torch.equal(g_idx[0].long(), torch.arange(g_idx.shape[1]) // 32)
    assert (torch.bincount(g_idx[0].long()) == 32).all()
    for weight, source in ((experts.w13, src13), (experts.w2, src2)):
        error = relative_error(dequantize_ref(weight), source)
        assert 0.05 < error < GPTQ_BOUND, f"relative error {error:.4f}"
    w13, _ = experts.dequantize()
    torch.testing.assert_close(w13.double(), dequantize_ref(experts.w13), rtol=0, atol=1e-6)


def test_fixture_matches_independent_decoder() -> None:
    experts = open_checkpoint(GPTQ_W4_G32_DESCACT).load_layer(0)
    w13, w2 = decode_layer(GPTQ_W4_G32_DESCACT, 0)
    torch.testing.assert_close(dequantize_ref(experts.w13), w13, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_ref(experts.w2), w2, rtol=0, atol=0)
    assert experts.w13.zeros is None  # symmetric: v1 stores 7 per nibble, meaning the implicit zero 8


@pytest.mark.parametrize(
    ("wrong", "minimum"),
    [
        ("ignore_g_idx", 0.25),  # consecutive groups instead of desc_act's g_idx: measured 0.28
        ("v2_zeros", 0.3),  # stored zero - 1 taken as the zero: every element a step off, measured 0.34
        ("swap_gate_up", 1.0),  # gate rows where up rows belong: measured 1.4
    ],
)
def test_wrong_layout_gives_a_much_larger_error(wrong: str, minimum: float) -> None:
    src13, _ = load_source_experts(0)
    right, _ = decode_layer(GPTQ_W4_G32_DESCACT, 0)
    w13, _ = decode_layer(GPTQ_W4_G32_DESCACT, 0, use_g_idx=wrong != "ignore_g_idx", v1=wrong != "v2_zeros")
    if wrong == "swap_gate_up":
        w13 = w13.roll(INTERMEDIATE, dims=1)
    assert relative_error(right, src13) < GPTQ_BOUND
    assert relative_error(w13, src13) > minimum
    assert relative_error(w13, src13) > 2 * relative_error(right, src13)


def test_fixture_tensor_layout() -> None:
    with safe_open(GPTQ_W4_G32_DESCACT / "model.safetensors", "pt") as f:
        prefix = "model.layers.0.mlp.experts.0.gate_proj."
        assert f.get_slice(prefix + "qweight").get_shape() == [256 // 8, 128]  # [K / 8, N]
        assert f.get_slice(prefix + "qzeros").get_shape() == [256 // 32, 128 // 8]  # [G, N / 8]
        assert f.get_slice(prefix + "scales").get_dtype() == "F16"
        assert (f.get_tensor(prefix + "qzeros") == 0x77777777).all()  # v1 symmetric: 8 - 1 per nibble


# ----- writer / reader round trips ----------------------------------------------------------------------------

@st.composite
def gptq_cases(draw: st.DrawFn) -> tuple[WeightScheme, str, int, int, int, int]:
    bits = draw(st.sampled_from([4, 8]))
    scheme = WeightScheme(
        bits,
        draw(st.sampled_from([32, 64, 128, None])),
        zero_point=draw(st.booleans()),
        act_order=draw(st.booleans()),  # desc_act with a shuffled g_idx
        scale_dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
    )
    fmt = draw(st.sampled_from(["gptq", "gptq_v2"]))
    per_word = 32 // bits
    # K must fill whole words; it need not fill whole groups (the last group is partial, g_idx records it).
    h = per_word * draw(st.integers(1, 24))
    i = per_word * draw(st.integers(1, 12))
    return scheme, fmt, draw(st.integers(1, 3)), h, i, draw(st.integers(0, 2**31 - 1))


@given(case=gptq_cases(), layer=st.integers(0, 3), mixtral=st.booleans())
def test_round_trip_is_bit_exact(case: tuple[WeightScheme, str, int, int, int, int], layer: int,
                                 mixtral: bool) -> None:
    scheme, fmt_name, e, h, i, seed = case
    fmt = CheckpointFormat(fmt_name)
    naming = MIXTRAL_NAMING if mixtral else HF_NAMING
    # v1 stores zero - 1, so a zero point of 0 cannot be written: draw zeros from 1 up for v1.
    zero_low = 1 if fmt_name == "gptq" else 0
    experts = random_experts(scheme, e, h, i, torch.Generator().manual_seed(seed), zero_low=zero_low)
    tensors = assert_round_trip(experts, fmt, layer, naming)
    per_word = 32 // scheme.bits
    prefix = naming.projection_prefix(layer, 0, naming.gate)  # gate: [N=I, K=H]
    assert tensors[prefix + "qweight"].shape == (h // per_word, i)
    assert tensors[prefix + "qzeros"].shape == (scheme.num_groups(h), -(-i // per_word))
    assert tensors[prefix + "scales"].shape == (scheme.num_groups(h), i)
    assert tensors[prefix + "g_idx"].shape == (h,)  # always written, trivial without act-order


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])  # v1 (stored zero - 1) and v2 zero points
@pytest.mark.parametrize("act_order", [False, True])  # desc_act g_idx or trivial g_idx
@pytest.mark.parametrize("zero_point", [False, True])  # sym (implicit zeros stored) or asymmetric
@pytest.mark.parametrize("group", [32, 64, 128, None])  # group-wise and channel-wise
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_every_scheme(bits: int, group: int | None, zero_point: bool, act_order: bool, fmt: str) -> None:
    """Every scheme once, with H=104 and I=40 (whole words, partial last groups)."""
    experts = random_experts(WeightScheme(bits, group, zero_point, act_order, torch.float16), 2, 104, 40,
                             zero_low=1 if fmt == "gptq" else 0)
    assert_round_trip(experts, CheckpointFormat(fmt), 0)


@pytest.mark.parametrize(
    ("fmt", "zero", "stored"),
    [
        ("gptq", 8, 7),  # v1: zero - 1
        ("gptq_v2", 8, 8),  # v2: the zero itself
        ("gptq", 1, 0),  # v1's smallest writable zero
    ],
)
def test_zero_point_encoding(fmt: str, zero: int, stored: int) -> None:
    scheme = WeightScheme(4, None, zero_point=True, scale_dtype=torch.float16)
    projection = Projection(torch.zeros(8, 8, dtype=torch.uint8), torch.ones(8, 1, dtype=torch.float16),
                            torch.full((8, 1), zero, dtype=torch.uint8), None)
    qzeros = gptq.write_projection(projection, scheme, fmt)["qzeros"]
    nibble = stored * 0x11111111
    assert qzeros.tolist() == [[nibble - 2**32 if nibble >= 2**31 else nibble]]


def test_qweight_packs_along_k() -> None:
    """Word w of column n holds rows 8w..8w+7, row 8w+j in bits [4j, 4j+4)."""
    scheme = WeightScheme(4, None, scale_dtype=torch.float16)
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16) % 16  # one output row, K=16
    out = gptq.write_projection(Projection(codes, torch.ones(1, 1, dtype=torch.float16), None, None), scheme)
    assert out["qweight"].shape == (2, 1)
    assert out["qweight"][:, 0].tolist() == [0x76543210, 0xFEDCBA98 - 2**32]


def test_v1_cannot_write_zero_point_zero() -> None:
    scheme = WeightScheme(4, None, zero_point=True, scale_dtype=torch.float16)
    projection = Projection(torch.zeros(8, 8, dtype=torch.uint8), torch.ones(8, 1, dtype=torch.float16),
                            torch.zeros(8, 1, dtype=torch.uint8), None)
    with pytest.raises(UnsupportedError, match="gptq_v2"):
        gptq.write_projection(projection, scheme, "gptq")
    assert gptq.write_projection(projection, scheme, "gptq_v2")["qzeros"].tolist() == [[0]]


# ----- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("config", "scheme"),
    [
        ({"bits": 4, "group_size": 128, "desc_act": False, "sym": True}, WeightScheme(4, 128)),  # plain GPTQ
        ({"bits": 8, "group_size": -1, "sym": False}, WeightScheme(8, None, zero_point=True)),  # channel-wise
        ({"bits": 4, "group_size": 32, "desc_act": True}, WeightScheme(4, 32, act_order=True)),  # sym by default
    ],
)
def test_scheme_from_config(config: dict, scheme: WeightScheme) -> None:
    assert gptq.scheme_from_config(config, torch.bfloat16) == scheme


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bits": 3, "group_size": 128}, "bits=3"),  # 3-bit GPTQ
        ({"bits": 2, "group_size": 128}, "bits=2"),  # 2-bit GPTQ
        ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),  # pre-repacked checkpoints
        ({"bits": 4, "group_size": 0}, "group_size=0"),  # nonsense group
        ({"bits": 4, "group_size": 128, "desc_act": "false"}, "desc_act='false'"),  # a string, not read as true
        ({"bits": 4, "group_size": 128, "sym": "true"}, "sym='true'"),  # same
    ],
)
def test_scheme_from_config_rejects(config: dict, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        gptq.scheme_from_config(config, torch.float16)


# ----- bad input ------------------------------------------------------------------------------------------------

def _projection_tensors(scheme: WeightScheme, n: int, k: int, fmt: str = "gptq", zero_low: int = 1
                        ) -> dict[str, torch.Tensor]:
    experts = random_experts(scheme, 1, k, n, zero_low=zero_low)  # gate projection is [N=n, K=k]
    w13 = experts.w13
    projection = Projection(w13.codes[0, :n], w13.scales[0, :n], None if w13.zeros is None else w13.zeros[0, :n],
                            None if w13.g_idx is None else w13.g_idx[0])
    return gptq.write_projection(projection, scheme, fmt)


def test_k_must_fill_words() -> None:
    scheme = WeightScheme(4, 32, scale_dtype=torch.float16)
    with pytest.raises(CheckpointError, match="not a multiple of 8"):
        gptq.read_projection(DictSource({}), "x.", scheme, (16, 100))


def test_symmetric_checkpoint_with_other_zeros() -> None:
    asym = WeightScheme(4, 32, zero_point=True, scale_dtype=torch.float16)
    tensors = _projection_tensors(asym, 16, 64)
    tensors["qzeros"][0, 0] = 0x76777777  # one nibble stores 6 (zero 7) in a sym=true checkpoint
    with pytest.raises(CheckpointError, match="every zero point must be 8") as info:
        gptq.read_projection(DictSource(tensors, "ckpt"), "", WeightScheme(4, 32, scale_dtype=torch.float16), (16, 64))
    assert info.value.tensor == "qzeros"


def test_v1_zero_that_does_not_fit() -> None:
    scheme = WeightScheme(4, 32, zero_point=True, scale_dtype=torch.float16)
    tensors = _projection_tensors(scheme, 16, 64)
    tensors["qzeros"][0, 0] = 0x7777777F  # stored 15 means zero 16
    with pytest.raises(CheckpointError, match="does not fit in 4 bits"):
        gptq.read_projection(DictSource(tensors), "", scheme, (16, 64), "gptq")
    gptq.read_projection(DictSource(tensors), "", scheme, (16, 64), "gptq_v2")  # but as v2, 15 is a zero


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g.fill_(2), r"must lie in \[0, 2\)"),  # a group past the last one
        (lambda g: g.fill_(-1), r"must lie in \[0, 2\)"),  # negative
        (lambda g: g.zero_(), "holds 64 elements, more than group_size 32"),  # every row in group 0
    ],
)
def test_bad_g_idx(edit: TensorEdit, message: str) -> None:
    scheme = WeightScheme(4, 32, act_order=True, scale_dtype=torch.float16)
    tensors = _projection_tensors(scheme, 16, 64)
    edit(tensors["g_idx"])
    with pytest.raises(CheckpointError, match=message):
        gptq.read_projection(DictSource(tensors), "", scheme, (16, 64))


def test_g_idx_without_desc_act_must_be_trivial() -> None:
    scheme = WeightScheme(4, 32, scale_dtype=torch.float16)
    tensors = _projection_tensors(scheme, 16, 64)
    gptq.read_projection(DictSource(tensors), "", scheme, (16, 64))  # trivial g_idx: fine
    tensors["g_idx"] = tensors["g_idx"].flip(0)
    with pytest.raises(CheckpointError, match="desc_act is false"):
        gptq.read_projection(DictSource(tensors), "", scheme, (16, 64))
    del tensors["g_idx"]  # and a checkpoint without g_idx at all is fine too
    gptq.read_projection(DictSource(tensors), "", scheme, (16, 64))


KEY = "model.layers.1.mlp.experts.5.down_proj."


@pytest.mark.parametrize(
    ("tensor", "edit", "message"),
    [
        ("g_idx", lambda t: None, "missing"),  # desc_act needs g_idx
        ("qzeros", lambda t: None, "missing"),  # qzeros are always stored
        ("qweight", lambda t: t[:-1], r"expected shape \[16, 256\], got \[15, 256\]"),  # K/8 rows
        ("qweight", lambda t: t.view(torch.float32), "expected dtype torch.int32"),  # reinterpreted words
        ("scales", lambda t: t[:3], r"expected shape \[4, 256\]"),  # G = ceil(128 / 32) = 4
        ("scales", lambda t: t.to(torch.bfloat16), "expected dtype torch.float16"),  # differs from the others
        ("scales", lambda t: t.index_fill(1, torch.tensor([7]), float("inf")), "infinite"),  # inf scale
        ("qzeros", lambda t: t[:, :16], r"expected shape \[4, 32\]"),  # packed width not N/8
        ("g_idx", lambda t: t[:100], r"expected shape \[128\]"),  # g_idx not [K]
        ("g_idx", lambda t: t.float(), "expected dtype"),  # g_idx as floats
    ],
)
def test_corrupted_tensor(fixture_copy: FixtureCopy, tensor: str, edit: TensorEdit, message: str) -> None:
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        new = edit(tensors[KEY + tensor])
        if new is None:
            del tensors[KEY + tensor]
        else:
            tensors[KEY + tensor] = new

    edit_tensors(copy, corrupt)
    ckpt = open_checkpoint(copy)
    ckpt.load_layer(0)  # untouched layer
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.load_layer(1)
    assert str(copy) in str(info.value) and KEY + tensor in str(info.value)


def test_gate_and_up_g_idx_must_agree(fixture_copy: FixtureCopy) -> None:
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)
    key = "model.layers.0.mlp.experts.2.up_proj.g_idx"
    edit_tensors(copy, lambda t: t.__setitem__(key, t[key].roll(1)))
    with pytest.raises(CheckpointError, match="different act-order g_idx"):
        open_checkpoint(copy).load_layer(0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"bits": 3}, "bits=3"),  # unsupported bits
        ({"checkpoint_format": "gptq_v3"}, "gptq_v3"),  # unknown zero-point convention
    ],
)
def test_corrupted_config(fixture_copy: FixtureCopy, edit: dict, message: str) -> None:
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)
    edit_config(copy, lambda c: c["quantization_config"].update(edit))
    with pytest.raises(UnsupportedError, match=message) as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)
