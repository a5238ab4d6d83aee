"""`wna16moe explain`: every candidate with its verdict and reason, for checkpoints and for named shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import table_rows

from wna16moe import cli
from wna16moe.oracle import BACKEND_CLASSES, BACKEND_ENV, Backend

DATA = Path(__file__).parent / "data"
# (fixture, scheme read from it, extra arguments): every checkpoint in tests/data.
FIXTURES = [
    ("qwen3moe-w4a16-g32-sym", "int4_g32_sym", []),
    ("qwen3moe-w4a16-g128-asym", "int4_g128_zp", []),
    ("qwen3moe-w8a16-g128-sym", "int8_g128_sym", []),
    ("qwen3moe-gptq-w4-g32-descact", "int4_g32_sym_actorder", []),
    ("qwen3moe-awq-gemm-w4-g32", "int4_g32_zp", []),
    ("qwen3moe-bf16", "int4_g64_sym", ["--quantize-to", "int4_g64_sym"]),  # dense: quantized on load
]


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err




def expected_candidates() -> set[tuple[str, str]]:
    """Every (backend, kernel class) the report must list; '-' for a backend without classes."""
    return {(b.value, cls.__name__) for b in Backend for cls in BACKEND_CLASSES.get(b, ())} | {
        (b.value, "-") for b in Backend if b not in BACKEND_CLASSES}


@pytest.mark.parametrize(("fixture", "scheme", "extra"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_explain_checkpoint_on_cpu(capsys: pytest.CaptureFixture[str], fixture: str, scheme: str,
                                   extra: list[str]) -> None:
    code, out, _ = run(capsys, str(DATA / fixture), "--device", "cpu", *extra)
    assert code == 0
    assert f"layer     {DATA / fixture}: E=8 top_k=2 H=256 I=128, {scheme}, silu, softmax, bfloat16" in out
    assert "device    CPU (cpu; optional packages: none)" in out
    assert "priority  cpu: cpu > emulation" in out
    rows = table_rows(out)
    assert set(rows) == expected_candidates()
    assert rows["cpu", "CPUExperts"] == ("chosen", "first in priority order whose checks all pass")
    assert rows["emulation", "EmulationExperts"] == ("eligible",
                                                     "every check passes, but a higher-priority kernel was chosen")
    for (backend, _), (verdict, reason) in rows.items():
        if backend not in ("cpu", "emulation"):
            assert verdict == "rejected" and reason.startswith("not in the cpu priority list; ")
    assert out.rstrip().endswith("chosen: cpu (CPUExperts)")


def test_explain_checkpoint_on_b200(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(DATA / "qwen3moe-w4a16-g32-sym"), "--device", "b200")
    assert code == 0
    assert "priority  cuda_sm100: flashinfer_trtllm > marlin > batched_marlin > triton > batched_triton > " \
           "emulation" in out
    rows = table_rows(out)
    assert set(rows) == expected_candidates()
    assert rows["flashinfer_trtllm", "FlashInferTrtllmExperts"] == (
        "rejected", "routing: softmax routing without "
                    "renormalization is not supported; the kernel's Renormalize routing always renormalizes the "
                    "top-k weights; shape: H and I/tp must be multiples of 256 (whole 256-element K blocks in the "
                    "kernel's weight layout), got H=256, I/tp=128")
    assert rows["marlin", "MarlinExperts"] == ("chosen", "first in priority order whose checks all pass")
    assert rows["batched_marlin", "BatchedMarlinExperts"][1].endswith(
        "format: needs the batched activation format, the layer uses standard")
    assert [key for key, (verdict, _) in rows.items() if verdict == "chosen"] == [("marlin", "MarlinExperts")]
    assert out.rstrip().endswith("chosen: marlin (MarlinExperts)")


def test_explain_named_shape_with_tp(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--shape", "qwen3-30b-a3b", "--scheme", "int4_g128_sym", "--device", "h100",
                       "--tp", "4")
    assert code == 1 and "no kernel chosen" in out  # I/tp=192 splits a g128 group in every kernel
    assert "layer     qwen3-30b-a3b: E=128 top_k=8 H=2048 I=768 (I/tp=192), int4_g128_sym, silu, softmax " \
           "renormalized, bfloat16" in out and "tp=4 ep=1 dp=1, standard format" in out
    rows = table_rows(out)
    assert set(rows) == expected_candidates()
    verdict, reason = rows["marlin", "MarlinExperts"]
    assert verdict == "rejected"
    assert reason == ("shape: I/tp=192 is not a multiple of group_size 128: a quantization group would straddle the "
                      "TP shard, which padding to a multiple of lcm(64, 128)=128 cannot fix; use a tp_size that keeps "
                      "I/tp a multiple of 128")
    assert rows["flashinfer_trtllm", "FlashInferTrtllmExperts"][1].startswith("not in the cuda_sm90 priority list")
    assert rows["emulation", "EmulationExperts"] == ("rejected", (
        "shape: I/tp=192 (intermediate_size=768, tp_size=4) is not a multiple of group_size 128: a quantization "
        "group would straddle two TP shards; use a tp_size that keeps I/tp a multiple of 128, or expert "
        "parallelism (ep_size) instead of tensor parallelism"))


def test_explain_default_scheme_dtype_and_ep(capsys: pytest.CaptureFixture[str]) -> None:
    # kimi-k2's usual group size is 32, so the default scheme is int4_g32_sym.
    code, out, _ = run(capsys, "--shape", "kimi-k2", "--device", "b200", "--dtype", "fp16", "--ep", "2")
    assert code == 0
    assert "int4_g32_sym, silu, deepseek_v3 renormalized, float16 (router logits float16), tp=1 ep=2" in out
    reason = table_rows(out)["flashinfer_trtllm", "FlashInferTrtllmExperts"][1]
    assert "scheme: activation dtype float16 is not supported; expected bfloat16" in reason
    assert "parallel: expert parallelism (ep_size=2) is not supported" in reason


def test_explain_batched(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--shape", "mixtral", "--device", "h100", "--batched")
    rows = table_rows(out)
    assert rows["marlin", "MarlinExperts"][1].endswith(
        "format: needs the standard activation format, the layer uses batched")
    verdict, reason = rows["batched_marlin", "BatchedMarlinExperts"]
    assert verdict == "chosen" and reason == "first in priority order whose checks all pass"
    assert rows["emulation", "EmulationExperts"][1] == ("format: needs the standard activation format, the layer "
                                                        "uses batched")
    assert code == 0 and out.rstrip().endswith("chosen: batched_marlin (BatchedMarlinExperts)")


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(DATA / "qwen3moe-w8a16-g128-sym"), "--device", "h100-bare", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["scheme"] == "int8_g128_sym"
    assert data["device"] == {"name": "NVIDIA H100 80GB HBM3", "platform": "cuda", "compute_capability": [9, 0],
                              "packages": []}
    assert {(c["backend"], c["kernel"]) for c in data["candidates"]} == expected_candidates()
    marlin = next(c for c in data["candidates"] if c["backend"] == "marlin")
    assert marlin["failed_checks"] == [{"check": "device", "reason": "no Marlin op provider found (install vllm or set "
                                                                     "WNA16MOE_MARLIN_LIB)"}]
    assert data["chosen"]["backend"] in ("triton", "emulation")


def test_explain_forced_backend(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "xpu")
    code, out, _ = run(capsys, "--shape", "mixtral", "--device", "h100")
    assert code == 1
    assert "override  xpu" in out and "no kernel chosen: backend 'xpu' cannot run this layer" in out
    assert "every check passes, but 'xpu' was requested" in out
    monkeypatch.setenv(BACKEND_ENV, "tpu")
    code, _, err = run(capsys, "--shape", "mixtral", "--device", "h100")
    assert code == 2 and "WNA16MOE_BACKEND='tpu' is not a backend" in err
    code, out, _ = run(capsys, "--shape", "mixtral", "--device", "h100", "--backend", "emulation")
    assert code == 0 and out.rstrip().endswith("chosen: emulation (EmulationExperts)")


@pytest.mark.parametrize(("argv", "message"), [
    ([], "explain needs either a checkpoint PATH or --shape NAME (not both)"),
    ([str(DATA / "qwen3moe-w4a16-g32-sym"), "--shape", "mixtral"], "explain needs either a checkpoint PATH or --shape"),
    (["--shape", "gpt-5"], "unknown model shape 'gpt-5'; known: deepseek-v3"),
    (["--shape", "mixtral", "--device", "tpu"], "unknown device name 'tpu'; known: a100, b200"),
    (["--shape", "mixtral", "--scheme", "int3_g128_sym"], "bits=3 is not supported"),
    (["--shape", "qwen3-30b-a3b", "--tp", "5"], "intermediate_size=768 is not divisible by tp_size=5"),
    (["--shape", "mixtral", "--backend", "cutlass"], "--backend='cutlass' is not a backend; valid names: auto"),
    ([str(DATA / "qwen3moe-w4a16-g32-sym"), "--scheme", "int4_g32_sym"], "--scheme applies to --shape"),
    ([str(DATA / "qwen3moe-bf16")], "is not quantized (no quantization_config)"),
])
def test_explain_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("wna16moe: error: ") and message in err
