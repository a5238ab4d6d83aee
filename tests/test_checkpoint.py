"""open_checkpoint: format detection, sharded and lazy reading, expert namings, router and correction bias,
the MoE config read from config.json, and broken checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    AWQ_W4_G32,
    CT_W4_G32_SYM,
    CT_W4_G128_ASYM,
    CT_W8_G128_SYM,
    GPTQ_W4_G32_DESCACT,
    HIDDEN,
    INTERMEDIATE,
    NUM_EXPERTS,
    SOURCE,
    TOP_K,
    ConfigEdit,
    FixtureCopy,
    TensorEdit,
    deepseek_config,
    edit_config,
    edit_tensors,
    load_source_router,
    random_experts,
    write_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file

from wna16moe import (
    Activation,
    CheckpointError,
    InvalidInputError,
    RoutingConfig,
    RoutingMethod,
    UnsupportedError,
    WeightScheme,
    open_checkpoint,
)
from wna16moe.formats import (
    MIXTRAL_LINEARIZED_NAMING,
    MIXTRAL_NAMING,
    CheckpointFormat,
    ExpertNaming,
    moe_config_from_hf,
    quantization_config,
    write_experts,
)
from wna16moe.quantized import QuantizedExperts


def assert_same_experts(a: QuantizedExperts, b: QuantizedExperts) -> None:
    for x, y in ((a.w13, b.w13), (a.w2, b.w2)):
        assert x.scheme == y.scheme
        assert torch.equal(x.codes, y.codes) and torch.equal(x.scales, y.scales)
        for p, q in ((x.zeros, y.zeros), (x.g_idx, y.g_idx)):
            assert (p is None) == (q is None)
            if p is not None:
                assert torch.equal(p, q)


# ----- detection ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "fmt", "scheme", "scale_dtype"),
    [
        (CT_W4_G32_SYM, CheckpointFormat.COMPRESSED_TENSORS, "int4_g32_sym", torch.bfloat16),  # CT int4 sym
        (CT_W4_G128_ASYM, CheckpointFormat.COMPRESSED_TENSORS, "int4_g128_zp", torch.bfloat16),  # CT int4 asym
        (CT_W8_G128_SYM, CheckpointFormat.COMPRESSED_TENSORS, "int8_g128_sym", torch.bfloat16),  # CT int8
        (GPTQ_W4_G32_DESCACT, CheckpointFormat.GPTQ, "int4_g32_sym_actorder", torch.float16),  # GPTQ v1 desc_act
        (AWQ_W4_G32, CheckpointFormat.AWQ, "int4_g32_zp", torch.bfloat16),  # AWQ GEMM
    ],
)
def test_detection(path: Path, fmt: CheckpointFormat, scheme: str, scale_dtype: torch.dtype) -> None:
    ckpt = open_checkpoint(path)
    assert ckpt.format == fmt
    assert ckpt.scheme.name == scheme and ckpt.scheme.scale_dtype == scale_dtype
    assert ckpt.moe_layer_indices() == [0, 1]
    cfg = ckpt.moe_config()
    assert (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size) == (8, 2, 256, 128)
    assert cfg.activation == Activation.SILU and cfg.dtype == torch.bfloat16
    assert cfg.routing.method == RoutingMethod.SOFTMAX and not cfg.routing.renormalize  # norm_topk_prob: false
    assert ckpt.correction_bias(0) is None


def test_legacy_quantize_config_json(fixture_copy: FixtureCopy) -> None:
    """Without quantization_config in config.json, GPTQ's quantize_config.json is read instead."""
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)
    edit_config(copy, lambda c: c.pop("quantization_config"))
    ckpt = open_checkpoint(copy)
    assert ckpt.format == CheckpointFormat.GPTQ and ckpt.scheme.name == "int4_g32_sym_actorder"
    assert_same_experts(ckpt.load_layer(1), open_checkpoint(GPTQ_W4_G32_DESCACT).load_layer(1))


def test_gptq_v2_detected(fixture_copy: FixtureCopy) -> None:
    """checkpoint_format gptq_v2 changes how zeros are read: the v1 fixture's 7s are then not zero 8."""
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)
    edit_config(copy, lambda c: c["quantization_config"].update({"checkpoint_format": "gptq_v2"}))
    ckpt = open_checkpoint(copy)
    assert ckpt.format == CheckpointFormat.GPTQ_V2
    with pytest.raises(CheckpointError, match="every zero point must be 8"):
        ckpt.load_layer(0)


