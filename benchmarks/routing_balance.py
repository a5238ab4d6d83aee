"""What an expert's few rows past a block cost: a layer timed on the bench's uniform random routing against routing that
gives every expert exactly M * k / E rows, with the shipped configuration, as graph replays after the bench's L2 flush.

At M = 512 on mixtral an expert gets 128 +- 10 rows, so about half the experts need a second 128-row block for a few
rows, which reads and dequantizes the expert's weights again; balanced routing needs none. The difference bounds what
blocks that take a few rows past BLOCK_M could win. Both routings are checked against the float32 reference first.

    python benchmarks/routing_balance.py mixtral:512 qwen3-30b-a3b:512,2048 deepseek-v3:2048 [--rounds 3] [--out F.json]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from functools import partial

import torch

from wna16moe.bench import _bench_graph, budget_ms, layer_inputs, random_layer, triton_and_reference, write_results
from wna16moe.experts.base import relative_error


def balanced_ids(tokens: int, num_experts: int, top_k: int, device: torch.device) -> torch.Tensor:
    """Top-k ids [tokens, top_k] in which token t takes experts (t * k + j) mod E: distinct within a token, and every
    expert gets tokens * k / E of them where E divides tokens * k."""
    pairs = torch.arange(tokens * top_k, device=device).reshape(tokens, top_k)
    return (pairs % num_experts).to(torch.int32)


def blocks_needed(ids: torch.Tensor, num_experts: int, block_m: int) -> int:
    """Row blocks of `block_m` the alignment makes for these ids: the sum over experts of ceil(rows / block_m)."""
    rows = torch.bincount(ids.flatten().long(), minlength=num_experts)
    return int(((rows + block_m - 1) // block_m).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--scheme", help="weight scheme (default: int4 symmetric at the model's group size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for case in args.cases:
        name, ms = case.split(":")
        spec, experts = random_layer(name, device, args.scheme)
        kernel, weights, emulation, emu_weights = triton_and_reference(spec, experts, device)
        del experts
        moe = spec.moe
        for m in map(int, ms.split(",")):
            x, topk_weights, random = layer_inputs(name, m, moe, device)
            config = kernel.config(m)
            routings = {"random": random, "balanced": balanced_ids(m, moe.num_experts, moe.top_k, device)}
            for label, ids in routings.items():
                err = relative_error(kernel.apply(x, topk_weights, ids, weights, config),
                                     emulation.apply(x, topk_weights, ids, emu_weights))
                print(f"{name} M={m} {label}: relative error {err:.2e}, "
                      f"{blocks_needed(ids, moe.num_experts, config.block_m)} blocks of {config.block_m}", flush=True)
            for rnd in range(-1, args.rounds):  # (round -1 is not recorded: each graph's first timings)
                for label, ids in routings.items():
                    us = _bench_graph(partial(kernel.apply, x, topk_weights, ids, weights, config),
                                      budget_ms=budget_ms(m))
                    if rnd < 0:
                        continue
                    rows.append({"shape": name, "scheme": spec.scheme.name, "M": m, "routing": label, "round": rnd,
                                 "us_graph": us, "blocks": blocks_needed(ids, moe.num_experts, config.block_m),
                                 "config": asdict(config)})
                    print(f"{name} M={m} r{rnd} {label:8s} {us:9.1f} us", flush=True)
            by_routing = {label: [r["us_graph"] for r in rows if (r["shape"], r["M"], r["routing"]) == (name, m, label)]
                          for label in routings}
            change = [100 * (b / r - 1) for r, b in zip(by_routing["random"], by_routing["balanced"], strict=True)]
            print(f"{name} M={m}: balanced against random per round " + " / ".join(f"{c:+.1f}%" for c in change),
                  flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
