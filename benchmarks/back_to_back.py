"""Is a layer's time in the bench its time inside a model? The bench times one forward (a graph replay) right
after an L2 flush; a model's decode graph runs layer after layer. Per shape and M, for TRITON and MARLIN:

    single  one forward after the flush: the bench's number
    chain   R forwards on R copies of the layer's weights in one graph, after the flush, divided by R
    stream  that graph replayed back to back without a flush (each copy is evicted by the others), divided by R

Each row also gives the weight bytes the forward must read over its time, as a % of the copy rate measured at the
start of the same run (`bench.measure_ceilings`): `%BW single` is the bench's %BW column, `%BW chain` the same bytes
at the layer's time inside a graph of layers. (`read_bandwidth.py` times plain reads the same three ways.) With
--from-logits every forward starts from router
logits and routes them first with our routing kernel (`routing.route`), both backends alike: the whole layer
as a model runs it.

    python benchmarks/back_to_back.py --shapes deepseek-v3 qwen3-30b-a3b --tokens 1 8 [--from-logits] --out chain.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import torch

from wna16moe.bench import (
    _bench,
    capture_graph,
    expert_bytes,
    layer_inputs,
    measure_ceilings,
    random_layer,
    write_results,
)
from wna16moe.config import MoEConfig
from wna16moe.device import DeviceInfo
from wna16moe.experts.base import relative_error
from wna16moe.experts.marlin import MarlinExperts
from wna16moe.experts.triton import TritonExperts
from wna16moe.routing import route

MIN_CHAIN_BYTES = 512 << 20  # a chain reads at least 10x the L2 before a copy comes round again
MAX_CHAIN_COPIES = 16


def chain_copies(bytes_per_call: int, bytes_per_copy: int, memory: int = 24 << 30) -> int:
    """Copies in a chain: enough that MIN_CHAIN_BYTES pass between two calls on one copy, 2 to
    MAX_CHAIN_COPIES, within `memory`."""
    return max(2, min(MAX_CHAIN_COPIES, math.ceil(MIN_CHAIN_BYTES / bytes_per_call), memory // bytes_per_copy))


def chain_times(forwards: list[Callable[[], object]]) -> dict[str, float]:
    """The three timings of the module docstring, in µs per forward."""

    def chained() -> None:
        for forward in forwards:
            forward()

    graph = capture_graph(chained)
    return {"single": _bench(capture_graph(forwards[0]).replay), "chain": _bench(graph.replay) / len(forwards),
            "stream": _bench(graph.replay, flush=False) / len(forwards)}


def copies(weights: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    return [weights] + [{name: t.clone() for name, t in weights.items()} for _ in range(count - 1)]


def routed_forward(apply: Callable[..., torch.Tensor], x: torch.Tensor, logits: torch.Tensor, cfg: MoEConfig,
                   bias: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer from its router logits: our routing, then the backend."""
    return apply(x, *route(logits, cfg.routing, cfg.top_k, correction_bias=bias), weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3", "mixtral", "kimi-k2"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--from-logits", action="store_true", help="route the router logits first (our kernel)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows: list[dict[str, object]] = []
    ceilings = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)

    def report(row: dict[str, object]) -> None:
        for timing in ("single", "chain"):  # (bytes / µs = MB/s; the copy rate in GB/s)
            row[f"pct_bw_{timing}"] = round(100 * row["bytes"] / row[timing] / 1e3 / ceilings["copy_gbps"], 1)
        rows.append(row)
        print(f"{row['backend']:>7} {row['shape']:>16} M={row['M']:<4} R={row['copies']:<3} single "
              f"{row['single']:8.1f}  chain {row['chain']:8.1f}  stream {row['stream']:8.1f} us  %BW single "
              f"{row['pct_bw_single']:5.1f}  chain {row['pct_bw_chain']:5.1f}", flush=True)

    for name in args.shapes:
        spec, experts = random_layer(name, device)
        cfg = spec.moe
        per_expert = expert_bytes(spec.scheme, cfg.hidden_size, cfg.intermediate_size)
        count = chain_copies(cfg.top_k * per_expert, cfg.num_experts * per_expert)
        backends: dict[str, tuple[Callable[..., torch.Tensor], list[dict[str, torch.Tensor]]]] = {}
        triton = TritonExperts(spec, experts.quant_config(), device)
        backends["triton"] = triton.apply, copies(TritonExperts.prepare_weights(experts, device), count)
        if MarlinExperts.is_supported(spec, DeviceInfo.current()).ok:
            marlin = MarlinExperts(spec, experts.quant_config(), device)
            backends["marlin"] = marlin.apply, copies(MarlinExperts.prepare_weights(experts, device), count)
        del experts
        for m in args.tokens:
            x, tw, ids = layer_inputs(name, m, cfg, device)
            if args.from_logits:  # (fresh logits, routed by our kernel, in place of the drawn ids)
                logits = torch.randn(m, cfg.num_experts, device=device).to(cfg.dtype)
                bias = torch.randn(cfg.num_experts, device=device) * 0.1
                tw, ids = route(logits, cfg.routing, cfg.top_k, correction_bias=bias)
            outputs = {b: apply(x, tw, ids, sets[-1]) for b, (apply, sets) in backends.items()}
            if "marlin" in outputs:  # two independent kernels agree, on the last copy: the copies are whole
                err = relative_error(outputs["triton"], outputs["marlin"])
                if not err < 2e-2:
                    raise RuntimeError(f"{name} M={m}: triton and marlin disagree (relative error {err:.2e})")
            touched = int(torch.unique(ids).numel())
            for backend, (apply, sets) in backends.items():
                forwards = [partial(routed_forward, apply, x, logits, cfg, bias, w) if args.from_logits
                            else partial(apply, x, tw, ids, w) for w in sets]
                report({"backend": backend, "shape": name, "M": m, "copies": count, "from_logits": args.from_logits,
                        "bytes": touched * per_expert, **chain_times(forwards)})
        del backends
        torch.cuda.empty_cache()

    write_results(args.out, rows, torch=torch.__version__, **ceilings)


if __name__ == "__main__":
    main()
