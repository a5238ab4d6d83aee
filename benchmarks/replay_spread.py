"""Does a configuration's time depend on the graph it was captured in? try_configs.py captures a fresh CUDA graph
for every timing; in v54 its first round read 0.5-4% away from the later ones. Here each configuration is captured
CAPTURES times, alternating, and each capture timed REPEATS times (the bench's timing: replays after the L2
flush): a spread between captures that the repeats of one capture do not show is the graph's buffers' placement,
a drift over the whole run is the card (clocks, temperature). Run on the device:

    python benchmarks/replay_spread.py qwen3-30b-a3b:1 --scheme int8_g128_sym --variant pdl=2 --captures 8 \
        --repeats 3 [--pad 0,4096,65536] [--fresh] [--keep] --out F.json

Placement moved on purpose: `--pad B` allocates B bytes in the graph's pool before the forward (its buffers sit
B bytes further on), `--fresh` returns the cached memory to the driver before each capture (every graph then
gets newly mapped memory, as the first one in a process does). `--keep` captures every graph first and keeps them
all (none reuses another's memory), then times them last captured first: whether a graph's speed follows its
capture or the time it is timed at.

Rows: configuration, pad, capture, repeat, µs, seconds since the start, and the address and size of every buffer
the captured forward allocated, in allocation order.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from try_configs import variants_of

from wna16moe.bench import _bench, capture_graph, layer_cases, write_results
from wna16moe.experts.triton import TritonConfig


@contextmanager
def recorded_allocations() -> Iterator[list[tuple[int, int]]]:
    """(address, bytes) of every tensor `torch.empty` / `torch.zeros` make inside the block, in order (our
    forwards allocate only through these)."""
    record: list[tuple[int, int]] = []
    originals = torch.empty, torch.zeros

    def recording(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def made(*args: object, **kwargs: object) -> torch.Tensor:
            tensor = make(*args, **kwargs)
            record.append((tensor.data_ptr(), tensor.numel() * tensor.element_size()))
            return tensor
        return made

    torch.empty, torch.zeros = recording(torch.empty), recording(torch.zeros)
    try:
        yield record
    finally:
        torch.empty, torch.zeros = originals


def captured(fn: Callable[[], torch.Tensor], pad: int = 0) -> tuple[torch.cuda.CUDAGraph, list[tuple[int, int]]]:
    """`bench.capture_graph(fn)`, `pad` bytes allocated in the graph's pool before the captured call, and the
    captured call's allocations (their addresses are in the graph's pool)."""
    allocations: list[tuple[int, int]] = []

    def padded() -> None:
        keep = torch.empty(pad, dtype=torch.uint8, device="cuda") if pad else None
        with recorded_allocations() as record:
            fn()
        allocations[:] = record
        del keep

    return capture_graph(padded), allocations


def timed(case: dict[str, Any], held: tuple[int, int, TritonConfig, int, torch.cuda.CUDAGraph, list[tuple[int, int]]],
          repeats: int, start: float) -> list[dict[str, Any]]:
    """`repeats` timings of one held capture (capture, variant, configuration, pad, graph, allocations) as rows."""
    capture, index, config, pad, graph, allocations = held
    rows = []
    for repeat in range(repeats):
        us = _bench(graph.replay)
        rows.append({**case, "variant": index, "config": asdict(config), "pad": pad, "capture": capture,
                     "repeat": repeat, "us_graph": us, "seconds": time.perf_counter() - start,
                     "allocations": allocations})
        print(f"{case['shape']} M={case['M']} v{index} pad {pad} capture {capture} repeat {repeat} {us:8.2f} us "
              f"at {' '.join(f'{a:#x}' for a, _ in allocations)} t {rows[-1]['seconds']:.1f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--variant", action="append", default=[], help="field=value[,field=value...]")
    parser.add_argument("--scheme")
    parser.add_argument("--captures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pad", default="0", help="bytes before the forward's buffers, comma-separated")
    parser.add_argument("--fresh", action="store_true", help="torch.cuda.empty_cache() before every capture")
    parser.add_argument("--keep", action="store_true", help="capture all graphs first, then time them in reverse")
    parser.add_argument("--out")
    args = parser.parse_args()
    pads = [int(p) for p in args.pad.split(",")]
    rows = []
    start = time.perf_counter()
    for name, m, kernel, weights, (x, tw, ids), _ in layer_cases(args.cases, torch.device("cuda"), args.scheme):
        case = {"shape": name, "scheme": kernel.spec.scheme.name, "M": m, "fresh": args.fresh, "keep": args.keep}
        shipped = kernel.config(m)
        variants = variants_of(shipped, args.variant, f"{name} M={m}", kernel.default_config(m, kernel.moe.top_k))
        captures = []  # (capture, variant index, configuration, pad, graph, allocations)
        for capture in range(args.captures):
            for index, config in enumerate(variants):
                for pad in pads:
                    if args.fresh:
                        torch.cuda.empty_cache()
                    graph, allocations = captured(partial(kernel.apply, x, tw, ids, weights, config), pad)
                    captures.append((capture, index, config, pad, graph, allocations))
                    if not args.keep:
                        rows += timed(case, captures.pop(), args.repeats, start)
        for held in reversed(captures):
            rows += timed(case, held, args.repeats, start)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
