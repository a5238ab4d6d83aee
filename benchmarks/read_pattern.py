"""Is the decode GEMMs' weight access pattern itself slower to read than a stream of the same bytes?

    python benchmarks/read_pattern.py [--out pattern.json]

For the M = 1 GEMMs of deepseek-v3 and mixtral (the experts one token touches), three readers of the same
int4 words, each timed alone after the bench's L2 flush (as the bench times a layer):
  - tile: the decode grid (one program per expert, BLOCK_N columns and K split), each program reading its
    [R, BLOCK_N] tiles of the K-major layout (rows 4 * N_total bytes apart; GEMM1: the gate and the up tile);
  - blocked: the same grid and bytes per program, each program's bytes contiguous (a tiled layout);
  - stream: the grid-stride reader of read_bandwidth.py (8 programs per SM) over the whole buffer.
A running max keeps every load; UNROLL tiles are loaded before they are reduced (loads in flight).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import triton
import triton.language as tl
from back_to_back import _bench, capture_graph
from read_bandwidth import stream_read

from wna16moe.bench import write_results

R = 16  # int4 words per 128-deep tile column


@triton.jit
def _tile_read_kernel(w_ptr, out_ptr, rows_per_split, n_total, n_half, stride_e, BLOCK_N: tl.constexpr,
                      GATED: tl.constexpr, BLOCKED: tl.constexpr, UNROLL: tl.constexpr, N_TILES: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = pid // N_TILES
    pid_n = pid % N_TILES
    rows = tl.arange(0, 16)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    acc = tl.full((16, BLOCK_N), -2147483648, tl.int32)
    halves: tl.constexpr = 2 if GATED else 1
    if BLOCKED:  # the program's tiles back to back: (halves x tiles) x [16, BLOCK_N]
        region = (pid.to(tl.int64) * tl.num_programs(1) + pid_k) * rows_per_split * halves * BLOCK_N
        base = w_ptr + region + rows * BLOCK_N + cols
        tile_stride = 16 * BLOCK_N
        half_stride = rows_per_split * BLOCK_N
    else:
        base = (w_ptr + expert.to(tl.int64) * stride_e + (pid_k * rows_per_split + rows).to(tl.int64) * n_total
                + pid_n * BLOCK_N + cols)
        tile_stride = 16 * n_total
        half_stride = n_half
    tiles = rows_per_split // 16
    for t in range(0, tiles, UNROLL):
        for u in tl.static_range(UNROLL):
            inside = t + u < tiles
            acc = tl.maximum(acc, tl.load(base + (t + u) * tile_stride, mask=inside, other=-2147483648))
            if GATED:
                acc = tl.maximum(acc, tl.load(base + (t + u) * tile_stride + half_stride, mask=inside,
                                              other=-2147483648))
    tl.store(out_ptr + pid * tl.num_programs(1) + pid_k, tl.max(tl.max(acc, 1), 0))


def tile_read(w: torch.Tensor, experts: int, n_total: int, gated: bool, block_n: int, split: int, blocked: bool,
              unroll: int) -> torch.Tensor:
    rows = w.numel() // experts // n_total
    n_half = n_total // 2 if gated else n_total
    n_tiles = n_half // block_n
    out = torch.empty(experts * n_tiles * split, dtype=torch.int32, device=w.device)
    _tile_read_kernel[(experts * n_tiles, split)](w, out, rows // split, n_total, n_half, rows * n_total,
                                                  BLOCK_N=block_n, GATED=gated, BLOCKED=blocked, UNROLL=unroll,
                                                  N_TILES=n_tiles, num_warps=4)
    return out


# name, experts one token reads, K, N_total, gated, BLOCK_N, split (the shipped M = 1 entries' tiles)
CASES = [
    ("deepseek-v3 GEMM1", 8, 7168, 4096, True, 64, 2),
    ("deepseek-v3 GEMM2", 8, 2048, 7168, False, 128, 2),
    ("mixtral GEMM1", 2, 4096, 28672, True, 64, 2),
    ("mixtral GEMM2", 2, 14336, 4096, False, 256, 8),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, experts, k, n_total, gated, block_n, split in CASES:
        w = torch.randint(0, 1 << 30, (experts * k // 8 * n_total,), dtype=torch.int32, device="cuda")
        truth = int(w.max())
        readers = {"stream 8/SM": partial(stream_read, w, 8 * sms, 2048, 4)}
        for blocked in (False, True):
            for unroll in (1, 2, 4):
                readers[f"{'blocked' if blocked else 'tile'} unroll {unroll}"] = partial(
                    tile_read, w, experts, n_total, gated, block_n, split, blocked, unroll)
        for reader, run in readers.items():
            if int(run().max()) != truth:
                raise RuntimeError(f"{name} {reader} read wrongly")
            us = _bench(capture_graph(run).replay)
            rows.append({"case": name, "reader": reader, "bytes": w.numel() * 4, "us": us})
            print(f"{name:>18} {reader:>18} {us:8.1f} us {w.numel() * 4 / us / 1e3:6.0f} GB/s", flush=True)
        del w, readers
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
