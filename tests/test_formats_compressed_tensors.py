"""compressed-tensors `pack-quantized`: the real llm-compressor fixtures against their bf16 source, an
independent decoder, writer/reader round trips, config parsing and corrupted checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    CT_W4_G32_SYM,
    CT_W4_G128_ASYM,
    CT_W8_G128_SYM,
    HIDDEN,
    INTERMEDIATE,
    NUM_EXPERTS,
    ConfigEdit,
    FixtureCopy,
    TensorEdit,
    assert_round_trip,
    dequantize_ref,
    edit_config,
    edit_tensors,
    load_source_experts,
    random_experts,
    relative_error,
    step_ref,
    unpack_words,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from wna16moe import CheckpointError, UnsupportedError, WeightScheme, open_checkpoint
from wna16moe.formats import HF_NAMING, MIXTRAL_NAMING, CheckpointFormat, DictSource, Projection
from wna16moe.formats import compressed_tensors as ct
from wna16moe.formats.packing import pack_int32

# (fixture, bits, group size, symmetric, bound in steps). The bounds sit just above what llm-compressor's
# bf16 rounding gives (measured 0.526 int4 sym, 0.585 int4 asym, 0.749 int8), per element, own group's scale.
FIXTURES = [
    pytest.param(CT_W4_G32_SYM, 4, 32, True, 0.55, id="w4a16-g32-sym"),
    pytest.param(CT_W4_G128_ASYM, 4, 128, False, 0.62, id="w4a16-g128-asym"),
    pytest.param(CT_W8_G128_SYM, 8, 128, True, 0.76, id="w8a16-g128-sym"),
]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def decode_layer(path: Path, layer: int, bits: int, group_size: int, symmetric: bool,
                 nibble_order: str = "lsb", ignore_zero_points: bool = False) -> dict[str, torch.Tensor]:
    """Decode the raw tensors of one layer by hand into float64 w13 [E, 2I, H], w2 [E, H, I] and their steps.

    `nibble_order="msb"` and `ignore_zero_points` are deliberately wrong layouts."""
    per_word = 32 // bits
    order = list(reversed(range(per_word))) if nibble_order == "msb" else None
    weights: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    steps: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    with safe_open(path / "model.safetensors", "pt") as f:
        for projection in PROJECTIONS:
            for expert in range(NUM_EXPERTS):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{projection}."
                n, k = f.get_tensor(prefix + "weight_shape").tolist()
                codes = unpack_words(f.get_tensor(prefix + "weight_packed"), bits, order)[:, :k].double()
                group = torch.arange(k) // group_size
                scale = f.get_tensor(prefix + "weight_scale").double()[:, group]
                if symmetric or ignore_zero_points:
                    zero = torch.full_like(codes, 2.0 ** (bits - 1))
                else:  # [ceil(N/P), G] packed along N: unpack the transposed words, then transpose back
                    packed_zeros = f.get_tensor(prefix + "weight_zero_point")
                    zero = unpack_words(packed_zeros.t().contiguous(), bits)[:, :n].t().double()[:, group]
                weights[projection].append((codes - zero) * scale)
                steps[projection].append(scale)

    def fuse(parts: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        w13 = torch.cat([torch.stack(parts["gate_proj"]), torch.stack(parts["up_proj"])], dim=1)
        return w13, torch.stack(parts["down_proj"])

    w13, w2 = fuse(weights)
    s13, s2 = fuse(steps)
    return {"w13": w13, "w2": w2, "s13": s13, "s2": s2}


def worst_steps(approx: torch.Tensor, exact: torch.Tensor, step: torch.Tensor) -> float:
    return float(((approx.double() - exact.double()).abs() / step).max())


# ----- the real fixtures --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])  # both MoE layers
@pytest.mark.parametrize(("path", "bits", "group_size", "symmetric", "bound"), FIXTURES)
def test_fixture_matches_bf16_source(path: Path, bits: int, group_size: int, symmetric: bool, bound: float,
                                     layer: int) -> None:
    ckpt = open_checkpoint(path)
    assert ckpt.format == CheckpointFormat.COMPRESSED_TENSORS
    assert ckpt.scheme == WeightScheme(bits, group_size, not symmetric, False, torch.bfloat16)
    experts = ckpt.load_layer(layer)
    src13, src2 = load_source_experts(layer)
    for weight, source in ((experts.w13, src13), (experts.w2, src2)):
        worst = worst_steps(dequantize_ref(weight), source, step_ref(weight))
        assert worst <= bound, f"worst element {worst:.3f} steps > {bound}"
        assert worst > 0.45  # the fixture really is quantized: RTN error reaches about half a step
    # The library's own dequantize agrees with the reference dequantization.
    w13, w2 = experts.dequantize()
    torch.testing.assert_close(w13.double(), dequantize_ref(experts.w13), rtol=0, atol=1e-6)
    torch.testing.assert_close(w2.double(), dequantize_ref(experts.w2), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("path", "bits", "group_size", "symmetric", "bound"), FIXTURES)
def test_fixture_matches_independent_decoder(path: Path, bits: int, group_size: int, symmetric: bool,
                                             bound: float) -> None:
    """The reader agrees with a hand decoder of the raw tensors; the decoder itself meets the bound."""
    layer = 1
    decoded = decode_layer(path, layer, bits, group_size, symmetric)
    experts = open_checkpoint(path).load_layer(layer)
    torch.testing.assert_close(dequantize_ref(experts.w13), decoded["w13"], rtol=0, atol=0)
    torch.testing.assert_close(dequantize_ref(experts.w2), decoded["w2"], rtol=0, atol=0)
    src13, _ = load_source_experts(layer)
    assert worst_steps(decoded["w13"], src13, decoded["s13"]) <= bound


@pytest.mark.parametrize(
    ("path", "bits", "group_size", "symmetric", "bound"),
    [
        pytest.param(CT_W4_G32_SYM, 4, 32, True, 0.55, id="w4a16-g32-sym"),
        pytest.param(CT_W8_G128_SYM, 8, 128, True, 0.76, id="w8a16-g128-sym"),
    ],
)
@pytest.mark.parametrize(
    "wrong",
    [
        "msb",  # codes read most-significant slot first
        "swap_gate_up",  # gate and up halves of w13 exchanged
    ],
)
def test_wrong_layout_fails_the_bound(path: Path, bits: int, group_size: int, symmetric: bool, bound: float,
                                      wrong: str) -> None:
    """The bound above can fail: a plausible wrong layout is many steps off."""
    src13, _ = load_source_experts(0)
    decoded = decode_layer(path, 0, bits, group_size, symmetric, nibble_order="msb" if wrong == "msb" else "lsb")
    w13, s13 = decoded["w13"], decoded["s13"]
    if wrong == "swap_gate_up":
        w13, s13 = w13.roll(INTERMEDIATE, dims=1), s13.roll(INTERMEDIATE, dims=1)
    assert worst_steps(w13, src13, s13) > 5 * bound
    assert relative_error(w13, src13) > 1.0


def test_asymmetric_zero_points_matter() -> None:
    """Dropping the asymmetric fixture's zero points (treating it as symmetric) breaks the bound."""
    src13, src2 = load_source_experts(0)
    right = decode_layer(CT_W4_G128_ASYM, 0, 4, 128, symmetric=False)
    wrong = decode_layer(CT_W4_G128_ASYM, 0, 4, 128, symmetric=False, ignore_zero_points=True)
    assert worst_steps(right["w2"], src2, right["s2"]) <= 0.62
    assert worst_steps(wrong["w2"], src2, wrong["s2"]) > 1.5
    assert relative_error(wrong["w13"], src13) > 3 * relative_error(right["w13"], src13)


