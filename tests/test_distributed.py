"""Tensor and expert parallel layers on several processes (torch.distributed), each rank's output against the
single-process EMULATION layer on the same weights and tokens.

CPU: gloo, 2 and 4 ranks (one spawn per world size runs that size's scenarios in order; each test checks one
scenario), TRITON and BATCHED_TRITON through the interpreter in float16 (its bfloat16 dot is wrong), EMULATION
in bfloat16. Scenarios cover TP (all-reduce), EP with shared tokens (expert map + all-reduce), EP with
data-parallel tokens (all-to-all, standard with counts or fixed buffers, and batched), TP x EP, act-order
under TP, biases, uneven expert ranges, ranks that receive no token, skewed routing, M = 1, an idle
data-parallel rank, and layers read from checkpoints with only the rank's experts.

GPU (marker gpu, 2 CUDA devices): the same through NCCL on real-sized layers in bfloat16. NCCL's NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, set unless the environment already sets it).

The spawned runs are shared by the tests, so their data comes from one seed per module ($WNA16MOE_TEST_SEED
when set), named in every failure message; the per-test seed conftest reports does not drive them.
"""

from __future__ import annotations

import os
import random
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CT_W4_G32_SYM, GPTQ_W4_G32_DESCACT, SEED_ENV, random_experts
from triton_env import HAS_CUDA

from wna16moe import MoEConfig, WeightScheme
from wna16moe.distributed import parallel_config, select_experts
from wna16moe.layer import WNA16MoE

E, K, H, I = 8, 2, 64, 128  # noqa: E741 (I is the intermediate size)
FP16, BF16 = torch.float16, torch.bfloat16
# Largest relative error ||out_row - ref_row|| / ||ref_row|| of any token: partial sums rounded to the
# activation dtype before they are added up (bf16: 2**-8) and, for TRITON, fp16 tensor-core products.
ROW_TOL = 1e-2


@dataclass(frozen=True)
class Scenario:
    """One parallel layer run.

    tokens: tokens per token group: one entry when every rank holds the same tokens, one per EP rank with
    `data_parallel`. routing: "random"; "first-rank" (every pair on EP rank 0's experts: the others get
    nothing); "skewed" (expert 5 is every token's first choice). local_only: pass the layer only this rank's
    experts. checkpoint: build the layer from this checkpoint's layer 0 (only the rank's experts are read).
    """

    name: str
    tp: int = 1
    ep: int = 1
    data_parallel: bool = False
    batched: bool = False
    backend: str = "emulation"
    scheme: str = "int4_g32_sym"
    dtype: torch.dtype = BF16
    tokens: tuple[int, ...] = (5,)
    routing: str = "random"
    num_experts: int = E
    hidden: int = H
    intermediate: int = I
    bias: bool = False
    local_only: bool = False
    checkpoint: Path | None = None
    capacity: int | None = None  # ParallelConfig.max_tokens_per_rank: the fixed-buffer all-to-all

    @property
    def world(self) -> int:
        return self.tp * self.ep