def test_expert_bytes_and_size_on_disk() -> None:
    ckpt = open_checkpoint(AWQ_W4_G32)
    assert ckpt.nbytes_on_disk() == (AWQ_W4_G32 / "model.safetensors").stat().st_size
    expected = 0
    with safe_open(AWQ_W4_G32 / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            if ".experts." in key:
                expected += f.get_tensor(key).numel() * f.get_tensor(key).element_size()
    # Per [N, K] projection: qweight K * N/8 int32, qzeros K/32 * N/8 int32, scales K/32 * N bf16.
    n_k = HIDDEN * INTERMEDIATE
    per_projection = n_k // 8 * 4 + n_k // 256 * 4 + n_k // 32 * 2
    assert ckpt.expert_nbytes() == expected == 2 * NUM_EXPERTS * 3 * per_projection


# ----- sharded and lazy reading ---------------------------------------------------------------------------------

def _sharded_copy(src: Path, dst: Path) -> Path:
    """`src` split into three shards: layer 0, layer 1, everything else; with an index."""
    config = json.loads((src / "config.json").read_text())
    shards = [lambda k: k.startswith("model.layers.0."), lambda k: k.startswith("model.layers.1."),
              lambda k: True]
    return write_checkpoint(dst, config, load_file(src / "model.safetensors"), shards)


@pytest.mark.parametrize("src", [CT_W4_G128_ASYM, GPTQ_W4_G32_DESCACT])  # packed zeros; g_idx
def test_sharded_checkpoint(src: Path, tmp_path: Path) -> None:
    sharded = _sharded_copy(src, tmp_path / "sharded")
    for name in ("quantize_config.json",):
        if (src / name).exists():
            (sharded / name).write_text((src / name).read_text())
    assert not (sharded / "model.safetensors").exists()
    ckpt, whole = open_checkpoint(sharded), open_checkpoint(src)
    assert (ckpt.format, ckpt.scheme) == (whole.format, whole.scheme)
    for layer in (0, 1):
        assert_same_experts(ckpt.load_layer(layer), whole.load_layer(layer))
        assert torch.equal(ckpt.router_weight(layer), whole.router_weight(layer))
    assert ckpt.nbytes_on_disk() == sum(f.stat().st_size for f in sharded.glob("*.safetensors"))
    assert ckpt.expert_nbytes() == whole.expert_nbytes()


def test_missing_shard_only_breaks_its_layer(tmp_path: Path) -> None:
    sharded = _sharded_copy(CT_W4_G32_SYM, tmp_path / "sharded")
    (sharded / "model-00001-of-00003.safetensors").unlink()  # layer 0's shard
    # Detection reads layer 0 expert 0's scale ...
    with pytest.raises(CheckpointError, match=re.escape("shard model-00001-of-00003.safetensors is missing")):
        open_checkpoint(sharded)
    # ... so move the scheme probe's tensors into a shard that exists, and only layer 0 stays unreadable.
    sharded2 = tmp_path / "sharded2"
    config = json.loads((CT_W4_G32_SYM / "config.json").read_text())
    probe = "model.layers.0.mlp.experts.0.gate_proj."
    shards = [lambda k: k.startswith("model.layers.0.mlp.experts.1"), lambda k: True]
    write_checkpoint(sharded2, config, load_file(CT_W4_G32_SYM / "model.safetensors"), shards)
    (sharded2 / "model-00001-of-00002.safetensors").unlink()
    ckpt = open_checkpoint(sharded2)
    assert ckpt.source.has(probe + "weight_scale")
    ckpt.load_layer(1)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.0.mlp.experts.1.gate_proj")) as info:
        ckpt.load_layer(0)
    assert "is missing" in str(info.value)


def test_index_naming_a_shard_without_the_tensor(tmp_path: Path) -> None:
    sharded = _sharded_copy(CT_W4_G32_SYM, tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.experts.2.down_proj.weight_packed"
    index["weight_map"][key] = "model-00001-of-00003.safetensors"  # wrong shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(sharded)
    message = re.escape("cannot be read from model-00001-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.load_layer(1)
    assert info.value.tensor == key


@pytest.mark.parametrize("layer", [0, 1])
def test_load_layer_reads_only_that_layer(layer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = open_checkpoint(GPTQ_W4_G32_DESCACT)
    read: list[str] = []
    get = ckpt.source.get

    def spy(key: str) -> torch.Tensor:
        read.append(key)
        return get(key)

    monkeypatch.setattr(ckpt.source, "get", spy)
    ckpt.load_layer(layer)
    assert len(read) == NUM_EXPERTS * 3 * 4  # qweight, qzeros, scales, g_idx of 3 projections per expert
    assert all(key.startswith(f"model.layers.{layer}.mlp.experts.") for key in read)


# ----- namings --------------------------------------------------------------------------------------------------

def _renamed_copy(src: Path, dst: Path, naming: ExpertNaming, layers: tuple[int, ...] = (0, 1),
                  experts: tuple[int, ...] = tuple(range(NUM_EXPERTS))) -> Path:
    """A copy of `src` with the experts (and routers) of `layers` renamed to `naming`, as a Mixtral config."""
    tensors = {}
    renames = {"gate_proj": naming.gate, "up_proj": naming.up, "down_proj": naming.down}
    for key, tensor in load_file(src / "model.safetensors").items():
        parts = key.split(".")
        if len(parts) > 4 and parts[3] == "mlp" and int(parts[2]) in layers:
            if parts[4] == "experts" and int(parts[5]) in experts:
                parts[3], parts[6] = naming.block, renames[parts[6]]
            elif parts[4] == "gate":
                parts[3] = naming.block
        tensors[".".join(parts)] = tensor
    config = json.loads((src / "config.json").read_text())
    config.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                   "intermediate_size": config.pop("moe_intermediate_size")})
    config.pop("norm_topk_prob")
    return write_checkpoint(dst, config, tensors)


@pytest.mark.parametrize(
    "naming",
    [
        MIXTRAL_NAMING,  # block_sparse_moe.experts.E.{w1,w3,w2}: transformers' Mixtral
        MIXTRAL_LINEARIZED_NAMING,  # block_sparse_moe.experts.E.{gate,up,down}_proj: llm-compressor's Mixtral
    ],
)
def test_mixtral_namings(naming: ExpertNaming, tmp_path: Path) -> None:
    copy = _renamed_copy(CT_W4_G32_SYM, tmp_path / "mixtral", naming)
    ckpt, original = open_checkpoint(copy), open_checkpoint(CT_W4_G32_SYM)
    assert ckpt.format == CheckpointFormat.COMPRESSED_TENSORS and ckpt.scheme == original.scheme
    assert ckpt.moe_layer_indices() == [0, 1]
    for layer in (0, 1):
        assert_same_experts(ckpt.load_layer(layer), original.load_layer(layer))
        assert torch.equal(ckpt.router_weight(layer), load_source_router(layer))
    cfg = ckpt.moe_config()
    assert cfg.intermediate_size == INTERMEDIATE and cfg.num_experts == NUM_EXPERTS
    assert cfg.routing.renormalize  # Mixtral always renormalizes its top-k


def test_mixed_namings_in_one_layer(tmp_path: Path) -> None:
    copy = _renamed_copy(CT_W4_G32_SYM, tmp_path / "mixed", MIXTRAL_NAMING, layers=(0,), experts=(7,))
    with pytest.raises(CheckpointError, match="layer 0 mixes expert namings"):
        open_checkpoint(copy)


def test_router_weight() -> None:
    ckpt = open_checkpoint(AWQ_W4_G32)  # AWQ leaves the router as it was
    for layer in (0, 1):
        router = ckpt.router_weight(layer)
        assert router.shape == (NUM_EXPERTS, HIDDEN) and router.dtype == torch.bfloat16
        assert torch.equal(router, load_source_router(layer))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[:4], r"expected a float \[8, 256\] router, got \[4, 256\]"),  # too few experts
        (lambda t: t.to(torch.int32), "got .* torch.int32"),  # not float
        (lambda t: None, "missing"),  # no router
        (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "NaN or infinite"),  # NaN logits for expert 3
    ],
)
def test_router_weight_validated(fixture_copy: FixtureCopy, edit: TensorEdit, message: str) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    key = "model.layers.1.mlp.gate.weight"

    def corrupt(tensors: dict[str, torch.Tensor]) -> None:
        new = edit(tensors[key])
        if new is None:
            del tensors[key]
        else:
            tensors[key] = new

    edit_tensors(copy, corrupt)
    ckpt = open_checkpoint(copy)
    ckpt.router_weight(0)
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.router_weight(1)
    assert info.value.tensor == key


