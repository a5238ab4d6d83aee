"""Helpers of the transformers tests (tests/test_hf*.py): reference models and tiny quantized checkpoints.

A reference model is the stock transformers architecture (no quantizer) in float32 whose every parameter
comes from the quantized checkpoint: quantized experts and projections dequantized with the float64
`dequantize_ref` of conftest, everything else copied. Tiny Mixtral and DeepSeek-V3 checkpoints are made here
from randomly initialized bf16 models, quantized by round-to-nearest and written with the library's format
writers (the Qwen3-MoE fixtures in tests/data were made by real quantization tools).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from conftest import dequantize_ref
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from wna16moe.formats import awq, compressed_tensors, gptq, open_checkpoint
from wna16moe.formats.checkpoint import (
    HF_NAMING,
    MIXTRAL_NAMING,
    Checkpoint,
    CheckpointFormat,
    quantization_config,
    read_projection,
    write_experts,
    write_projection,
)
from wna16moe.formats.common import Projection
from wna16moe.quantized import QuantizedWeight, quantize_rtn
from wna16moe.scheme import WeightScheme

_EXPERT_PARAM = re.compile(r"^(?P<block>.*\.layers\.(?P<layer>\d+)\.mlp)\.experts\.(?P<name>gate_up_proj|down_proj)$")


def _scheme_of(ckpt: Checkpoint, module: str, scale_dtype: torch.dtype) -> WeightScheme:
    qcfg = ckpt.config["quantization_config"]
    if ckpt.format == CheckpointFormat.COMPRESSED_TENSORS:
        return compressed_tensors.scheme_from_config(qcfg, module, scale_dtype)
    if ckpt.format == CheckpointFormat.AWQ:
        return awq.scheme_from_config(qcfg, scale_dtype)
    return gptq.scheme_from_config(qcfg, scale_dtype)


def _checkpoint_key(ckpt: Checkpoint, key: str) -> str:
    """The checkpoint's name for model parameter or module `key` (Mixtral stores `mlp` blocks as
    `block_sparse_moe`)."""
    if any(name == key or name.startswith(key + ".") for name in ckpt.source.names()):
        return key
    return key.replace(".mlp.", ".block_sparse_moe.")


def dequantized_projection(ckpt: Checkpoint, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """float64 [N, K] weight of quantized projection `module` of the checkpoint."""
    prefix = module + "."
    scale_key = {CheckpointFormat.COMPRESSED_TENSORS: "weight_scale"}.get(ckpt.format, "scales")
    scheme = _scheme_of(ckpt, module, ckpt.source.get(prefix + scale_key).dtype)
    projection = read_projection(ckpt.format, ckpt.source, prefix, scheme, shape)

    def unsqueeze(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.unsqueeze(0)

    weight = QuantizedWeight(scheme, projection.codes.unsqueeze(0), projection.scales.unsqueeze(0),
                             unsqueeze(projection.zeros), unsqueeze(projection.g_idx))
    return dequantize_ref(weight)[0]


def _experts_param(ckpt: Checkpoint, layer: int, block: str, name: str, shape: torch.Size) -> torch.Tensor:
    """float64 HF `gate_up_proj` [E, 2I, H] or `down_proj` [E, H, I] of `block` from the checkpoint."""
    keys = [k for k in ckpt.source.names() if k.startswith(f"{block}.experts.")]
    if not keys:
        block = block.replace(".mlp", ".block_sparse_moe")
        keys = [k for k in ckpt.source.names() if k.startswith(f"{block}.experts.")]
    projections = {k.split(".")[-2] for k in keys}
    gate, up, down = ("w1", "w3", "w2") if "w1" in projections else ("gate_proj", "up_proj", "down_proj")
    if f"{block}.experts.0.{down}.weight" in keys:  # experts the checkpoint keeps unquantized
        def stack(projection: str) -> torch.Tensor:
            return torch.stack([ckpt.source.get(f"{block}.experts.{e}.{projection}.weight")
                                for e in range(shape[0])]).double()

        return torch.cat([stack(gate), stack(up)], 1) if name == "gate_up_proj" else stack(down)
    experts = ckpt.load_layer(layer)
    return dequantize_ref(experts.w13 if name == "gate_up_proj" else experts.w2)


def reference_model(path: Path) -> nn.Module:
    """The float32 stock model of the checkpoint at `path`, every weight taken from (and every quantized one
    dequantized out of) that checkpoint."""
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ckpt = open_checkpoint(path)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    state = {}
    for key, param in model.state_dict().items():
        module, _, name = key.rpartition(".")
        expert = _EXPERT_PARAM.match(key)
        if expert is not None:
            value = _experts_param(ckpt, int(expert["layer"]), expert["block"], expert["name"], param.shape)
        elif module in linears and name == "weight" and not ckpt.source.has(_checkpoint_key(ckpt, key)):
            value = dequantized_projection(ckpt, _checkpoint_key(ckpt, module), tuple(param.shape))
        else:
            value = ckpt.source.get(_checkpoint_key(ckpt, key))
        state[key] = value.float()
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----- tiny quantized Mixtral / DeepSeek-V3 checkpoints ------------------------------------------------------

def tiny_config(arch: str) -> PretrainedConfig:
    """A small random-weight config of `arch` ("mixtral" or "deepseek_v3")."""
    from transformers import DeepseekV3Config, MixtralConfig

    if arch == "mixtral":
        return MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "deepseek_v3":
        return DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                max_position_embeddings=64, routed_scaling_factor=2.0, tie_word_embeddings=False)
    raise ValueError(arch)


def write_tiny_quantized(directory: Path, arch: str, fmt: CheckpointFormat, scheme: WeightScheme) -> Path:
    """A random bf16 `arch` model saved by transformers, then quantized (experts and every Linear but the
    lm_head) into `fmt` with the library's writers. Returns the quantized checkpoint's directory."""
    source = directory / f"{arch}-bf16"
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():  # larger than the default init, so quantization error shows
            param.normal_(0, 0.05)
    model.save_pretrained(source)
    dense = open_checkpoint(source, quantize_to=scheme)
    tensors = load_file(source / "model.safetensors")
    out = {key: value for key, value in tensors.items() if ".experts." not in key}
    naming = MIXTRAL_NAMING if arch == "mixtral" else HF_NAMING  # how transformers saves the experts
    for layer in dense.moe_layer_indices():
        out.update(write_experts(dense.load_layer(layer), fmt, layer, naming))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            weight = out.pop(f"{name}.weight").float()
            q = quantize_rtn(weight.unsqueeze(0), scheme)
            projection = Projection(q.codes[0], q.scales[0], None if q.zeros is None else q.zeros[0], None)
            out.update({f"{name}.{suffix}": t for suffix, t in write_projection(fmt, projection, scheme).items()})
    target = directory / f"{arch}-{fmt.value}-{scheme.name}"
    target.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, scheme, ignore=["lm_head", "re:.*mlp.gate$"])
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
