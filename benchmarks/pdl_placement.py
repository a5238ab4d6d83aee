"""Where do the programs of a grid land when it launches early, as a programmatic dependent?

v50 (benchmarks/NOTES.md) saw grids run slower when they launched beside a running kernel and parked at their
wait: GEMM1 behind the routing kernel 23% (qwen3-30b-a3b M = 8), GEMM2 beside GEMM1 at M = 1. One explanation
to test: programs launched early fill the free SMs one after another up to their occupancy, instead of spreading
over all SMs as a plain launch does, so that fewer SMs stream the weights once the wait is over.

A probe grid (`--programs`, `--warps` per program: the warps bound the programs per SM) records each program's
SM (%smid) and the time it passed its wait (%globaltimer), launched three ways behind a kernel of `--holders`
one-warp programs that run ~`--hold-us` µs:
    plain     an ordinary launch after it
    at-end    a programmatic dependent that the holder never releases (it launches as the holder ends)
    early     a programmatic dependent released at the holder's start (it parks beside it)
Per way: SMs used, programs per SM (max / mean over the SMs used), and the spread of the start times.

    python benchmarks/pdl_placement.py [--programs 384] [--warps 16] [--out placement.json]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import triton
import triton.language as tl

from wna16moe.bench import write_results
from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options, release_dependents


@triton.jit
def now_ns():
    """The GPU's global nanosecond clock (%globaltimer), comparable across SMs."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _hold_kernel(out_ptr, hold_ns, RELEASE: tl.constexpr):
    """Spins for hold_ns (globaltimer); with RELEASE lets its dependent launch first."""
    if RELEASE:
        release_dependents()
    start = now_ns()
    now = start
    while now - start < hold_ns:
        now = now_ns()
    tl.store(out_ptr + tl.program_id(0), now - start)


@triton.jit
def _where_kernel(sm_ptr, time_ptr, PDL: tl.constexpr):
    """Each program's SM and the time it passed its wait."""
    if PDL:
        await_prior_grids()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    now = now_ns()
    tl.store(sm_ptr + tl.program_id(0), sm)
    tl.store(time_ptr + tl.program_id(0), now)


def placement(way: str, programs: int, warps: int, holders: int, hold_us: float) -> dict[str, object]:
    device = torch.device("cuda")
    held = torch.empty(holders, dtype=torch.int64, device=device)
    sm = torch.full((programs,), -1, dtype=torch.int32, device=device)
    times = torch.zeros(programs, dtype=torch.int64, device=device)
    pdl = 0 if way == "plain" else 1
    for _ in range(3):  # (compiles, then the last launch counts)
        _hold_kernel[(holders,)](held, int(hold_us * 1e3), RELEASE=way == "early", num_warps=1)
        _where_kernel[(programs,)](sm, times, PDL=pdl, num_warps=warps, **launch_options(pdl))
        torch.cuda.synchronize()
    per_sm = Counter(sm.tolist())
    starts = (times - times.min()).double() / 1e3
    return {"way": way, "programs": programs, "warps": warps, "holders": holders, "hold_us": hold_us,
            "sms_used": len(per_sm), "max_per_sm": max(per_sm.values()),
            "mean_per_sm": programs / len(per_sm), "start_spread_us": float(starts.max()),
            "per_sm": sorted(per_sm.values(), reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=384)
    parser.add_argument("--warps", type=int, default=16, help="warps per program (16: at most 4 per SM)")
    parser.add_argument("--holders", type=int, default=8)
    parser.add_argument("--hold-us", type=float, default=20.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for way in ("plain", "at-end", "early"):
        row = placement(way, args.programs, args.warps, args.holders, args.hold_us)
        rows.append(row)
        print(f"{way:>7}: {row['sms_used']} SMs, programs per SM max {row['max_per_sm']} mean "
              f"{row['mean_per_sm']:.2f}, starts spread over {row['start_spread_us']:.2f} us", flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
