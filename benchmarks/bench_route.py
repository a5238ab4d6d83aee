"""Routing alone, and TRITON's decode layer timed from the router logits (routing included: the "whole layer" of
issue #7's small-expert target), on the GPU: CUDA-graph replays after the bench's L2 flush.

Routing rows, per shape and M, on the same bf16 logits: ours (`routing.route` on a GPU: one launch,
kernels/topk_route.py), torch's (`routing.route_torch`), and vLLM's fused ops (`topk_softmax`, `grouped_topk`
with sigmoid scoring) when its op library is found as for MARLIN (build/marlin carried). Every peer's experts
are checked against ours first (as sets per token; a peer that disagrees on more than 1% of tokens is listed,
not timed). Layer rows: TRITON's shipped configuration from routed ids (what `wna16moe.bench` times, and
checks against the float32 reference) and from the logits: our routing (or torch's) then the layer, one graph.

    python benchmarks/bench_route.py [--shapes qwen3-30b-a3b,...] [--tokens 1,8,...] [--layer-shapes ...]
        [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch

from wna16moe.bench import _bench_graph, random_layer, write_results
from wna16moe.config import MoEConfig, RoutingMethod
from wna16moe.errors import BackendError
from wna16moe.experts.marlin import load_marlin_ops
from wna16moe.experts.triton import TritonExperts
from wna16moe.routing import route, route_torch
from wna16moe.shapes import model_shape

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def vllm_router(cfg: MoEConfig, bias: torch.Tensor) -> Router | None:
    """vLLM's fused routing op for this layer's method, or None (no op library, or no such op)."""
    try:
        ops = load_marlin_ops()
    except BackendError:
        return None
    routing, k = cfg.routing, cfg.top_k
    if routing.method == RoutingMethod.SOFTMAX and routing.routed_scaling_factor == 1.0:
        def softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = logits.shape[0]
            weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
            ids, token_expert = (torch.empty(t, k, dtype=torch.int32, device=logits.device) for _ in range(2))
            ops.topk_softmax(weights, ids, token_expert, logits, routing.renormalize, None, None)
            return weights, ids
        return softmax
    if routing.method == RoutingMethod.DEEPSEEK_V3:
        def grouped(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return ops.grouped_topk(logits, routing.n_group, routing.topk_group, k, routing.renormalize,
                                    routing.routed_scaling_factor, bias.to(logits.dtype), 1)  # 1: sigmoid
        return grouped
    return None


def ours_and_torch(cfg: MoEConfig, bias: torch.Tensor) -> tuple[Router, Router]:
    """`routing.route` (one launch on a GPU) and `routing.route_torch` for this layer's routing."""
    fields = dict(routing=cfg.routing, top_k=cfg.top_k, correction_bias=bias)
    return partial(route, **fields), partial(route_torch, **fields)


def agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Share of tokens whose chosen experts (as a set) and weights (by expert) match."""
    order_got, order_want = got[1].long().sort(-1), want[1].long().sort(-1)
    same_ids = (order_got.values == order_want.values).all(-1)
    weights_got = got[0].float().gather(1, order_got.indices)
    weights_want = want[0].float().gather(1, order_want.indices)
    same_weights = torch.isclose(weights_got, weights_want, rtol=1e-2, atol=1e-4).all(-1)
    return (same_ids & same_weights).float().mean().item()


def routing_rows(name: str, tokens: list[int], device: torch.device) -> list[dict[str, object]]:
    cfg = model_shape(name).moe_config()
    bias = (torch.randn(cfg.num_experts, device=device) * 0.1).to(torch.bfloat16).float()  # exact in bf16 for vLLM
    ours_router, torch_router = ours_and_torch(cfg, bias)
    routers: dict[str, Router] = {"torch": torch_router}
    vllm = vllm_router(cfg, bias)
    if vllm is not None:
        routers["vllm"] = vllm
    rows = []
    for m in tokens:
        logits = torch.randn(m, cfg.num_experts, device=device).to(torch.bfloat16)
        ours = ours_router(logits)
        row: dict[str, object] = {"shape": name, "M": m, "experts": cfg.num_experts, "top_k": cfg.top_k,
                                  "method": cfg.routing.method.value, "ours_us": graph_us(partial(ours_router, logits))}
        for peer, router in routers.items():
            try:
                share = agreement(router(logits), ours)
            except RuntimeError as error:  # an op that does not take this case
                row[f"{peer}_error"] = str(error).splitlines()[0]
                continue
            row[f"{peer}_agrees"] = round(share, 4)
            if share >= 0.99:
                row[f"{peer}_us"] = graph_us(partial(router, logits))
        rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return rows


def layer_rows(name: str, tokens: list[int], device: torch.device, rounds_per_way: int) -> list[dict[str, object]]:
    spec, experts = random_layer(name, device)
    kernel = TritonExperts(spec, experts.quant_config(), device)
    weights = TritonExperts.prepare_weights(experts, device)
    del experts
    cfg = spec.moe
    bias = torch.randn(cfg.num_experts, device=device) * 0.1
    ours_router, torch_router = ours_and_torch(cfg, bias)
    rows = []
    for m in tokens:
        x = torch.randn(m, cfg.hidden_size, dtype=cfg.dtype, device=device)
        logits = torch.randn(m, cfg.num_experts, device=device).to(cfg.dtype)
        topk = ours_router(logits)

        def layer(router: Router | None, x: torch.Tensor = x, logits: torch.Tensor = logits,
                  topk: tuple[torch.Tensor, torch.Tensor] = topk) -> torch.Tensor:
            return kernel.apply(x, *(topk if router is None else router(logits)), weights)

        # Each way timed once per round, the ways in turn, so that a drift over time does not read as a cost of
        # one way (v50-v51: deepseek-v3 M = 128 read +59 and +100 us from the logits, timed second).
        ways = {"from_ids_us": None, "from_logits_us": ours_router, "from_logits_torch_routing_us": torch_router}
        rounds: dict[str, list[float | None]] = {key: [] for key in ways}
        for _ in range(rounds_per_way):
            for key, router in ways.items():
                rounds[key].append(graph_us(partial(layer, router)))
        row = {"shape": name, "M": m, "config": str(kernel.config(m)),
               **{key: statistics.median(us) if None not in us else None for key, us in rounds.items()},
               "rounds": rounds}
        rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items() if key not in ("config", "rounds")),
              " rounds " + " ".join(f"{key[:-3]}={us}" for key, us in rounds.items()), flush=True)
    return rows


def graph_us(fn: Callable[[], object]) -> float | None:
    us = _bench_graph(fn)
    return None if us is None else round(us, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral,deepseek-v3,kimi-k2")
    parser.add_argument("--tokens", default="1,8,32,128,512,2048,8192")
    parser.add_argument("--layer-shapes", default="qwen3-30b-a3b")
    parser.add_argument("--layer-tokens", default="1,8,32,128")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the layer's three ways (median kept)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    tokens = [int(m) for m in args.tokens.split(",")]
    rows = [row for name in args.shapes.split(",") for row in routing_rows(name, tokens, device)]
    layer_tokens = [int(m) for m in args.layer_tokens.split(",")]
    layers = [row for name in args.layer_shapes.split(",") if name
              for row in layer_rows(name, layer_tokens, device, args.rounds)]
    write_results(args.out, rows, layers=layers)


if __name__ == "__main__":
    main()