# ----- experts counted against the config ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("edit", "ok"),
    [
        (lambda c: c.update(num_experts=c.pop("num_local_experts")), True),  # older configs say num_experts
        (lambda c: c.update(num_local_experts=6), False),  # experts 6 and 7 are unexpected
        (lambda c: c.update(num_local_experts=10), False),  # experts 8 and 9 are missing
    ],
)
def test_num_experts_checked_against_tensors(fixture_copy: FixtureCopy, edit: ConfigEdit, ok: bool) -> None:
    copy = fixture_copy(CT_W8_G128_SYM)
    edit_config(copy, edit)
    ckpt = open_checkpoint(copy)
    if ok:
        assert ckpt.moe_config().num_experts == NUM_EXPERTS
        ckpt.load_layer(0)
        return
    expected = ckpt.moe_config().num_experts
    with pytest.raises(CheckpointError, match=f"config says {expected} experts") as info:
        ckpt.load_layer(0)
    assert ("missing experts [8, 9]" if expected == 10 else "unexpected [6, 7]") in str(info.value)


def test_missing_expert(fixture_copy: FixtureCopy) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    edit_tensors(copy, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.mlp.experts.3.")])
    ckpt = open_checkpoint(copy)
    ckpt.load_layer(0)
    with pytest.raises(CheckpointError, match=r"missing experts \[3\]"):
        ckpt.load_layer(1)


# ----- the MoE config from config.json ---------------------------------------------------------------------------

MIXTRAL_8X7B = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 4096,
                "intermediate_size": 14336, "hidden_act": "silu", "torch_dtype": "bfloat16"}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "hidden_size": 2048,
                 "moe_intermediate_size": 768, "intermediate_size": 6144, "norm_topk_prob": True,
                 "hidden_act": "silu", "torch_dtype": "bfloat16"}
