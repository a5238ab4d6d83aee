"""Registers of every shipped H200 entry's two decode-kernel launches against the occupancy steps, on the CPU.

ptxas spends registers freely below 255, so a kernel change that adds a live value or two can take a kernel past
the count at which one more program fits an SM, with nothing to see in its instruction counts: the paired int8
words took the W8A16 32-row GEMM2 from 168 to 174 registers, three 4-warp programs per SM to two, and 8-11%
slower (benchmarks/NOTES.md v69). This compiles each entry's GEMM1 and GEMM2 for sm_90 as `tests/compile_kernels.py`
does (bf16 activations, no zero points), reads registers and shared memory, and prints the programs per SM each
allows. Rows marked "<-" sit at most `--within` registers above the next step that shared memory and warps would
allow: candidates for a `max_registers` trial (`benchmarks/try_configs.py --variant max_registers=N`). Local loads and
stores in a kernel's longest loop (spills that every tile of it pays) are printed too: at 255 registers a 144-row
block's unrolled 128-row loop took two local loads per tile that the 128-row block's does not have (NOTES.md v87).
Where loops index the ring (int8), the longest is a 144-row block's 128 + 16 loop.

    python benchmarks/register_audit.py [--within 16] [--keys mixtral ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED_PER_SM = 233472  # sm_90: 228 KB, of which 1 KB is reserved per program
WARPS_PER_SM = 64


def launches(key: str, m: int, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """`compile_kernels.compile_decode_gemm` cases of an entry's GEMM1 and GEMM2 at M = m."""
    scheme, _, _, experts, top_k = key.split()
    # Blocks straight from the ids where a block holds every token and pairs do not outnumber experts
    # (`TritonExperts.apply`): ID_BLOCKS 1 for one token (a block per pair), 2 for more.
    from_ids = m <= entry["block_m"] and m * int(top_k[2:]) <= int(experts[2:])
    common = dict(bits=int(scheme[3]), zp=False, perm=False, group=int(scheme.split("_g")[1]),
                  block_m=entry["block_m"], wgmma=entry["wgmma"], pdl=entry["pdl"],
                  persistent=entry["persistent"] > 0, pair=(1 if m == 1 else 2) if from_ids else 0)
    if entry["max_registers"]:
        common["maxnreg"] = entry["max_registers"]
    gemm1 = dict(common, gated=True, block_n=entry["block_n1"], warps=entry["num_warps"],
                 stages=entry["num_stages"], split_k=entry["split_k1"])
    gemm2 = dict(common, gated=False, block_n=entry["block_n2"], warps=entry["num_warps2"] or entry["num_warps"],
                 stages=entry["num_stages2"] or entry["num_stages"], split_k=entry["split_k2"], carry=entry["carry"])
    return [gemm1] if entry["specialize"] else [gemm1, gemm2]  # (a specialized GEMM2 is another kernel)


def local_accesses(loop: list[str]) -> dict[str, int]:
    """Local (spill) loads and stores among a loop's SASS instructions, predicated ones too."""
    opcodes = [ins.split()[1 if ins.startswith("@") else 0].split(".")[0] for ins in loop]
    return {op: opcodes.count(op) for op in ("LDL", "STL")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--within", type=int, default=16, help="registers above a step to mark (default 16)")
    parser.add_argument("--keys", nargs="*", default=[], help="only table keys holding one of these strings")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
    os.environ.pop("TRITON_INTERPRET", None)  # (before triton decides how to run the kernels)
    import compile_kernels
    import triton

    from wna16moe.experts.triton import REGISTERS_PER_SM, registers_for_programs

    cubins: list[bytes] = []
    original = triton.compile

    def capture(*a: Any, **k: Any) -> Any:
        kernel = original(*a, **k)
        cubins.append(kernel.asm["cubin"])
        return kernel

    compile_kernels.triton.compile = capture
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    table = json.loads((ROOT / "src/wna16moe/tuned_triton.json").read_text())["cards"]["NVIDIA H200"]
    for key, entries in table.items():
        if args.keys and not any(part in key for part in args.keys):
            continue
        for m, entry in sorted(entries.items(), key=lambda item: int(item[0])):
            for gemm, case in enumerate(launches(key, int(m), entry), start=1):
                shared = compile_kernels.compile_decode_gemm(case)["shared"]
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(cubins[-1])
                    f.flush()
                    usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                                           check=True).stdout
                registers = int(usage.split("REG:")[1].split()[0])
                threads = 32 * case["warps"]
                by_registers = REGISTERS_PER_SM // (math.ceil(registers / 8) * 8 * threads)
                by_other = min(SHARED_PER_SM // (shared + 1024), WARPS_PER_SM // case["warps"])
                step = registers_for_programs(by_registers + 1, case["warps"])
                near = by_registers < by_other and registers - step <= args.within
                local = local_accesses(compile_kernels.loops_by_length(compile_kernels.sass(cubins[-1]))[0])
                print(f"{key:35s} M={m:>5s} GEMM{gemm} {case['block_m']:3d} x {case['block_n']:3d} "
                      f"{case['warps']} warps {case['stages']} stages: {registers:3d} registers "
                      f"(cap {entry['max_registers']}), {shared:6d} B shared, {min(by_registers, by_other)} per SM"
                      + (f", longest loop {local['LDL']} LDL / {local['STL']} STL" if any(local.values()) else "")
                      + (f"  <- {by_registers + 1} per SM at {step}" if near else ""), flush=True)


if __name__ == "__main__":
    main()
