"""A/B of two source trees of the package: `try_configs.py` (the shipped entries, graph replays after the bench's L2
flush, each checked against the float32 reference) run in separate processes, the base tree's and the new tree's
(by default this checkout's) in turn, PROCESSES times each. A kernel change in any module is timed on the same
cases, the GPU's drift over time falls on both, and the spread from one process to the next shows (kimi-k2
M = 512 moves by ~10%, NOTES.md v49).
(It replaced `ab_kernel.py`, which swapped only `kernels/moe_gemm.py`, in one process.)

The base tree is a `src` folder: export the revision before the change and carry it to the device, e.g.

    git archive 407ef55 src | tar -x -C build/ab/407ef55
    python benchmarks/ab_trees.py build/ab/407ef55/src deepseek-v3:1,8 qwen3-30b-a3b:8 --processes 3 --out ab.json

or, for a branch not checked out, this checkout as the base and the branch exported as `--new`:

    git archive wip-x src | tar -x -C build/ab/wip-x
    python benchmarks/ab_trees.py src deepseek-v3:1,8 --new build/ab/wip-x/src --out ab.json

Each tree times itself with its own `wna16moe/bench.py`: trees whose timing differs (before 154d9df the bench did not
warm up for 250 ms, and a process's first timing read up to 10% fast, NOTES.md v78) are not comparable, so a base
whose bench.py differs from the new tree's is named in a warning and in the results (`bench_differs`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wna16moe.bench import write_results

HERE = Path(__file__).resolve().parent
TREES = ("base", "new")


def run_try_configs(src: str, cases: list[str], options: list[str], log: Path) -> list[dict[str, Any]]:
    """try_configs.py's rows for `cases`, with the package imported from `src`; its output goes to `log`."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(HERE)])}
        with log.open("w") as stream:
            subprocess.run([sys.executable, str(HERE / "try_configs.py"), *cases, *options, "--out", str(out)],
                           env=env, stdout=stream, stderr=subprocess.STDOUT, check=True)
        return json.loads(out.read_text())["rows"]


def _bench_source(src: str) -> bytes | None:
    """The text of the timing harness the tree `src` imports (None where it has none)."""
    path = Path(src) / "wna16moe" / "bench.py"
    return path.read_bytes() if path.exists() else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, M): each tree's timings of the shipped entry in the order taken, their means and the change."""
    summary = []
    for shape, m in sorted({(r["shape"], r["M"]) for r in rows}):
        us = {tree: [r["us_graph"] for r in rows if (r["shape"], r["M"], r["tree"]) == (shape, m, tree)
                     and r["shipped"]] for tree in TREES}
        if not all(us.values()):
            continue
        base, new = (statistics.mean(us[tree]) for tree in TREES)
        summary.append({"shape": shape, "M": m, "base_us": round(base, 2), "new_us": round(new, 2),
                        "change_pct": round(100 * (new / base - 1), 2), "base_rounds": us["base"],
                        "new_rounds": us["new"]})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the base tree's src folder")
    parser.add_argument("--new", default=str(HERE.parent / "src"),
                        help="the changed tree's src folder (default: this checkout's), e.g. a branch exported with "
                             "`git archive BRANCH src`")
    parser.add_argument("cases", nargs="+", help="shape:M[,M...]")
    parser.add_argument("--processes", type=int, default=3, help="processes per tree (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="try_configs rounds per process (default 2)")
    parser.add_argument("--scheme", help="weight scheme (default: int4 symmetric at the model's group size)")
    parser.add_argument("--base-config", choices=("shipped", "default"), default="shipped",
                        help="the configuration timed: the table's entry or `default_config`'s (try_configs --base)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no process after this many seconds (the pairs done so far are kept)")
    parser.add_argument("--logs", type=Path, default=Path("."), help="folder for each process's output")
    parser.add_argument("--out")
    args = parser.parse_args()
    trees = {"base": str(Path(args.base).resolve()), "new": str(Path(args.new).resolve())}
    bench_differs = len({_bench_source(src) for src in trees.values()}) > 1
    if bench_differs:
        print("warning: the trees' wna16moe/bench.py differ, so they may time differently", flush=True)
    options = (["--rounds", str(args.rounds), "--base", args.base_config]
               + (["--scheme", args.scheme] if args.scheme else []))
    start, rows = time.monotonic(), []
    for process in range(args.processes):
        if time.monotonic() - start > args.budget_s:
            break
        for tree in TREES:  # (a pair at a time: both trees in every process round)
            log = args.logs / f"ab-{tree}-{process}.log"
            rows += [{**r, "tree": tree, "process": process}
                     for r in run_try_configs(trees[tree], args.cases, options, log)]
        # (written after every pair: a call's time limit keeps what it finished)
        write_results(args.out, rows, base=args.base, new=args.new, bench_differs=bench_differs,
                      summary=summarize(rows),
                      method=f"benchmarks/ab_trees.py: try_configs.py's {args.base_config} configurations, the trees' "
                             "processes in turn")
    for s in summarize(rows):
        print(f"{s['shape']:15s} M={s['M']:5d} base {s['base_us']:9.1f} new {s['new_us']:9.1f} "
              f"{s['change_pct']:+.1f}%  base {[round(u, 1) for u in s['base_rounds']]} "
              f"new {[round(u, 1) for u in s['new_rounds']]}", flush=True)


if __name__ == "__main__":
    main()
