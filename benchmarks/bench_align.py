"""Time `moe_align_block_size` alone on each path (one program; a grid of count + place; cooperative programs
that meet at a barrier, with a workspace), per pair count and expert count, as CUDA-graph replays (what decode
serving runs): where each path pays.
(The H200 v17 results came from an earlier version that timed five bare replays instead of `bench._bench`.)

    python benchmarks/bench_align.py [--out results.json]
"""

from __future__ import annotations

import argparse
from unittest.mock import patch

import torch

from wna16moe.bench import _bench, capture_graph, random_routing, write_results
from wna16moe.kernels import moe_align

CASES = [  # (tokens, experts, top_k, block_m) of the bench shapes' routings
    (8, 128, 8, 16), (32, 128, 8, 8), (128, 128, 8, 16), (256, 128, 8, 16), (512, 128, 8, 32), (1024, 128, 8, 64),
    (2048, 128, 8, 128), (8, 384, 8, 16), (128, 384, 8, 16), (256, 384, 8, 16), (512, 384, 8, 32),
    (2048, 384, 8, 64), (512, 256, 8, 32), (2048, 256, 8, 64), (512, 8, 2, 128), (2048, 8, 2, 128),
    (8192, 8, 2, 128), (8192, 256, 8, 128),
]
REPLAYS = 50


PATHS = ("one program", "grid", "cooperative")


def time_path(ids: torch.Tensor, experts: int, block_m: int, path: str) -> float:
    """µs per alignment on `path`: the bench's timing of a CUDA graph of REPLAYS alignments."""
    workspace = moe_align.align_workspace(experts, ids.device)

    def aligns() -> None:
        for _ in range(REPLAYS):
            moe_align.moe_align_block_size(ids, experts, block_m, workspace=workspace)

    with (patch.object(moe_align, "one_program", lambda pairs, experts: path == "one program"),
          patch.object(moe_align, "cooperative", lambda pairs, device: path == "cooperative")):
        return _bench(capture_graph(aligns).replay) / REPLAYS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for tokens, experts, top_k, block_m in CASES:
        _, ids = random_routing(tokens, experts, top_k, torch.device("cuda"))
        pairs = tokens * top_k
        chosen = moe_align.alignment_path(pairs, experts, ids.device, workspace=True)
        times = {}
        for path in PATHS:  # (one program holds at most ONE_PROGRAM_LIMIT pairs; the cooperative path's cap)
            fits = {"one program": pairs <= moe_align.ONE_PROGRAM_LIMIT,
                    "cooperative": pairs <= moe_align.COOPERATIVE_MAX_PROGRAMS * moe_align.COOPERATIVE_CHUNK}
            times[path] = round(time_path(ids, experts, block_m, path), 2) if fits.get(path, True) else None
        rows.append({"pairs": pairs, "experts": experts, "block_m": block_m,
                     **{f"{path.replace(' ', '_')}_us": t for path, t in times.items()}, "chosen": chosen})
        shown = ", ".join(f"{path} {'-' if t is None else f'{t:.2f}'} us" for path, t in times.items())
        print(f"pairs {pairs:6} experts {experts:4} block_m {block_m:4}: {shown} (chosen: {chosen})", flush=True)
    write_results(args.out, rows, replays_per_graph=REPLAYS)


if __name__ == "__main__":
    main()
