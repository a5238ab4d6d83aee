"""`python -m wna16moe.bench_generate` end to end on CPU with the tiny config (transformers installed)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from safetensors import safe_open

from wna16moe import bench_generate
from wna16moe.bench_generate import (
    MOE_TOLERANCE,
    TINY,
    build_bf16,
    check_model,
    main,
    reference_forward,
    write_checkpoint,
)
from wna16moe.oracle import BACKEND_ENV
from wna16moe.scheme import WeightScheme

NEW_TOKENS, PROMPT_TOKENS, REPEATS = 6, 5, 2


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: a tiny model's decode is many small parallel regions, which stall for scheduler
    ticks on CPUs shared with other processes (BENCHMARKS.md), 100x slower at times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results"  # a directory: the default file name goes inside
    code = main(["--tiny", "--new-tokens", str(NEW_TOKENS), "--prompt-tokens", str(PROMPT_TOKENS), "--repeats",
                 str(REPEATS), "--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out), *extra])
    assert code == 0
    (file,) = out.iterdir()
    assert file.name.startswith("cpu-generate-") and file.suffix == ".json"
    return json.loads(file.read_text())


def test_tiny_run_measures_both_models_and_checks_the_quantized_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(tmp_path, "--batch", "1", "2")
    assert all(stage["ok"] for stage in result["stages"]), result["stages"]
    assert result["card"] == "cpu" and result["torch"] == torch.__version__ and result["commit"]
    config = result["config"]
    assert (config["layers"], config["experts"], config["hidden"], config["scheme"]) == (2, 8, 256, "int4_g128_sym")

    rows = {(row["model"], row["mode"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(m, "eager", b) for m in ("wna16moe", "bf16") for b in (1, 2)}
    for (_, _, batch), row in rows.items():
        assert row["decode_steps"] == NEW_TOKENS and len(row["decode_s_runs"]) == REPEATS
        assert all(s > 0 for s in row["decode_s_runs"])
        assert math.isfinite(row["decode_tokens_per_s"]) and row["decode_tokens_per_s"] > 0
        assert row["decode_tokens_per_s_total"] == pytest.approx(row["decode_tokens_per_s"] * batch, rel=1e-2)
        # decode excludes the prefill, and both are inside the whole generate call
        assert row["decode_s_runs"][0] + row["prefill_ms"] / 1e3 <= row["generate_s"] * 1.001 + 1e-3
        assert len(row["first_ids"]) == NEW_TOKENS + 1
    assert rows["wna16moe", "eager", 1]["backend"] in ("cpu", "emulation")

    # The quantized model keeps the packed experts (int4 + bf16 scales per 128: 0.258 of bf16) and bf16 dense layers.
    models = result["models"]
    assert 0 < models["wna16moe"]["experts_checkpoint_bytes"] < 0.27 * models["bf16"]["experts_bytes"]
    assert models["wna16moe"]["quantized_dense_layers"] == 0
    assert models["wna16moe"]["weights_bytes"] < models["bf16"]["weights_bytes"]

    check = result["check"]
    assert check["ok"] and check["moe_rel_err_max"] < MOE_TOLERANCE and len(check["moe_rel_err_per_layer"]) == 2
    assert check["positions"] == 8 + 1 and check["logits_rel_err"] < check["logits_tolerance"]

    text = capsys.readouterr().out
    assert "tok/s/seq" in text and "vs bf16" in text and "check vs bf16" in text and ": ok" in text


def test_the_checkpoint_stores_only_the_experts_quantized(tmp_path: Path) -> None:
    _run(tmp_path, "--models", "wna16moe", "--batch", "1")
    ckpt = tmp_path / "work" / "checkpoint"
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["ignore"] == bench_generate.IGNORE
    assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in weight_map
    assert not any(k.endswith(".weight") and ".experts." in k for k in weight_map)  # no bf16 experts
    with safe_open(str(ckpt / weight_map["model.layers.0.self_attn.q_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in weight_map


def test_a_failed_stage_still_reports_the_other_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated load failure")

    monkeypatch.setattr(bench_generate, "load_model", broken)
    result = _run(tmp_path, "--batch", "1")
    failed = [s for s in result["stages"] if not s["ok"]]
    assert len(failed) == 1 and "simulated load failure" in failed[0]["error"]
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("bf16", 1)]
    assert "wna16moe" not in result["models"] and "check" not in result


def test_the_check_tells_the_weights_before_quantization_apart(tmp_path: Path) -> None:
    """The MoE-block check is not vacuous: the bf16 model the checkpoint was made from (not dequantized) fails
    it by the int4 noise, while the dequantized one (what the benchmark's bf16 peer runs) matches itself."""
    model = build_bf16(TINY.config(2), torch.device("cpu"), seed=0)
    original = copy.deepcopy(model)
    write_checkpoint(model, WeightScheme(4, 128), tmp_path / "ckpt", lambda _: None)
    sequence = torch.randint(0, TINY.vocab, (1, 12))
    logits, blocks = reference_forward(model, sequence, slice(4, None))
    assert check_model(model, sequence, slice(4, None), logits, blocks)["moe_rel_err_max"] < 1e-6
    assert check_model(original, sequence, slice(4, None), logits, blocks)["moe_rel_err_max"] > 5 * MOE_TOLERANCE


def test_default_file_name() -> None:
    name = bench_generate._default_out("NVIDIA H100 80GB HBM3", "2026-11-28")
    assert name == "NVIDIA_H100_80GB_HBM3-generate-2026-11-28.json"