GLM45_AIR = {"model_type": "glm4_moe", "n_routed_experts": 128, "num_experts_per_tok": 8, "hidden_size": 4096,
             "moe_intermediate_size": 1408, "intermediate_size": 10944, "n_group": 1, "topk_group": 1,
             "routed_scaling_factor": 1.0, "norm_topk_prob": True, "hidden_act": "silu", "torch_dtype": "bfloat16"}
LLAMA4_SCOUT = {"model_type": "llama4", "text_config": {
    "model_type": "llama4_text", "num_local_experts": 16, "num_experts_per_tok": 1, "hidden_size": 5120,
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "hidden_act": "silu", "torch_dtype": "bfloat16"}}


@pytest.mark.parametrize(
    ("config", "shape", "method", "renormalize"),
    [
        (MIXTRAL_8X7B, (8, 2, 4096, 14336), RoutingMethod.SOFTMAX, True),  # num_local_experts, intermediate_size
        (QWEN3_30B_A3B, (128, 8, 2048, 768), RoutingMethod.SOFTMAX, True),  # num_experts, moe_intermediate_size
        (deepseek_config(256, 8, 7168, 2048, 8, 4), (256, 8, 7168, 2048), RoutingMethod.DEEPSEEK_V3, True),
        (GLM45_AIR, (128, 8, 4096, 1408), RoutingMethod.DEEPSEEK_V3, True),  # grouped routing, one group
        (LLAMA4_SCOUT, (16, 1, 5120, 8192), RoutingMethod.SIGMOID, False),  # nested text_config
    ],
)
def test_moe_config_from_hf(config: dict, shape: tuple[int, int, int, int], method: RoutingMethod,
                            renormalize: bool) -> None:
    cfg = moe_config_from_hf(config)
    assert (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size) == shape
    assert cfg.routing.method == method and cfg.routing.renormalize == renormalize
    assert cfg.activation == Activation.SILU and cfg.dtype == torch.bfloat16


