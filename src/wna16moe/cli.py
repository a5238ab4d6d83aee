"""Command line: `wna16moe info [PATH]`, `wna16moe explain ...`, `wna16moe bench ...`, and with transformers
installed `wna16moe generate PATH ...` and `wna16moe check PATH`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import wna16moe
from wna16moe.config import ActivationFormat, MoEConfig, ParallelConfig
from wna16moe.device import DeviceInfo
from wna16moe.errors import InvalidInputError
from wna16moe.experts.base import LayerSpec
from wna16moe.formats import open_checkpoint
from wna16moe.formats.checkpoint import read_config
from wna16moe.oracle import (
    BACKEND_ENV,
    PRIORITY,
    Report,
    describe_device,
    describe_layer,
    explain,
    parse_backend,
)
from wna16moe.scheme import WeightScheme
from wna16moe.shapes import MODEL_SHAPES, model_shape


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
    # A dense checkpoint is quantized on load: its disk size says nothing about the quantized size.
    size_note = "quantized on load" if info["format"] == "dense" else f"{ratio:.2f}x smaller"
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
                    f"in bf16 ({size_note})"),
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


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def explain_layer(args: argparse.Namespace) -> Report:
    """The oracle's report for `wna16moe explain` arguments (a checkpoint PATH, or --shape with --scheme)."""
    if (args.path is None) == (args.shape is None):
        raise InvalidInputError("explain needs either a checkpoint PATH or --shape NAME (not both)")
    moe: MoEConfig
    if args.path is not None:
        if args.scheme is not None:
            raise InvalidInputError("--scheme applies to --shape; a checkpoint's scheme is read from it (use "
                                    "--quantize-to for a dense checkpoint)")
        ckpt = open_checkpoint(args.path, quantize_to=args.quantize_to)
        moe, scheme = ckpt.moe_config(), ckpt.scheme
    else:
        if args.quantize_to is not None:
            raise InvalidInputError("--quantize-to applies to a dense checkpoint PATH; use --scheme with --shape")
        shape = model_shape(args.shape)
        moe = shape.moe_config()
        scheme = WeightScheme.from_name(args.scheme or f"int4_g{shape.group_size}_sym")
    if args.dtype is not None:
        moe = dataclasses.replace(moe, dtype=_DTYPES[args.dtype])
    spec = LayerSpec(moe, scheme, ParallelConfig(tp_size=args.tp, ep_size=args.ep),
                     ActivationFormat.BATCHED if args.batched else ActivationFormat.STANDARD)
    if args.backend:
        override = parse_backend(args.backend, "--backend")
    else:
        override = parse_backend(os.environ[BACKEND_ENV], BACKEND_ENV) if os.environ.get(BACKEND_ENV) else None
    return explain(spec, device=args.device or None, override=override)


def _cmd_explain(args: argparse.Namespace) -> int:
    report = explain_layer(args)
    chosen = report.chosen
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if chosen else 1
    order = " > ".join(b.value for b in PRIORITY[report.platform])
    print(f"layer     {args.path or args.shape}: {describe_layer(report.spec)}")
    print(f"device    {describe_device(report.device)}")
    print(f"priority  {report.platform}: {order}")
    if report.override is not None:
        print(f"override  {report.override.value}")
    print()
    print(report.table())
    print()
    if chosen is None:
        print(f"no kernel chosen: backend {report.override.value if report.override else 'auto'!r} cannot run "
              "this layer (see its reasons above)")
        return 1
    print(f"chosen: {chosen.backend.value} ({chosen.kernel_name})")
    return 0


def _hf_run() -> Any:
    """`wna16moe.hf.run`, or an `InvalidInputError` telling how to install transformers."""
    try:
        from wna16moe.hf import run
    except ImportError as error:
        raise InvalidInputError(str(error)) from error
    return run


def _check_vocabulary(ids: list[int], path: str, config: dict[str, Any]) -> None:
    """Token ids past the config's vocabulary would index outside the embedding."""
    text = config.get("text_config")
    vocab_size = (text if isinstance(text, dict) else config).get("vocab_size")
    if isinstance(vocab_size, int) and max(ids) >= vocab_size:
        raise InvalidInputError(f"--prompt-ids: token id {max(ids)} is outside the vocabulary of {path} "
                                f"(vocab_size {vocab_size})")


