"""Benchmark of tensor / expert parallel MoE layers under torchrun (NCCL), one GPU per rank:

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 -m wna16moe.bench --ep 4 --dp --shapes qwen3-30b-a3b

(`wna16moe.bench` hands --tp/--ep/--dp/--batched runs here.) World size = tp * ep. Every rank builds the same
random layer of each model shape (a fixed seed) and keeps its shard; with --dp each rank routes its own M
tokens (data-parallel attention: all-to-all dispatch), without it all ranks share the same M tokens (expert map
and all-reduce); --batched uses the batched activation format (BATCHED_TRITON).

Timed region: the layer's forward from router logits: routing, prepare (dispatch), experts, finalize (combine,
all-reduce); each row also splits it into those stages (CUDA events between them, the slowest rank's time per
stage). With --max-tokens-per-rank (and --dp) the all-to-all uses fixed buffers of that many tokens (no host
synchronization), and the whole forward is also timed as a CUDA-graph replay. Every rank runs the same number
of iterations (warm-up, then timed ones between barriers, CUDA events around each forward); reported per M:
the median over iterations of the slowest rank's time. Before timing, each rank's output for 32 tokens is
checked against a single-GPU EMULATION of the whole layer. Rank 0 prints the rows and writes them as JSON.

NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set here unless the environment sets it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wna16moe.bench import capture_graph, commit_id, random_experts
from wna16moe.config import ActivationFormat
from wna16moe.distributed import MoEGroups, parallel_config
from wna16moe.experts.base import relative_error
from wna16moe.layer import WNA16MoE
from wna16moe.routing import route
from wna16moe.scheme import WeightScheme
from wna16moe.shapes import model_shape

WARMUP, ITERATIONS = 5, 30
CHECK_TOKENS = 32


def _timed(forward: Any) -> float:
    """Median over ITERATIONS of the slowest rank's forward time, microseconds (every rank calls this)."""
    for _ in range(WARMUP):
        forward()
    times = []
    for _ in range(ITERATIONS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize()
        slowest = torch.tensor([start.elapsed_time(end) * 1e3], device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(float(slowest))
    return statistics.median(times)


def _graph_timed(forward: Any) -> float:
    """`_timed` of a CUDA-graph replay of `forward`, captured on every rank at once (NCCL calls included)."""
    return _timed(capture_graph(forward, WARMUP).replay)


STAGES = ("route", "dispatch", "experts", "combine")


def _staged_forward(layer: WNA16MoE, x: torch.Tensor, logits: torch.Tensor) -> list[torch.cuda.Event]:
    """`layer(x, logits)` (modular kernels) with a CUDA event after each of STAGES (and one before)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(STAGES) + 1)]
    events[0].record()
    topk_weights, topk_ids = route(logits, layer.config.routing, layer.config.top_k, layer.correction_bias)
    events[1].record()
    expert_input = layer.prepare_finalize.prepare(x, topk_weights, topk_ids)
    events[2].record()
    weights = layer.prepared_weights()
    if expert_input.empty:
        output = torch.zeros_like(expert_input.hidden)
    elif layer.kernel.ACTIVATION_FORMAT == ActivationFormat.BATCHED:
        output = layer.kernel.apply_batched(expert_input.hidden, expert_input.num_tokens, weights)
    else:
        output = layer.kernel.apply(expert_input.hidden, expert_input.topk_weights, expert_input.topk_ids, weights)
    events[3].record()
    layer.prepare_finalize.finalize(output, expert_input)
    events[4].record()
    return events


def _stage_times(layer: WNA16MoE, x: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Median over ITERATIONS of the slowest rank's time in each stage, microseconds."""
    for _ in range(WARMUP):
        _staged_forward(layer, x, logits)
    samples = []
    for _ in range(ITERATIONS):
        dist.barrier()
        events = _staged_forward(layer, x, logits)
        torch.cuda.synchronize()
        stages = torch.tensor([a.elapsed_time(b) * 1e3 for a, b in itertools.pairwise(events)], device="cuda")
        dist.all_reduce(stages, op=dist.ReduceOp.MAX)
        samples.append(stages.tolist())
    return {name: round(statistics.median(s[i] for s in samples), 2) for i, name in enumerate(STAGES)}


def _bench_shape(name: str, args: argparse.Namespace, groups: MoEGroups, log: Any) -> list[dict[str, Any]]:
    parallel = parallel_config(args.tp, args.ep, data_parallel=args.dp, batched=args.batched,
                               max_tokens_per_rank=args.max_tokens_per_rank)
    shape = model_shape(name)
    cfg = shape.moe_config()
    scheme = WeightScheme.from_name(args.scheme or f"int4_g{shape.group_size}_sym")
    device = torch.device("cuda")
    torch.manual_seed(0)  # the same layer on every rank
    experts = random_experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, scheme, device)
    # DeepSeek-style routing adds a per-expert score correction bias (the same on every rank).
    bias = torch.rand(cfg.num_experts, device=device) * 0.1 if cfg.routing.has_correction_bias else None
    backend = args.backend or ("batched_triton" if args.batched else None)
    layer = WNA16MoE(experts, cfg, device=device, backend=backend, parallel=parallel, groups=groups,
                     correction_bias=bias)
    log(f"{name} {scheme.name} tp={args.tp} ep={args.ep} dp={parallel.dp_size} batched={args.batched}: "
        f"{layer.backend.value} ({type(layer.kernel).__name__})")

    # Each rank's own tokens with --dp, else the same tokens everywhere (seeded alike).
    torch.manual_seed(1 + (parallel.ep_rank if args.dp else 0))
    check_tokens = min(CHECK_TOKENS, parallel.max_tokens_per_rank or CHECK_TOKENS)
    x = torch.randn(check_tokens, cfg.hidden_size, dtype=cfg.dtype, device=device)
    logits = torch.randn(check_tokens, cfg.num_experts, device=device)
    out = layer(x, logits).float()
    reference = WNA16MoE(experts, cfg, device=device, backend="emulation", correction_bias=bias)(x, logits).float()
    error = relative_error(out, reference)
    worst = torch.tensor([error], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    log(f"  output vs single-GPU EMULATION: largest relative error over ranks {float(worst):.2e}")
    if not float(worst) < 1e-2:
        raise RuntimeError(f"{name}: the parallel layer's output is wrong (relative error {float(worst):.3e})")
    del experts
    torch.cuda.empty_cache()

    rows = []
    for m in args.tokens:
        if parallel.max_tokens_per_rank is not None and m > parallel.max_tokens_per_rank:
            log(f"  M={m}: skipped, above --max-tokens-per-rank {parallel.max_tokens_per_rank}")
            continue
        x = torch.randn(m, cfg.hidden_size, dtype=cfg.dtype, device=device)
        logits = torch.randn(m, cfg.num_experts, device=device)
        us = _timed(lambda x=x, logits=logits: layer(x, logits))
        stages = _stage_times(layer, x, logits)
        # The fixed-buffer all-to-all has no host synchronization: the whole forward replays as one graph.
        graph_us = _graph_timed(lambda x=x, logits=logits: layer(x, logits)) if parallel.max_tokens_per_rank else None
        rows.append({"shape": name, "scheme": scheme.name, "backend": layer.backend.value, "tp": args.tp,
                     "ep": args.ep, "dp": parallel.dp_size, "batched": args.batched,
                     "max_tokens_per_rank": parallel.max_tokens_per_rank, "M_per_rank": m, "us": round(us, 2),
                     "us_graph": None if graph_us is None else round(graph_us, 2),
                     "tokens_per_s": round(m * parallel.dp_size / min(us, graph_us or us) * 1e6),
                     "stages_us": stages})
        graph = "" if graph_us is None else f" (graph {graph_us:.1f} us)"
        log(f"  M={m:<6} {us:10.1f} us{graph}  " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return rows


def run(args: argparse.Namespace, command: str) -> int:
    """Benchmark the parallel layers `args` (parsed by `wna16moe.bench.main`) describes; returns the exit code."""
    world = args.tp * args.ep
    if int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise SystemExit(f"--tp {args.tp} x --ep {args.ep} needs {world} ranks: run under torchrun --nproc-per-node "
                         f"{world} (WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')})")
    if not torch.cuda.is_available():
        raise SystemExit("the parallel benchmark needs one CUDA GPU per rank")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    rank = dist.get_rank()

    def log(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    try:
        groups = MoEGroups.create(parallel_config(args.tp, args.ep, data_parallel=args.dp, batched=args.batched,
                                                  max_tokens_per_rank=args.max_tokens_per_rank))
        card = torch.cuda.get_device_name()
        date = datetime.date.today().isoformat()
        result: dict[str, Any] = {"card": card, "gpus": world, "date": date, "commit": commit_id(),
                                  "torch": torch.__version__, "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"],
                                  "command": command, "rows": []}
        out = args.out or Path("benchmarks/results") / f"parallel-{card.replace(' ', '_')}-{date}.json"
        for name in args.shapes:
            result["rows"] += _bench_shape(name, args, groups, log)
            if rank == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1))
        log(f"wrote {out}")
    finally:
        dist.destroy_process_group()
    return 0
