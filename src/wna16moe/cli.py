"""Command line: `wna16moe info [PATH]`, `wna16moe explain ...`."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

import wna16moe
from wna16moe.device import DeviceInfo
from wna16moe.formats import open_checkpoint


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def checkpoint_info(path: str, quantize_to: str | None = None) -> dict[str, Any]:
    """Facts about a checkpoint: format, scheme, MoE layers, shapes, routing, sizes."""
    ckpt = open_checkpoint(path, quantize_to=quantize_to)
    cfg = ckpt.moe_config()
    layers = ckpt.moe_layer_indices()
    bf16_experts = len(layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 2
    stored = ckpt.expert_nbytes()
    routing = cfg.routing
    return {
        "path": str(ckpt.path),
        "format": ckpt.format.value,
        "scheme": ckpt.scheme.name,
        "scale_dtype": str(ckpt.scheme.scale_dtype).removeprefix("torch."),
        "moe_layers": layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "activation": cfg.activation.value,
        "routing": {"method": routing.method.value, "renormalize": routing.renormalize, "n_group": routing.n_group,
                    "topk_group": routing.topk_group, "routed_scaling_factor": routing.routed_scaling_factor},
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "bytes_on_disk": ckpt.nbytes_on_disk(),
        "expert_bytes_on_disk": stored,
        "expert_bytes_bf16": bf16_experts,
    }


def environment_info() -> dict[str, Any]:
    """Versions, the current device and which optional packages are importable."""
    info = DeviceInfo.current()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "wna16moe": wna16moe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": info.name,
        "platform": info.platform.value,
        "compute_capability": info.compute_capability,
        "optional_packages": sorted(info.packages),
    }


def _print_checkpoint(info: dict[str, Any]) -> None:
    r = info["routing"]
    routing = f"{r['method']}" + (" renormalized" if r["renormalize"] else "")
    if r["method"] == "deepseek_v3":
        routing += f", n_group {r['n_group']}, topk_group {r['topk_group']}, scale {r['routed_scaling_factor']}"
    ratio = info["expert_bytes_bf16"] / max(info["expert_bytes_on_disk"], 1)
    lines = [
        ("checkpoint", info["path"]),
        ("format", info["format"]),
        ("scheme", f"{info['scheme']} (scales {info['scale_dtype']})"),
        ("MoE layers", f"{len(info['moe_layers'])}: {info['moe_layers']}"),
        ("experts", f"E={info['num_experts']}, top_k={info['top_k']}, H={info['hidden_size']}, "
                    f"I={info['intermediate_size']}"),
        ("activation", info["activation"]),
        ("routing", routing),
        ("dtype", info["dtype"]),
        ("on disk", _human(info["bytes_on_disk"])),
        ("expert bytes", f"{_human(info['expert_bytes_on_disk'])} on disk vs {_human(info['expert_bytes_bf16'])} "
                    f"in bf16 ({ratio:.2f}x smaller)"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = checkpoint_info(args.path, args.quantize_to) if args.path else environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.path:
        _print_checkpoint(info)
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wna16moe", description="Quantized (W4A16/W8A16) MoE layers and kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint (format, scheme, layers, sizes) or, without PATH, "
                                       "this machine")
    info.add_argument("path", nargs="?", help="checkpoint directory (config.json + safetensors)")
    info.add_argument("--quantize-to", help="scheme to quantize a dense checkpoint into, e.g. int4_g128_sym")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except wna16moe.WNA16MoEError as error:
        print(f"wna16moe: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