SCENARIOS = [
    # ----- 2 ranks -----
    Scenario("tp2-triton-bias", tp=2, backend="triton", dtype=FP16, tokens=(7,), bias=True),
    Scenario("tp2-triton-actorder", tp=2, backend="triton", dtype=FP16, scheme="int4_g32_sym_actorder", tokens=(6,)),
    Scenario("tp2-int8-zp-m1", tp=2, scheme="int8_g64_zp", tokens=(1,)),
    Scenario("ep2-shared-tokens-bias", ep=2, tokens=(6,), bias=True, intermediate=64),
    Scenario("ep2-a2a-triton", ep=2, data_parallel=True, backend="triton", dtype=FP16, tokens=(5, 3),
             local_only=True, intermediate=64),
    Scenario("ep2-a2a-empty-rank", ep=2, data_parallel=True, tokens=(4, 2), routing="first-rank", intermediate=64),
    Scenario("ep2-a2a-skewed-m1-idle-rank", ep=2, data_parallel=True, tokens=(1, 0), routing="skewed",
             intermediate=64),
    Scenario("ep2-a2a-checkpoint", ep=2, data_parallel=True, tokens=(3, 4), checkpoint=CT_W4_G32_SYM),
    Scenario("ep2-fixed-a2a-triton", ep=2, data_parallel=True, backend="triton", dtype=FP16, tokens=(5, 3),
             capacity=8, intermediate=64),
    Scenario("ep2-fixed-a2a-skewed-m1-idle-rank", ep=2, data_parallel=True, tokens=(1, 0), routing="skewed",
             capacity=1, intermediate=64),
    Scenario("ep2-batched", ep=2, data_parallel=True, batched=True, backend="batched_triton", dtype=FP16,
             tokens=(6, 4), bias=True, intermediate=64),
    Scenario("ep2-batched-empty-rank", ep=2, data_parallel=True, batched=True, backend="batched_triton", dtype=FP16,
             tokens=(3, 5), routing="first-rank", intermediate=64),
    Scenario("ep2-batched-shared-tokens-skewed", ep=2, batched=True, backend="batched_triton", dtype=FP16,
             tokens=(4,), routing="skewed", intermediate=64),
    # ----- 4 ranks -----
    Scenario("tp4", tp=4, tokens=(3,)),
    Scenario("tp2xep2-a2a-triton-bias", tp=2, ep=2, data_parallel=True, backend="triton", dtype=FP16, tokens=(5, 2),
             bias=True),
    Scenario("tp2xep2-shared-tokens-actorder", tp=2, ep=2, scheme="int4_g32_zp_actorder", tokens=(4,)),
    Scenario("tp2xep2-batched-skewed-m1", tp=2, ep=2, data_parallel=True, batched=True, backend="batched_triton",
             dtype=FP16, tokens=(1, 6), routing="skewed"),
    Scenario("tp2xep2-checkpoint-actorder", tp=2, ep=2, data_parallel=True, tokens=(2, 3),
             checkpoint=GPTQ_W4_G32_DESCACT),
    Scenario("ep4-a2a-uneven-experts", ep=4, data_parallel=True, tokens=(3, 1, 0, 4), num_experts=6,
             local_only=True, intermediate=64),
    Scenario("tp2xep2-fixed-a2a-triton-bias", tp=2, ep=2, data_parallel=True, backend="triton", dtype=FP16,
             tokens=(5, 2), capacity=5, bias=True),
    Scenario("ep4-fixed-a2a-uneven-experts-empty-rank", ep=4, data_parallel=True, tokens=(3, 1, 0, 4), num_experts=6,
             routing="first-rank", capacity=4, intermediate=64),
    Scenario("ep4-batched-first-rank", ep=4, data_parallel=True, batched=True, backend="batched_triton", dtype=FP16,
             tokens=(2, 2, 2, 2), routing="first-rank", intermediate=64),
]


