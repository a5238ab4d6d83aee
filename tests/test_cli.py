"""`wna16moe info [PATH] [--json] [--quantize-to SCHEME]`, and the argument checks of `generate` and `check`
(which run before transformers is imported)."""

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
    deepseek_config,
    random_experts,
    write_checkpoint,
)
from safetensors import safe_open

import wna16moe
from wna16moe import WeightScheme
from wna16moe.cli import main
from wna16moe.formats import CheckpointFormat, quantization_config, write_experts

BF16_EXPERT_BYTES = 2 * NUM_EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2  # 2 layers, 3 projections, 2 bytes


def expert_bytes(path: Path) -> int:
    """Bytes of every stored expert tensor, counted from the file itself."""
    total = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            if ".experts." in key:
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


def human(nbytes: float) -> str:
    """1024-based sizes with one decimal: 1.6 MiB, 864.8 KiB."""
    units = ["B", "KiB", "MiB", "GiB"]
    while nbytes >= 1024:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.1f} {units[0]}"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


FIXTURES = [
    (CT_W4_G32_SYM, "compressed-tensors", "int4_g32_sym", "bfloat16"),  # CT int4 sym
    (CT_W4_G128_ASYM, "compressed-tensors", "int4_g128_zp", "bfloat16"),  # CT int4 asym
    (CT_W8_G128_SYM, "compressed-tensors", "int8_g128_sym", "bfloat16"),  # CT int8
    (GPTQ_W4_G32_DESCACT, "gptq", "int4_g32_sym_actorder", "float16"),  # GPTQ v1 desc_act, fp16 scales
    (AWQ_W4_G32, "awq", "int4_g32_zp", "bfloat16"),  # AWQ GEMM
]


@pytest.mark.parametrize(("path", "fmt", "scheme", "scale_dtype"), FIXTURES)
def test_info_json(path: Path, fmt: str, scheme: str, scale_dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["info", str(path), "--json"], capsys)
    assert rc == 0 and err == ""
    info = json.loads(out)
    assert info == {
        "path": str(path),
        "format": fmt,
        "scheme": scheme,
        "scale_dtype": scale_dtype,
        "moe_layers": [0, 1],
        "num_experts": NUM_EXPERTS,
        "top_k": 2,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "activation": "silu",
        "routing": {"method": "softmax", "renormalize": False, "n_group": 1, "topk_group": 1,
                    "routed_scaling_factor": 1.0},
        "dtype": "bfloat16",
        "bytes_on_disk": (path / "model.safetensors").stat().st_size,
        "expert_bytes_on_disk": expert_bytes(path),
        "expert_bytes_bf16": BF16_EXPERT_BYTES,
    }


@pytest.mark.parametrize(("path", "fmt", "scheme", "scale_dtype"), FIXTURES)
def test_info_text(path: Path, fmt: str, scheme: str, scale_dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["info", str(path)], capsys)
    assert rc == 0 and err == ""
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.strip().splitlines())
    stored = expert_bytes(path)
    assert lines == {
        "checkpoint": str(path),
        "format": fmt,
        "scheme": f"{scheme} (scales {scale_dtype})",
        "MoE layers": "2: [0, 1]",
        "experts": f"E={NUM_EXPERTS}, top_k=2, H={HIDDEN}, I={INTERMEDIATE}",
        "activation": "silu",
        "routing": "softmax",
        "dtype": "bfloat16",
        "on disk": human((path / "model.safetensors").stat().st_size),
        "expert bytes": f"{human(stored)} on disk vs {human(BF16_EXPERT_BYTES)} in bf16 "
                        f"({BF16_EXPERT_BYTES / stored:.2f}x smaller)",
    }


def test_info_dense_needs_quantize_to(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["info", str(SOURCE)], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("wna16moe: error: ") and "not quantized" in err and "quantize_to" in err
    rc, out, err = run(["info", str(SOURCE), "--quantize-to", "int8_ch_zp", "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert (info["format"], info["scheme"], info["scale_dtype"]) == ("dense", "int8_ch_zp", "bfloat16")
    assert info["expert_bytes_on_disk"] == info["expert_bytes_bf16"] == BF16_EXPERT_BYTES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/nonexistent/checkpoint"], "config.json"),  # no such checkpoint
        (["info", str(SOURCE), "--quantize-to", "int4_g128"], "not valid"),  # malformed scheme name
        (["info", str(CT_W4_G32_SYM), "--quantize-to", "int4_g128_sym"], "already quantized"),  # not dense
    ],
)
def test_info_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(args, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("wna16moe: error: ") and message in err


def test_info_deepseek_routing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scheme = WeightScheme(4, 32, scale_dtype=torch.float16)
    tensors = write_experts(random_experts(scheme, 16, 64, 32), CheckpointFormat.GPTQ_V2, layer=1)
    tensors["model.layers.1.mlp.gate.weight"] = torch.randn(16, 64, dtype=torch.bfloat16)
    config = deepseek_config() | {"quantization_config": quantization_config(CheckpointFormat.GPTQ_V2, scheme)}
    path = write_checkpoint(tmp_path / "dsv3", config, tensors)
    rc, out, _ = run(["info", str(path)], capsys)
    assert rc == 0
    assert re.search(r"^routing\s+deepseek_v3 renormalized, n_group 4, topk_group 2, scale 2.5$", out, re.M)
    assert re.search(r"^format\s+gptq_v2$", out, re.M)
    assert re.search(r"^MoE layers\s+1: \[1\]$", out, re.M)


def test_info_environment(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["info", "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert info["wna16moe"] == wna16moe.__version__ and info["torch"] == torch.__version__
    assert info["platform"] in ("cuda", "rocm", "xpu", "cpu") and info["device"]
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    assert re.search(rf"^wna16moe\s+{re.escape(wna16moe.__version__)}$", out, re.M)
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)}$", out, re.M)


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "argument", "message"),
    [
        (["generate", str(AWQ_W4_G32), "--prompt-ids", "1 2 x"], "--prompt-ids", "'x' is not a token id"),
        (["generate", str(AWQ_W4_G32), "--prompt-ids", ""], "--prompt-ids", "expected at least one token id"),
        (["generate", str(AWQ_W4_G32), "--prompt-ids", "-3"], "--prompt-ids", "'-3' is not a token id"),
        (["generate", str(AWQ_W4_G32), "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens",
         "expected a positive integer, got 0"),
        (["check", str(AWQ_W4_G32), "--tokens", "0"], "--tokens", "expected a positive integer, got 0"),
        (["check", str(AWQ_W4_G32), "--tokens", "-3"], "--tokens", "expected a positive integer, got -3"),
        (["check", str(AWQ_W4_G32), "--tolerance", "nan"], "--tolerance",
         "expected a finite positive number, got 'nan'"),
        (["check", str(AWQ_W4_G32), "--tolerance", "-1"], "--tolerance",
         "expected a finite positive number, got '-1'"),
    ],
)
def test_hf_commands_reject_bad_arguments(args: list[str], argument: str, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {argument}: {message}" in err


MISSING_CHECKPOINT = "/nonexistent/checkpoint: tensor 'config.json': missing"  # as `info` says it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/nonexistent/checkpoint", "--prompt-ids", "1"], MISSING_CHECKPOINT),
        (["check", "/nonexistent/checkpoint"], MISSING_CHECKPOINT),
        (["generate", str(AWQ_W4_G32), "--prompt-ids", "1 2 512"], "--prompt-ids: token id 512 is outside the "
                                                                   "vocabulary"),  # vocab_size 512
    ],
)
def test_hf_commands_check_the_checkpoint_first(args: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(args, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("wna16moe: error: ") and message in err