def _cmd_generate(args: argparse.Namespace) -> int:
    config = read_config(args.path)  # a missing checkpoint is named here, not deep inside transformers
    if args.prompt_ids is not None:
        _check_vocabulary(args.prompt_ids, args.path, config)
    run = _hf_run()
    start = time.perf_counter()
    model = run.load_model(args.path, args.backend, args.device, _DTYPES[args.dtype])
    load_seconds = time.perf_counter() - start
    result = run.generate(model, args.path, args.prompt, args.prompt_ids, args.max_new_tokens, args.cache)
    if args.json:
        print(json.dumps({"load_seconds": load_seconds, **run.generation_report(result)}, indent=2))
        return 0
    print(result.text if result.text is not None else " ".join(map(str, result.new_ids)))
    print()
    print(f"tokens    {len(result.new_ids)} new after {result.prompt_tokens} prompt tokens in {result.seconds:.2f} s: "
          f"{result.tokens_per_second:.1f} tokens/s ({args.cache} cache; load {load_seconds:.1f} s)")
    print(f"memory    model {_human(result.model_bytes)}; experts {_human(result.experts_bytes)} (bf16 would be "
          f"{_human(result.experts_bf16_bytes)}); {result.peak_kind} {_human(result.peak_bytes)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    read_config(args.path)  # a missing checkpoint is named here, not deep inside transformers
    run = _hf_run()
    model = run.load_model(args.path, args.backend, args.device, _DTYPES[args.dtype])
    results = run.check_model(model, tokens=args.tokens, seed=args.seed, tolerance=args.tolerance)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    elif not results:
        print("no backend other than emulation can run these layers on this machine: nothing to compare")
    else:
        rows = [("layer", "backend", "kernel", "max |err|", "rel err", "")]
        rows += [(r.layer, r.backend, r.kernel, f"{r.max_abs_error:.3g}", f"{r.relative_error:.3g}",
                  "ok" if r.ok else f"MISMATCH (> {args.tolerance:g})") for r in results]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[5])
    return 0 if all(r.ok for r in results) else 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # rejected below, like "nan" itself
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _token_ids(text: str) -> list[int]:
    """'1 2 3' or '1,2,3' as token ids."""
    words = text.replace(",", " ").split()
    if not words:
        raise argparse.ArgumentTypeError("expected at least one token id, got none")
    for word in words:
        if not word.isdecimal():  # also rejects negative ids
            raise argparse.ArgumentTypeError(f"{word!r} is not a token id (a non-negative integer)")
    return [int(word) for word in words]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wna16moe", description="Quantized (W4A16/W8A16) MoE layers and kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a checkpoint (format, scheme, layers, sizes) or, without PATH, "
                                       "this machine")
    info.add_argument("path", nargs="?", help="checkpoint directory (config.json + safetensors)")
    info.add_argument("--quantize-to", help="scheme to quantize a dense checkpoint into, e.g. int4_g128_sym")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    exp = sub.add_parser("explain", help="which backend runs a layer on a device, and why every other one does not")
    exp.add_argument("path", nargs="?", help="checkpoint directory: scheme and shapes are read from it")
    exp.add_argument("--shape", help=f"a named model shape instead of a checkpoint: {', '.join(sorted(MODEL_SHAPES))}")
    exp.add_argument("--scheme", help="weight scheme for --shape, e.g. int4_g128_sym (default: int4, symmetric, the "
                                      "shape's usual group size)")
    exp.add_argument("--quantize-to", help="scheme to quantize a dense checkpoint into, e.g. int4_g128_sym")
    exp.add_argument("--device", help="a named device (h100, b200, cpu, xpu, ...; -bare: no optional packages); "
                                      "default: this machine")
    exp.add_argument("--tp", type=int, default=1, help="tensor-parallel size (I is split over it)")
    exp.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    exp.add_argument("--batched", action="store_true", help="the batched activation format (low-latency all-to-all "
                                                            "EP) instead of the standard one")
    exp.add_argument("--dtype", choices=sorted(_DTYPES), help="activation dtype (default: the model's)")
    exp.add_argument("--backend", help=f"explain a forced backend (default: ${BACKEND_ENV}, else auto)")
    exp.add_argument("--json", action="store_true", help="print JSON")
    exp.set_defaults(func=_cmd_explain)

    gen = sub.add_parser("generate", help="load a checkpoint with transformers through wna16moe and generate "
                                          "greedily; prints tokens/s and memory (needs wna16moe[hf])")
    gen.add_argument("path", help="checkpoint directory (compressed-tensors, GPTQ or AWQ)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (the checkpoint's tokenizer encodes it)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="prompt token ids, e.g. '1 2 3' (checkpoints without a "
                                                              "tokenizer)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32)
    gen.add_argument("--cache", choices=("static", "dynamic"), default="static", help="KV cache (default static)")
    _add_load_options(gen)
    gen.set_defaults(func=_cmd_generate)

    chk = sub.add_parser("check", help="run every backend this machine has on the model's real experts layers and "
                                       "compare each with EMULATION (needs wna16moe[hf])")
    chk.add_argument("path", help="checkpoint directory (compressed-tensors, GPTQ or AWQ)")
    chk.add_argument("--tokens", type=_positive_int, default=32, help="random hidden states per layer (default 32)")
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--tolerance", type=_positive_float, default=2e-2, help="largest relative error that passes")
    _add_load_options(chk)
    chk.set_defaults(func=_cmd_check)

    # Listed for --help only: main() hands every argument after "bench" to wna16moe.bench unparsed.
    sub.add_parser("bench", help="benchmark whole MoE layers on this GPU (the options of python -m wna16moe.bench)")
    return parser


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto", help="experts backend: auto (the oracle, or "
                                                          f"${BACKEND_ENV}) or a name such as emulation, triton")
    parser.add_argument("--device", help="where the model runs (default: the accelerator, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="activation dtype")
    parser.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from wna16moe.bench import main as bench_main  # imports triton: only when asked for

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except wna16moe.WNA16MoEError as error:
        print(f"wna16moe: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