def test_fixture_tensor_layout() -> None:
    """What llm-compressor wrote, as the reader expects it (ecosystem.md §4 table)."""
    with safe_open(CT_W4_G128_ASYM / "model.safetensors", "pt") as f:
        prefix = "model.layers.0.mlp.experts.0.gate_proj."
        assert f.get_slice(prefix + "weight_packed").get_shape() == [INTERMEDIATE, HIDDEN // 8]
        assert f.get_slice(prefix + "weight_scale").get_shape() == [INTERMEDIATE, HIDDEN // 128]
        assert f.get_slice(prefix + "weight_zero_point").get_shape() == [INTERMEDIATE // 8, HIDDEN // 128]
        assert f.get_tensor(prefix + "weight_shape").tolist() == [INTERMEDIATE, HIDDEN]


# ----- writer / reader round trips ----------------------------------------------------------------------------

@st.composite
def ct_cases(draw: st.DrawFn) -> tuple[WeightScheme, int, int, int, int]:
    bits = draw(st.sampled_from([4, 8]))
    scheme = WeightScheme(
        bits,
        draw(st.sampled_from([32, 64, 128, None])),  # group-wise and channel-wise
        zero_point=draw(st.booleans()),
        act_order=draw(st.booleans()),  # actorder "group": a stored g_idx
        scale_dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
    )
    e = draw(st.integers(1, 3))
    h = draw(st.integers(1, 150))  # any K: compressed-tensors pads the last packed word and the last group
    i = draw(st.integers(1, 80))
    return scheme, e, h, i, draw(st.integers(0, 2**31 - 1))


@given(case=ct_cases(), layer=st.integers(0, 5), mixtral=st.booleans())
def test_round_trip_is_bit_exact(case: tuple[WeightScheme, int, int, int, int], layer: int, mixtral: bool) -> None:
    scheme, e, h, i, seed = case
    naming = MIXTRAL_NAMING if mixtral else HF_NAMING
    experts = random_experts(scheme, e, h, i, torch.Generator().manual_seed(seed))
    tensors = assert_round_trip(experts, CheckpointFormat.COMPRESSED_TENSORS, layer, naming)
    # The stored layout of one projection: gate [I, H].
    per_word = 32 // scheme.bits
    prefix = naming.projection_prefix(layer, 0, naming.gate)
    assert tensors[prefix + "weight_packed"].shape == (i, -(-h // per_word))
    assert tensors[prefix + "weight_packed"].dtype == torch.int32
    assert tensors[prefix + "weight_scale"].shape == (i, scheme.num_groups(h))
    assert tensors[prefix + "weight_shape"].tolist() == [i, h]
    assert (prefix + "weight_zero_point" in tensors) == scheme.zero_point
    if scheme.zero_point:
        assert tensors[prefix + "weight_zero_point"].shape == (-(-i // per_word), scheme.num_groups(h))
    assert (prefix + "weight_g_idx" in tensors) == scheme.act_order


@pytest.mark.parametrize("act_order", [False, True])  # actorder "group" (stored g_idx) or none
@pytest.mark.parametrize("zero_point", [False, True])  # symmetric or packed zero points
@pytest.mark.parametrize("group", [32, 64, 128, None])  # group-wise and channel-wise
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_every_scheme(bits: int, group: int | None, zero_point: bool, act_order: bool) -> None:
    """Every scheme once, with H=100 and I=36: partial last groups and padded last words on both projections."""
    experts = random_experts(WeightScheme(bits, group, zero_point, act_order), 2, 100, 36)
    assert_round_trip(experts, CheckpointFormat.COMPRESSED_TENSORS, 3)


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (4, 0x76543210),  # eight nibbles, element j in bits [4j, 4j+4)
        (8, 0x03020100),  # four bytes, element j in bits [8j, 8j+8)
    ],
)
def test_packing_known_answer(bits: int, expected: int) -> None:
    per_word = 32 // bits
    codes = torch.arange(per_word, dtype=torch.uint8).view(1, per_word)
    projection = ct.Projection(codes, torch.ones(1, 1), None, None)
    packed = ct.write_projection(projection, WeightScheme(bits, None, scale_dtype=torch.float32))["weight_packed"]
    assert packed.tolist() == [[expected]]


def test_packing_known_answer_high_bit() -> None:
    """A code of 15 in the top nibble makes a negative int32; it must still unpack to 15."""
    codes = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 15, 3]], dtype=torch.uint8)  # K=9: a second, padded word
    scheme = WeightScheme(4, None, scale_dtype=torch.float32)
    out = ct.write_projection(ct.Projection(codes, torch.ones(1, 1), None, None), scheme)
    assert out["weight_packed"].tolist() == [[0xF0000001 - 2**32, 3]]
    back = ct.read_projection(DictSource(out), "", scheme, (1, 9))
    assert back.codes.tolist() == codes.tolist()


# ----- quantization_config parsing -------------------------------------------------------------------------

def _config(**weights: object) -> dict:
    config = ct.write_config(WeightScheme(4, 32), ignore=["lm_head"])
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


MODULE = "model.layers.0.mlp.experts.0.gate_proj"


@pytest.mark.parametrize(
    ("weights", "scheme"),
    [
        ({}, WeightScheme(4, 32)),  # what write_config writes
        ({"strategy": "channel", "group_size": None}, WeightScheme(4, None)),  # channel-wise from the strategy
        ({"num_bits": 8, "symmetric": False, "group_size": 128}, WeightScheme(8, 128, zero_point=True)),  # int8 zp
        ({"actorder": "group"}, WeightScheme(4, 32, act_order=True)),  # stored g_idx
        ({"actorder": "weight"}, WeightScheme(4, 32)),  # static reorder: no g_idx
    ],
)
def test_scheme_from_config(weights: dict, scheme: WeightScheme) -> None:
    assert ct.scheme_from_config(_config(**weights), MODULE, torch.bfloat16) == scheme


def test_scheme_from_config_targets() -> None:
    config = _config()
    config["config_groups"]["group_0"]["targets"] = ["re:.*experts.*"]  # a regex target
    assert ct.scheme_from_config(config, MODULE, torch.float16) == WeightScheme(4, 32, scale_dtype=torch.float16)
    config["config_groups"]["group_0"]["targets"] = ["re:.*self_attn.*"]
    with pytest.raises(UnsupportedError, match="no compressed-tensors config group targets"):
        ct.scheme_from_config(config, MODULE, torch.bfloat16)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_bits": 3}, "bits=3"),  # unsupported bit width
        ({"num_bits": 2}, "bits=2"),  # same
        ({"type": "float"}, "type 'float'"),  # fp4/fp8 weights
        ({"strategy": "tensor"}, "strategy 'tensor'"),  # one scale per tensor
        ({"strategy": "group", "group_size": None}, "group_size"),  # a group strategy needs its size
        ({"actorder": "dynamic"}, "actorder 'dynamic'"),  # unknown act-order mode
        ({"symmetric": "false"}, "symmetric='false'"),  # a string, not read as true
    ],
)
def test_scheme_from_config_rejects(edit: dict, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        ct.scheme_from_config(_config(**edit), MODULE, torch.bfloat16)


def test_scheme_from_config_rejects_group_settings() -> None:
    config = _config()
    config["config_groups"]["group_0"]["format"] = "naive-quantized"  # unpacked int8
    with pytest.raises(UnsupportedError, match="naive-quantized"):
        ct.scheme_from_config(config, MODULE, torch.bfloat16)
    config = _config()
    config["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}  # W8A8
    with pytest.raises(UnsupportedError, match="weight-only"):
        ct.scheme_from_config(config, MODULE, torch.bfloat16)
    config = _config()
    config["ignore"] = ["re:.*experts.*"]  # experts left unquantized
    with pytest.raises(UnsupportedError, match="ignore"):
        ct.scheme_from_config(config, MODULE, torch.bfloat16)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(config_groups=[c["config_groups"]["group_0"]]), "config_groups must be an object"),
        (lambda c: c["config_groups"].update(group_0="Linear"), "config group group_0 must be an object"),
        (lambda c: c["config_groups"]["group_0"].update(weights=[4]), r"weights \(config group group_0\) must be"),
        (lambda c: c.update(ignore="lm_head"), "ignore must be a list"),  # (a string matched letter by letter)
        (lambda c: c["config_groups"]["group_0"].update(targets="Linear"), r"targets \(config group group_0\) must"),
    ],
)
def test_scheme_from_config_rejects_malformed_groups(edit: ConfigEdit, message: str) -> None:
    config = _config()
    edit(config)
    with pytest.raises(UnsupportedError, match=message):
        ct.scheme_from_config(config, MODULE, torch.bfloat16)