def _inputs(sc: Scenario, gen: torch.Generator) -> dict[str, Any]:
    """Weights (unless read from a checkpoint), biases and per-group tokens and router logits."""
    data: dict[str, Any] = {}
    e, h, i = sc.num_experts, sc.hidden, sc.intermediate
    if sc.checkpoint is not None:
        from wna16moe import open_checkpoint

        cfg = open_checkpoint(sc.checkpoint).moe_config()
        e, h = cfg.num_experts, cfg.hidden_size
    else:
        data["experts"] = random_experts(WeightScheme.from_name(sc.scheme), e, h, i, gen)
        data["config"] = MoEConfig(e, K, h, i, dtype=sc.dtype)
        if sc.bias:
            data["w13_bias"] = torch.randn(e, 2 * i, generator=gen) * 0.1
            data["w2_bias"] = torch.randn(e, h, generator=gen) * 0.1
    xs, logits = [], []
    for t in sc.tokens:
        xs.append(torch.randn(t, h, generator=gen).to(sc.dtype))
        logit = torch.randn(t, e, generator=gen)
        if sc.routing == "first-rank":
            logit[:, : e // sc.ep] += 20.0  # EP rank 0 owns the first E // ep_size experts (at least)
        elif sc.routing == "skewed":
            logit[:, 5 % e] += 20.0
        logits.append(logit)
    data["x"], data["logits"] = xs, logits
    return data


def _layer(sc: Scenario, data: dict[str, Any], **kwargs: Any) -> WNA16MoE:
    if sc.checkpoint is not None:
        return WNA16MoE.from_checkpoint(sc.checkpoint, 0, **kwargs)
    bias = {k: data[k] for k in ("w13_bias", "w2_bias") if k in data}
    return WNA16MoE(data["experts"], data["config"], **bias, **kwargs)


def _join(rank: int, world: int, out_dir: str, backend: str, timeout_s: int = 120) -> torch.device:
    """Join this spawn's process group (gloo on the CPU, NCCL on GPU `rank`) and return the rank's device."""
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(out_dir, "store"), world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    return device


def _worker(rank: int, world: int, scenarios: list[Scenario], inputs: list[dict[str, Any]], out_dir: str,
            backend: str) -> None:
    """One rank: run every scenario, save {name: output, backend, token group} or {name: error}."""
    device = _join(rank, world, out_dir, backend)
    results: dict[str, Any] = {}
    for sc, data in zip(scenarios, inputs, strict=True):
        try:
            parallel = parallel_config(sc.tp, sc.ep, data_parallel=sc.data_parallel, batched=sc.batched,
                                       max_tokens_per_rank=sc.capacity)
            if sc.local_only:
                data = dict(data, experts=select_experts(data["experts"],
                                                         parallel.local_experts(sc.num_experts)))
            layer = _layer(sc, data, device=device, backend=sc.backend, parallel=parallel)
            group = parallel.ep_rank if sc.data_parallel else 0
            out = layer(data["x"][group].to(device), data["logits"][group].to(device))
            results[sc.name] = {"out": out.cpu(), "backend": layer.backend.value, "group": group}
        except Exception:  # reported by the scenario's test, not here
            results[sc.name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(scenarios: list[Scenario], inputs: dict[str, dict[str, Any]], out_dir: Path,
           backend: str) -> dict[str, list[dict[str, Any]]]:
    """Run `scenarios` (one world size) on that many processes; per scenario, each rank's result."""
    world = scenarios[0].world
    mp.spawn(_worker, args=(world, scenarios, [inputs[sc.name] for sc in scenarios], str(out_dir), backend),
             nprocs=world)
    per_rank = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {sc.name: [ranks[sc.name] for ranks in per_rank] for sc in scenarios}


def _seed() -> int:
    return int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else random.SystemRandom().randrange(2**31)


def _check(sc: Scenario, data: dict[str, Any], results: list[dict[str, Any]], seed: int,
           device: torch.device) -> None:
    """Every rank's output equals the single-process EMULATION layer's rows for its tokens."""
    where = f"{sc.name} (seed {seed}; rerun with {SEED_ENV}={seed})"
    for rank, result in enumerate(results):
        assert "error" not in result, f"{where}, rank {rank}:\n{result.get('error')}"
        assert result["backend"] == sc.backend, where
    reference = _layer(sc, data, device=device, backend="emulation")
    refs = [reference(x.to(device), logits.to(device)).float().cpu() for x, logits in zip(data["x"], data["logits"],
                                                                                           strict=True)]
    for rank, result in enumerate(results):
        out, ref = result["out"].float(), refs[result["group"]]
        assert out.shape == ref.shape, f"{where}, rank {rank}: {list(out.shape)} vs {list(ref.shape)}"
        assert torch.isfinite(out).all(), f"{where}, rank {rank}: non-finite output"
        if ref.numel():
            errors = (out - ref).norm(dim=1) / ref.norm(dim=1)
            assert float(errors.max()) < ROW_TOL, f"{where}, rank {rank}: per-token relative errors {errors.tolist()}"


def _runs_on_cpu(sc: Scenario) -> bool:
    """TRITON's kernels run on CPU ranks only in the interpreter, which triton_env turns on where there is no
    GPU (on a GPU machine the gpu-* scenarios below cover them)."""
    return "triton" not in sc.backend or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    inputs = {sc.name: _inputs(sc, gen) for sc in SCENARIOS}
    results: dict[str, list[dict[str, Any]]] = {}
    runnable = [sc for sc in SCENARIOS if _runs_on_cpu(sc)]
    for world in sorted({sc.world for sc in runnable}):
        batch = [sc for sc in runnable if sc.world == world]
        results.update(_spawn(batch, inputs, tmp_path_factory.mktemp(f"gloo{world}"), "gloo"))
    return seed, inputs, results


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[sc.name for sc in SCENARIOS])
def test_parallel_layer_matches_emulation(cpu_runs: tuple, scenario: Scenario) -> None:
    if not _runs_on_cpu(scenario):
        pytest.skip("TRITON on CPU ranks needs the interpreter (TRITON_INTERPRET=1), which is off beside a GPU")
    seed, inputs, results = cpu_runs
    _check(scenario, inputs[scenario.name], results[scenario.name], seed, torch.device("cpu"))


def _capacity_worker(rank: int, out_dir: str) -> None:
    """Rank r builds a data-parallel EP layer with max_tokens_per_rank 4 + r and saves what building raised."""
    _join(rank, 2, out_dir, "gloo")
    parallel = parallel_config(1, 2, data_parallel=True, max_tokens_per_rank=4 + rank)
    try:
        WNA16MoE(random_experts(WeightScheme(4, 32), 8, 64, 32), MoEConfig(8, 2, 64, 32), device="cpu",
                 backend="emulation", parallel=parallel)
        error = ""
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"rank{rank}.txt").write_text(error)
    dist.destroy_process_group()


