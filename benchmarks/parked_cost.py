"""Does a grid parked at its programmatic wait slow the kernel it waits for, and by what it holds?

v28 and v50 (benchmarks/NOTES.md) saw kernels run slower while their dependents, launched early, sat at their
wait beside them (GEMM1 behind the routing kernel +23%; GEMM2 beside GEMM1 at M = 1 +9%); v51 found such
dependents spread over the SMs as a plain launch does (`pdl_placement.py`), so placement is not why. This
times a streaming kernel (`--programs` programs of 4 warps, each reading its share of a `--mib` buffer, as a
decode GEMM streams its weights; span from the first program's start to the last one's end, %globaltimer)
with a dependent grid after it, launched:
    plain    after it ends (no programmatic dependence)
    light    early, 132 one-warp programs parked at their wait beside it
    wave     early, `--programs` 4-warp programs parked (what a dependent GEMM launches)
    heavy    early, `--programs` / 2 4-warp programs that hold a 128 x 128 tl.dot tile while parked (its
             operands' 64 KB of shared memory, 166 registers a thread on sm_90)
    shared   the same programs holding mostly shared memory (a 128 x 256 by 256 x 16 tl.dot: 72 KB, 66
             registers)
    registers  the same programs holding registers only (a 128 x 128 float32 tile element-wise: 96)

    python benchmarks/parked_cost.py [--mib 512] [--programs 528] [--repeats 20] [--out parked.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from pdl_placement import now_ns

from wna16moe.bench import write_results
from wna16moe.kernels.grid_dependence import await_prior_grids, launch_options, release_dependents

_BLOCK = 4096


@triton.jit
def _stream_kernel(src_ptr, sums_ptr, span_ptr, per_program, RELEASE: tl.constexpr, BLOCK: tl.constexpr):
    """Sums this program's share of src; the earliest start and latest end over the programs into span_ptr[0:2].
    With RELEASE its dependent may launch at once."""
    if RELEASE:
        release_dependents()
    start = now_ns()
    base = src_ptr + tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], tl.float32)
    for offset in range(0, per_program, BLOCK):
        acc += tl.load(base + offset + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(sums_ptr + tl.program_id(0), tl.sum(acc))
    tl.atomic_min(span_ptr, start)
    tl.atomic_max(span_ptr + 1, now_ns())


@triton.jit
def _parked_kernel(x_ptr, out_ptr, PDL: tl.constexpr, HOLD: tl.constexpr):
    """Waits for the grid before (PDL), then stores one value (HOLD "none"), or what holds resources from the
    program's launch on: a 128 x 128 tl.dot ("both": its operands' shared memory, its accumulator's registers),
    a 128 x 256 by 256 x 16 one ("shared"), a 128 x 128 float32 tile element-wise ("registers")."""
    if PDL:
        await_prior_grids()
    rows = tl.arange(0, 128)
    out = out_ptr + tl.program_id(0) * 128 * 128
    if HOLD == "both":
        a = tl.load(x_ptr + rows[:, None] * 128 + rows[None, :])
        tl.store(out + rows[:, None] * 128 + rows[None, :], tl.dot(a, a))
    elif HOLD == "shared":
        wide, narrow = tl.arange(0, 256), tl.arange(0, 16)
        a = tl.load(x_ptr + rows[:, None] * 256 + wide[None, :])
        b = tl.load(x_ptr + wide[:, None] * 16 + narrow[None, :])
        tl.store(out + rows[:, None] * 16 + narrow[None, :], tl.dot(a, b))
    elif HOLD == "registers":
        tile = tl.load(x_ptr + rows[:, None] * 128 + rows[None, :]).to(tl.float32)
        tl.store(out + rows[:, None] * 128 + rows[None, :], tile * tile + 1.0)
    else:
        tl.store(out_ptr + tl.program_id(0), 1.0)


def stream_span_us(way: str, src: torch.Tensor, programs: int, repeats: int) -> float:
    """Median span of the streaming kernel (µs) with the dependent grid of `way` after it."""
    device = src.device
    per_program = src.numel() // programs // _BLOCK * _BLOCK
    sums = torch.empty(programs, device=device)
    span = torch.empty(2, dtype=torch.int64, device=device)
    dependents, warps, hold = {"plain": (programs, 4, "none"), "light": (132, 1, "none"),
                               "wave": (programs, 4, "none"), "heavy": (programs // 2, 4, "both"),
                               "shared": (programs // 2, 4, "shared"),
                               "registers": (programs // 2, 4, "registers")}[way]
    x = torch.randn(128 * 256, device=device).half()
    out = torch.empty(dependents * 128 * 128, device=device)
    pdl = 0 if way == "plain" else 1
    spans = []
    for _ in range(repeats + 3):  # (the first three compile and warm up)
        span.copy_(torch.tensor([2**62, 0]))
        _stream_kernel[(programs,)](src, sums, span, per_program, RELEASE=pdl == 1, BLOCK=_BLOCK, num_warps=4)
        _parked_kernel[(dependents,)](x, out, PDL=pdl, HOLD=hold, num_warps=warps, **launch_options(pdl))
        torch.cuda.synchronize()
        spans.append((span[1] - span[0]).item() / 1e3)
    return statistics.median(spans[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="bytes the streaming kernel reads")
    parser.add_argument("--programs", type=int, default=528, help="its programs (4 warps each)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    src = torch.randn(args.mib << 19, device="cuda").to(torch.bfloat16)
    rows = []
    for way in ("plain", "light", "wave", "heavy", "shared", "registers", "plain"):  # (plain again: a drift shows)
        us = stream_span_us(way, src, args.programs, args.repeats)
        rows.append({"way": way, "mib": args.mib, "programs": args.programs, "stream_us": us,
                     "gbps": (args.mib << 20) / us / 1e3})
        print(f"{way:>6}: stream {us:8.1f} us ({rows[-1]['gbps']:.0f} GB/s)", flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
