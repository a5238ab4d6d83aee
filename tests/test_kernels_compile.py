"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU.

The interpreter used by the other CPU tests runs kernels as Python and accepts code the compiler rejects
(module globals, loop-local constexprs). This compiles them through to PTX (tests/compile_kernels.py, in a
process without TRITON_INTERPRET) and checks what the matrix products became, that weight loads are
pipelined (cp.async) and that nothing spills to local memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    # decode GEMM1, int4 g128, BLOCK_M 16: mma.sync
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync"),
    # GEMM2 with zero points, act-order and g32 groups at BLOCK_M 64: wgmma
    dict(sm=90, gated=False, bits=4, zp=True, perm=True, group_in_tile=32, block_m=64, block_n=64, warps=4,
         mma="wgmma.mma_async"),
    # prefill GEMM1, int8 g64, 128x128 tiles
    dict(sm=90, gated=True, bits=8, zp=True, perm=False, group_in_tile=64, block_m=128, block_n=128, warps=8,
         mma="wgmma.mma_async"),
    # Ampere
    dict(sm=80, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=64, block_n=64, warps=4,
         mma="mma.sync"),
]


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script), json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"sm{c['sm']}-{c['mma']}-bm{c['block_m']}" for c in CASES])
def test_gemm_compiles(compiled: dict, index: int) -> None:
    facts = compiled["gemm"][index]
    assert facts[CASES[index]["mma"]] > 0
    assert facts["cp.async"] > 0  # weight tiles are software-pipelined
    assert facts[".local"] == 0  # no spills to local memory


def test_align_compiles(compiled: dict) -> None:
    assert compiled["align"]["bar.sync"] > 0  # the barrier between the kernel's phases survived
