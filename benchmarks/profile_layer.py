"""Where one TRITON layer forward spends its GPU time: every kernel's mean duration (torch.profiler, CUPTI);
"#2 _moe_gemm_kernel" is the second launch of that kernel in a forward (GEMM2).

    python benchmarks/profile_layer.py --shapes qwen3-30b-a3b deepseek-v3 --tokens 1 8

The L2 is flushed between forwards by reading (`wna16moe.bench._flush_l2`, as the bench does), so the GEMMs read
their weights from HBM; a one-byte fill marks where each forward starts. Each
kernel's bytes floor is not split out: compare a GEMM's time with the layer's floor in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from wna16moe.bench import _flush_l2, random_layer, random_routing
from wna16moe.experts.triton import TritonExperts


def profile_shape(name: str, m: int, repeats: int = 20) -> None:
    device = torch.device("cuda")
    spec, experts = random_layer(name, device)
    cfg = spec.moe
    kernel = TritonExperts(spec, experts.quant_config(), device)
    weights = TritonExperts.prepare_weights(experts, device)
    x = torch.randn(m, cfg.hidden_size, dtype=torch.bfloat16, device=device)
    tw, ids = random_routing(m, cfg.num_experts, cfg.top_k, device)
    marker = torch.empty(1, dtype=torch.int8, device=device)
    for _ in range(3):
        kernel.apply(x, tw, ids, weights)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            _flush_l2()
            marker.zero_()
            kernel.apply(x, tw, ids, weights)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)  # launches of each kernel so far in this forward
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in sorted(kernels, key=lambda e: e.time_range.start):
        if "FillFunctor<signed char>" in event.name:  # the marker: a new forward starts
            seen.clear()
            continue
        if event.name.startswith("void at::native::reduce_kernel"):  # the L2 flush (a read)
            continue
        seen[event.name] += 1
        totals[f"#{seen[event.name]} {event.name}"] += event.device_time_total
    print(f"{name} M={m} config {kernel.config(m)}")
    for kernel_name, us in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {us / repeats:9.2f} us  {kernel_name[:110]}")
    print(f"  {sum(totals.values()) / repeats:9.2f} us  total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args()
    for name in args.shapes:
        for m in args.tokens:
            profile_shape(name, m)


if __name__ == "__main__":
    main()
