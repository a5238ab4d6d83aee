"""CPU benchmark of one MoE layer: the CPU backend against EMULATION, `python -m wna16moe.bench_cpu`.

Timed region: one `apply` from routed top-k ids/weights to the [T, H] output (routing excluded), as in
`wna16moe.bench` on the GPU. Each backend gets one warm-up call, then `reps` timed calls with
`time.perf_counter`, the two backends alternating call by call so that load from other processes hits both
alike; the median is reported. Routing is uniform random with distinct experts per token; weights are
random codes and scales of the scheme. Before timing, the CPU backend's output is checked against
EMULATION (relative Frobenius error below 1e-2). The JSON records the CPU model (/proc/cpuinfo), torch's
CPU capability and thread count, the CPU backend's GEMM_GRAIN (`--gemm-grain 0`: one parallel region per
GEMM at every size, PyTorch's own behaviour), the load average before and after (other processes on the same
cores slow both backends), the date and the commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from wna16moe.bench import commit_id, random_experts, random_routing
from wna16moe.config import MoEConfig
from wna16moe.experts import cpu as cpu_backend
from wna16moe.experts.base import LayerSpec, relative_error
from wna16moe.experts.cpu import CPUExperts
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.scheme import WeightScheme
from wna16moe.shapes import model_shape

DEFAULT_SHAPE = "qwen3-30b-a3b"
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32)
MAX_REL_ERR = 1e-2


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_layer(config: MoEConfig, scheme: WeightScheme, tokens: list[int], reps: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per token count M: median ms of the CPU backend and of EMULATION, speedup, relative error."""
    device = torch.device("cpu")
    e, k, h, i = config.num_experts, config.top_k, config.hidden_size, config.intermediate_size
    experts = random_experts(e, h, i, scheme, device)
    quant = experts.quant_config()
    spec = LayerSpec(config, scheme)
    start = time.perf_counter()
    cpu, cpu_weights = CPUExperts(spec, quant, device), CPUExperts.prepare_weights(experts, device)
    log(f"CPU weights prepared in {time.perf_counter() - start:.1f} s")
    emulation, emu_weights = EmulationExperts(spec, quant, device), EmulationExperts.prepare_weights(experts, device)
    rows: list[dict[str, Any]] = []
    for m in tokens:
        x = torch.randn(m, h, dtype=torch.bfloat16)
        topk_weights, topk_ids = random_routing(m, e, k, device)
        run_cpu = partial(cpu.apply, x, topk_weights, topk_ids, cpu_weights)
        run_emulation = partial(emulation.apply, x, topk_weights, topk_ids, emu_weights)
        err = relative_error(run_cpu(), run_emulation())  # also the warm-up
        if not err < MAX_REL_ERR:
            raise RuntimeError(f"M={m}: the CPU backend's output is wrong (relative error {err:.3e} vs EMULATION)")
        cpu_ms, emu_ms = [], []
        for _ in range(reps):
            cpu_ms.append(_time_ms(run_cpu))
            emu_ms.append(_time_ms(run_emulation))
        cpu_med, emu_med = statistics.median(cpu_ms), statistics.median(emu_ms)
        rows.append({"M": m, "experts_touched": int(torch.unique(topk_ids).numel()), "cpu_ms": round(cpu_med, 2),
                     "emulation_ms": round(emu_med, 2), "speedup": round(emu_med / cpu_med, 2),
                     "rel_err_vs_emulation": float(f"{err:.3e}")})
        log(f"M={m:<3} experts {rows[-1]['experts_touched']:>3}  cpu {cpu_med:9.2f} ms  emulation {emu_med:9.2f} ms  "
            f"x{emu_med / cpu_med:.1f}  (rel err {err:.1e})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wna16moe.bench_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help=f"model shape (default {DEFAULT_SHAPE})")
    parser.add_argument("--scheme", help="scheme name (default: int4 symmetric at the model's group size)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--reps", type=int, default=7, help="timed calls per backend and M (median reported)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--gemm-grain", type=int, help="the CPU backend's multiply-adds per intra-op thread "
                        f"(default {cpu_backend.GEMM_GRAIN}; 0: every GEMM on all threads)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/cpu-<shape>-<date>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gemm_grain is not None:
        cpu_backend.GEMM_GRAIN = args.gemm_grain
    shape = model_shape(args.shape)
    scheme = WeightScheme.from_name(args.scheme or f"int4_g{shape.group_size}_sym")
    config = replace(shape.moe_config(), dtype=torch.bfloat16)
    date = datetime.date.today().isoformat()
    result: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "gemm_grain": cpu_backend.GEMM_GRAIN, "date": date, "commit": commit_id(),
        "torch": torch.__version__,
        "python": platform.python_version(), "shape": args.shape, "scheme": scheme.name, "reps": args.reps,
        "command": "python -m wna16moe.bench_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"{result['cpu']} ({result['cpu_capability']}, {result['threads']} threads), {args.shape} {scheme.name}",
          flush=True)
    result["load_average_before"] = [round(v, 2) for v in os.getloadavg()]  # other processes share the cores
    result["rows"] = bench_layer(config, scheme, args.tokens, args.reps, lambda s: print(s, flush=True))
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out = args.out or Path("benchmarks/results") / f"cpu-{args.shape}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
