"""How fast can one kernel read N bytes on this GPU: the ceiling a decode step of that many weight bytes faces.

    python benchmarks/read_bandwidth.py [--sizes-mb 16 64 ...] [--out reads.json]

A decode forward reads 10-200 MB of weights (qwen3-30b-a3b M = 1: 19 MB; the big experts at M = 1: ~180 MB)
in two GEMMs. The copy ceiling of `wna16moe.bench` streams 4 GiB; a short read pays the ramp-up and drain of
the memory system, which a long copy hides. Two readers: torch's max reduction over int32, and a grid-stride
Triton reader (16-byte loads, a running max so that no load can be dropped) at several grid sizes. Each is timed
as `back_to_back.py` times a layer: alone after the bench's L2 flush (single), R copies in one graph (chain),
and that graph back to back without a flush (stream).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from back_to_back import chain_copies, chain_times

from wna16moe.bench import write_results


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.full((BLOCK,), -2147483648, tl.int32)
    for start in range(pid * BLOCK, numel, tl.num_programs(0) * BLOCK):
        acc = tl.maximum(acc, tl.load(src_ptr + start + tl.arange(0, BLOCK)))
    tl.store(out_ptr + pid, tl.max(acc, 0))


def stream_read(src: torch.Tensor, programs: int, block: int, num_warps: int) -> torch.Tensor:
    """Max of `src` (int32, numel a multiple of `block`) per program."""
    out = torch.empty(programs, dtype=torch.int32, device=src.device)
    _stream_read_kernel[(programs,)](src, out, src.numel(), BLOCK=block, num_warps=num_warps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--out")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    readers = {"max": lambda b: b.max}
    for per_sm in (4, 8, 16):
        for block, warps in ((2048, 4), (8192, 8)):
            readers[f"triton {per_sm}/SM {block}x{warps}w"] = (
                lambda b, p=per_sm * sms, n=block, w=warps: lambda: stream_read(b, p, n, w))
    print(f"{torch.cuda.get_device_name()}: µs per read (single / chain / stream) and GB/s of the best")
    rows = []
    for mb in args.sizes_mb:
        count = chain_copies(mb << 20, mb << 20)
        buffers = [torch.randint(0, 1 << 30, ((mb << 20) // 4,), dtype=torch.int32, device="cuda")
                   for _ in range(count)]
        truth = buffers[0].max()
        for name, make in readers.items():
            if name != "max" and int(make(buffers[0])().max()) != int(truth):
                raise RuntimeError(f"{name} read {mb} MB wrongly")
            times = chain_times([make(b) for b in buffers])
            rows.append({"reader": name, "bytes": mb << 20, "copies": count, **times})
            print(f"{mb:>5} MB {name:>24}  {times['single']:8.1f} {times['chain']:8.1f} {times['stream']:8.1f} us  "
                  f"{(mb << 20) / min(times.values()) / 1e3:6.0f} GB/s", flush=True)
        del buffers
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
