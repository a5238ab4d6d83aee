"""`wna16moe generate` and `wna16moe check` (transformers installed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch
from conftest import AWQ_W4_G32, CT_W4_G128_ASYM, FixtureCopy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from wna16moe import oracle
from wna16moe.cli import main
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.hf import run
from wna16moe.oracle import Backend


def test_generate_prints_tokens_per_second_and_memory(capsys: pytest.CaptureFixture[str]) -> None:
    prompt = torch.randint(0, 512, (5,)).tolist()
    code = main(["generate", str(AWQ_W4_G32), "--prompt-ids", " ".join(map(str, prompt)), "--max-new-tokens", "4",
                 "--backend", "emulation", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["prompt_tokens"] == 5 and 1 <= len(report["new_ids"]) <= 4  # may stop at EOS
    assert report["tokens_per_second"] > 0 and report["peak_bytes"] > 0
    # EMULATION keeps only the checkpoint's packed experts: well under their bf16 size
    assert 0 < report["experts_bytes"] < report["experts_bf16_bytes"] / 3
    assert main(["generate", str(AWQ_W4_G32), "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "memory" in text and "bf16 would be" in text


def test_generate_attends_to_a_prompt_token_equal_to_the_pad_id() -> None:
    # The fixtures' pad id (511) is an ordinary token inside a prompt: it must be attended like any other
    # (transformers' generate masks it unless given a mask). Reference: greedy steps of cache-free forwards.
    model = run.load_model(AWQ_W4_G32, backend="emulation", device="cpu", dtype=torch.float32)
    pad = model.generation_config.pad_token_id
    assert pad is not None
    prompt = [7, pad, 300, 42, pad]
    got = run.generate(model, AWQ_W4_G32, None, prompt, max_new_tokens=3).new_ids
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(len(got)):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got and got == ids[0, len(prompt):].tolist()


def test_generate_with_a_text_prompt(fixture_copy: FixtureCopy, capsys: pytest.CaptureFixture[str]) -> None:
    path = fixture_copy(CT_W4_G128_ASYM)
    words = ["<unk>", "<eos>", *(f"w{i}" for i in range(100))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    assert main(["generate", str(path), "--prompt", "w1 w7 w42", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_tokens"] == 3 and 1 <= len(report["new_ids"]) <= 3 and isinstance(report["text"], str)


def test_generate_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wna16moe.hf", None)  # makes `from wna16moe.hf import run` fail
    assert main(["generate", str(AWQ_W4_G32), "--prompt-ids", "1"]) == 2
    assert "wna16moe" in capsys.readouterr().err


class _Exact(EmulationExperts):
    """Stands in for a CPU kernel: EMULATION under the CPU name."""

    NAME = "cpu"


class _Wrong(_Exact):
    """A CPU kernel whose output is 10% too large."""

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().apply(hidden_states, topk_weights, topk_ids, weights) * 1.1


@pytest.mark.parametrize(("kernel", "ok"), [(_Exact, True), (_Wrong, False)])
def test_check_compares_every_available_backend_with_emulation(kernel: type, ok: bool, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(oracle.BACKEND_CLASSES, Backend.CPU, (kernel,))
    code = main(["check", str(CT_W4_G128_ASYM), "--tokens", "8", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in results] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(r["backend"] == "cpu" and r["ok"] == ok for r in results)
    assert code == (0 if ok else 1)
    if ok:
        assert all(r["relative_error"] < 1e-6 for r in results)
    else:
        assert all(0.09 < r["relative_error"] < 0.11 for r in results)
    main(["check", str(CT_W4_G128_ASYM), "--tokens", "8"])
    assert ("MISMATCH" in capsys.readouterr().out) != ok


def test_check_with_only_emulation_says_so(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(oracle.BACKEND_CLASSES, Backend.CPU, raising=False)
    assert main(["check", str(CT_W4_G128_ASYM), "--tokens", "4"]) == 0
    assert "nothing to compare" in capsys.readouterr().out
