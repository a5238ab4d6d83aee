"""Turn a `wna16moe.bench` results file into the BENCHMARKS.md tables and a plot.

    python benchmarks/report.py benchmarks/results/H100-2026-11-28.json --plot benchmarks/H100-2026-11-28.png

Per row: the best of eager and CUDA-graph time, % of the measured copy bandwidth and matmul rate, and
xFloor = time / max(bytes / copy rate, FLOPs / matmul rate). Peers measured in the same run (MARLIN, bf16
torch grouped GEMM) give same-run ratios (peer time / ours); `--reference` adds vLLM's Triton MoE from
shared/reference/measured_h100_peers.md (a separate run on another H100, labelled as such).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# Our shape names -> the section names of measured_h100_peers.md.
SHAPE_NAMES = {"qwen3-30b-a3b": "qwen3_30b_a3b", "deepseek-v3": "deepseek_v3", "kimi-k2": "kimi_k2"}


def best_us(row: dict) -> float:
    return min(v for v in (row["us_eager"], row["us_graph"]) if v is not None)


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


SAME_RUN_PEERS = ("marlin", "bf16")


def markdown(result: dict, backend: str, reference: dict | None) -> str:
    ceilings = result["ceilings"]
    rows = [r for r in result["rows"] if r["backend"] == backend]
    peers = {(r["backend"], r["shape"], r["M"]): r for r in result["rows"] if r["backend"] in SAME_RUN_PEERS}
    present = [p for p in SAME_RUN_PEERS if any(key[0] == p for key in peers)]
    lines = []
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
                     f"{r['tflops']:.1f}", f"{r['pct_mm']:.1f}", f"{t / floor_us(r, ceilings):.2f}"]
            for p in present:
                peer = peers.get((p, shape, r["M"]))
                cells += ["-", "-"] if peer is None else [f"{best_us(peer):.1f}", f"{best_us(peer) / t:.2f}x"]
            if reference is not None:
                ref = reference.get(("vllm-triton", SHAPE_NAMES.get(shape, shape), r["M"]))
                cells.append("-" if ref is None else f"{ref / t:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, backends: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2))
    for ax, shape in zip(axes, shapes, strict=True):
        for backend in backends:
            rows = [r for r in result["rows"] if r["shape"] == shape and r["backend"] == backend]
            if rows:
                ax.plot([r["M"] for r in rows], [best_us(r) for r in rows], marker="o", label=backend)
        floor_rows = [r for r in result["rows"] if r["shape"] == shape and r["backend"] == backends[0]]
        ax.plot([r["M"] for r in floor_rows], [floor_us(r, result["ceilings"]) for r in floor_rows], "k--",
                label="int4 roofline (measured)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("µs per layer")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['card']}, {result['date']}, commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--reference", type=Path, help="measured_h100_peers.md, for the cross-run ratios")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    reference = read_reference(args.reference) if args.reference else None
    print(markdown(result, args.backend, reference))
    if args.plot:
        plot(result, [args.backend, *SAME_RUN_PEERS], args.plot)


if __name__ == "__main__":
    main()
