"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU.

The interpreter used by the other CPU tests runs kernels as Python and accepts code the compiler rejects
(module globals, loop-local constexprs). This compiles them through to PTX (tests/compile_kernels.py, in a
process without TRITON_INTERPRET) and checks what the matrix products became, that weight loads are
pipelined (cp.async) and that nothing spills to local memory; for the PTX-dequantization cases, that the main
loop's SASS has no per-weight int -> float conversion and stays within an instruction budget (a performance
regression that CPU CI can see).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wna16moe.kernels.moe_gemm_decode import ring_bytes
from wna16moe.kernels.moe_gemm_ws import ws_extra_bytes

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
    # PTX dequantization (kernels/dequant.py), through ptxas: decode int4 bf16, fp16 int8 with zero points,
    # int8 bf16 at BLOCK_M 128 (wgmma per slot), and Ampere
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, loop_budget=390),
    dict(sm=90, gated=False, bits=8, zp=True, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, dtype="fp16", loop_budget=265),
    # (without swap-AB this tile spills: ptxas stores ~46 registers per K tile; swap-AB below does not)
    dict(sm=90, gated=True, bits=8, zp=False, perm=False, group_in_tile=128, block_m=128, block_n=128, warps=8,
         stages=3, mma="wgmma.mma_async", fast=True, loop_budget=1240, spills=True),
    dict(sm=80, gated=False, bits=4, zp=True, perm=True, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, dtype="fp16", loop_budget=340),
    # decode GEMM2 128 wide with registers capped at 96 (one more program per SM): no spills in the loop
    dict(sm=90, gated=False, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=128, warps=4,
         mma="mma.sync", fast=True, maxnreg=96, loop_budget=395),
    # groups smaller than the tile: weights scaled in the asm (int4 g32 bf16, int8 g64 fp16 with zero points)
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=32, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, loop_budget=500),
    dict(sm=80, gated=False, bits=8, zp=True, perm=False, group_in_tile=64, block_m=32, block_n=64, warps=4,
         mma="mma.sync", fast=True, dtype="fp16", loop_budget=490),
    # swap-AB prefill tiles: the dequantized weights are wgmma's register A operand, never stored to shared
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=128, block_n=128, warps=8,
         stages=3, mma="wgmma.mma_async", fast=True, swap=True, loop_budget=550),
    dict(sm=90, gated=True, bits=4, zp=True, perm=False, group_in_tile=32, block_m=128, block_n=128, warps=8,
         stages=3, mma="wgmma.mma_async", fast=True, swap=True, loop_budget=700),
    # a block that multiplies only its first 64 or 32 rows when its real rows fit (one loop per size)
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=128, block_n=128, warps=8,
         stages=3, mma="wgmma.mma_async", fast=True, swap=True, loop_budget=550, shrink=2),
    # launched as a programmatic dependent: it waits before its first load; it lets the next kernel launch
    # after its loop (pdl 1) or right after its wait (2)
    dict(sm=90, gated=False, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, loop_budget=390, pdl=1),
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, loop_budget=390, pdl=2),
    # ... with its blocks found in the ids (kernels/token_blocks.py)
    dict(sm=90, gated=True, bits=4, zp=False, perm=False, group_in_tile=128, block_m=16, block_n=64, warps=4,
         mma="mma.sync", fast=True, loop_budget=390, pdl=2, id_blocks=2),
]