def _projection_tensors(scheme: WeightScheme, n: int, k: int) -> dict[str, torch.Tensor]:
    """One random gate projection [N=n, K=k] as llm-compressor writes it."""
    w13 = random_experts(scheme, 1, k, n).w13
    return ct.write_projection(Projection(w13.codes[0, :n], w13.scales[0, :n],
                                          None if w13.zeros is None else w13.zeros[0, :n],
                                          None if w13.g_idx is None else w13.g_idx[0]), scheme)


def test_zero_points_beside_symmetric_weights() -> None:
    """Zero points stored although the config says symmetric: read when they are all the midpoint (they change
    nothing), an error otherwise (dropping them would dequantize every weight off by z - 8 steps)."""
    sym = WeightScheme(4, 32)
    tensors = _projection_tensors(sym, 16, 64)
    zeros = torch.full((16, 2), 8, dtype=torch.uint8)  # [N, G]: every zero the midpoint
    tensors["weight_zero_point"] = pack_int32(zeros, 4, dim=0)
    assert ct.read_projection(DictSource(tensors), "", sym, (16, 64)).zeros is None
    zeros[3, 1] = 7
    tensors["weight_zero_point"] = pack_int32(zeros, 4, dim=0)
    with pytest.raises(CheckpointError, match="every zero point must be 8") as info:
        ct.read_projection(DictSource(tensors, "ckpt"), "", sym, (16, 64))
    assert info.value.tensor == "weight_zero_point"