def test_deepseek_v3_routing_config() -> None:
    routing = moe_config_from_hf(deepseek_config(256, 8, 7168, 2048, 8, 4, 2.5)).routing
    assert (routing.n_group, routing.topk_group, routing.routed_scaling_factor) == (8, 4, 2.5)
    assert routing.has_correction_bias  # topk_method noaux_tc
    greedy = deepseek_config() | {"topk_method": "greedy"}
    assert not moe_config_from_hf(greedy).routing.has_correction_bias


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({"torch_dtype": "float16"}, "dtype", torch.float16),  # fp16 models
        ({"torch_dtype": None, "dtype": "float16"}, "dtype", torch.float16),  # transformers 5 spells it dtype
        ({"hidden_act": "gelu_pytorch_tanh"}, "activation", Activation.GELU_TANH),  # tanh GELU
        ({"hidden_act": "gelu"}, "activation", Activation.GELU),  # exact GELU
        ({"torch_dtype": "float32"}, "dtype", torch.bfloat16),  # float32 models get bf16 activations
        ({"model_type": None}, "routing", RoutingConfig(RoutingMethod.SOFTMAX)),  # null reads as absent
    ],
)
def test_moe_config_fields(change: dict, field: str, value: object) -> None:
    assert getattr(moe_config_from_hf(MIXTRAL_8X7B | change), field) == value


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"}, CheckpointError,
         "num_local_experts"),  # no expert count
        ({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"}, CheckpointError, "hidden_size"),
        (MIXTRAL_8X7B | {"hidden_act": "relu"}, UnsupportedError, "'relu'"),  # not a gated SiLU/GELU
        (MIXTRAL_8X7B | {"num_experts_per_tok": 9}, CheckpointError, "some/config.json.*top_k=9"),  # more than E
        (deepseek_config(16, 4, 64, 32, 3, 2), CheckpointError, "n_group=3"),  # 16 experts in 3 groups
        (deepseek_config(16, 9, 64, 32, 4, 2), CheckpointError, "topk_group=2"),  # 9 > 2 groups of 4
        # Values of the wrong type: an error naming the key, never a raw Python error or a silent coercion.
        (MIXTRAL_8X7B | {"num_local_experts": "eight"}, CheckpointError,
         "num_local_experts must be an integer, got 'eight'"),
        (MIXTRAL_8X7B | {"num_local_experts": 8.7}, CheckpointError,
         "num_local_experts must be an integer, got 8.7"),  # not truncated to 8
        (MIXTRAL_8X7B | {"num_experts_per_tok": [2]}, CheckpointError, "num_experts_per_tok must be an integer"),
        (MIXTRAL_8X7B | {"hidden_act": ["silu"]}, UnsupportedError, r"hidden_act \['silu'\]"),
        (MIXTRAL_8X7B | {"norm_topk_prob": "false"}, CheckpointError,
         "norm_topk_prob must be true or false, got 'false'"),  # not truthy
        (MIXTRAL_8X7B | {"torch_dtype": "int8"}, CheckpointError, "torch_dtype 'int8' is not a model dtype"),
        (MIXTRAL_8X7B | {"text_config": "x"}, CheckpointError, "text_config must be an object"),
        (MIXTRAL_8X7B | {"model_type": 3}, CheckpointError, "model_type must be a string"),
        (deepseek_config() | {"n_group": "2"}, CheckpointError, "n_group must be an integer, got '2'"),
    ],
)
def test_moe_config_rejects(config: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        moe_config_from_hf(config, "some/config.json")


# ----- a DeepSeek-V3 style checkpoint ------------------------------------------------------------------------------

def _deepseek_checkpoint(path: Path, bias: torch.Tensor | None) -> tuple[Path, QuantizedExperts]:
    scheme = WeightScheme(4, 32, zero_point=True, scale_dtype=torch.float16)
    experts = random_experts(scheme, 16, 64, 32)
    tensors = write_experts(experts, CheckpointFormat.GPTQ_V2, layer=1)  # layer 0 is dense (first_k_dense_replace)
    tensors["model.layers.1.mlp.gate.weight"] = torch.randn(16, 64, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.randn(256, 64, dtype=torch.bfloat16)  # a dense MLP
    if bias is not None:
        tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = bias
    config = deepseek_config() | {"quantization_config": quantization_config(CheckpointFormat.GPTQ_V2, scheme)}
    return write_checkpoint(path, config, tensors), experts


def test_deepseek_v3_checkpoint(tmp_path: Path) -> None:
    bias = torch.randn(16) * 0.1
    path, experts = _deepseek_checkpoint(tmp_path / "dsv3", bias)
    ckpt = open_checkpoint(path)
    assert ckpt.format == CheckpointFormat.GPTQ_V2 and ckpt.moe_layer_indices() == [1]
    cfg = ckpt.moe_config()
    assert (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size) == (16, 4, 64, 32)
    assert cfg.routing.method == RoutingMethod.DEEPSEEK_V3 and cfg.routing.routed_scaling_factor == 2.5
    assert torch.equal(ckpt.correction_bias(1), bias)
    assert_same_experts(ckpt.load_layer(1), experts)
    with pytest.raises(CheckpointError, match="layer 0 has no experts"):
        ckpt.load_layer(0)


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (torch.randn(8), r"expected a float \[16\] correction bias, got \[8\]"),  # one per expert
        (torch.ones(16, dtype=torch.int64), "torch.int64"),  # integer bias
        (torch.full((16,), float("nan")), "NaN"),  # NaN bias
    ],
)
def test_correction_bias_validated(tmp_path: Path, bias: torch.Tensor, message: str) -> None:
    path, _ = _deepseek_checkpoint(tmp_path / "dsv3", bias)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(path).correction_bias(1)
    assert info.value.tensor == "model.layers.1.mlp.gate.e_score_correction_bias"