# The Gluon decode GEMM (kernels/moe_gemm_decode.py): loop budgets as for CASES (the v26 kernel + ~10%; groups of
# 32 and 64, and rows not in 16-byte pieces, the v30 kernel + ~10%), per K tile. `k`, the reduction length (default
# GROUPED_FROM_K), picks the program order (`moe_gemm.group_m`): narrow blocks below it keep the decode order.
DECODE_CASES = [
    # one token per block (M = 1): GEMM1 int4 g128 bf16, the K-split GEMM1 with zero points, a 2-deep ring
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=True,
         loop_budget=335),
    dict(gated=True, bits=4, zp=True, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=True, split_k=2,
         loop_budget=370),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=128, warps=4, pair=True, stages=2,
         loop_budget=535),
    # GEMM2: aligned blocks of 16, 256 wide; g32 groups (and with zero points); act-order; int8 (bf16: the offset
    # in the asm; fp16: raw)
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=16, block_n=256, warps=4, pair=False,
         loop_budget=705, k=768),
    dict(gated=False, bits=4, zp=False, perm=False, group=32, block_m=8, block_n=64, warps=4, pair=False,
         loop_budget=285),
    dict(gated=False, bits=4, zp=True, perm=False, group=32, block_m=16, block_n=128, warps=4, pair=False,
         loop_budget=615),
    dict(gated=False, bits=4, zp=True, perm=True, group=128, block_m=8, block_n=64, warps=4, pair=False,
         loop_budget=395),
    dict(gated=False, bits=8, zp=False, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=False,
         loop_budget=195),
    dict(gated=True, bits=8, zp=True, perm=False, group=64, block_m=8, block_n=64, warps=4, pair=True, dtype="fp16",
         loop_budget=425),
    # Wide blocks (activations through shared memory, weights scaled in the asm): GEMM1 32 rows; GEMM2 64 rows
    # 128 wide; g32 with zero points; act-order (the gathered columns stored from registers); 8 warps; int8
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=450),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=64, block_n=128, warps=4, pair=False,
         loop_budget=535),
    dict(gated=True, bits=4, zp=True, perm=False, group=32, block_m=64, block_n=64, warps=4, pair=False,
         loop_budget=670),
    dict(gated=False, bits=4, zp=True, perm=True, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=390),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=64, block_n=128, warps=8, pair=False,
         loop_budget=535),
    dict(gated=True, bits=8, zp=False, perm=False, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=505),
    # Rows not in whole 16-byte pieces (cp.async moves 4, 8 or 16 bytes): scale and zero-point rows, and a wide
    # block's activations, through registers
    dict(gated=False, bits=4, zp=True, perm=False, group=32, block_m=8, block_n=64, warps=4, pair=False,
         aligned=False, loop_budget=335),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=64, warps=4, pair=False,
         aligned=False, loop_budget=500),
    # Ampere
    dict(sm=80, gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=True,
         loop_budget=330),
    # Programmatic dependent launch (kernels/grid_dependence.py): GEMM2 copies its first weight tiles before it
    # waits (their activations after it), wide blocks too; GEMM1 waits first.
    # It lets the next kernel launch after its loop (pdl 1) or right after its wait (2).
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=16, block_n=256, warps=4, pair=False,
         loop_budget=705, pdl=1, prefetch=True),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=256, warps=4, pair=False,
         loop_budget=705, pdl=2, prefetch=True),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=True,
         loop_budget=335, pdl=1, prefetch=False),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=64, warps=4, pair=True,
         loop_budget=335, pdl=2, prefetch=False),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=450, pdl=1, prefetch=True),
    # The program timeline (`moe_gemm(trace=...)`, benchmarks/program_timeline.py) on deepseek-v3 M = 1's GEMM1 (K
    # split 4, waiting first) and GEMM2 (copying weights before it waits): the loop as without it
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=128, warps=4, pair=True, stages=2,
         split_k=4, loop_budget=395, pdl=2, prefetch=False, trace=True),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=256, warps=4, pair=True, stages=2,
         split_k=2, loop_budget=410, pdl=2, prefetch=True, trace=True),
    # Persistent narrow blocks (`persistent`): one ring through every item of the program, each item's epilogue
    # between its last tile and the next item's first (GEMM1 8 x 128 at 2 stages, GEMM2 8 x 256 prefetching)
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=128, warps=4, pair=False, stages=2,
         loop_budget=860, pdl=1, prefetch=False, persistent=True),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=256, warps=4, pair=False,
         stages=2, loop_budget=880, pdl=2, prefetch=True, persistent=True),
    # Blocks found in the ids (pair=2, kernels/token_blocks.py; qwen3-30b-a3b M = 8's entries): GEMM1 8 x 128 at 2
    # stages, waiting first; GEMM2 8 x 256 copying weights before it waits; a 32-row wgmma block (kimi-k2 M = 8)
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=128, warps=4, pair=2, stages=2,
         loop_budget=535, pdl=2, prefetch=False),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=8, block_n=256, warps=4, pair=2, stages=2,
         loop_budget=705, pdl=2, prefetch=True),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=128, warps=4, pair=2,
         loop_budget=890, wgmma=True, shrunk_budget=720),
    # Wide blocks on Hopper's warpgroup mmas (wgmma): 32 rows 128 wide, GEMM2 256 wide, 64 rows at 8 warps with
    # g32 groups, int8, act-order with zero points (their 8- and 16-row loops scale a tile's products once, half
    # after half: `shrunk_budget`, the longest of those loops; 808 instructions scaled in the asm, 688 so).
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=128, warps=4, pair=False,
         loop_budget=890, wgmma=True, shrunk_budget=720),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=256, warps=4, pair=False,
         loop_budget=880, wgmma=True),
    dict(gated=True, bits=4, zp=False, perm=False, group=32, block_m=64, block_n=128, warps=8, pair=False,
         loop_budget=490, wgmma=True),
    dict(gated=True, bits=8, zp=False, perm=False, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=525, wgmma=True),
    dict(gated=False, bits=4, zp=True, perm=True, group=128, block_m=32, block_n=64, warps=4, pair=False,
         loop_budget=430, wgmma=True),
    # 128 rows at 8 warps (prefill): twice the rows per dequantized weight of the 64-row blocks
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=128, warps=8, pair=False,
         stages=3, loop_budget=425, wgmma=True),
    # ... with rows off 16 bytes (activations stored into the unrolled stages from registers)
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=128, warps=8, pair=False,
         stages=3, aligned=False, loop_budget=440, wgmma=True),
    # ... and at 4 warps, 2 stages (82 KB of shared memory, 255 registers: two programs per SM)
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=64, warps=4, pair=False,
         stages=2, loop_budget=440, wgmma=True),
    # ... and int8 (W8A16's prefill entries), its rings indexed at run time (unrolled, the 128-row loops spilled):
    # GEMM1 128 x 128 and GEMM2 128 x 256 at 8 warps, 3 stages; GEMM1 64 wide at 4 warps, 2 stages (453 / 471 / 465
    # instructions per tile since int8 + bf16 dequantizes in two halves from paired words, v68; 672 / 670 / 709
    # before)
    dict(gated=True, bits=8, zp=False, perm=False, group=128, block_m=128, block_n=128, warps=8, pair=False,
         stages=3, loop_budget=500, wgmma=True),
    dict(gated=False, bits=8, zp=False, perm=False, group=128, block_m=128, block_n=256, warps=8, pair=False,
         stages=3, loop_budget=520, wgmma=True),
    dict(gated=True, bits=8, zp=False, perm=False, group=128, block_m=128, block_n=64, warps=4, pair=False,
         stages=2, loop_budget=515, wgmma=True),
    # GEMM2 on 128 x 256 blocks (the prefill entries', v39) at 3 stages: no spill in its loops. (At 4, deepseek-v3's
    # entry, ptxas spills 2 words per 4-tile iteration of the 128-row loop, as GEMM1 at 4 stages does.)
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=256, warps=8, pair=False,
         stages=3, loop_budget=425, wgmma=True),
    # ... and 128 x 128 at one warpgroup, 2 stages (`num_warps2`, `num_stages2`: 82 KB, two programs per SM)
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=128, warps=4, pair=False,
         stages=2, loop_budget=430, wgmma=True),
    # Blocks of 48, 96 and 144 rows: their 32 + 16, 64 + 32 and 128 + 16 loops multiply one tile's slots into two
    # accumulators (GEMM1 48 x 64 at 4 warps, 171 registers, 521 instructions per tile against the 32-row block's
    # 417; GEMM2 96 x 256 at 8 warps, 2 stages, 449; GEMM1 144 x 128 at 8 warps, 2 stages, 488 against the 128-row
    # block's 369); the ring holds the block's rows in two buffers (v80; 64, 128 and 256 rows before). A 144-row
    # block's other loops are a 128-row block's, unrolled (v86: its longest, the 128-row loop, as the 128-row
    # block's)
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=48, block_n=64, warps=4, pair=False,
         loop_budget=575, wgmma=True),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=96, block_n=256, warps=8, pair=False,
         stages=2, loop_budget=495, wgmma=True),
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=144, block_n=128, warps=8, pair=False,
         stages=2, loop_budget=540, wgmma=True),
    # A 128-row block's 65-96 live rows run that 64 + 32 loop too, with blocks found in the ids as well (pair=2:
    # 65-96 tokens routed to as many experts or more), its last rows' pairs from the ids as the first ones'
    dict(gated=True, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=128, warps=8, pair=2,
         stages=3, loop_budget=540, wgmma=True),
    # GEMM2 leaving each tile's last mmas in flight (`carry`): 128 x 256 at 3 stages (since the 16-byte word loads,
    # v48, ptxas stores one word per 3-tile iteration there; carry is a search move, in no shipped entry), 32 x 256
    # at 4 warps, int8
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=256, warps=8, pair=False,
         stages=3, loop_budget=425, wgmma=True, carry=1, loop_spills=1),
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=32, block_n=256, warps=4, pair=False,
         stages=3, loop_budget=880, wgmma=True, carry=2),
    dict(gated=False, bits=8, zp=True, perm=False, group=128, block_m=64, block_n=256, warps=8, pair=False,
         stages=3, loop_budget=580, wgmma=True, carry=1),  # (526 per tile; 692 before v68)
]


