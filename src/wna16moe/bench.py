"""Benchmark of whole MoE layers on the current GPU: `python -m wna16moe.bench` or `wna16moe bench`.

Timed region: one layer forward from routed top-k ids/weights to the [T, H] output (alignment, both GEMMs,
activation, top-k reduction, cast); routing itself is excluded (`benchmarks/bench_route.py` times it). Times
are medians of CUDA-event timings after warm-up (at least WARM_MS under the timed call's own load, so that every
backend is timed at the clock the board holds under it), each call right after an L2 flush that reads a buffer of 5x the
L2 size: weights always come from HBM, and the L2 holds only clean lines, so the timed call writes back nothing
of the flush's (a flush by zeroing, as
`triton.testing.do_bench` does, leaves the L2 dirty and billed up to ~20% extra to a decode step; benchmarks/NOTES.md
v12). For M <= 512 the forward is also captured in a CUDA graph and its replay timed. Routing is uniform random
with distinct experts per token, drawn (with the tokens) from a seed fixed per shape and M: every backend and
every run times the same routing (at mixtral M = 512 one draw can give an expert two blocks of 128 rows where
another gives one).

Ceilings are measured in the same run: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate at 8192^3. Per (backend, shape, M): bytes that must be read = distinct experts touched x bytes per
expert (packed weights + scales + zero points); FLOPs = 2 * M * k * 3 * H * I.

Peers in the same run: `bf16` (unquantized weights: tokens sorted by expert, torch._grouped_mm twice,
SiLU-and-mul, weighted sum), `emulation` (M <= 8), the TRITON backend with its default configuration plus a
sweep of alternatives (`--sweep`: a fixed grid; `--search`: a coordinate search from the default, see
`coordinate_search`; `triton-best`: the fastest eager configuration, or at M <= 512 the fastest CUDA-graph
replay; `python -m wna16moe.tuning` ships them), and `marlin`
(vLLM's Marlin MoE op over our repack) when a Marlin op provider is found (its check at each M, which
JIT-compiles its kernels on Hopper, runs before its timing). Before timing, outputs are checked against a
float32 dequantized reference: TRITON's at every M with every configuration that is timed (a wrong default
stops the run; a wrong alternative is left untimed and listed as `triton-wrong`), MARLIN's at every M on the
same tokens (a wrong one is listed as `marlin-wrong`, untimed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from wna16moe.config import MoEConfig, MoEQuantConfig
from wna16moe.device import DeviceInfo
from wna16moe.experts.base import LayerSpec, relative_error
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.marlin import MarlinExperts
from wna16moe.experts.triton import (
    INTERMEDIATE_ALIGN,
    PDL_OFF,
    RELEASE_AT_WAIT,
    RELEASE_EARLY,
    TritonConfig,
    TritonExperts,
    registers_for_programs,
)
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme
from wna16moe.shapes import model_shape

DEFAULT_SHAPES = ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "kimi-k2")
DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
# Serving replays CUDA graphs up to a few hundred tokens; graph times also keep host load out of the rows.
GRAPH_MAX_TOKENS = 512
# From M = 2048 an H200 runs at its power cap, and for stretches of a few hundred ms its SM clock dips 8-17% lower
# (benchmarks/NOTES.md v56): each eager row there is the median of ~2 s of calls, over several dips, not of 60 ms
# that may fall inside one.
PREFILL_TOKENS = 2048
PREFILL_BUDGET_MS = 2000.0
BUDGET_MS = 60.0  # (below PREFILL_TOKENS)
# Warm-up under the timed call's own load lasts at least this long, and half the timing's budget: a board that
# idled (a compile, the reference) runs its first ~0.1 s of heavy work at a higher clock than it holds after, so
# that the first call timed in a process read 4-10% fast at deepseek-v3 / kimi-k2 M = 32-512 (NOTES v78); at the
# power cap the clock settles within ~1 s (v56).
WARM_MS = 250.0


def budget_ms(m: int) -> float:
    """How long one timing of a layer at M = m spans (`_bench`'s budget): PREFILL_BUDGET_MS from PREFILL_TOKENS."""
    return PREFILL_BUDGET_MS if m >= PREFILL_TOKENS else BUDGET_MS


_FLUSH_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _flush_l2() -> None:
    """Evict the L2 by reading (not writing) a buffer of 5x its size: it is left holding clean lines."""
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _FLUSH_BUFFERS:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        _FLUSH_BUFFERS[device] = torch.ones(5 * l2_bytes // 4, dtype=torch.int32, device=device)
    _FLUSH_BUFFERS[device].max()


def _warm_up(fn: Callable[[], object], calls: int, warm_ms: float, flush: bool) -> None:
    """Call `fn` (each after `_flush_l2` unless not `flush`) `calls` times, and on in rounds of as many until
    the device has run them for `warm_ms`."""
    began = time.perf_counter()
    while True:
        for _ in range(calls):
            if flush:
                _flush_l2()
            fn()
        torch.cuda.synchronize()
        if (time.perf_counter() - began) * 1e3 >= warm_ms:
            return


def _bench(fn: Callable[[], object], warmup: int = 10, budget_ms: float = BUDGET_MS, flush: bool = True,
           warm_ms: float | None = None) -> float:
    """Median microseconds of `fn`: CUDA events around each call, each after `_flush_l2` (unless not `flush`),
    after at least `warmup` calls and `warm_ms` of them (default: WARM_MS or half of `budget_ms`, the more);
    as many calls as fit in about `budget_ms` (10 to 1000)."""
    _warm_up(fn, warmup, max(WARM_MS, budget_ms / 2) if warm_ms is None else warm_ms, flush)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(10, min(1000, int(budget_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for begin, finish in events:
        if flush:
            _flush_l2()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(finish) for begin, finish in events) * 1e3


def capture_graph(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of `fn`, after `warmup` calls on a side stream (allocations, autotuning)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _bench_graph(fn: Callable[[], object], budget_ms: float = BUDGET_MS) -> float | None:
    """Median microseconds of a CUDA-graph replay of `fn` (timed as `_bench` does), or None if it cannot be
    captured."""
    try:
        return _bench(capture_graph(fn).replay, budget_ms=budget_ms)
    except RuntimeError:
        return None


def measure_copy_gbps() -> float:
    """Copy bandwidth (GB/s, read + written) of 2 GiB, measured now."""
    n = 1 << 30  # 2 GiB of bf16
    src, dst = torch.randn(2, n, dtype=torch.bfloat16, device="cuda")
    return 2 * 2 * n / _bench(lambda: dst.copy_(src)) / 1e3


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (GB/s, read + written) and bf16 matmul rate (TFLOP/s), measured now."""
    copy_gbps = measure_copy_gbps()
    a, b = torch.randn(2, 8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_us = _bench(lambda: a @ b, budget_ms=PREFILL_BUDGET_MS)  # (at the power cap, as the prefill rows run)
    return {"copy_gbps": copy_gbps, "matmul_tflops": 2 * 8192**3 / mm_us / 1e6}


def random_experts(e: int, h: int, i: int, scheme: WeightScheme, device: torch.device) -> QuantizedExperts:
    """Random codes and scales (never zeros: real data, real timings)."""

    def weight(n: int, k: int) -> QuantizedWeight:
        g = scheme.num_groups(k)
        codes = torch.randint(0, scheme.max_code + 1, (e, n, k), dtype=torch.uint8, device=device)
        scales = (torch.rand(e, n, g, device=device) * 0.01 + 0.005).to(scheme.scale_dtype)
        zeros = (torch.randint(0, scheme.max_code + 1, (e, n, g), dtype=torch.uint8, device=device)
                 if scheme.zero_point else None)
        return QuantizedWeight(scheme, codes, scales, zeros)

    return QuantizedExperts(weight(2 * i, h), weight(h, i))


def random_layer(name: str, device: torch.device, scheme_name: str | None = None
                 ) -> tuple[LayerSpec, QuantizedExperts]:
    """A model shape's layer in bf16 with random experts, quantized as `scheme_name` or by default int4
    symmetric at the model's group size."""
    shape = model_shape(name)
    scheme = WeightScheme.from_name(scheme_name or f"int4_g{shape.group_size}_sym")
    cfg = replace(shape.moe_config(), dtype=torch.bfloat16)
    experts = random_experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, scheme, device)
    return LayerSpec(cfg, scheme), experts


def layer_inputs(name: str, m: int, cfg: MoEConfig, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [m, H], router weights and ids for shape `name` at M = m, drawn from a seed fixed per (name, m):
    every backend and every run sees the same routing (at M = 512 on mixtral whether an expert gets 128 or 129
    pairs decides between one and two blocks of 128 rows)."""
    torch.manual_seed(zlib.crc32(f"{name} {m}".encode()))
    x = torch.randn(m, cfg.hidden_size, dtype=cfg.dtype, device=device)
    return x, *random_routing(m, cfg.num_experts, cfg.top_k, device)


def layer_cases(cases: list[str], device: torch.device, scheme_name: str | None = None) -> Iterator[
        tuple[str, int, TritonExperts, dict[str, torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]]:
    """For each "shape:M[,M...]" of a benchmark script: the shape's random layer as TRITON runs it, and per M
    (name, M, kernel, weights, (x, topk_weights, topk_ids) from `layer_inputs`, the float32 reference output);
    quantized as `scheme_name` (default: `random_layer`'s)."""
    for case in cases:
        name, ms = case.split(":")
        spec, experts = random_layer(name, device, scheme_name)
        kernel, weights, emulation, emu_weights = triton_and_reference(spec, experts, device)
        del experts
        for m in map(int, ms.split(",")):
            inputs = layer_inputs(name, m, spec.moe, device)
            yield name, m, kernel, weights, inputs, emulation.apply(*inputs, emu_weights)


def expert_bytes(scheme: WeightScheme, h: int, i: int) -> int:
    """Bytes one expert's weights occupy: packed codes + scales + zero points (w13 and w2)."""
    elements = 3 * h * i
    groups = 2 * i * scheme.num_groups(h) + h * scheme.num_groups(i)
    scale_bytes = torch.finfo(scheme.scale_dtype).bits // 8
    return elements * scheme.bits // 8 + groups * (scale_bytes + (1 if scheme.zero_point else 0))


def random_routing(t: int, e: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(t, e, device=device).argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.softmax(torch.randn(t, k, device=device), dim=1)
    return weights, ids


def bf16_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor) -> torch.Tensor:
    """Unquantized MoE peer: w13 [E, 2I, H], w2 [E, H, I] bf16; grouped matmuls over expert-sorted tokens."""
    t, k = topk_ids.shape
    e = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat,
                                                                                              dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    a = x[order // k]
    gate_up = torch._grouped_mm(a, w13.transpose(1, 2), offs=offsets)
    i = w13.shape[1] // 2
    h = torch.nn.functional.silu(gate_up[:, :i]) * gate_up[:, i:]
    down = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)
    weighted = down.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, weighted)
    return out.to(x.dtype)


# The decode kernel's wide blocks on Hopper's warpgroup mmas (a move the configuration rejects elsewhere: skipped).
_WGMMA_MOVES = [{"wgmma": True}]
# GEMM2's tiles leaving their last wgmmas in flight (v44: within 2% of the shipped entries at M = 8192 and mid M,
# 2-5% slower at M = 2048, where its ring runs a tile less ahead; wgmma entries only).
_CARRY_MOVES = [{"carry": c} for c in (1, 2)]
# GEMM2 on two warp-specialized warpgroups that meet only on the ring's mbarriers (v45: level with the shipped
# 128 x 256 GEMM2 at deepseek-v3 M = 8192, -1% at qwen3-30b-a3b; 128-row wgmma entries at 8 warps only).
_SPECIALIZE_MOVES = [{"specialize": True}]
# At decode, GEMM2's tile width and K split move together (v22: mixtral's best was 64 x 2 -> 128 x 16).
_DECODE_GEMM2_MOVES = [{"block_n2": bn, "split_k2": s} for bn in (64, 128, 256) for s in (1, 2, 4, 8, 16)]
# Register caps at which one more 4-warp program fits an SM (168: three, 128: four). v69: the paired int8 GEMM2 of
# the 32-row wgmma entries compiled to 174 registers, two programs per SM where 168 holds three (Nsight Compute);
# capped at 168, W8A16 qwen3-30b-a3b M = 128 / 512 -2.6 / -3.9%, kimi-k2 M = 512 -3%. The search never offered it.
_REGISTER_MOVES = [{"max_registers": registers_for_programs(programs)} for programs in (4, 3)]
# Warps and ring depth of each GEMM apart (v43: GEMM1 at 8 warps and GEMM2 at 4 took W8A16 mixtral M = 1 -3%,
# GEMM2 at 8 warps W8A16 qwen3-30b-a3b M = 32 -2%, GEMM2 a stage deeper than GEMM1 W8A16 mixtral M = 32 -3%).
_PER_GEMM_MOVES = ([{"num_warps2": w} for w in (4, 8)]
                   + [{"num_warps": 8, "num_warps2": 4}, {"num_warps": 4, "num_warps2": 8}]
                   + [{"num_stages2": st} for st in (2, 3, 4)])


def _sweep_configs(base: TritonConfig, per_expert: float) -> list[TritonConfig]:
    """Alternatives around the default: M block, N tiles, warps, pipeline stages, split-K, swap-AB."""
    swapped: tuple[tuple[int, int, int, int, int], ...] = ()
    if per_expert <= 20:
        # (GEMM2 has half GEMM1's weights per program at the same BLOCK_N: wider GEMM2 tiles amortise the
        # loop's bookkeeping, at the cost of registers and programs per SM.)
        tiles = ((16, 32, 32, 4, 4), (16, 64, 64, 4, 3), (16, 64, 64, 4, 6), (16, 128, 128, 4, 4),
                 (16, 64, 128, 4, 4), (16, 128, 64, 8, 4), (16, 64, 128, 4, 3), (16, 64, 256, 4, 3),
                 (16, 64, 256, 8, 3), (16, 128, 256, 8, 3))
        splits = (1, 2, 4, 8)
    elif per_expert <= 1024:
        tiles = ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 128, 128, 8, 3), (64, 64, 64, 4, 3),
                 (128, 64, 64, 4, 4), (32, 128, 128, 4, 4))
        swapped = ((64, 64, 64, 4, 4), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 3))
        splits = (1, 2)
    else:
        tiles = ((64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4))
        # (With 8 warps only the 256 x 64 tile keeps several wgmma in flight in the SASS; NOTES.md v10.)
        swapped = ((64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
                   (256, 64, 64, 8, 3))
        splits = (1,)
    candidates = [base] + [replace(base, split_k2=s) for s in splits]
    candidates += [TritonConfig(bm, bn1, bn2, num_warps=warps, num_stages=stages)
                   for bm, bn1, bn2, warps, stages in tiles]
    candidates += [TritonConfig(bm, bn1, bn2, num_warps=warps, num_stages=stages, swap_ab=True)
                   for bm, bn1, bn2, warps, stages in swapped]
    if per_expert > 20:  # the decode kernel's 128-row blocks on wgmma (v37: they took M = 8192; v38: at one
        # warpgroup, 64 wide, two programs per SM, 128 rows per expert at qwen3-30b-a3b and mixtral; v39: GEMM2
        # 256 wide, every shape's M = 8192)
        candidates += [TritonConfig(128, 128, 128, num_warps=8, num_stages=3, decode=True, wgmma=True),
                       TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True),
                       TritonConfig(128, 64, 64, num_warps=4, num_stages=2, decode=True, wgmma=True)]
    if per_expert <= 20:
        candidates += [TritonConfig(16, bn1, bn2, split_k2=s, num_warps=warps, num_stages=stages)
                       for bm, bn1, bn2, warps, stages in tiles[:2] for s in splits[1:]]
        # GEMM2's width x split with the default's GEMM1, the search's moves (mixtral, whose GEMM2 is 14336 deep
        # over few experts: 128 x 16 and 256 x 8 were 10-12% faster than any of the above at M = 1-32; v22).
        candidates += [replace(base, **fields) for fields in _DECODE_GEMM2_MOVES]
        # GEMM1 split over K (partial sums + activation pass), with the default's GEMM2 and with 8 warps.
        candidates += [replace(base, split_k1=s) for s in (1, 2, 4, 8)]
        candidates += [replace(base, split_k1=s, num_warps=8) for s in (1, 2, 4)]
        # Registers capped at 96: one more program per SM where a GEMM would take more (GEMM2 at 128 wide).
        candidates += [replace(c, max_registers=96) for c in candidates[:1]
                       + [TritonConfig(16, bn1, bn2, num_warps=4, num_stages=stages)
                          for _, bn1, bn2, warps, stages in tiles if bn2 >= 128 and warps == 4]]
    unique: list[TritonConfig] = []
    for c in candidates:
        # (A decode base's moves can leave the decode kernel's tilings: 8 warps on 64-wide tiles.)
        if c.decode_tiling_error() is None and c not in unique:
            unique.append(c)
    return unique


MIN_SEARCH_GAIN = 0.02  # a move must be this much faster: the search does not chase noise


def _search_groups(per_expert: float) -> list[list[dict[str, Any]]]:
    """The coordinate search's moves: groups of field settings tried together. Fields that interact are one
    group (a GEMM's tile width and its split; v22: mixtral's best GEMM2 was a joint move, 64 x 2 -> 128 x 16)."""
    if per_expert <= 20:  # decode: small blocks, wide tiles, splits over K
        gemm1 = [{"block_n1": bn, "split_k1": s, "max_registers": r}
                 for bn in (32, 64, 128) for s in (1, 2, 4) for r in (None, 96)]
        pipeline = [{"num_stages": st} for st in (2, 3, 4, 5)]
        # The Gluon decode kernel (kernels/moe_gemm_decode.py) at the two tilings that led the v26 trials; the
        # later groups tune it (or the Triton kernel) from there. Its 8-row blocks pay where experts see <= 8;
        # its 32-row blocks shrink to their real rows and took kimi-k2 M = 8, one row per expert (v30).
        block_ms = (8, 16, 32) if per_expert > 4 else (8, 32)
        # (on mma.sync: a wgmma base, the Hopper default at 10-64 rows, must reach narrow blocks; the last group
        # turns wgmma on again; 128 / 256 at 2 stages too: v70's 16-row blocks at int4 qwen3-30b-a3b M = 143-159,
        # 5-9% faster than the 8-row entry there, were 2-4% slower than it at 4 stages, so a search from the 8-row
        # base never reached them through the stage group)
        kernel = [{"decode": True, "block_m": bm, "block_n1": bn1, "block_n2": bn2, "num_warps": 4,
                   "num_stages": st, "max_registers": None, "wgmma": False, "persistent": 0}
                  for bm in block_ms for bn1, bn2, st in ((64, 128, 3), (128, 256, 4), (128, 256, 2))]
        # Where each kernel lets the next one launch (kernels/grid_dependence.py; v28: released at the wait,
        # qwen3-30b-a3b M = 1 gained 6% and mixtral M = 1 lost 5%; released early, GEMM2 beside a K-split
        # GEMM1), or plain launches.
        release = [{"pdl": p} for p in (RELEASE_AT_WAIT, RELEASE_EARLY, PDL_OFF)]
        # Narrow blocks on a few programs per SM, one ring through all their items (v41: won at qwen3-30b-a3b
        # M = 32 at three, lost at M = 8 and 128 and on the big experts)
        persistent = [{"persistent": p} for p in (2, 3)]
        return [kernel, _DECODE_GEMM2_MOVES, gemm1, pipeline, _PER_GEMM_MOVES, release, persistent, _WGMMA_MOVES,
                _REGISTER_MOVES]
    # (last: the decode kernel's 32-row blocks, which led at qwen3-30b-a3b M = 2048, v27, its 64-row blocks at 8
    # warps, which lost at kimi-k2 M = 2048 before v30 moved their scale rows into the ring, both on mma.sync (what
    # cards before Hopper run) and on wgmma (4-17% faster on Hopper, v34; the entries at deepseek-v3 and W8A16
    # kimi-k2 M = 2048: a wgmma move from a 128-row base lands there only through its own tile), and its 128-row
    # blocks, on wgmma only: they took M = 8192 from the Triton kernel, v37; at one warpgroup, two programs per
    # SM, they took 128 rows per expert at small K, v38)
    tiles = [{"block_m": bm, "block_n1": bn1, "block_n2": bn2, "num_warps": w, "num_stages": st, "swap_ab": swap,
              "split_k1": 1, "max_registers": None, "decode": decode, "shrink": 0, "wgmma": wgmma}
             for bm, bn1, bn2, w, st, swap, decode, wgmma in (
                 (32, 64, 64, 4, 4, False, False, False), (64, 64, 64, 4, 3, False, False, False),
                 (32, 128, 128, 4, 4, False, False, False), (64, 64, 64, 4, 4, True, False, False),
                 (64, 128, 128, 4, 3, True, False, False), (128, 128, 128, 8, 3, True, False, False),
                 (128, 64, 64, 4, 3, True, False, False), (128, 128, 64, 8, 3, True, False, False),
                 (256, 64, 64, 8, 3, True, False, False),
                 (32, 64, 128, 4, 3, False, True, False), (64, 128, 256, 8, 3, False, True, False),
                 (32, 64, 128, 4, 3, False, True, True), (64, 128, 256, 8, 3, False, True, True),
                 (128, 128, 128, 8, 3, False, True, True), (128, 64, 64, 4, 2, False, True, True))]
    gemm2 = [{"block_n2": bn, "split_k2": s} for bn in (64, 128, 256) for s in (1, 2, 4)]
    # Blocks that multiply only the rows they hold (an expert's last block: deepseek-v3 at M = 2048 sees 64 +- 8
    # rows per expert in blocks of 128); a setting the block size cannot take fails and is skipped.
    shrink = [{"shrink": s} for s in (1, 2)]
    return [tiles, gemm2, [{"num_stages": st} for st in (3, 4)], _PER_GEMM_MOVES, shrink, _WGMMA_MOVES,
            _CARRY_MOVES, _SPECIALIZE_MOVES, _REGISTER_MOVES]


def coordinate_search(measure: Callable[[TritonConfig], float | None], start: TritonConfig,
                      groups: list[list[dict[str, Any]]], min_gain: float = MIN_SEARCH_GAIN,
                      passes: int = 2) -> TritonConfig:
    """The fastest configuration found from `start` by moving one group of fields at a time (`_search_groups`),
    keeping a move only when `measure` (µs; None: it failed or was wrong) beats the best so far by `min_gain`;
    up to `passes` passes over the groups, stopping when one changes nothing. Each configuration is measured
    once."""
    seen: dict[TritonConfig, float | None] = {}

    def timed(config: TritonConfig) -> float | None:
        if config not in seen:
            seen[config] = measure(config)
        return seen[config]

    best, best_us = start, timed(start)
    if best_us is None:
        raise RuntimeError(f"the search's start {start} could not be measured")
    for _ in range(passes):
        moved = False
        for group in groups:
            for fields in group:
                try:
                    candidate = replace(best, **fields)
                except ValueError:  # a setting this configuration cannot take (shrink on the decode kernel)
                    continue
                if candidate.decode_tiling_error() is not None:  # (32-wide tiles at 4 warps: never launched)
                    continue
                us = timed(candidate)
                if us is not None and us < best_us * (1 - min_gain):
                    best, best_us, moved = candidate, us, True
        if not moved:
            break
    return best


SEARCH_CONFIRM_ROUNDS = 2


def _stays_ahead(measure: Callable[[TritonConfig], float | None], pick: TritonConfig, incumbent: TritonConfig,
                 rounds: int, min_gain: float = MIN_SEARCH_GAIN) -> bool:
    """Whether `pick` beats `incumbent` by `min_gain` in each of `rounds` fresh alternating timings (a run's
    times of one configuration drift by several %: one lucky timing must not decide)."""
    for _ in range(rounds):
        incumbent_us, pick_us = measure(incumbent), measure(pick)
        if incumbent_us is None or pick_us is None or not pick_us < incumbent_us * (1 - min_gain):
            return False
    return True


def _config_change(base: TritonConfig, config: TritonConfig) -> str:
    """The fields of `config` that differ from `base`, as field=value (for logs)."""
    changed = {k: v for k, v in asdict(config).items() if asdict(base)[k] != v}
    return " ".join(f"{k}={v}" for k, v in changed.items()) or "(default)"


def bench_shape(name: str, tokens: list[int], scheme_name: str | None, sweep: str, ceilings: dict[str, float],
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    spec, experts = random_layer(name, device, scheme_name)
    scheme, cfg = spec.scheme, spec.moe
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    quant = experts.quant_config()
    triton_kernel, weights, emulation, emu_weights = triton_and_reference(spec, experts, device)
    per_expert = expert_bytes(scheme, h, i)
    rows: list[dict[str, Any]] = []

    marlin = _marlin_peer(name, spec, quant, experts, log)

    bf16_weights = None
    try:
        bf16_weights = (torch.randn(e, 2 * i, h, dtype=torch.bfloat16, device=device) * 0.02,
                        torch.randn(e, h, i, dtype=torch.bfloat16, device=device) * 0.02)
    except torch.OutOfMemoryError:
        log(f"{name}: bf16 peer unavailable (out of memory)")
    del experts
    torch.cuda.empty_cache()

    for m in tokens:
        rows += _bench_tokens(name, m, scheme, cfg, triton_kernel, weights, emulation, emu_weights, bf16_weights,
                              marlin, per_expert, sweep, ceilings, log)
    return rows


def timing_row(backend: str, name: str, scheme: WeightScheme, m: int, touched: int, us: float, us_graph: float | None,
               nbytes: int, flops: int, ceilings: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """One results row: eager and graph µs, and from the better of them the rates and % of the ceilings."""
    best = min(v for v in (us, us_graph) if v is not None)
    return {
        "backend": backend, "shape": name, "scheme": scheme.name, "M": m, "experts_touched": touched,
        "us_eager": round(us, 2), "us_graph": None if us_graph is None else round(us_graph, 2),
        "bytes": nbytes, "gbps": round(nbytes / best / 1e3, 1),
        "pct_bw": round(100 * nbytes / best / 1e3 / ceilings["copy_gbps"], 1),
        "tflops": round(flops / best / 1e6, 2),
        "pct_mm": round(100 * flops / best / 1e6 / ceilings["matmul_tflops"], 1), **extra,
    }


def best_us(row: dict[str, Any]) -> float:
    """A results row's time: the better of its eager and graph times."""
    return min(v for v in (row["us_eager"], row["us_graph"]) if v is not None)


def format_row(row: dict[str, Any]) -> str:
    graph = "-" if row["us_graph"] is None else f"{row['us_graph']:9.1f}"
    return (f"{row['backend']:>12} {row['shape']:>14} M={row['M']:<5} eager {row['us_eager']:9.1f} us  graph "
            f"{graph} us  {row['pct_bw']:5.1f}% BW  {row['tflops']:7.1f} TFLOP/s")


def _marlin_peer(name: str, spec: LayerSpec, quant: MoEQuantConfig, experts: QuantizedExperts,
                 log: Callable[[str], None]) -> tuple[MarlinExperts, dict[str, torch.Tensor]] | None:
    """The MARLIN kernel and its weights when this machine can run it (its output is checked at every M, in
    `_bench_tokens`); None otherwise, with the reason logged."""
    check = MarlinExperts.is_supported(spec, DeviceInfo.current())
    if not check.ok:
        log(f"{name}: marlin peer unavailable: {check.reason}")
        return None
    device = torch.device("cuda")
    return MarlinExperts(spec, quant, device), MarlinExperts.prepare_weights(experts, device)


def _rank_us(timing: tuple[float, float | None, TritonConfig]) -> float:
    """A candidate's rank: its graph replay where timed, else its eager time."""
    return timing[1] if timing[1] is not None else timing[0]


def _bench_tokens(name: str, m: int, scheme: WeightScheme, cfg: MoEConfig, triton_kernel: TritonExperts,
                  weights: dict[str, torch.Tensor], emulation: EmulationExperts, emu_weights: dict[str, torch.Tensor],
                  bf16_weights: tuple[torch.Tensor, torch.Tensor] | None,
                  marlin: tuple[MarlinExperts, dict[str, torch.Tensor]] | None, per_expert: int, sweep: str,
                  ceilings: dict[str, float], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every backend's row for one token count M, all on the same tokens and routing (`layer_inputs`)."""
    device = weights["w13"].device
    e, k, h, i = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
    rows: list[dict[str, Any]] = []
    x, tw, ids = layer_inputs(name, m, cfg, device)
    touched = int(torch.unique(ids).numel())
    flops = 2 * m * k * 3 * h * i

    def row(backend: str, us: float, us_graph: float | None, nbytes: int, extra: dict[str, Any]) -> None:
        rows.append(timing_row(backend, name, scheme, m, touched, us, us_graph, nbytes, flops, ceilings, extra))
        log(format_row(rows[-1]))

    default = triton_kernel.config(m)
    reference = emulation.apply(x, tw, ids, emu_weights)
    graphs = m <= GRAPH_MAX_TOKENS
    bench = partial(_bench, budget_ms=budget_ms(m))
    timings: list[tuple[float, float | None, TritonConfig]] = []  # eager µs, graph µs, configuration

    def measure(c: TritonConfig) -> float | None:
        """Check `c` against the reference, time it, and return its rank time (None: failed or wrong)."""
        try:
            # Correctness first, at this M and with the configuration timed: against the float32 reference.
            err = relative_error(triton_kernel.apply(x, tw, ids, weights, c), reference)
        except Exception as error:  # a config that does not compile or fit is skipped, with its reason
            log(f"  config {c} failed: {type(error).__name__}: {str(error)[:120]}")
            return None
        if c == default:
            log(f"{name} {scheme.name} M={m}: triton vs float32 reference, relative error {err:.2e}")
        if not err < 1e-2:
            if c == default:
                raise RuntimeError(f"{name} M={m}: triton output is wrong (relative error {err:.3e})")
            # A wrong alternative is a bug to fix, but not a reason to lose the run: it is never timed or
            # shipped, and the results file names it.
            log(f"  config {c} is WRONG: relative error {err:.3e}")
            rows.append({"backend": "triton-wrong", "shape": name, "scheme": scheme.name, "M": m,
                         "config": asdict(c), "relative_error": err})
            return None
        apply = partial(triton_kernel.apply, x, tw, ids, weights, c)
        # Where serving replays graphs, every candidate is ranked by its replay: eager times at small M are
        # host time, and would penalise configurations with one more launch.
        timings.append((bench(apply), _bench_graph(apply) if graphs else None, c))
        if sweep == "search":
            log(f"  {_rank_us(timings[-1]):9.1f} us  {_config_change(default, c)}")
        return _rank_us(timings[-1])

    if sweep == "search":
        # The search's own pick: a candidate faster by less than its bar is noise, not a better configuration.
        # Each candidate was timed once; the pick ships only if it stays ahead of the default in fresh rounds.
        found = coordinate_search(measure, default, _search_groups(m * k / e))
        if found != default and not _stays_ahead(measure, found, default, SEARCH_CONFIRM_ROUNDS):
            log(f"  the search's pick {_config_change(default, found)} fell behind when timed again: default kept")
            found = default
        best_timing = [t for t in timings if t[2] == found][-1]  # (the latest of its timings)
    else:
        for c in _sweep_configs(default, m * k / e) if sweep == "grid" else [default]:
            measure(c)
        best_timing = min(timings, key=_rank_us)
    default_us, default_graph = [(us, g) for us, g, c in timings if c == default][-1]
    row("triton", default_us, default_graph, touched * per_expert, {"config": asdict(default)})
    if sweep:
        best_us, best_graph, best = best_timing
        row("triton-best", best_us, best_graph, touched * per_expert, {"config": asdict(best)})
    if bf16_weights is not None:
        w13, w2 = bf16_weights
        try:
            us = bench(lambda: bf16_moe(x, w13, w2, tw, ids))
            g = _bench_graph(lambda: bf16_moe(x, w13, w2, tw, ids)) if m <= GRAPH_MAX_TOKENS else None
            row("bf16", us, g, touched * 3 * h * i * 2, {})
        except RuntimeError as error:
            log(f"bf16 peer unavailable: {str(error)[:160]}")
    if m <= 8:
        row("emulation", _bench(lambda: emulation.apply(x, tw, ids, emu_weights)), None,
            touched * per_expert, {})
    if marlin is not None:
        marlin_kernel, marlin_weights = marlin
        err = relative_error(marlin_kernel.apply(x, tw, ids, marlin_weights), reference)
        log(f"{name} {scheme.name} M={m}: marlin vs float32 reference, relative error {err:.2e}")
        if err < 1e-2:
            apply = partial(marlin_kernel.apply, x, tw, ids, marlin_weights)
            row("marlin", bench(apply), _bench_graph(apply) if graphs else None, touched * per_expert, {})
        else:
            log(f"{name} M={m}: marlin output is WRONG (relative error {err:.3e}); not timed")
            rows.append({"backend": "marlin-wrong", "shape": name, "scheme": scheme.name, "M": m,
                         "relative_error": err})
    return rows


def write_results(path: str | None, rows: list[dict[str, Any]], **extra: object) -> None:
    """A benchmark script's results as JSON at `path` (nothing if None): card, date, commit, `extra`, rows."""
    if path:
        header = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                  "commit": commit_id()}
        Path(path).write_text(json.dumps({**header, **extra, "rows": rows}, indent=1))


def triton_and_reference(spec: LayerSpec, experts: QuantizedExperts, device: torch.device
                         ) -> tuple[TritonExperts, dict[str, torch.Tensor], EmulationExperts, dict[str, torch.Tensor]]:
    """TRITON's kernel and prepared weights for a layer, and EMULATION's (the float32 reference) alike."""
    quant = experts.quant_config()
    return (TritonExperts(spec, quant, device), TritonExperts.prepare_weights(experts, device),
            EmulationExperts(spec, quant, device), EmulationExperts.prepare_weights(experts, device))


def commit_id() -> str:
    """The commit measured: $WNA16MOE_COMMIT when set (a copied tree whose .git may be stale), else git's HEAD."""
    if os.environ.get("WNA16MOE_COMMIT"):
        return os.environ["WNA16MOE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wna16moe bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--scheme", help="scheme name (default: int4 symmetric at the model's group size)")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--sweep", action="store_const", const="grid", default="",
                       help="also time a fixed grid of alternative TRITON configurations")
    sweep.add_argument("--search", action="store_const", const="search", dest="sweep",
                       help="also search TRITON configurations from the default (coordinate_search)")
    parser.add_argument("--out", type=Path, help="JSON results file (default benchmarks/results/<card>-<date>.json)")
    parallel = parser.add_argument_group("parallel layers, under torchrun (wna16moe.bench_parallel)")
    parallel.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parallel.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parallel.add_argument("--dp", action="store_true", help="each EP rank routes its own tokens (all-to-all)")
    parallel.add_argument("--batched", action="store_true", help="the batched activation format")
    parallel.add_argument("--max-tokens-per-rank", type=int,
                          help="with --dp: fixed-buffer all-to-all of this many tokens per rank (graph-capturable)")
    parallel.add_argument("--backend", help="force a backend for the parallel layer (default: the oracle's)")
    args = parser.parse_args(argv)
    if args.tp * args.ep > 1 or args.batched:
        from wna16moe.bench_parallel import run

        return run(args, "python -m wna16moe.bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    if not torch.cuda.is_available():
        raise SystemExit("wna16moe bench needs a CUDA GPU")
    import triton

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    ceilings = measure_ceilings()
    print(f"{card}: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s",
          flush=True)
    result = {
        "card": card, "date": date, "commit": commit_id(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "intermediate_align": INTERMEDIATE_ALIGN, "ceilings": ceilings,
        "command": "python -m wna16moe.bench " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": [],
    }
    out = args.out or Path("benchmarks/results") / f"{card.replace(' ', '_')}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        result["rows"] += bench_shape(name, args.tokens, args.scheme, args.sweep, ceilings,
                                      lambda s: print(s, flush=True))
        torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1))  # after every shape: a timeout keeps what was measured
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

