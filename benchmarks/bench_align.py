"""Time `moe_align_block_size` alone, both paths (one program; grid of count + place), per pair count and
expert count, as CUDA-graph replays (what decode serving runs): where the one-program path stops paying.
(The H200 v17 results came from an earlier version that timed five bare replays instead of `bench._bench`.)

    python benchmarks/bench_align.py [--out results.json]
"""

from __future__ import annotations

import argparse

import torch
import triton

from wna16moe.bench import _bench, capture_graph, random_routing, write_results
from wna16moe.kernels import moe_align

CASES = [  # (tokens, experts, top_k, block_m) of the bench shapes' routings
    (8, 128, 8, 16), (32, 128, 8, 8), (128, 128, 8, 16), (256, 128, 8, 16), (512, 128, 8, 32), (1024, 128, 8, 64),
    (2048, 128, 8, 128), (8, 384, 8, 16), (128, 384, 8, 16), (256, 384, 8, 16), (512, 384, 8, 32),
    (2048, 384, 8, 64), (512, 256, 8, 32), (2048, 256, 8, 64), (512, 8, 2, 128), (2048, 8, 2, 128),
    (8192, 8, 2, 128), (8192, 256, 8, 128),
]
REPLAYS = 50


def time_path(ids: torch.Tensor, experts: int, block_m: int, one_program: bool) -> float:
    """µs per alignment: the bench's timing of a CUDA graph of REPLAYS alignments."""
    moe_align.one_program = lambda pairs, experts: one_program

    def aligns() -> None:
        for _ in range(REPLAYS):
            moe_align.moe_align_block_size(ids, experts, block_m)

    return _bench(capture_graph(aligns).replay) / REPLAYS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default = moe_align.one_program
    rows = []
    for tokens, experts, top_k, block_m in CASES:
        _, ids = random_routing(tokens, experts, top_k, torch.device("cuda"))
        pairs = tokens * top_k
        chosen = "one program" if default(pairs, triton.next_power_of_2(experts)) else "grid"
        # (past ONE_PROGRAM_LIMIT one program cannot hold the pairs)
        one = time_path(ids, experts, block_m, True) if pairs <= moe_align.ONE_PROGRAM_LIMIT else None
        grid = time_path(ids, experts, block_m, False)
        rows.append({"pairs": pairs, "experts": experts, "block_m": block_m,
                     "one_program_us": None if one is None else round(one, 2), "grid_us": round(grid, 2),
                     "chosen": chosen})
        print(f"pairs {pairs:6} experts {experts:4} block_m {block_m:4}: one program "
              f"{'-' if one is None else f'{one:.2f}':>7} us, grid {grid:7.2f} us (chosen: {chosen})", flush=True)
    write_results(args.out, rows, replays_per_graph=REPLAYS)


if __name__ == "__main__":
    main()