# The warp-specialized GEMM2 (kernels/moe_gemm_ws.py, `warps`: its first warpgroup's): 128 x 256 int4 at 4 stages
# (the prefill entries' tile), int8 with zero points at 3, int4 g32 with zero points 128 wide.
SPECIALIZED_CASES = [
    dict(gated=False, bits=4, zp=False, perm=False, group=128, block_m=128, block_n=256, warps=4, pair=False,
         stages=4, wgmma=True, specialize=True),
    dict(gated=False, bits=8, zp=True, perm=False, group=128, block_m=128, block_n=256, warps=4, pair=False,
         stages=3, wgmma=True, specialize=True),
    dict(gated=False, bits=4, zp=True, perm=False, group=32, block_m=128, block_n=128, warps=4, pair=False,
         stages=4, wgmma=True, specialize=True),
]


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script), json.dumps({"gemm": CASES, "decode": DECODE_CASES,
                                                                    "specialized": SPECIALIZED_CASES})], env=env,
                          capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


CASE_IDS = [f"sm{c['sm']}-{c['mma']}-bm{c['block_m']}" + ("-fast" if c.get("fast") else "")
            + ("-swap" if c.get("swap") else "") + (f"-shrink{c['shrink']}" if c.get("shrink") else "")
            + ("-ids" if c.get("id_blocks") else "") for c in CASES]


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_gemm_compiles(compiled: dict, index: int) -> None:
    facts = compiled["gemm"][index]
    assert facts[CASES[index]["mma"]] > 0
    assert facts["cp.async"] > 0  # weight tiles are software-pipelined
    # A programmatic dependent reads nothing before it waits, and lets the next kernel launch once its loop is
    # done; without the flag there is neither.
    if CASES[index].get("pdl"):
        assert (facts["loads_before_wait"], facts["copies_before_wait"]) == (0, 0), facts
        assert facts["release_after_wait"], facts
        assert (facts["mma_after_release"] == 0) == (CASES[index]["pdl"] == 1), facts
    else:
        assert (facts["copies_before_wait"], facts["mma_after_release"]) == (-1, -1), facts
    assert facts[".local"] == 0  # no spills to local memory
    if CASES[index].get("swap"):
        assert facts["loop_STS"] == 0, facts  # the dequantized weights stay in registers
    if CASES[index].get("shrink"):  # as many MMAs per loop as its twin without shrink, in shrink + 1 loops
        twin = CASES.index({k: v for k, v in CASES[index].items() if k != "shrink"})
        mma = CASES[index]["mma"]
        assert facts[mma] == (CASES[index]["shrink"] + 1) * compiled["gemm"][twin][mma], facts
    if CASES[index].get("fast"):
        converts = facts["cvt.rn.bf16.s32"] + facts["cvt.rn.f16.s32"]
        # The codes become floats by exponent tricks, not by quarter-rate int -> float conversions (I2F): what
        # is left in the loop converts zero points, one per column and group, not one per weight.
        assert converts == 0 and facts["lop3.b32"] + facts["prmt.b32"] > 0
        assert facts["loop_I2F"] <= 16, facts
        assert CASES[index].get("spills") or facts["loop_STL"] == 0, facts  # nor spills by ptxas in the loop
        # Instructions per thread in one K tile of the main loop (SASS): the budget is the count measured when
        # the loop last got faster (benchmarks/NOTES.md v5-v12) plus ~10%; growing past it needs a reason there.
        assert facts["loop_instructions"] <= CASES[index]["loop_budget"], facts


