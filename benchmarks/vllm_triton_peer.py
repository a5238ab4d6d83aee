"""vLLM's Triton WNA16 MoE kernel as a same-run peer: issue #4 asks TRITON to be at least 2x faster than it at
every shape and M, and until now the only numbers for it came from another machine's H100
(shared/reference/measured_h100_peers.md).

The peer is vLLM 0.33's `fused_moe_kernel_gptq_awq` with the configuration vLLM picks when it has no tuned file
for the shape (it has none for int4_w4a16 or these shapes): BLOCK_M 16 / 32 / 64 for M <= 20 / <= 40 / more,
BLOCK_N x BLOCK_K 32 x 64 at one token and 64 x 32 otherwise, Triton's default warps and stages. Its source is not
shipped here (the device has no vLLM package): the two jit functions are read out of vLLM's `fused_moe.py` and
imported from a scratch file. The forward around them is vLLM's `fused_experts_impl` for int4_w4a16: token
alignment (ours, which fills the same sorted ids, block experts and padded count), GEMM1 into [T, K, 2I], SiLU
and mul in torch (as our MARLIN peer does), GEMM2 with the router weights into [T, K, H], and the sum over K.
vLLM itself sends int4 with few tokens per expert to a CUDA kernel instead; like the reference file, this times
the Triton kernel at every M.

Per shape and M, on the same tokens and routing (`bench.layer_inputs`), both outputs checked against the float32
reference first: the shipped TRITON configuration and the peer, eager and (M <= 512) as graph replays, rows in the
bench's format with the ceilings measured in the same run (`benchmarks/report.py` gives "vs vllm-triton").

    unzip -j vllm-0.33.0-*.whl vllm/model_executor/layers/fused_moe/fused_moe.py -d build/vllm_triton
    python benchmarks/vllm_triton_peer.py --source build/vllm_triton/fused_moe.py mixtral:1,8,2048 --out peer.json
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import tempfile
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import triton
import triton.language as tl

from wna16moe.activations import silu_and_mul
from wna16moe.bench import (
    GRAPH_MAX_TOKENS,
    _bench,
    _bench_graph,
    best_us,
    expert_bytes,
    format_row,
    layer_inputs,
    measure_ceilings,
    random_layer,
    timing_row,
    triton_and_reference,
    write_results,
)
from wna16moe.experts.base import relative_error
from wna16moe.kernels.moe_align import moe_align_block_size
from wna16moe.quantized import QuantizedWeight

KERNELS = ("write_zeros_to_output", "fused_moe_kernel_gptq_awq")
COMPUTE_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def load_peer(source: Path) -> ModuleType:
    """The peer's jit functions, taken out of vLLM's fused_moe.py (which imports all of vLLM) into a module of
    their own: Triton reads a kernel's source from its file."""
    text = source.read_text()
    found = {node.name: node for node in ast.parse(text).body
             if isinstance(node, ast.FunctionDef) and node.name in KERNELS}
    if set(found) != set(KERNELS):
        raise SystemExit(f"{source} lacks {sorted(set(KERNELS) - set(found))}")
    body = "\n\n".join(f"@triton.jit\n{ast.get_source_segment(text, found[name])}" for name in KERNELS)
    path = Path(tempfile.mkdtemp()) / "vllm_wna16_moe_kernel.py"
    path.write_text(f"import triton\nimport triton.language as tl\n\n\n{body}\n")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_config(m: int) -> dict[str, int]:
    """vLLM 0.33's untuned WNA16 configuration at M tokens (get_default_config, get_moe_wna16_block_config)."""
    block_m = 16 if m <= 20 else 32 if m <= 40 else 64
    block_n, block_k = (32, 64) if m == 1 else (64, 32)
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k, "GROUP_SIZE_M": 1,
            "SPLIT_K": 1}


