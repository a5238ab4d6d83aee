"""A/B of two versions of `kernels/moe_gemm.py` in one process: the working tree's and a base version from a
file, on the same layer, tokens and routing, the versions alternating within each round (graph replays after
the bench's L2 flush). The GPU's drift over time and the routing drop out of the ratio; each version's output
is checked against the float32 reference first. The shipped configuration is used for both.

    git show <ref>:src/wna16moe/kernels/moe_gemm.py > build/base_moe_gemm.py
    python benchmarks/ab_kernel.py build/base_moe_gemm.py deepseek-v3:1,8,32 qwen3-30b-a3b:1,8 --out ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from functools import partial

import torch

import wna16moe.kernels.moe_gemm as gemm_module
from wna16moe.bench import _bench_graph, layer_cases, write_results
from wna16moe.experts.base import relative_error


def load_base(path: str) -> object:
    spec = importlib.util.spec_from_file_location("wna16moe.kernels._moe_gemm_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.moe_gemm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the base version's moe_gemm.py")
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    versions = {"base": load_base(args.base), "new": gemm_module.moe_gemm}
    device = torch.device("cuda")
    rows: list[dict[str, object]] = []
    for name, m, kernel, weights, (x, tw, ids), reference in layer_cases(args.cases, device):
        times: dict[str, list[float]] = {v: [] for v in versions}
        for rnd in range(args.rounds):
            for version, fn in versions.items():
                gemm_module.moe_gemm = fn  # TRITON's forward imports it from the module at each call
                if rnd == 0:
                    err = relative_error(kernel.apply(x, tw, ids, weights), reference)
                    if not err < 1e-2:
                        raise RuntimeError(f"{name} M={m} {version}: relative error {err:.2e}")
                us = _bench_graph(partial(kernel.apply, x, tw, ids, weights))
                times[version].append(us)
                rows.append({"shape": name, "M": m, "round": rnd, "version": version, "us_graph": us})
        base, new = (statistics.median(times[v]) for v in versions)
        spread = {v: [round(t, 1) for t in ts] for v, ts in times.items()}
        print(f"{name:>14} M={m:<4} base {base:9.1f} us  new {new:9.1f} us  base/new {base / new:5.3f}  "
              f"{spread}", flush=True)
    gemm_module.moe_gemm = versions["new"]
    write_results(args.out, rows, base=args.base)


if __name__ == "__main__":
    main()
