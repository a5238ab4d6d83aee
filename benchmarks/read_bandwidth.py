"""How fast one kernel can read N bytes on this GPU: the ceiling a decode step of that many weight bytes faces.

    python benchmarks/read_bandwidth.py [--sizes-mb 8 16 ... 2048]

A decode forward reads 10-200 MB of weights (qwen3-30b-a3b M = 1: 19 MB; the big experts at M = 1: ~180 MB).
The copy ceiling of `wna16moe.bench` streams 4 GiB; a short read pays the ramp-up and drain of the memory
system, which a long copy hides. Each size is timed as `wna16moe.bench` times a layer (CUDA events, an L2 flush
by reading before every call), eagerly and as a CUDA-graph replay, with torch's max reduction (int32).
"""

from __future__ import annotations

import argparse

import torch

from wna16moe.bench import _bench, capture_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", nargs="+", type=int, default=[8, 16, 32, 64, 128, 192, 256, 512, 1024, 2048])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: bytes read by one max() kernel")
    print(f"{'MB':>6} {'µs eager':>10} {'µs graph':>10} {'GB/s (best)':>12}")
    for mb in args.sizes_mb:
        read = torch.ones(mb * (1 << 20) // 4, dtype=torch.int32, device="cuda").max
        eager = _bench(read)
        graph = _bench(capture_graph(read).replay)
        print(f"{mb:>6} {eager:>10.1f} {graph:>10.1f} {mb * (1 << 20) / min(eager, graph) / 1e3:>12.0f}")


if __name__ == "__main__":
    main()
