"""wna16moe.hf on Mixtral (block_sparse_moe / w1 w3 w2 naming) and DeepSeek-V3 (MLA attention, dense first
layer, shared experts, grouped routing): tiny random models quantized into each format family, loaded through
from_pretrained, compared with their float32 dequantized reference, and saved back bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from hf_reference import reference_model, write_tiny_quantized
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import wna16moe.hf as hf
from wna16moe.formats.checkpoint import CheckpointFormat
from wna16moe.hf.modules import PackedExperts, WNA16Linear
from wna16moe.scheme import WeightScheme

CASES = {
    "mixtral-gptq-int4_g32_sym": ("mixtral", CheckpointFormat.GPTQ, "int4_g32_sym", torch.float16),
    "mixtral-ct-int8_ch_sym": ("mixtral", CheckpointFormat.COMPRESSED_TENSORS, "int8_ch_sym", torch.bfloat16),
    "deepseek_v3-ct-int4_g32_zp": ("deepseek_v3", CheckpointFormat.COMPRESSED_TENSORS, "int4_g32_zp", torch.bfloat16),
    "deepseek_v3-awq-int4_g32_zp": ("deepseek_v3", CheckpointFormat.AWQ, "int4_g32_zp", torch.float16),
}
# (experts layers, dense quantized linears) per architecture
EXPECTED = {"mixtral": (2, 8), "deepseek_v3": (1, 16)}


@pytest.fixture(autouse=True)
def takeover() -> Iterator[None]:
    with hf.loading(backend="emulation"):  # float32 math: exact comparisons with the reference
        yield


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch, fmt, scheme, scale_dtype = CASES[request.param]
    torch.manual_seed(sum(map(ord, request.param)))
    path = write_tiny_quantized(tmp_path_factory.mktemp(request.param), arch, fmt,
                                WeightScheme.from_name(scheme, scale_dtype))
    return arch, path


def test_logits_match_dequantized_reference(checkpoint: tuple[str, Path]) -> None:
    arch, path = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    dense = [m for m in model.modules() if isinstance(m, WNA16Linear)]
    assert (len(experts), len(dense)) == EXPECTED[arch]
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        got = model(ids).logits
        want = reference_model(path)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_save_round_trip_is_bit_exact(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    _, path = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    for key, tensor in original.items():
        if key.endswith("e_score_correction_bias"):  # transformers keeps it in float32 (_keep_in_fp32_modules_strict)
            assert torch.equal(saved[key].to(tensor.dtype), tensor), key
            continue
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key


def test_static_cache_generate(checkpoint: tuple[str, Path]) -> None:
    """Each step's logits under the static cache equal a cache-free forward over the generated sequence
    (comparing logits, not tokens: a near-tie may pick a different token in two correct runs)."""
    _, path = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    # (An explicit mask: without one, generate masks prompt tokens equal to the pad id.)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, cache_implementation="static", output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 9)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[0, 4:8]
    torch.testing.assert_close(torch.cat(out.logits), full, rtol=1e-4, atol=1e-6)