@pytest.mark.parametrize("index", range(len(DECODE_CASES)))
def test_decode_gemm_compiles(compiled: dict, index: int) -> None:
    case = DECODE_CASES[index]
    facts = compiled["decode"][index]
    wgmma = case.get("wgmma", False)
    # (wide blocks on wgmma: no mma.sync at all)
    assert facts["wgmma.mma_async" if wgmma else "mma.sync"] > 0 and not (wgmma and facts["mma.sync"]), facts
    assert facts["cp.async"] > 0, facts  # the words through the cp.async ring, the kernel's only shared memory
    # (what `moe_gemm` checks against the GPU's limit before a launch)
    assert facts["shared"] == ring_bytes(case["bits"], case["gated"], case["zp"], min(case["group"], 128),
                                         case["block_m"], case["block_n"], case.get("stages", 3)), facts
    assert facts[".local"] == 0 and facts["loop_STL"] <= case.get("loop_spills", 0), facts
    assert facts["cvt.rn.bf16.s32"] + facts["cvt.rn.f16.s32"] == 0 and facts["loop_I2F"] <= 16, facts
    assert facts["loop_instructions"] <= case["loop_budget"], facts
    assert (facts["globaltimer"] > 0) == bool(case.get("trace")), facts
    if not case.get("pdl"):
        assert (facts["copies_before_wait"], facts["mma_after_release"]) == (-1, -1), facts
    else:
        if case["prefetch"]:  # GEMM2's first weight tiles are in flight before it waits
            assert facts["copies_before_wait"] > 0, facts
        else:  # nothing read before the wait
            assert (facts["loads_before_wait"], facts["copies_before_wait"]) == (0, 0), facts
        assert facts["release_after_wait"], facts
        if case["block_m"] < 32:  # (a wide block holds a loop per row count, each releasing after its own)
            assert (facts["mma_after_release"] == 0) == (case["pdl"] == 1), facts
    # 64- and 128-row wgmma blocks' results leave 16 bytes per thread (`_store_layout`): 16-byte stores out of
    # GEMM1, 4-wide atomics out of GEMM2; every other block stores and adds one element at a time
    wide_out = wgmma and case["block_m"] >= 64
    assert (facts["st.global.v4"] > 0) == (wide_out and case["gated"]), facts
    assert (facts["add.v4.f32"] > 0) == (wide_out and not case["gated"]), facts
    halves = 2 if case["gated"] else 1
    # (48 and 96 rows: the longest loop, past 32 or 64 rows, multiplies each step into two accumulators)
    split = case["block_m"] in (48, 96, 144)
    # A 128-row wgmma block (and a 144-row one, up to 128 live rows) multiplies 65-96 live rows in the 96-row
    # block's 64 + 32 loop (no carry there), its ring indexed: where the 128-row loop is indexed too (int8) that
    # loop is the longer one. A 144-row block's loops up to 128 rows are a 128-row block's, its split loop indexed.
    unrolled = case["block_m"] < 32 or (case["block_m"] in (128, 144) and case["bits"] == 4)
    mid_loop = wgmma and case["block_m"] in (128, 144) and not case.get("carry")
    if wgmma:  # one m64 wgmma per 16-deep step, half and 64 columns of the program's warpgroup, all in the loop
        per_loop = halves * 8 * case["block_n"] // (16 * case["warps"])
        longest_split = (split or mid_loop) and not unrolled
        assert facts["loop_HGMMA"] == per_loop * (1 + longest_split) and facts["loop_HMMA"] == 0, facts
        # all of a tile's wgmmas in flight, one wait at its end (post-scaled shrunk loops: one per half); with
        # `carry` one more, before the tile's dequantization, for the last tile's (ptxas, where it serializes
        # the mmas, C7513 / C7515, waits after each)
        if case.get("carry"):
            assert facts["loop_wgmma_waits"] == 2, facts
        else:
            assert 1 <= facts["loop_wgmma_waits"] <= halves, facts
        if "shrunk_budget" in case:
            assert facts["shrunk_loop_instructions"] <= case["shrunk_budget"], facts
    # A narrow block's loop and a 128-row int4 block's, unrolled by the ring's depth, have the ring's barrier and no
    # other (their stages are buffers of their own); other wide blocks' rings are indexed at run time: one
    # barrier more, and one more where registers store into them (act-order activations, rows off 16 bytes).
    if wgmma:
        # one per row count the block can shrink to, 8 to 32, 64 or 128 rows (unrolled: one per stage), and the
        # split loop and a 128-row block's 96-row loop (both indexed), twice each
        copies = case.get("stages", 3) if unrolled else 1
        loops = (case["block_m"].bit_length() - 3) * copies + 2 * split + 2 * mid_loop
        assert facts["wgmma.mma_async"] == loops * per_loop, facts
    stores = case["perm"] or not case.get("aligned", True)
    # (a persistent GEMM1 parks the sums of an item it shares once per program, behind a barrier of its own)
    parks = case.get("persistent", False) and case["gated"]
    assert facts["loop_BAR"] == (1 + parks if unrolled else 3 if stores else 2), facts
    if wgmma:
        return
    if case["pair"] != 1:  # every mma of the tile is in the loop (with one pair per block ptxas drops 7 rows)
        assert facts["loop_HMMA"] >= halves * 8 * case["block_m"] // 8 * case["block_n"] // (16 * case["warps"]), facts
    if case["block_m"] >= 32:  # wide blocks read the activations from shared memory as MMA operands
        assert facts["loop_LDSM"] > 0, facts
        # and hold one loop per row count they can shrink to (8, 16, ... BLOCK_M), each with all its mmas
        rows = [8 << i for i in range(case["block_m"].bit_length() - 3)]
        per_8_rows = (2 if case["gated"] else 1) * 8 * case["block_n"] // (16 * case["warps"])
        assert facts["mma.sync"] == sum(per_8_rows * r // 8 for r in rows), (rows, facts)


def test_align_compiles(compiled: dict) -> None:
    one_program = compiled["align"]["one_program"]
    assert one_program["bar.sync"] > 0  # the barrier between the counters' clear and the ranks survived
    assert one_program["atom"] > 0  # ranks (and the counters' clear) by atomics returning values
    cooperative = compiled["align"]["cooperative"]
    assert cooperative["atom"] > 0  # ranks, and the arrivals and departures of the grid-wide barrier
    for kernel in ("one_program", "cooperative", "place"):  # as programmatic dependents: they wait before the ids
        assert compiled["align"][kernel]["loads_before_wait"] == 0, compiled["align"]


@pytest.mark.parametrize("index", range(len(SPECIALIZED_CASES)),
                         ids=[f"int{c['bits']}-g{c['group']}-{c['block_n']}-wide" for c in SPECIALIZED_CASES])
def test_warp_specialized_gemm2_compiles(compiled: dict, index: int) -> None:
    case = SPECIALIZED_CASES[index]
    facts = compiled["specialized"][index]
    # Each warpgroup's copies land on mbarriers, and it waits on them (no CTA barrier between the warpgroups).
    assert facts["cp.async.mbarrier.arrive.noinc"] > 0 and facts["mbarrier.try_wait"] > 0, facts
    # Two m64k16 mmas per 16 reduction rows of a warpgroup's 128 columns (one for 64), in both row counts' loops
    # and both warpgroups; one wait per tile in each of those four loops. Where ptxas runs short of registers it
    # serializes them (C7511: 12 warps get 168 registers a thread) and waits after every one.
    per_step = case["block_n"] // 2 // 64
    assert facts["HGMMA"] == 2 * 2 * (128 // 16) * per_step, facts
    assert facts["wgmma_waits"] == 4, facts
    # (what `moe_gemm` checks against the GPU's limit before a launch: an upper bound within 16 bytes)
    expected = (ring_bytes(case["bits"], False, case["zp"], min(case["group"], 128), 128, case["block_n"],
                           case["stages"]) + ws_extra_bytes(case["block_n"], case["stages"]))
    assert expected - 16 <= facts["shared"] <= expected, facts


@pytest.mark.parametrize("variant", ["softmax", "grouped", "grouped-uneven"])
def test_route_compiles(compiled: dict, variant: str) -> None:
    facts = compiled["route"][variant]
    # a programmatic dependent: nothing read before its wait; no early release (the layer's GEMM1 launches as
    # it ends)
    assert facts["loads_before_wait"] == 0 and facts["mma_after_release"] == -1, facts
    # one warp at one token: its reductions stay in the warp (no CTA barrier, no shared memory), nothing spilled
    assert facts["bar.sync"] == 0 and facts["shared"] == 0 and facts[".local"] == 0, facts


def test_activation_pass_releases_where_told(compiled: dict) -> None:
    at_wait, early = compiled["activation"]["2"], compiled["activation"]["3"]
    # nothing read before the wait either way (GEMM1's partial sums are the previous grid's output), one release
    for facts in (at_wait, early):
        assert facts["loads_before_wait"] == 0 and facts["releases"] == 1, compiled["activation"]
    # released at the wait (2), or before it (3: GEMM2 launches beside GEMM1)
    assert at_wait["release_after_wait"] and not at_wait["release_before_wait"], at_wait
    assert early["release_before_wait"] and not early["release_after_wait"], early
