"""Shared fixtures and helpers of the test suite.

Randomness: every test gets a fresh seed (or the one in $WNA16MOE_TEST_SEED), seeded into torch, numpy and
`random` before it runs; a failing test's report carries the seed and the command that reruns it with it.
Hypothesis tests draw their own seeds, so hypothesis can shrink and replay them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
from collections.abc import Callable, Generator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

# First, before any test module (or transformers, which imports triton) is imported: without a GPU the Triton
# kernels run in the interpreter, and triton must see TRITON_INTERPRET=1 before it is first imported.
import triton_env  # noqa: F401
from hypothesis import HealthCheck, settings
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wna16moe.experts.base import relative_error  # noqa: F401 (the tests' measure, re-exported)
from wna16moe.formats import HF_NAMING, CheckpointFormat, DictSource, ExpertNaming, read_experts, write_experts
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

DATA = Path(__file__).parent / "data"
SOURCE = DATA / "qwen3moe-bf16"
# The quantized fixtures, all made by real tools from SOURCE's bf16 weights.
CT_W4_G32_SYM = DATA / "qwen3moe-w4a16-g32-sym"
CT_W4_G128_ASYM = DATA / "qwen3moe-w4a16-g128-asym"
CT_W8_G128_SYM = DATA / "qwen3moe-w8a16-g128-sym"
GPTQ_W4_G32_DESCACT = DATA / "qwen3moe-gptq-w4-g32-descact"
AWQ_W4_G32 = DATA / "qwen3moe-awq-gemm-w4-g32"
QUANTIZED_FIXTURES = (CT_W4_G32_SYM, CT_W4_G128_ASYM, CT_W8_G128_SYM, GPTQ_W4_G32_DESCACT, AWQ_W4_G32)
# Shapes of every fixture (tiny Qwen3-MoE): 2 MoE layers of 8 experts, top-2, H=256, I=128.
NUM_LAYERS, NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 2, 8, 2, 256, 128

SEED_ENV = "WNA16MOE_TEST_SEED"

FixtureCopy = Callable[[Path], Path]  # the `fixture_copy` fixture
TensorEdit = Callable[[torch.Tensor], "torch.Tensor | None"]  # corrupts a tensor; None drops it
ConfigEdit = Callable[[dict], object]  # changes a config dict in place

settings.register_profile("wna16moe", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("wna16moe")

_seed_key = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test (or $WNA16MOE_TEST_SEED), seeded everywhere; reported if the test fails."""
    value = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else random.SystemRandom().randrange(2**31)
    request.node.stash[_seed_key] = value
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    value = item.stash.get(_seed_key, None)
    if report.failed and value is not None:
        report.sections.append(("random seed", f"seed {value}; rerun with {SEED_ENV}={value} python -m pytest "
                                               f"'{item.nodeid}'"))


# ----- the bf16 source weights ------------------------------------------------------------------------------