# ----- broken checkpoints -------------------------------------------------------------------------------------------

def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("config.json")) as info:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((SOURCE / "config.json").read_text())
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors")):
        open_checkpoint(tmp_path, quantize_to="int4_g32_sym")


def test_no_experts(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, MIXTRAL_8X7B, {"model.embed_tokens.weight": torch.randn(4, 4)})
    with pytest.raises(CheckpointError, match="no MoE expert tensors"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "method",
    [
        "bitsandbytes",  # a real but unsupported method
        "fp8",  # same
        None,  # quantization_config without a quant_method
    ],
)
def test_unknown_quant_method(fixture_copy: FixtureCopy, method: str | None) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    edit_config(copy, lambda c: c["quantization_config"].update(quant_method=method))
    with pytest.raises(UnsupportedError, match=f"quant_method {method!r} is not supported") as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)


@pytest.mark.parametrize("qcfg", ["gptq", []])  # a method name; an empty list
def test_quantization_config_not_an_object(fixture_copy: FixtureCopy, qcfg: object) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    edit_config(copy, lambda c: c.update(quantization_config=qcfg))
    with pytest.raises(CheckpointError, match=f"quantization_config must be an object, got {re.escape(repr(qcfg))}"
                       ) as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)


def test_layer_without_experts() -> None:
    with pytest.raises(CheckpointError, match=r"layer 5 has no experts; MoE layers: \[0, 1\]"):
        open_checkpoint(CT_W4_G32_SYM).load_layer(5)
    with pytest.raises(InvalidInputError, match="a layer index is an int, got '0'"):  # (not "layer 0 has no experts")
        open_checkpoint(CT_W4_G32_SYM).load_layer("0")  # type: ignore[arg-type]


def test_top_k_matches_fixture() -> None:
    assert open_checkpoint(SOURCE, quantize_to="int4_g32_sym").moe_config().top_k == TOP_K


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", "{not json", "config.json.*is not readable JSON"),  # malformed config
        ("config.json", "[1, 2]", "expected a JSON object, got list"),  # not an object
        ("quantize_config.json", "{", "quantize_config.json.*is not readable JSON"),  # malformed legacy config
    ],
)
def test_malformed_json(fixture_copy: FixtureCopy, file: str, content: str, message: str) -> None:
    copy = fixture_copy(GPTQ_W4_G32_DESCACT)
    if file == "quantize_config.json":
        edit_config(copy, lambda c: c.pop("quantization_config"))
    (copy / file).write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(copy)
    assert str(copy) in str(info.value)


def test_index_without_weight_map(tmp_path: Path) -> None:
    sharded = _sharded_copy(CT_W4_G32_SYM, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        open_checkpoint(sharded)


def test_index_weight_map_naming_no_file(tmp_path: Path) -> None:
    sharded = _sharded_copy(CT_W4_G32_SYM, tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.experts.2.down_proj.weight_packed"
    index["weight_map"][key] = 2  # a shard number, not a file name
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"weight_map['{key}'] must be a shard file name, got 2")):
        open_checkpoint(sharded)


@pytest.mark.parametrize("keep", [1000, 0.5])  # a cut header; a header whose tensors run past the end
def test_truncated_safetensors(fixture_copy: FixtureCopy, keep: float) -> None:
    copy = fixture_copy(CT_W4_G32_SYM)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:int(keep if keep > 1 else len(data) * keep)])
    with pytest.raises(CheckpointError, match="is not a readable safetensors file") as info:
        open_checkpoint(copy)
    assert info.value.tensor == "model.safetensors"
