"""When each program of the decode kernel starts, gets past its wait, ends its loop and ends, in one layer forward
replayed as a CUDA graph after an L2 flush (`moe_gemm(trace=...)`, global timer): the ramp and the tail of each GEMM,
and the hop between them. Run on the device:

    python benchmarks/program_timeline.py deepseek-v3:1 mixtral:1 [--scheme int8_g128_sym] [--eager] [--out F.json]

(--eager: launched from Python instead, after the same flush; the host may then fall behind the GPU.)

Per GEMM, µs from GEMM1's first program start: quantiles (0, 10, 50, 90, 100%) of each stamp over the programs
that reach it, and programs per SM. The stamps cost a few instructions outside the loops
(tests/test_kernels_compile.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

import wna16moe.kernels.moe_gemm as launcher  # (where the TRITON backend imports it from)
from wna16moe.bench import _flush_l2, capture_graph, layer_cases, write_results
from wna16moe.experts.base import relative_error
from wna16moe.kernels.moe_gemm_decode import (
    TRACE_END,
    TRACE_FIELDS,
    TRACE_LOOP_END,
    TRACE_SM,
    TRACE_START,
    TRACE_WAITED,
)

STAMPS = {"start": TRACE_START.value, "waited": TRACE_WAITED.value, "loop_end": TRACE_LOOP_END.value,
          "end": TRACE_END.value}
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
# Rows per traced launch: more than any one-GEMM grid of the table's shapes at the M this is for.
ROWS = 1 << 16


def traced_forward(kernel, weights, inputs, eager: bool) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The layer forward as one CUDA graph whose two GEMM launches fill trace buffers, replayed once after an L2
    flush (eager: launched once after it). The buffers are allocated and reset outside the forward: a fill kernel
    between GEMM1 and GEMM2 would hold GEMM2 back to a plain launch. Returns the output and (GEMM, trace) per GEMM."""
    buffers = [torch.empty(ROWS, TRACE_FIELDS.value, dtype=torch.int64, device=inputs[0].device) for _ in range(2)]
    launch = launcher.moe_gemm
    names: list[str] = []

    def traced(*args, **kwargs):
        names.append("GEMM1" if kwargs["gated"] else "GEMM2")
        return launch(*args, trace=buffers[(len(names) - 1) % 2], **kwargs)

    launcher.moe_gemm = traced
    try:
        out = []
        graph = capture_graph(lambda: out.append(kernel.apply(*inputs, weights)))
        for _ in range(3):
            graph.replay()
        for buffer in buffers:
            buffer.fill_(-1)
        _flush_l2()
        if eager:
            out.append(kernel.apply(*inputs, weights))
        else:
            graph.replay()
    finally:
        launcher.moe_gemm = launch
    torch.cuda.synchronize()
    return out[-1], list(zip(names[-2:], buffers, strict=True))


def summarize(traces: list[tuple[str, torch.Tensor]]) -> dict[str, dict]:
    rows = {name: trace[trace[:, TRACE_START.value] >= 0].cpu() for name, trace in traces}
    origin = int(min(r[:, TRACE_START.value].min() for r in rows.values()))
    summary = {}
    for name, r in rows.items():
        stamps = {}
        for stamp, field in STAMPS.items():
            reached = r[r[:, field] >= 0, field].double()
            stamps[stamp] = [round(float(torch.quantile((reached - origin) / 1e3, q)), 2) for q in QUANTILES]
        per_sm = torch.bincount(r[:, TRACE_SM.value])
        summary[name] = {"programs": len(r), "us_from_gemm1_start": stamps, "sms": int((per_sm > 0).sum()),
                         "max_programs_per_sm": int(per_sm.max())}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--scheme", default=None)
    parser.add_argument("--eager", action="store_true", help="launch from Python, not as a CUDA graph")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name, m, kernel, weights, inputs, reference in layer_cases(args.cases, torch.device("cuda"), args.scheme):
        out, traces = traced_forward(kernel, weights, inputs, args.eager)
        row = {"shape": name, "M": m, "eager": args.eager, "config": asdict(kernel.config(m)),
               "relative_error": relative_error(out, reference), **summarize(traces)}
        results.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
