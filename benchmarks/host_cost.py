"""Host time of eager TRITON forwards: what a forward costs the CPU before the GPU has its work.

Per case, after warm-up: ROUNDS rounds of CALLS forwards queued without synchronizing (µs of host time per call;
while the GPU is the slower, the queue only grows, so this is the host's own cost), then the time until the GPU
is done (per call). Each round times the forward as served (`apply`: replayed from its launch
plan, checked against the float32 reference) and, in turn in the same process, without a plan (`_forward`: every
launch through `kernels/launch.py`'s `launch`), and the planned forward after routing from random logits (the
routing launch, as the layer runs it). A forward whose host time exceeds its GPU time is host-bound when
run eagerly. With --profile, cProfile's top functions over CALLS more planned forwards (Python's own overhead
roughly doubles the times).

    python benchmarks/host_cost.py qwen3-30b-a3b:1,512,2048 deepseek-v3:1 [--profile] --out F.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
from functools import partial

import torch

from wna16moe.bench import layer_cases, write_results
from wna16moe.experts.base import relative_error
from wna16moe.experts.triton import TritonExperts
from wna16moe.routing import route


def host_and_done_us(forward: Callable[[], object], calls: int) -> tuple[float, float]:
    """µs per call of queueing `calls` forwards, and until the GPU has finished them."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return 1e6 * (queued - start) / calls, 1e6 * (done - start) / calls


def profiled(forward: Callable[[], object], calls: int) -> str:
    """cProfile's 20 top functions by own time over `calls` forwards."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        forward()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name, m, kernel, weights, (x, tw, ids), reference in layer_cases(args.cases, torch.device("cuda")):
        logits = torch.randn(m, kernel.moe.num_experts, device=x.device)
        bias = torch.randn(kernel.moe.num_experts, device=x.device) * 0.1  # (read by DeepSeek-V3's routing only)

        def from_logits(x: torch.Tensor = x, logits: torch.Tensor = logits, bias: torch.Tensor = bias,
                        kernel: TritonExperts = kernel, weights: dict[str, torch.Tensor] = weights) -> torch.Tensor:
            return kernel.apply(x, *route(logits, kernel.moe.routing, kernel.moe.top_k, bias), weights)

        forwards = {"planned": partial(kernel.apply, x, tw, ids, weights, kernel.config(m)),
                    "unplanned": partial(kernel._forward, x, tw, ids, weights, kernel.config(m)),
                    "planned, routed from logits": from_logits}
        for forward in forwards.values():
            for _ in range(20):  # (compiles, the plan's recording, allocator warm-up)
                forward()
        error = relative_error(forwards["planned"](), reference)
        if error > 1e-2:
            raise SystemExit(f"{name} M={m}: the planned forward is off the float32 reference by {error:.3g}")
        for rnd in range(args.rounds):
            for how, forward in forwards.items():
                host_us, done_us = host_and_done_us(forward, args.calls)
                rows.append({"shape": name, "M": m, "forward": how, "round": rnd, "host_us": host_us,
                             "until_done_us": done_us})
                print(f"{name} M={m} {how} round {rnd}: host {host_us:.1f} us/call, until done {done_us:.1f} us/call",
                      flush=True)
        forward = forwards["planned"]
        if args.profile:
            rows[-1]["profile"] = profiled(forward, args.calls)
            print(rows[-1]["profile"], flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