@cache
def _source_experts(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(SOURCE / "model.safetensors", "pt") as f:
        def stack(projection: str) -> torch.Tensor:
            return torch.stack([f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight").float()
                                for e in range(NUM_EXPERTS)])

        w13 = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        return w13, stack("down_proj")


def load_source_experts(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 source experts of `layer`, read straight from the safetensors file (not through the library):
    float32 w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]."""
    w13, w2 = _source_experts(layer)
    return w13.clone(), w2.clone()


def load_source_router(layer: int) -> torch.Tensor:
    """The bf16 router weight [E, H] of `layer` of the source checkpoint."""
    with safe_open(SOURCE / "model.safetensors", "pt") as f:
        return f.get_tensor(f"model.layers.{layer}.mlp.gate.weight")


# ----- independent dequantization ---------------------------------------------------------------------------

def group_index_ref(weight: QuantizedWeight, expert: int) -> torch.Tensor:
    """Group of each input element: g_idx when act-order, else k // group_size (0 when channel-wise)."""
    k = weight.codes.shape[2]
    if weight.g_idx is not None:
        return weight.g_idx[expert].long()
    gs = weight.scheme.group_size
    return torch.zeros(k, dtype=torch.long) if gs is None else torch.tensor([i // gs for i in range(k)])


def dequantize_ref(weight: QuantizedWeight) -> torch.Tensor:
    """float64 [E, N, K]: (code - zero) * scale of each element's own group, written out plainly."""
    out = []
    for e in range(weight.codes.shape[0]):
        group = group_index_ref(weight, e)
        scale = weight.scales[e].double()[:, group]
        if weight.zeros is None:
            zero = torch.full_like(scale, 2.0 ** (weight.scheme.bits - 1))
        else:
            zero = weight.zeros[e].double()[:, group]
        out.append((weight.codes[e].double() - zero) * scale)
    return torch.stack(out)


def step_ref(weight: QuantizedWeight) -> torch.Tensor:
    """float64 [E, N, K]: the quantization step (its group's scale) of every element."""
    return torch.stack([weight.scales[e].double()[:, group_index_ref(weight, e)]
                        for e in range(weight.codes.shape[0])])


# ----- random canonical experts -----------------------------------------------------------------------------

def random_g_idx(k: int, group_size: int | None, generator: torch.Generator) -> torch.Tensor:
    """A random act-order g_idx [K] int32: the consecutive groups, shuffled (each group keeps its size)."""
    groups = torch.zeros(k, dtype=torch.int64) if group_size is None else torch.arange(k) // group_size
    return groups[torch.randperm(k, generator=generator)].to(torch.int32)


def random_weight(scheme: WeightScheme, e: int, n: int, k: int, generator: torch.Generator,
                  zero_low: int = 0) -> QuantizedWeight:
    """Random codes, positive scales, zeros in [zero_low, 2**bits) and (act-order) a shuffled g_idx."""
    g = scheme.num_groups(k)
    codes = torch.randint(0, scheme.max_code + 1, (e, n, k), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(e, n, g, generator=generator) * 0.02 + 0.001).to(scheme.scale_dtype)
    zeros = None
    if scheme.zero_point:
        zeros = torch.randint(zero_low, scheme.max_code + 1, (e, n, g), generator=generator, dtype=torch.uint8)
    g_idx = None
    if scheme.act_order:
        g_idx = torch.stack([random_g_idx(k, scheme.group_size, generator) for _ in range(e)])
    return QuantizedWeight(scheme, codes, scales, zeros, g_idx)


def random_experts(scheme: WeightScheme, e: int, h: int, i: int, generator: torch.Generator | None = None,
                   zero_low: int = 0) -> QuantizedExperts:
    """Random canonical experts w13 [E, 2I, H], w2 [E, H, I] (gate and up share one g_idx per expert)."""
    gen = generator if generator is not None else torch.default_generator
    w13 = random_weight(scheme, e, 2 * i, h, gen, zero_low)
    w2 = random_weight(scheme, e, h, i, gen, zero_low)
    return QuantizedExperts(w13, w2)


# ----- editable copies of the fixtures ----------------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of checkpoint directory `src` at `dst`."""
    shutil.copytree(src, dst)
    for file in dst.iterdir():
        file.chmod(file.stat().st_mode | stat.S_IWUSR)
    dst.chmod(dst.stat().st_mode | stat.S_IWUSR)
    return dst


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load every tensor of `path`/model.safetensors, let `edit` change the dict in place, save it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def edit_config(path: Path, edit: Callable[[dict], None], name: str = "config.json") -> None:
    """Let `edit` change `path`/`name` (a JSON file) in place."""
    file = path / name
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config, indent=2))


@pytest.fixture
def fixture_copy(tmp_path: Path) -> FixtureCopy:
    """`fixture_copy(CT_W4_G32_SYM)`: a writable copy of a fixture checkpoint under tmp_path."""
    def make(src: Path) -> Path:
        return copy_checkpoint(src, tmp_path / src.name)

    return make


# ----- raw bit unpacking, written independently of wna16moe.formats.packing --------------------------------

def unpack_words(words: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Unpack int32 words along the last dim into codes (int64), LSB first: slot j = bits [j*bits, (j+1)*bits).

    With `order`, slot j holds element order[j] of the word's elements (AWQ interleaving)."""
    per_word = 32 // bits
    unsigned = words.numpy().astype(np.int64) & 0xFFFFFFFF
    slots = np.stack([(unsigned >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)], axis=-1)
    if order is not None:
        elements = np.empty_like(slots)
        for slot, element in enumerate(order):
            elements[..., element] = slots[..., slot]
        slots = elements
    return torch.from_numpy(slots.reshape(*slots.shape[:-2], -1))


# ----- synthetic checkpoints on disk --------------------------------------------------------------------------

def write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor],
                     shards: list[Callable[[str], bool]] | None = None) -> Path:
    """Write a Hugging Face style checkpoint: config.json plus model.safetensors, or, with `shards` (one
    predicate per shard file, first match wins), model-0000i-of-0000n.safetensors and an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index = next(i for i, belongs in enumerate(shards) if belongs(key))
        files.setdefault(f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors", {})[key] = tensor
    weight_map = {}
    for name, part in files.items():
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def deepseek_config(num_experts: int = 16, top_k: int = 4, hidden: int = 64, intermediate: int = 32,
                    n_group: int = 4, topk_group: int = 2, scale: float = 2.5) -> dict:
    """A DeepSeek-V3 style config.json (noaux_tc routing with e_score_correction_bias)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "moe_intermediate_size": intermediate, "n_routed_experts": num_experts,
        "n_shared_experts": 1, "num_experts_per_tok": top_k, "n_group": n_group, "topk_group": topk_group,
        "routed_scaling_factor": scale, "norm_topk_prob": True, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "first_k_dense_replace": 1, "num_hidden_layers": 3, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def assert_round_trip(experts: QuantizedExperts, fmt: CheckpointFormat, layer: int = 0,
                      naming: ExpertNaming = HF_NAMING) -> dict[str, torch.Tensor]:
    """write_experts -> DictSource -> read_experts gives back exactly the same codes, scales (and dtype), zeros
    and g_idx, and the tensors can be saved (safetensors refuses tensors that share storage). Returns them."""
    tensors = write_experts(experts, fmt, layer, naming)
    safetensors.torch.save(tensors)
    back = read_experts(DictSource(tensors), fmt, experts.scheme, layer, naming, experts.num_experts,
                        experts.hidden_size, experts.intermediate_size)
    for got, want in ((back.w13, experts.w13), (back.w2, experts.w2)):
        assert got.scheme == want.scheme
        assert torch.equal(got.codes, want.codes)
        assert got.scales.dtype == want.scales.dtype and torch.equal(got.scales, want.scales)
        for a, b in ((got.zeros, want.zeros), (got.g_idx, want.g_idx)):
            assert (a is None) == (b is None)
            if b is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)
    return tensors


def table_rows(out: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(backend, kernel) -> (verdict, reason) from the table `wna16moe explain` prints."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["backend", "kernel", "verdict"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        backend, kernel, verdict, reason = line.split(maxsplit=3)
        rows[backend, kernel] = (verdict, reason)
    return rows
