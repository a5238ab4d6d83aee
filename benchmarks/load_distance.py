"""How far ahead of its first use the main loop issues each global load, in SASS, on the CPU.

A load issued for the next tile hides its latency only if nothing touches its register until then. v30 found
ptxas packing a constant into the upper half of a register whose lower half was a scale row still in flight,
75 instructions after the load in an 824-instruction loop: kimi-k2's decode loop waited there for 14% of its
samples (benchmarks/NOTES.md v30). This compiles compile-check cases of `tests/test_kernels_compile.py` (as
`sass_diff.py` does) and lists, per case, the main loop's global loads whose register is touched soonest,
counting instructions forward and around the loop:

    python benchmarks/load_distance.py --decode 3 4 --gemm 4     # the five nearest uses per case
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from sass_diff import dump

ROOT = Path(__file__).resolve().parent.parent


def _registers(instruction: str) -> set[int]:
    found = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", instruction):
        found.add(int(m.group(1)))
        if m.group(2):  # a 64-bit operand also names the next register
            found.add(int(m.group(1)) + 1)
    return found


def load_distances(loop: list[str]) -> list[tuple[int, str, str]]:
    """(instructions until the destination register is next read or written, the load, that instruction) for
    every global load into registers in `loop`, nearest first; cp.async copies (LDGSTS) write no register."""
    found = []
    for i, text in enumerate(loop):
        load = re.search(r"\bLDG(?!STS|DEPBAR)\S*\s+R(\d+)", text)
        if not load:
            continue
        register = int(load.group(1))
        for step in range(1, len(loop) + 1):
            user = loop[(i + step) % len(loop)]
            if register in _registers(user):
                found.append((step, text, user))
                break
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemm", type=int, nargs="*", default=[], help="indices into CASES")
    parser.add_argument("--decode", type=int, nargs="*", default=[], help="indices into DECODE_CASES")
    parser.add_argument("--show", type=int, default=5, help="loads listed per case")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
    os.environ.pop("TRITON_INTERPRET", None)
    from compile_kernels import loop_instructions
    from test_kernels_compile import CASES, DECODE_CASES

    cases = {"gemm": [CASES[i] for i in args.gemm], "decode": [DECODE_CASES[i] for i in args.decode]}
    texts = dump(ROOT, cases, raw=True)
    for kind, picked in (("gemm", args.gemm), ("decode", args.decode)):
        for index, sass in zip(picked, texts[kind], strict=True):
            loop = loop_instructions(sass)
            distances = load_distances(loop)
            print(f"{kind} case {index}: {len(loop)} instructions in the loop, {len(distances)} global loads")
            for step, load, user in distances[: args.show]:
                print(f"  {step:5d}  {load[:60]:60s} -> {user[:60]}")


if __name__ == "__main__":
    main()
