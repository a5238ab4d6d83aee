"""Compare the SASS of the GEMM kernels between this tree and a git revision, whole kernel, on the CPU.

An unchanged main loop does not make an unchanged kernel: a store moved outside the loop rescheduled kimi-k2's
decode GEMM1 and cost it 8% (benchmarks/NOTES.md v29). This compiles the compile-check cases of
`tests/test_kernels_compile.py` (or those named) in both trees, each tree with its own `tests/compile_kernels.py`,
and counts the lines of SASS that differ once registers, predicates, labels and immediates are normalized:

    python benchmarks/sass_diff.py 435b693             # every case
    python benchmarks/sass_diff.py HEAD~1 --gemm 0 13 --decode 4

0 differing lines means ptxas emitted the same instructions in the same order.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter per tree (each imports its own wna16moe): compile the cases, print normalized SASS.
_DUMP = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
tree, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [tree + "/src", tree + "/tests"]
import triton
import compile_kernels
nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
compiled = []
original = triton.compile
def capture(*args, **kwargs):
    kernel = original(*args, **kwargs)
    compiled.append(kernel.asm["cubin"])
    return kernel
compile_kernels.triton.compile = capture
out = {"gemm": [], "decode": []}
for kind, compile_case in (("gemm", compile_kernels.compile_gemm), ("decode", compile_kernels.compile_decode_gemm)):
    for case in cases[kind]:
        compile_case(case)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled[-1])
            f.flush()
            text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
        out[kind].append(text)
print(json.dumps(out))
"""


def normalize(sass: str) -> list[str]:
    """Instructions only, with registers, predicates, labels and immediates replaced by placeholders."""
    lines = []
    for line in sass.splitlines():
        if instruction := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            text = re.sub(r"\bU?R\d+\b", "R", instruction.group(1))
            text = re.sub(r"\bU?P\d\b", "P", text)
            text = re.sub(r"\.L_x_\d+", "L", text)
            lines.append(re.sub(r"0x[0-9a-f]+", "IMM", text))
    return lines


def dump(tree: Path, cases: dict, raw: bool = False) -> dict[str, list]:
    """Per kind ("gemm", "decode"), the SASS of each case compiled in `tree`: normalized instruction lists, or
    with `raw` nvdisasm's text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _DUMP, str(tree), json.dumps(cases)], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"compiling in {tree} failed:\n{done.stderr[-3000:]}")
    texts = json.loads(done.stdout)
    return texts if raw else {kind: [normalize(text) for text in by_kind] for kind, by_kind in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="git revision to compare this tree against")
    parser.add_argument("--gemm", type=int, nargs="*", help="indices into CASES (default: all)")
    parser.add_argument("--decode", type=int, nargs="*", help="indices into DECODE_CASES (default: all)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
    os.environ.pop("TRITON_INTERPRET", None)
    from test_kernels_compile import CASES, DECODE_CASES

    picked = {"gemm": args.gemm if args.gemm is not None else range(len(CASES)),
              "decode": args.decode if args.decode is not None else range(len(DECODE_CASES))}
    cases = {"gemm": [CASES[i] for i in picked["gemm"]], "decode": [DECODE_CASES[i] for i in picked["decode"]]}
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.revision, "src", "tests/compile_kernels.py"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        before, after = dump(Path(old), cases), dump(ROOT, cases)
    for kind in ("gemm", "decode"):
        for index, a, b in zip(picked[kind], before[kind], after[kind], strict=True):
            changed = sum(1 for line in difflib.ndiff(a, b) if line[:1] in "+-")
            print(f"{kind} case {index}: {len(a)} -> {len(b)} instructions, {changed} lines differ")


if __name__ == "__main__":
    main()
