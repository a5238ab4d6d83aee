"""Turn `wna16moe.bench` results files into the BENCHMARKS.md tables and a plot.

    python benchmarks/report.py benchmarks/results/H100-2026-11-28.json --plot benchmarks/H100-2026-11-28.png

Several files (one run split over GPUs, one shape each; or a later sweep of some M) are read together, each
row against its own file's ceilings; where files overlap in shape and M, the last file's rows stand.
`--backend served` takes, per shape and M, the faster of the sweep's pick and the default as CUDA graphs
replay them where timed (what `wna16moe.tuning` ships).

Per row: the best of eager and CUDA-graph time, % of the measured copy bandwidth and matmul rate, and
xFloor = time / max(bytes / copy rate, FLOPs / matmul rate). Peers measured in the same run (MARLIN, bf16
torch grouped GEMM, vLLM's Triton WNA16 kernel from `vllm_triton_peer.py`) give same-run ratios (peer time /
ours); `--reference` adds vLLM's Triton MoE from shared/reference/measured_h100_peers.md (a separate run on
another H100, labelled as such).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from wna16moe.bench import best_us

# Our shape names -> the section names of measured_h100_peers.md.
SHAPE_NAMES = {"qwen3-30b-a3b": "qwen3_30b_a3b", "deepseek-v3": "deepseek_v3", "kimi-k2": "kimi_k2"}


def served_us(row: dict) -> float:
    return row["us_graph"] if row["us_graph"] is not None else row["us_eager"]


def floor_us(row: dict, ceilings: dict) -> float:
    flops = row["tflops"] * 1e6 * best_us(row)
    return max(row["bytes"] / ceilings["copy_gbps"] / 1e3, flops / ceilings["matmul_tflops"] / 1e6)


def read_reference(path: Path) -> dict[tuple[str, str, int], float]:
    """(peer, shape, M) -> best of eager/graph µs from the markdown tables of measured_h100_peers.md."""
    out: dict[tuple[str, str, int], float] = {}
    shape = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            shape = line[3:].strip()
        cells = [c.strip() for c in line.strip("|").split("|")]
        if shape and len(cells) == 10 and re.fullmatch(r"\d+", cells[1]):
            times = [float(c) for c in cells[3:5] if c != "-"]
            out[(cells[0], shape, int(cells[1]))] = min(times)
    return out


SAME_RUN_PEERS = ("marlin", "bf16", "vllm-triton")


def merge(results: list[dict]) -> dict:
    """One result from several files: each row carries its file's ceilings. Where files overlap in (shape, M),
    the last file's rows stand (as `wna16moe.tuning` merges sweeps), so every table row is from one run."""
    owner = {(r["shape"], r["M"]): index for index, res in enumerate(results) for r in res["rows"]}
    rows = [dict(r, ceilings=res["ceilings"]) for index, res in enumerate(results) for r in res["rows"]
            if "us_eager" in r and owner[r["shape"], r["M"]] == index]
    return dict(results[0], rows=rows, commit=", ".join(dict.fromkeys(res["commit"] for res in results)))


def backend_rows(result: dict, backend: str) -> list[dict]:
    if backend != "served":
        return [r for r in result["rows"] if r["backend"] == backend]
    best: dict[tuple[str, int], dict] = {}
    for r in result["rows"]:
        key = (r["shape"], r["M"])
        if r["backend"] in ("triton", "triton-best") and (key not in best or served_us(r) < served_us(best[key])):
            best[key] = r
    return sorted(best.values(), key=lambda r: r["M"])


def markdown(result: dict, backend: str, reference: dict | None) -> str:
    rows = backend_rows(result, backend)
    peers = {(r["backend"], r["shape"], r["M"]): r for r in result["rows"] if r["backend"] in SAME_RUN_PEERS}
    present = [p for p in SAME_RUN_PEERS if any(key[0] == p for key in peers)]
    lines = []
    ratios: dict[str, list[float]] = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [f"### {shape}", ""]
        head = "| M | experts | µs (eager) | µs (graph) | %BW | TFLOP/s | %MM | xFloor |"
        head += "".join(f" {p} µs | vs {p} |" for p in present)
        if reference is not None:
            head += " vs vLLM-Triton (ref) |"
        lines += [head, "|" + "---|" * head.count(" |")]
        for r in (r for r in rows if r["shape"] == shape):
            t = best_us(r)
            graph = "-" if r["us_graph"] is None else f"{r['us_graph']:.1f}"
            cells = [str(r["M"]), str(r["experts_touched"]), f"{r['us_eager']:.1f}", graph, f"{r['pct_bw']:.1f}",
                     f"{r['tflops']:.1f}", f"{r['pct_mm']:.1f}", f"{t / floor_us(r, r['ceilings']):.2f}"]
            for p in present:
                peer = peers.get((p, shape, r["M"]))
                cells += ["-", "-"] if peer is None else [f"{best_us(peer):.1f}", f"{best_us(peer) / t:.2f}x"]
                if peer is not None and p == "marlin":
                    ratios.setdefault(shape, []).append(best_us(peer) / t)
            if reference is not None:
                ref = reference.get(("vllm-triton", SHAPE_NAMES.get(shape, shape), r["M"]))
                cells.append("-" if ref is None else f"{ref / t:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if ratios:
        every = [x for xs in ratios.values() for x in xs]
        parts = ", ".join(f"{shape} {geomean(xs):.2f}x" for shape, xs in ratios.items())
        lines += [f"Geometric mean of MARLIN time / ours over the rows above: **{geomean(every):.2f}x** ({parts}).", ""]
    return "\n".join(lines)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot(result: dict, backends: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for backend in backends:
            rows = sorted((r for r in backend_rows(result, backend) if r["shape"] == shape), key=lambda r: r["M"])
            if rows:
                ax.plot([r["M"] for r in rows], [best_us(r) for r in rows], marker="o", label=backend)
        floor_rows = sorted((r for r in backend_rows(result, backends[0]) if r["shape"] == shape),
                            key=lambda r: r["M"])
        schemes = ", ".join(sorted({r["scheme"] for r in floor_rows}))
        ax.plot([r["M"] for r in floor_rows], [floor_us(r, r["ceilings"]) for r in floor_rows], "k--",
                label=f"{schemes} roofline (measured)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("µs per layer")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{result['card']}, {result['date']}, commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--backend", default="triton", help="a backend of the rows, or 'served'")
    parser.add_argument("--reference", type=Path, help="measured_h100_peers.md, for the cross-run ratios")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    result = merge([json.loads(path.read_text()) for path in args.results])
    reference = read_reference(args.reference) if args.reference else None
    print(markdown(result, args.backend, reference))
    if args.plot:
        plot(result, [args.backend, *SAME_RUN_PEERS], args.plot)


if __name__ == "__main__":
    main()