def test_ranks_with_different_fixed_buffers_are_refused_at_build(tmp_path: Path) -> None:
    """Unequal max_tokens_per_rank would abort the first forward inside the all-to-all: every rank raises at
    build time instead, naming the setting."""
    mp.spawn(_capacity_worker, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        error = (tmp_path / f"rank{rank}.txt").read_text()
        assert error.startswith("InvalidInputError") and "max_tokens_per_rank differs between the EP ranks (4 to 5" \
            in error, (rank, error)


def _overflow_worker(rank: int, out_dir: str, seed: int, backend: str) -> None:
    """Two data-parallel EP ranks with max_tokens_per_rank 4; rank 0 brings 5 tokens, rank 1 brings 3. Each saves
    its output or what it raised, and the single-process EMULATION layer's output for its tokens."""
    device = _join(rank, 2, out_dir, backend, timeout_s=60)
    gen = torch.Generator().manual_seed(seed)
    h, i = (2048, 768) if backend == "nccl" else (64, 32)
    experts, config = random_experts(WeightScheme(4, 128 if backend == "nccl" else 32), 8, h, i, gen), \
        MoEConfig(8, 2, h, i)
    tokens = [(torch.randn(t, h, generator=gen).to(BF16), torch.randn(t, 8, generator=gen)) for t in (5, 3)]
    x, logits = (v.to(device) for v in tokens[rank])
    parallel = parallel_config(1, 2, data_parallel=True, max_tokens_per_rank=4)
    layer = WNA16MoE(experts, config, device=device, backend="triton" if backend == "nccl" else "emulation",
                     parallel=parallel)
    try:
        result: dict[str, Any] = {"out": layer(x, logits).cpu()}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["reference"] = WNA16MoE(experts, config, device=device, backend="emulation")(x, logits).cpu()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _check_overflow(backend: str) -> None:
    """A rank with more tokens than max_tokens_per_rank raises, naming the setting, but only after it has taken its
    part in the step's collectives with its first tokens: the other rank finishes the step with the right output
    instead of waiting in the all-to-all until the process group times out."""
    seed = _seed()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_overflow_worker, args=(out_dir, seed, backend), nprocs=2)
        over, under = (torch.load(Path(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2))
    assert "out" not in over and over["error"].startswith("InvalidInputError") and \
        "5 tokens on this rank exceed ParallelConfig.max_tokens_per_rank=4" in over["error"], (seed, over)
    assert "error" not in under, (seed, under)
    errors = (under["out"].float() - under["reference"].float()).norm(dim=1) / under["reference"].float().norm(dim=1)
    assert float(errors.max()) < ROW_TOL, (seed, errors.tolist())


def test_a_rank_over_its_fixed_buffer_raises_after_the_step() -> None:
    _check_overflow("gloo")


def test_scenarios_reach_every_path() -> None:
    """The scenario list keeps covering what the module docstring promises."""
    names = " ".join(sc.name for sc in SCENARIOS)
    for feature in ("tp2", "tp4", "ep2-a2a", "ep2-fixed-a2a", "ep2-batched", "tp2xep2-a2a", "tp2xep2-fixed-a2a",
                    "tp2xep2-batched", "shared-tokens",
                    "empty-rank", "skewed", "m1", "idle-rank", "actorder", "uneven", "checkpoint", "bias"):
        assert feature in names, feature
    assert {sc.world for sc in SCENARIOS} == {2, 4}


# ----- GPU: NCCL, two ranks ---------------------------------------------------------------------------------

# Qwen3-30B-A3B's H and I (I/tp = 384: three groups of 128), 32 of its experts.
GPU_SHAPE = dict(num_experts=32, hidden=2048, intermediate=768)
GPU_SCENARIOS = [
    Scenario("gpu-tp2-triton", tp=2, backend="triton", scheme="int4_g128_sym", tokens=(64,), **GPU_SHAPE),
    Scenario("gpu-ep2-a2a-triton", ep=2, data_parallel=True, backend="triton", scheme="int4_g128_zp",
             tokens=(48, 1), local_only=True, **GPU_SHAPE),
    Scenario("gpu-ep2-fixed-a2a-triton", ep=2, data_parallel=True, backend="triton", tokens=(3, 8), capacity=8,
             **GPU_SHAPE),
    Scenario("gpu-ep2-a2a-empty-rank", ep=2, data_parallel=True, backend="triton", tokens=(8, 16),
             routing="first-rank", **GPU_SHAPE),
    Scenario("gpu-ep2-batched", ep=2, data_parallel=True, batched=True, backend="batched_triton",
             scheme="int8_g128_sym", tokens=(33, 7), routing="skewed", **GPU_SHAPE),
    Scenario("gpu-ep2-shared-tokens", ep=2, backend="triton", tokens=(17,), bias=True, **GPU_SHAPE),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_a_rank_over_its_fixed_buffer_raises_after_the_step_nccl() -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (module docstring)
    _check_overflow("nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_two_ranks_nccl(tmp_path: Path) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (module docstring)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    inputs = {sc.name: _inputs(sc, gen) for sc in GPU_SCENARIOS}
    results = _spawn(GPU_SCENARIOS, inputs, tmp_path, "nccl")
    for sc in GPU_SCENARIOS:
        _check(sc, inputs[sc.name], results[sc.name], seed, torch.device("cuda:0"))