def test_g_idx_without_actorder_group_must_be_trivial() -> None:
    scheme = WeightScheme(4, 32)
    tensors = _projection_tensors(scheme, 16, 64)
    tensors["weight_g_idx"] = scheme.group_of(64).to(torch.int32)
    ct.read_projection(DictSource(tensors), "", scheme, (16, 64))  # consecutive groups: nothing to apply
    tensors["weight_g_idx"] = tensors["weight_g_idx"].flip(0)
    with pytest.raises(CheckpointError, match="actorder is not 'group'") as info:
        ct.read_projection(DictSource(tensors), "", scheme, (16, 64))
    assert info.value.tensor == "weight_g_idx"

# ----- corrupted checkpoints --------------------------------------------------------------------------------

KEY = "model.layers.0.mlp.experts.3.up_proj."


@pytest.mark.parametrize(
    ("path", "tensor", "edit", "message"),
    [
        (CT_W4_G32_SYM, "weight_scale", lambda t: None, "missing"),  # tensor dropped
        (CT_W4_G32_SYM, "weight_packed", lambda t: t[:, :-1], r"expected shape \[128, 32\], got \[128, 31\]"),
        (CT_W4_G32_SYM, "weight_packed", lambda t: t.to(torch.int64), "expected dtype torch.int32"),  # dtype
        (CT_W4_G32_SYM, "weight_scale", lambda t: t[:, :7], r"expected shape \[128, 8\]"),  # G does not fit K/32
        (CT_W4_G32_SYM, "weight_scale", lambda t: t.to(torch.float16), "expected dtype torch.bfloat16"),  # mixed
        (CT_W4_G32_SYM, "weight_scale", lambda t: t.index_fill(1, torch.tensor([2]), float("nan")), "NaN"),
        (CT_W4_G32_SYM, "weight_scale", lambda t: -t, "negative"),  # negative scales
        (CT_W4_G32_SYM, "weight_shape", lambda t: torch.tensor([128, 250]), r"expected \[128, 256\]"),  # width
        (CT_W4_G32_SYM, "weight_shape", lambda t: t.float(), "expected dtype"),  # weight_shape as floats
        (CT_W4_G128_ASYM, "weight_zero_point", lambda t: None, "missing"),  # asymmetric without zero points
        (CT_W4_G128_ASYM, "weight_zero_point", lambda t: t[:8], r"expected shape \[16, 2\]"),  # packed along N
    ],
)
def test_corrupted_tensor(fixture_copy: FixtureCopy, path: Path, tensor: str, edit: TensorEdit, message: str) -> None:
    copy = fixture_copy(path)

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        new = edit(tensors[KEY + tensor])
        if new is None:
            del tensors[KEY + tensor]
        else:
            tensors[KEY + tensor] = new

    edit_tensors(copy, corrupt)
    ckpt = open_checkpoint(copy)
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.load_layer(0)
    assert info.value.checkpoint == str(copy) and info.value.tensor == KEY + tensor
    assert str(copy) in str(info.value) and KEY + tensor in str(info.value)
    ckpt.load_layer(1)  # the other layer is untouched and still loads


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_bits": 3}, "bits=3"),  # unsupported bits
        ({"type": "float"}, "'float'"),  # float weights
    ],
)
def test_corrupted_config(fixture_copy: FixtureCopy, edit: dict, message: str) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    edit_config(copy, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(edit))
    with pytest.raises(UnsupportedError, match=message) as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)  # the error names the checkpoint
