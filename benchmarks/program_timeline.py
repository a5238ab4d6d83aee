"""When each program of the decode kernel starts, gets past its wait, ends its loop and ends, in one layer forward
replayed as a CUDA graph after an L2 flush (`moe_gemm(trace=...)`, global timer): the ramp and the tail of each GEMM,
and the hop between them. Run on the device:

    python benchmarks/program_timeline.py deepseek-v3:1 mixtral:1 [--scheme int8_g128_sym] [--eager] \
        [--variant field=value,...] [--out F.json]

(--eager: launched from Python instead, after the same flush; the host may then fall behind the GPU.)

Per GEMM, µs from GEMM1's first program start: quantiles (0, 10, 50, 90, 100%) of each stamp over the programs
that reach it, and programs per SM. The stamps cost a few instructions outside the loops
(tests/test_kernels_compile.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

import torch
from try_configs import parse_variant

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


def traced_forward(kernel, weights, inputs, config, eager: bool
                   ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The layer forward as one CUDA graph whose two GEMM launches fill trace buffers, replayed once after an L2
    flush (eager: launched once after it). The buffers are allocated and reset outside the forward: a fill kernel
    between GEMM1 and GEMM2 would hold GEMM2 back to a plain launch. Returns the output and (GEMM, trace) per GEMM."""
    buffers = [torch.empty(ROWS, TRACE_FIELDS.value, dtype=torch.int64, device=inputs[0].device) for _ in range(2)]
    plain_moe_gemm = launcher.moe_gemm
    names: list[str] = []

    def traced(*args, **kwargs):
        names.append("GEMM1" if kwargs["gated"] else "GEMM2")
        return plain_moe_gemm(*args, trace=buffers[(len(names) - 1) % 2], **kwargs)

    launcher.moe_gemm = traced
    try:
        out = []
        # (`_forward`: a launch plan would replay its launches without the traced moe_gemm)
        graph = capture_graph(lambda: out.append(kernel._forward(*inputs, weights, config)))
        for _ in range(3):
            graph.replay()
        for buffer in buffers:
            buffer.fill_(-1)
        _flush_l2()
        if eager:
            out.append(kernel._forward(*inputs, weights, config))
        else:
            graph.replay()
    finally:
        launcher.moe_gemm = plain_moe_gemm
    torch.cuda.synchronize()
    return out[-1], list(zip(names[-2:], buffers, strict=True))


def summarize(traces: list[tuple[str, torch.Tensor]], raw: bool) -> dict[str, dict]:
    """Per GEMM: quantiles of each stamp (µs from GEMM1's first start); the median loop end of the programs on SMs
    that ran n of them (are SMs that hold more programs slower per program?) and of each quarter of the program
    ids (launch order); with `raw`, every program's stamps and SM."""
    rows = {name: trace[trace[:, TRACE_START.value] >= 0].cpu() for name, trace in traces}
    origin = int(min(r[:, TRACE_START.value].min() for r in rows.values()))
    summary = {}
    for name, r in rows.items():
        us = {stamp: torch.where(r[:, field] >= 0, (r[:, field] - origin).double() / 1e3, float("nan"))
              for stamp, field in STAMPS.items()}
        stamps = {stamp: [round(float(torch.nanquantile(v, q)), 2) for q in QUANTILES] for stamp, v in us.items()}
        sm = r[:, TRACE_SM.value]
        per_sm = torch.bincount(sm)
        load = per_sm[sm]
        by_load = {int(n): round(float(us["loop_end"][load == n].nanmedian()), 2) for n in load.unique()}
        quarters = [round(float(q.nanmedian()), 2) for q in us["loop_end"].chunk(4)]
        summary[name] = {"programs": len(r), "us_from_gemm1_start": stamps, "sms": int((per_sm > 0).sum()),
                         "max_programs_per_sm": int(per_sm.max()), "loop_end_by_programs_on_sm": by_load,
                         "loop_end_by_program_quarter": quarters}
        if raw:
            summary[name]["raw"] = [[round(float(v[i]), 2) for v in us.values()] + [int(sm[i])] for i in range(len(r))]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--scheme", default=None)
    parser.add_argument("--eager", action="store_true", help="launch from Python, not as a CUDA graph")
    parser.add_argument("--variant", default=None, help="the shipped entry with these fields changed (try_configs.py)")
    parser.add_argument("--raw", action="store_true", help="every program's stamps and SM in the JSON")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name, m, kernel, weights, inputs, reference in layer_cases(args.cases, torch.device("cuda"), args.scheme):
        config = replace(kernel.config(m), **parse_variant(args.variant)) if args.variant else kernel.config(m)
        out, traces = traced_forward(kernel, weights, inputs, config, args.eager)
        row = {"shape": name, "M": m, "eager": args.eager, "config": asdict(config),
               "relative_error": relative_error(out, reference), **summarize(traces, args.raw)}
        results.append(row)
        print(json.dumps({key: {k: v for k, v in value.items() if k != "raw"} if isinstance(value, dict) else value
                          for key, value in row.items()}), flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
