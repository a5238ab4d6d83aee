"""Does a configuration's time depend on the graph it was captured in? try_configs.py captures a fresh CUDA graph
for every timing; in v54 its first round read 0.5-4% away from the later ones. Here each configuration is captured
CAPTURES times, alternating, and each capture timed REPEATS times (the bench's timing: replays after the L2
flush): a spread between captures that the repeats of one capture do not show is the graph's buffers' placement,
a drift over the whole run is the card (clocks, temperature). Run on the device:

    python benchmarks/replay_spread.py qwen3-30b-a3b:1 --scheme int8_g128_sym --variant pdl=2 --captures 8 \
        --repeats 3 --out F.json

Rows: configuration, capture, repeat, µs, seconds since the start, and the graph's output address.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
from try_configs import variants_of

from wna16moe.bench import _bench, capture_graph, layer_cases, write_results


def captured(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`bench.capture_graph(fn)` and the captured call's output (its address is in the graph's pool)."""
    outputs = []
    graph = capture_graph(lambda: outputs.append(fn()))
    return graph, outputs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--variant", action="append", default=[], help="field=value[,field=value...]")
    parser.add_argument("--scheme")
    parser.add_argument("--captures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    start = time.perf_counter()
    for name, m, kernel, weights, (x, tw, ids), _ in layer_cases(args.cases, torch.device("cuda"), args.scheme):
        shipped = kernel.config(m)
        variants = variants_of(shipped, args.variant, f"{name} M={m}", kernel.default_config(m, kernel.moe.top_k))
        for capture in range(args.captures):
            for index, config in enumerate(variants):
                graph, out = captured(partial(kernel.apply, x, tw, ids, weights, config))
                for repeat in range(args.repeats):
                    us = _bench(graph.replay)
                    rows.append({"shape": name, "scheme": kernel.spec.scheme.name, "M": m, "variant": index,
                                 "config": asdict(config), "capture": capture, "repeat": repeat, "us_graph": us,
                                 "seconds": time.perf_counter() - start, "out_address": out.data_ptr()})
                    print(f"{name} M={m} v{index} capture {capture} repeat {repeat} {us:8.2f} us "
                          f"out {out.data_ptr():#x} t {rows[-1]['seconds']:.1f}s", flush=True)
                del graph, out
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
