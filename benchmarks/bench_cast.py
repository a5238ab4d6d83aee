"""Time the cast of GEMM2's float32 sums to bf16 (`kernels/cast.py`) per [T, H] and per tiling (elements per
program, warps), beside torch's `.to()`, against the copy bandwidth measured in the same run (each element reads
4 bytes and writes 2): whether the cast, a pass nothing overlaps after GEMM2, streams at the copy rate.

    python benchmarks/bench_cast.py [--out results.json]
"""

from __future__ import annotations

import argparse
from unittest.mock import patch

import torch

from wna16moe.bench import _bench, measure_copy_gbps, write_results
from wna16moe.kernels import cast as cast_module

SHAPES = [(1, 7168), (512, 2048), (2048, 2048), (2048, 7168), (8192, 2048), (8192, 4096), (8192, 7168)]
TILINGS = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_gbps = measure_copy_gbps()
    print(f"copy rate {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for t, h in SHAPES:
        sums = torch.randn(t, h, device="cuda")
        moved = sums.numel() * 6
        times = {"torch": _bench(lambda sums=sums: sums.to(torch.bfloat16))}
        for block, warps in TILINGS:
            with patch.object(cast_module, "cast_tiling", lambda numel, tiling=(block, warps): tiling):
                times[f"{block}x{warps}"] = _bench(lambda sums=sums: cast_module.cast(sums, torch.bfloat16))
        chosen = "{}x{}".format(*cast_module.cast_tiling(sums.numel()))
        pct = {name: 100 * moved / us / 1e3 / copy_gbps for name, us in times.items()}
        rows.append({"T": t, "H": h, "chosen": chosen, **{f"{name}_us": round(us, 2) for name, us in times.items()},
                     **{f"{name}_pct_copy": round(p, 1) for name, p in pct.items()}})
        shown = ", ".join(f"{name} {us:.1f} us ({pct[name]:.0f}%)" for name, us in times.items())
        print(f"T {t:5} H {h:5}: {shown} (chosen: {chosen})", flush=True)
    write_results(args.out, rows, copy_gbps=round(copy_gbps, 1))


if __name__ == "__main__":
    main()
