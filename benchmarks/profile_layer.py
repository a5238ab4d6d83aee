"""Where one TRITON layer forward spends its GPU time: every kernel's mean start and end (µs from the forward's
first kernel) and duration (torch.profiler, CUPTI); "#2 _moe_gemm_kernel" is the second launch of that kernel
in a forward (GEMM2). Starts before the previous kernel's end are overlaps (programmatic dependent launch,
kernels/grid_dependence.py); gaps between an end and the next start are launch latency.

    python benchmarks/profile_layer.py --shapes qwen3-30b-a3b deepseek-v3 --tokens 1 8 [--graph] \
        [--from-logits] [--variant pdl=3,num_stages2=4] [--scheme int8_g128_sym]

--from-logits starts each forward from router logits with our routing kernel (`routing.route`), as a model
does (--route-plain: launched without programmatic dependence, so that the layer's first kernel launches only
after it ends); --variant changes the shipped configuration's fields (`benchmarks/try_configs.py`'s syntax).

The L2 is flushed between forwards by reading (`wna16moe.bench._flush_l2`, as the bench does), so the GEMMs read
their weights from HBM; a one-byte fill marks where each forward starts. With --graph the forward is a CUDA
graph replay (as the bench times M <= 512). Each kernel's bytes floor is not split out: compare a GEMM's time
with the layer's floor in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from unittest.mock import patch

import torch
from torch.profiler import ProfilerActivity, profile
from try_configs import parse_variant

from wna16moe.bench import _flush_l2, capture_graph, random_layer, random_routing
from wna16moe.experts.triton import TritonExperts
from wna16moe.routing import route


def profile_shape(name: str, m: int, graph: bool, from_logits: bool, route_plain: bool, variant: str | None,
                  scheme: str | None = None, repeats: int = 20) -> None:
    device = torch.device("cuda")
    spec, experts = random_layer(name, device, scheme)
    cfg = spec.moe
    kernel = TritonExperts(spec, experts.quant_config(), device)
    weights = TritonExperts.prepare_weights(experts, device)
    config = replace(kernel.config(m), **parse_variant(variant)) if variant else kernel.config(m)
    x = torch.randn(m, cfg.hidden_size, dtype=torch.bfloat16, device=device)
    logits = torch.randn(m, cfg.num_experts, device=device).to(torch.bfloat16)
    bias = torch.randn(cfg.num_experts, device=device) * 0.1
    tw, ids = random_routing(m, cfg.num_experts, cfg.top_k, device)

    def layer() -> torch.Tensor:
        if not from_logits:
            return kernel.apply(x, tw, ids, weights, config)
        # (--route-plain: its programmatic dependence turned off)
        with patch("wna16moe.kernels.grid_dependence.chained_launch", return_value=False) if route_plain else (
                nullcontext()):
            routed = route(logits, cfg.routing, cfg.top_k, correction_bias=bias)
        return kernel.apply(x, *routed, weights, config)

    marker = torch.empty(1, dtype=torch.int8, device=device)
    forward = capture_graph(layer).replay if graph else layer
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            _flush_l2()
            marker.zero_()
            forward()
        torch.cuda.synchronize()
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)  # per kernel: (start, end) from the first
    seen: dict[str, int] = defaultdict(int)  # launches of each kernel so far in this forward
    first = None
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in sorted(kernels, key=lambda e: e.time_range.start):
        if "FillFunctor<signed char>" in event.name:  # the marker: a new forward starts
            seen.clear()
            first = None
            continue
        if event.name.startswith("void at::native::reduce_kernel"):  # the L2 flush (a read)
            continue
        seen[event.name] += 1
        first = event.time_range.start if first is None else first
        spans[f"#{seen[event.name]} {event.name}"].append((event.time_range.start - first,
                                                           event.time_range.end - first))
    how = (" from logits" + (" (plain routing launch)" if route_plain else "")) if from_logits else ""
    print(f"{name} {spec.scheme.name} M={m} {'graph' if graph else 'eager'}{how} config {config}")
    print("      start        end   duration")
    for kernel_name, times in sorted(spans.items(), key=lambda item: sum(s for s, _ in item[1])):
        start = sum(s for s, _ in times) / len(times)
        end = sum(e for _, e in times) / len(times)
        print(f"  {start:9.2f} {end:10.2f} {end - start:10.2f} us  {kernel_name[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--graph", action="store_true", help="time CUDA graph replays of the forward")
    parser.add_argument("--from-logits", action="store_true", help="route the router logits first (our kernel)")
    parser.add_argument("--route-plain", action="store_true", help="launch the routing kernel without PDL")
    parser.add_argument("--variant", help="field=value[,field=value...] on the shipped configuration")
    parser.add_argument("--scheme", help="weight scheme (default: int4 symmetric at the model's group size)")
    args = parser.parse_args()
    for name in args.shapes:
        for m in args.tokens:
            profile_shape(name, m, args.graph, args.from_logits, args.route_plain, args.variant, args.scheme)


if __name__ == "__main__":
    main()