def peer_weight(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's layout of a symmetric weight: codes [E, N, K] (int4: two per byte along K, the even one in the
    low nibble: [E, N, K / 2]) and scales [E, N, G] as they are."""
    if weight.zeros is not None or weight.g_idx is not None:
        raise SystemExit("the vLLM Triton peer is wired for symmetric schemes without act-order only")
    codes = weight.codes
    if weight.scheme.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.contiguous(), weight.scales.contiguous()


def peer_forward(peer: ModuleType, weights: dict[str, torch.Tensor], bits: int, group_size: int,
                 x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    t, k = topk_ids.shape
    e, two_i, _ = weights["w13"].shape
    h = weights["w2"].shape[1]
    config = peer_config(t)
    block_m = config["BLOCK_SIZE_M"]
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, e, block_m)
    # vLLM launches programs for as many rows as T * K blocks can hold when T is below one block.
    rows = min(sorted_ids.numel(), t * k * block_m) if t < block_m else sorted_ids.numel()
    gate_up = torch.empty(t, k, two_i, dtype=x.dtype, device=x.device)
    down = torch.empty(t, k, h, dtype=x.dtype, device=x.device)

    def gemm(a: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, top_k: int,
             weighted: bool) -> None:
        n, kd = out.shape[2], a.shape[1]
        grid = (triton.cdiv(rows, block_m) * triton.cdiv(n, config["BLOCK_SIZE_N"]),)
        peer.fused_moe_kernel_gptq_awq[grid](
            a, w, out, scales, None, topk_weights, sorted_ids, expert_ids, num_padded, n, kd, rows, t * k,
            a.stride(0), a.stride(1), w.stride(0), w.stride(2), w.stride(1), out.stride(1), out.stride(2),
            scales.stride(0), scales.stride(2), scales.stride(1), 0, 0, 0,
            block_k_diviable=kd % config["BLOCK_SIZE_K"] == 0, group_size=group_size,
            MUL_ROUTED_WEIGHT=weighted, top_k=top_k, compute_type=COMPUTE_TYPES[x.dtype], has_zp=False,
            use_int4_w4a16=bits == 4, use_int8_w8a16=bits == 8, **config)

    gemm(x, weights["w13"], weights["w13_scales"], gate_up, k, False)
    act = silu_and_mul(gate_up.view(t * k, two_i))
    gemm(act, weights["w2"], weights["w2_scales"], down, 1, True)
    return down.sum(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--source", type=Path, required=True, help="vLLM's fused_moe.py")
    parser.add_argument("--scheme", help="int4_g*_sym or int8_g*_sym (default: int4 at the model's group size)")
    parser.add_argument("--out")
    args = parser.parse_args()
    peer = load_peer(args.source)
    device = torch.device("cuda")
    ceilings = measure_ceilings()
    print(f"copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for case in args.cases:
        name, ms = case.split(":")
        spec, experts = random_layer(name, device, args.scheme)
        kernel, weights, emulation, emu_weights = triton_and_reference(spec, experts, device)
        peer_weights = dict(zip(("w13", "w13_scales", "w2", "w2_scales"),
                                (*peer_weight(experts.w13), *peer_weight(experts.w2)), strict=True))
        scheme, moe = spec.scheme, spec.moe
        per_expert = expert_bytes(scheme, moe.hidden_size, moe.intermediate_size)
        del experts
        for m in map(int, ms.split(",")):
            x, tw, ids = layer_inputs(name, m, moe, device)
            reference = emulation.apply(x, tw, ids, emu_weights)
            touched = int(torch.unique(ids).numel())
            flops = 2 * m * moe.top_k * 3 * moe.hidden_size * moe.intermediate_size
            group = scheme.group_size if scheme.group_size > 0 else moe.hidden_size
            for backend, forward in (
                    ("triton", partial(kernel.apply, x, tw, ids, weights)),
                    ("vllm-triton", partial(peer_forward, peer, peer_weights, scheme.bits, group, x, tw, ids))):
                err = relative_error(forward(), reference)
                if not err < 1e-2:
                    raise SystemExit(f"{backend} {name} M={m}: relative error {err:.3e} against the reference")
                graph = _bench_graph(forward) if m <= GRAPH_MAX_TOKENS else None
                rows.append(timing_row(backend, name, scheme, m, touched, _bench(forward), graph,
                                       touched * per_expert, flops, ceilings, {"relative_error": err}))
                print(format_row(rows[-1]), f"err {err:.1e}", flush=True)
            print(f"{name} M={m}: vllm-triton / triton = {best_us(rows[-1]) / best_us(rows[-2]):.2f}x", flush=True)
        write_results(args.out, rows, ceilings=ceilings)  # after every shape: a timeout keeps what was measured


if __name__ == "__main__":
    main()
