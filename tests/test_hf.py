"""transformers drop-in (wna16moe.hf) on the real Qwen3-MoE fixtures: load through from_pretrained with our
quantizer, logits against a float32 reference built from the same checkpoint's dequantized weights, memory,
bit-exact save round trip, errors for missing tensors, static-cache generate and fullgraph compile."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from conftest import (  # noqa: E402
    CT_W4_G32_SYM,
    CT_W4_G128_ASYM,
    CT_W8_G128_SYM,
    GPTQ_W4_G32_DESCACT,
    HIDDEN,
    INTERMEDIATE,
    NUM_EXPERTS,
    QUANTIZED_FIXTURES,
    SOURCE,
    FixtureCopy,
    edit_config,
    edit_tensors,
    relative_error,
)
from hf_reference import reference_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402
from transformers.quantizers import auto  # noqa: E402

import wna16moe.hf as hf  # noqa: E402
from wna16moe.errors import BackendError, CheckpointError, InvalidInputError, UnsupportedError  # noqa: E402
from wna16moe.hf.modules import PackedExperts, WNA16Linear  # noqa: E402
from wna16moe.oracle import Backend, Verdict  # noqa: E402

VOCAB = 512
IDS = [pytest.param(path, id=path.name) for path in QUANTIZED_FIXTURES]


@pytest.fixture(autouse=True)
def takeover() -> Iterator[None]:
    with hf.loading():
        yield


def load(path: Path, dtype: torch.dtype = torch.float32, backend: str = "emulation") -> torch.nn.Module:
    """Load through wna16moe; EMULATION by default (float32 math: exact comparisons), "auto" for the oracle's
    choice on this machine (EMULATION, or CPU where that backend is implemented)."""
    with hf.loading(backend):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.fixture(scope="module")
def references() -> dict[Path, torch.nn.Module]:
    return {}


def reference(cache: dict[Path, torch.nn.Module], path: Path) -> torch.nn.Module:
    if path not in cache:
        cache[path] = reference_model(path)
    return cache[path]


def random_ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


@pytest.mark.parametrize("path", IDS)
def test_logits_match_dequantized_reference(path: Path, references: dict) -> None:
    model = load(path)
    assert sum(isinstance(m, PackedExperts) for m in model.modules()) == 2
    assert sum(isinstance(m, WNA16Linear) for m in model.modules()) == 8  # q, k, v, o of both layers
    ids = random_ids()
    with torch.no_grad():
        got = model(ids).logits
        want = reference(references, path)(ids).logits
    # float32 both sides: only the summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", [CT_W4_G128_ASYM, GPTQ_W4_G32_DESCACT], ids=lambda p: p.name)
def test_bfloat16_model_on_the_oracles_backend_is_close_to_reference(path: Path, references: dict) -> None:
    model = load(path, torch.bfloat16, backend="auto")
    ids = random_ids()
    with torch.no_grad():
        got = model(ids).logits.float()
        want = reference(references, path)(ids).logits
    assert relative_error(got, want) < 2e-2


@pytest.mark.parametrize("path", IDS)
def test_experts_hold_the_packed_size(path: Path) -> None:
    model = load(path, torch.bfloat16)  # EMULATION: reads the packed tensors at each forward
    bf16 = NUM_EXPERTS * 3 * HIDDEN * INTERMEDIATE * 2
    with safe_open(path / "model.safetensors", "pt") as f:
        for layer in (0, 1):
            module = model.get_submodule(f"model.layers.{layer}.mlp.experts")
            prefix = f"model.layers.{layer}.mlp.experts."
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(prefix))  # noqa: SIM118
            params = sum(p.nbytes for p in module.parameters())
            buffers = sum(b.nbytes for b in module.buffers())
            assert params == stored  # exactly the checkpoint's packed tensors, nothing dequantized
            assert buffers == 0  # EMULATION reads them at each forward: no second copy
            bits = module.plan.scheme.bits
            assert params < bf16 * (bits / 16 + 0.15)
    # no dequantized expert weights anywhere (a float tensor as large as one projection of every expert)
    one_projection = NUM_EXPERTS * HIDDEN * INTERMEDIATE
    assert not any(p.is_floating_point() and p.numel() >= one_projection for p in model.parameters())


@pytest.mark.parametrize("path", IDS)
def test_save_pretrained_round_trip_is_bit_exact(path: Path, tmp_path: Path) -> None:
    model = load(path, torch.bfloat16)
    model.save_pretrained(tmp_path)
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == json.loads((path / "config.json").read_text())["quantization_config"]
    again = load(tmp_path, torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("backend", ["auto", "emulation"])
def test_casting_a_loaded_model_is_refused(backend: str) -> None:
    """`model.to(torch.float16)` would rewrite the stored scales (saved no longer bit for bit) and the kernel's
    prepared tensors; transformers refuses it for GPTQ only."""
    model = load(CT_W4_G32_SYM, torch.bfloat16, backend)
    with pytest.raises(InvalidInputError, match="keeps the checkpoint's torch.bfloat16; casting the model to "
                                                 r"torch.float16 .* from_pretrained\(\.\.\., dtype=torch.float16\)"):
        model.to(torch.float16)
    fresh = load(CT_W4_G32_SYM, torch.bfloat16, backend)
    assert fresh.to("cpu") is fresh and fresh.to(torch.bfloat16) is fresh  # no change: fine
    with torch.no_grad():
        assert torch.isfinite(fresh(random_ids()).logits).all()


def test_missing_expert_tensor_is_a_clear_error(fixture_copy: FixtureCopy) -> None:
    path = fixture_copy(CT_W4_G32_SYM)
    key = "model.layers.1.mlp.experts.5.up_proj.weight_scale"
    edit_tensors(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*missing"):
        load(path)


def test_expert_tensor_no_converter_filled_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without our converters nothing fills the merged parameters: the load must fail, naming one.
    monkeypatch.setattr(hf.WNA16Quantizer, "update_weight_conversions", lambda self, conversions, model=None:
                        conversions)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.w13_qweight.*not filled"):
        load(GPTQ_W4_G32_DESCACT)


def test_wrong_shape_in_checkpoint_is_an_error(fixture_copy: FixtureCopy) -> None:
    path = fixture_copy(CT_W8_G128_SYM)
    key = "model.layers.0.mlp.experts.2.down_proj.weight_packed"
    edit_tensors(path, lambda t: t.update({key: t[key][:, :-1]}))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load(path)


def test_corrupt_scales_are_rejected_by_the_reader(fixture_copy: FixtureCopy) -> None:
    path = fixture_copy(CT_W4_G32_SYM)
    key = "model.layers.0.self_attn.k_proj.weight_scale"
    edit_tensors(path, lambda t: t[key].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight_scale.*NaN"):
        load(path)


def test_only_modules_the_checkpoint_quantizes_are_replaced(fixture_copy: FixtureCopy, references: dict) -> None:
    """Layer 1's experts and one attention projection stored in bf16 (and listed in `ignore`) stay HF's."""
    path = fixture_copy(CT_W4_G128_ASYM)
    source = load_file(SOURCE / "model.safetensors")
    dense = ("model.layers.1.mlp.experts.", "model.layers.1.self_attn.o_proj.")

    def swap(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith(dense)]:
            del tensors[key]
        tensors.update({k: v for k, v in source.items() if k.startswith(dense)})

    edit_tensors(path, swap)
    edit_config(path, lambda c: c["quantization_config"]["ignore"].extend(
        ["re:model.layers.1.mlp.experts.*", "model.layers.1.self_attn.o_proj"]))
    model = load(path)
    assert isinstance(model.get_submodule("model.layers.0.mlp.experts"), PackedExperts)
    experts1 = model.get_submodule("model.layers.1.mlp.experts")
    assert not isinstance(experts1, PackedExperts) and experts1.gate_up_proj.dtype == torch.float32
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), torch.nn.Linear)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_model(path)(ids).logits, rtol=1e-4, atol=1e-5)


def test_quantized_tensors_the_config_ignores_are_an_error(fixture_copy: FixtureCopy) -> None:
    path = fixture_copy(CT_W4_G32_SYM)
    edit_config(path, lambda c: c["quantization_config"]["ignore"].append("model.layers.0.self_attn.v_proj"))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn\.v_proj.*ignore"):
        load(path)


def test_static_cache_generate_matches_the_reference(references: dict) -> None:
    """Each step's logits under the static cache equal the reference's over the generated sequence (logits,
    not tokens: a near-tie may pick a different token in two correct runs)."""
    model = load(GPTQ_W4_G32_DESCACT)
    ids = random_ids(1, 6)
    # (An explicit mask: without one, generate masks prompt tokens equal to the pad id, 511 in the fixtures.)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, cache_implementation="static", output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 12)
    with torch.no_grad():
        want = reference(references, GPTQ_W4_G32_DESCACT)(out.sequences).logits[0, 5:11]
    torch.testing.assert_close(torch.cat(out.logits), want, rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_with_static_cache() -> None:
    """The experts are one custom op with a fake implementation: dynamo traces prefill and decode whole.
    (The EMULATION body synchronizes with the host; the op hides it from the compiler.)"""
    model = load(CT_W4_G32_SYM)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, step = random_ids(1, 7), random_ids(1, 1)

    # (5.24 renamed the forward's `past_key_values` to `cache`; the old name warns until 5.40.)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(m: torch.nn.Module) -> list[torch.Tensor]:
        cache = {cache_arg: StaticCache(config=model.config, max_cache_len=12)}
        with torch.no_grad():
            prefill = m(ids, **cache, use_cache=True, cache_position=torch.arange(7)).logits
            decode = m(step, **cache, use_cache=True, cache_position=torch.tensor([7])).logits
        return [prefill, decode]

    for got, want in zip(run(compiled), run(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.hf_quantizer.is_compileable


def test_custom_op_passes_opcheck() -> None:
    model = load(CT_W4_G128_ASYM)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    hidden = torch.randn(5, HIDDEN)
    ids = torch.stack([torch.randperm(NUM_EXPERTS)[:2] for _ in range(5)]).to(torch.int32)
    weights = torch.rand(5, 2)
    tensors = [getattr(experts, name) for name in experts._op_names]
    torch.library.opcheck(torch.ops.wna16moe.hf_experts.default, (hidden, ids, weights, tensors, experts._handle))


def test_experts_ignore_out_of_range_ids() -> None:
    """Expert-parallel sentinels (id >= E) contribute nothing."""
    model = load(CT_W8_G128_SYM)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    hidden = torch.randn(4, HIDDEN)
    ids = torch.tensor([[0, 3], [5, 1], [2, 7], [6, 4]])
    weights = torch.rand(4, 2)
    with torch.no_grad():
        full = experts(hidden, ids, weights)
        masked = experts(hidden, torch.where(ids == 3, NUM_EXPERTS, ids), weights)
        alone = experts(hidden, ids, torch.where(ids == 3, 0.0, weights))
    torch.testing.assert_close(masked, alone)
    assert not torch.equal(full[0], masked[0]) and torch.equal(full[1:], masked[1:])


@pytest.mark.parametrize("expert_map", [True, False], ids=["skip", "zero_weight"])
def test_any_out_of_range_id_contributes_nothing(expert_map: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """-1, E and ids far outside [0, E) all drop their pair: skipped (-1) by kernels that take an expert map,
    else sent to expert 0 with router weight 0 (forced here on EMULATION, which takes one)."""
    from wna16moe.experts.emulation import EmulationExperts

    monkeypatch.setattr(EmulationExperts, "SUPPORTS_EXPERT_MAP", expert_map)
    model = load(CT_W8_G128_SYM)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert (experts._valid_table is None) == expert_map
    hidden = torch.randn(4, HIDDEN)
    ids = torch.tensor([[0, 3], [5, 1], [2, 7], [6, 4]])
    weights = torch.rand(4, 2)
    drop = torch.tensor([[False, True], [True, False], [False, False], [False, True]])
    with torch.no_grad():
        alone = experts(hidden, ids, torch.where(drop, 0.0, weights))
        for sentinel in (-1, NUM_EXPERTS, NUM_EXPERTS + 1, 1000, -7):
            got = experts(hidden, torch.where(drop, sentinel, ids), weights)
            torch.testing.assert_close(got, alone, msg=f"sentinel {sentinel}")


def test_eager_forward_skips_the_op_and_matches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain eager forward calls the layer's runtime directly (the op's dispatch is host time), with the
    op's result bit for bit; inputs requiring grad and meta inputs still go through the op."""
    from wna16moe.hf import modules

    model = load(CT_W4_G128_ASYM)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    hidden = torch.randn(5, HIDDEN)
    ids = torch.stack([torch.randperm(NUM_EXPERTS)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    tensors = [getattr(experts, name) for name in experts._op_names]
    op_calls = []
    apply = modules._ExpertsRuntime.apply
    monkeypatch.setattr(modules._ExpertsRuntime, "apply", lambda self, *args: op_calls.append(1) or apply(self, *args))
    with torch.no_grad():
        direct = experts(hidden, ids, weights)
        assert not op_calls
        via_op = torch.ops.wna16moe.hf_experts(hidden, ids.to(torch.int32), weights, tensors, experts._handle)
        assert len(op_calls) == 1
    assert torch.equal(direct, via_op)
    with torch.enable_grad():
        through_op = experts(hidden.requires_grad_(), ids, weights)
        assert torch.equal(through_op, direct)
        # inference only: a backward through the experts is refused by name
        with pytest.raises(UnsupportedError, match="computes no gradients"):
            through_op.sum().backward()
    assert len(op_calls) == 2
    meta = experts(hidden.detach().to("meta"), ids.to("meta"), weights.to("meta"))  # the op's fake kernel
    assert meta.device.type == "meta" and meta.shape == hidden.shape and len(op_calls) == 2


def test_explain_names_every_layer_and_backend() -> None:
    model = load(CT_W4_G32_SYM, torch.bfloat16, backend="auto")
    explanation = hf.explain(model)
    assert [layer.name for layer in explanation.layers] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for layer in explanation.layers:
        # the first backend of the CPU priority list that can run it (CPU where implemented, else EMULATION)
        candidates = layer.report.candidates
        chosen = next(i for i, c in enumerate(candidates) if c.verdict == Verdict.CHOSEN)
        assert layer.backend in (Backend.CPU, Backend.EMULATION)
        assert all(c.verdict == Verdict.REJECTED and c.reason for c in candidates[:chosen])
        rejected = {c.backend for c in candidates if c.verdict == Verdict.REJECTED}
        assert Backend.MARLIN in rejected and all(c.reason for c in candidates)
    text = str(explanation)
    assert "model.layers.1.mlp.experts" in text and "emulation" in text and "rejected" in text
    assert len(explanation.dense_layers) == 8
    assert set(explanation.as_dict()["layers"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def test_forced_backend_that_cannot_run_is_an_error() -> None:
    with pytest.raises(BackendError, match="marlin"):
        load(CT_W4_G32_SYM, backend="marlin")  # needs CUDA
    model = load(CT_W4_G32_SYM)
    assert hf.explain(model).layers[0].report.override == Backend.EMULATION


def test_enable_disable_and_loading_restore_transformers_registries() -> None:
    hf.disable()  # the autouse fixture enabled it
    stock = {m: (auto.AUTO_QUANTIZER_MAPPING[m], auto.AUTO_QUANTIZATION_CONFIG_MAPPING[m])
             for m in hf.quantizer.METHODS}
    assert not hf.is_enabled()
    with hf.loading(backend="emulation"):
        assert all(auto.AUTO_QUANTIZER_MAPPING[m] is hf.WNA16Quantizer for m in stock)
        with hf.loading():  # nested: keeps the takeover, restores the outer backend
            assert hf.WNA16Quantizer.backend is None
        assert hf.is_enabled() and hf.WNA16Quantizer.backend == Backend.EMULATION
    assert not hf.is_enabled()
    assert {m: (auto.AUTO_QUANTIZER_MAPPING[m], auto.AUTO_QUANTIZATION_CONFIG_MAPPING[m]) for m in stock} == stock
    hf.enable()
    hf.enable()  # idempotent
    hf.disable()
    assert {m: (auto.AUTO_QUANTIZER_MAPPING[m], auto.AUTO_QUANTIZATION_CONFIG_MAPPING[m]) for m in stock} == stock
    hf.enable()  # for the autouse fixture to restore
