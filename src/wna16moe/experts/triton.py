"""TRITON and BATCHED_TRITON: our own fused W4A16/W8A16 MoE kernels (kernels/moe_align.py, kernels/moe_gemm.py).

Runs wherever Triton compiles for the GPU: NVIDIA sm80+, AMD (ROCm) and Intel XPU; on a CPU only under the
Triton interpreter (TRITON_INTERPRET=1, for tests). Forward: align the routed pairs by expert (for a few tokens
the GEMMs find their blocks in the ids instead, kernels/token_blocks.py), GEMM1 with the activation fused,
GEMM2 with the router weights and the top-k reduction fused (atomic float32 adds), cast.

Parallel layers: the kernels hold this rank's experts (E_local) and its TP shard of I (I/tp); pairs whose
local expert id is -1 (owned by another EP rank) are left out by the alignment. BATCHED_TRITON reads the
batched format [E_local, max_tokens, H]: the same grouped GEMMs over the flattened rows, where row j of
expert e is a top-1 pair of expert e when j < num_tokens[e] and left out (-1) otherwise, with unit weights.

Prepared layout (`prepare_weights`), I' = I padded to INTERMEDIATE_ALIGN, W(K) = ceil(K / 128) * 128 // PACK
words, PACK = 32 // bits:
    w13        [E, W(H), 2I'] int32       K-major, tile-interleaved (kernels/layout.py); gate columns [0, I'),
                                          up columns [I', 2I'); a tile is one coalesced load along N. On
                                          Hopper: [E, W(H) / 16, 2I', 16], fragment tiles (layout.py), words
                                          paired
    w13_scales [E, G1, 2I']               scale dtype of the checkpoint, N contiguous like the words
    w13_zeros  [E, G1, 2I'] uint8         zero-point schemes only
    w13_perm   [E, H] int32               act-order only: H in group order; hidden columns are gathered by it
    w2         [E, W(I'), H] int32, w2_scales [E, G2', H], w2_zeros, w2_perm [E, I'] likewise
Padded columns of w13 have zero scales, so the padded intermediate columns are exactly 0 and add nothing in GEMM2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wna16moe.activations import KERNEL_CODES, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT
from wna16moe.config import Activation, ActivationFormat, MoEQuantConfig
from wna16moe.device import NO_TRITON, TRITON_XPU_PROVIDER, DeviceInfo, Platform
from wna16moe.experts.base import OK, Check, Experts, LayerSpec, batched_pairs, check_tp_groups, fail
from wna16moe.kernels.layout import FRAGMENT_WORDS, TILE_K, fragment_tiles, tile_interleave, words_per_tile
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme
from wna16moe.tuning import ShapeKey, tuned_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from wna16moe.kernels.launch import PlanCache

NAME = "triton"
BATCHED_NAME = "batched_triton"
# Intermediate padding unit: every GEMM1 N tile and GEMM2 K tile we launch divides it.
INTERMEDIATE_ALIGN = 64
# Triton's wgmma/mma paths need sm80+ on NVIDIA (bf16 tensor cores).
MIN_CUDA_SM = 80
SUPPORTED_GROUPS = (32, 64, 128, 256, None)
# Persistent programs per SM that a layer's own share flags cover (the shipped entries use 2 and 3).
_FLAGGED_PROGRAMS_PER_SM = 8


# TritonConfig.pdl (kernels/grid_dependence.py): plain launches, or where each kernel lets the next one launch.
PDL_OFF, RELEASE_AFTER_LOOP, RELEASE_AT_WAIT, RELEASE_EARLY = 0, 1, 2, 3


@dataclass(frozen=True)
class TritonConfig:
    """Launch configuration of one forward: the M block shared by both GEMMs, each GEMM's N tile and K split.

    `split_k1` > 1 splits GEMM1's reduction over that many programs, which write float32 partial sums that a
    small activation pass finishes (kernels/activation.py): at decode, when experts x N tiles leave SMs idle.

    `swap_ab` computes each tile as (W^T a^T)^T in the PTX dequantization path: the dequantized weights are
    the MMA's A operand, which Hopper's wgmma reads from registers, instead of B, which it reads from shared
    memory (kernels/moe_gemm.py). It pays where wgmma runs (M blocks of 64 and more).

    `max_registers` caps the registers per thread (ptxas `.maxnreg`; None: the compiler's choice): at decode
    more programs then fit on an SM (GEMM2 at BLOCK_N 128 takes 128 registers, 4 programs of 4 warps per SM;
    capped at 96 the loop does not spill and 5 fit; SASS, NOTES.md "Open leads").

    `decode` runs both GEMMs on `kernels/moe_gemm_decode.py` (Gluon, mma.sync with the weights as A and
    blocks of `block_m` = 8, 16, 32, 64 or 128 rows as N) where the PTX dequantization runs (NVIDIA); elsewhere the
    same tiles run on `kernels/moe_gemm.py` with M blocks of at least 16. There `num_stages` (>= 2) is the depth of
    the shared-memory ring the weights come through; `swap_ab` does not apply.

    `pdl` launches each kernel of the forward as a programmatic dependent of the one before, on Hopper and
    later (kernels/grid_dependence.py): a launch and GEMM2's first weight loads overlap the previous kernel.
    Each kernel lets the next one launch once its main loop is done (RELEASE_AFTER_LOOP) or as soon as it
    has waited for the one before (RELEASE_AT_WAIT); PDL_OFF: plain launches. RELEASE_EARLY (with `split_k1`;
    without it, the same as RELEASE_AT_WAIT) also lets the activation pass launch GEMM2 before it waits for
    GEMM1, so that GEMM2's copies of its first tiles' weights (all of them where its ring is as deep as its
    split's tiles) run beside GEMM1 instead of after it.

    `shrink` (1 or 2; not with `decode`, whose wide blocks always shrink) lets an M block of `kernels/moe_gemm.py`
    multiply only its first block_m / 2 or block_m / 4 rows when its real rows fit there: an expert's last
    block is mostly padding at prefill (deepseek-v3 at M = 2048: 64 +- 8 rows per expert in blocks of 128).

    `wgmma` (with `decode` and blocks of 32 to 128 rows) multiplies the decode kernel's wide blocks with
    Hopper's warpgroup mmas instead of mma.sync: 4-10% faster at 32 rows, 9-17% at 64 rows at 8 warps where the
    H200 table runs them (benchmarks/NOTES.md v34); 128-row blocks (8 warps) are meant for it, and beat the
    Triton kernel's prefill tiles by 6-22% at M = 8192 (v37). On other cards the same blocks run mma.sync.

    `num_warps2` and `num_stages2` give GEMM2 warps and a ring depth of its own (None, as is a value equal to
    GEMM1's: GEMM1's). A 128-row GEMM2 at one warpgroup and 2 stages (82 KB, no spill in its loop) fits two
    programs per SM, so that one's ramp and epilogue can overlap the other's loop, while GEMM1 keeps its 8 warps.
    On an H200 it won where GEMM2 was 128 x 128 at 8 warps (W8A16 M = 8192 -4 to -6%, int4 mixtral M = 2048 -4
    to -5%) and gained nothing where it was 128 x 256, whose activation tiles it reads twice as often (NOTES.md
    v40).

    `persistent` (with `decode` and blocks of 8 or 16 rows) runs both GEMMs on that many programs per SM, each
    streaming an equal share of the (row block, column tile) items' K tiles through one cp.async ring, so that no
    program starts with an empty ring (small experts: qwen3-30b-a3b has 6 GEMM1 tiles per expert of 16 K tiles
    each) and none is left with more items than the others (shares split items: stream-K); 0: one program per
    block and tile. On an H200 it won at int4 qwen3-30b-a3b M = 32 (-4% as every third item, v41; -2.7% more as
    shares, v67) and lost or tied at M = 8 and 128 and on the big experts (NOTES.md v41, v66, v67).

    `carry` (with `wgmma`) lets GEMM2's wide blocks leave each K tile's last `carry` warpgroup mmas in flight
    over the next tile's barrier, copies and first dequantization, where the tensor cores otherwise wait; its
    ring then runs one tile less ahead (rings of 3 stages or more; GEMM1's two accumulators would make ptxas
    serialize every mma). 0: each tile waits for all of its mmas.

    `specialize` (with `wgmma`, GEMM2 on 128-row blocks at 8 warps, 128 or 256 wide) runs GEMM2 on
    warp-specialized programs: two warpgroups, each copying and multiplying half of the block's columns, that meet
    only on the ring's mbarriers, never at a CTA barrier (kernels/moe_gemm_ws.py).
    """

    block_m: int
    block_n1: int
    block_n2: int
    split_k2: int = 1
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False
    split_k1: int = 1
    max_registers: int | None = None
    decode: bool = False
    pdl: int = RELEASE_AFTER_LOOP
    shrink: int = 0
    wgmma: bool = False
    num_warps2: int | None = None
    num_stages2: int | None = None
    persistent: int = 0
    carry: int = 0
    specialize: bool = False

    @property
    def gemm2_warps(self) -> int:
        return self.num_warps if self.num_warps2 is None else self.num_warps2

    @property
    def gemm2_stages(self) -> int:
        return self.num_stages if self.num_stages2 is None else self.num_stages2

    def decode_tiling_error(self) -> str | None:
        """Why the decode kernel cannot run this configuration's GEMM1 or GEMM2 tiling, or None (also for
        configurations of the Triton kernel)."""
        if not self.decode:
            return None
        from wna16moe.kernels.moe_gemm_decode import tiling_error

        return (tiling_error(self.block_m, self.block_n1, self.num_warps, self.num_stages)
                or tiling_error(self.block_m, self.block_n2, self.gemm2_warps, self.gemm2_stages))

    def __post_init__(self) -> None:
        # GEMM2's own warps or depth equal to GEMM1's are GEMM1's (None): one configuration, one value.
        if self.num_warps2 == self.num_warps:
            object.__setattr__(self, "num_warps2", None)
        if self.num_stages2 == self.num_stages:
            object.__setattr__(self, "num_stages2", None)
        if self.pdl not in (PDL_OFF, RELEASE_AFTER_LOOP, RELEASE_AT_WAIT, RELEASE_EARLY):
            raise ValueError(f"pdl must be {PDL_OFF} to {RELEASE_EARLY} (kernels/grid_dependence.py), got {self.pdl}")
        if self.pdl == RELEASE_EARLY and self.split_k1 == 1:  # (no activation pass to release early)
            object.__setattr__(self, "pdl", RELEASE_AT_WAIT)
        if self.shrink not in (0, 1, 2):
            raise ValueError(f"shrink must be 0, 1 or 2, got {self.shrink}")
        if self.shrink and self.decode:
            raise ValueError("shrink applies to kernels/moe_gemm.py's blocks; the decode kernel's wide blocks "
                             "always multiply only their real rows")
        if self.persistent < 0 or (self.persistent and not (self.decode and self.block_m < 32)):
            raise ValueError(f"persistent (programs per SM) applies to the decode kernel's narrow blocks (decode, "
                             f"block_m 8 or 16), got persistent={self.persistent} decode={self.decode} "
                             f"block_m={self.block_m}")
        if self.wgmma and not (self.decode and self.block_m >= 32):
            raise ValueError(f"wgmma applies to the decode kernel's wide blocks (decode, block_m >= 32), got "
                             f"decode={self.decode} block_m={self.block_m}")
        if self.carry:
            from wna16moe.kernels.moe_gemm_decode import MAX_CARRY

            if not self.wgmma or not 0 < self.carry <= MAX_CARRY:
                raise ValueError(f"carry (GEMM2's warpgroup mmas left in flight, 0 to {MAX_CARRY}) needs wgmma, "
                                 f"got carry={self.carry} wgmma={self.wgmma}")
        if self.block_m & (self.block_m - 1) and not (self.wgmma and not self.carry):
            raise ValueError(f"blocks of rows other than a power of two (48, 96 or 144) run only on the decode "
                             f"kernel's warpgroup mmas, without carry, got block_m={self.block_m} wgmma={self.wgmma} "
                             f"carry={self.carry}")
        if self.specialize and (not self.wgmma or self.block_m != 128 or self.block_n2 not in (128, 256)
                                or self.gemm2_warps != 8 or self.carry or self.split_k2 != 1):
            raise ValueError(f"specialize runs GEMM2 on 128 x 128 or 128 x 256 wgmma blocks at 8 warps, without "
                             f"carry or K split, got wgmma={self.wgmma} block_m={self.block_m} block_n2="
                             f"{self.block_n2} GEMM2 warps={self.gemm2_warps} carry={self.carry} "
                             f"split_k2={self.split_k2}")


def default_config(num_tokens: int, top_k: int, num_experts: int, group_size: int | None,
                   hidden_size: int | None = None, intermediate_size: int | None = None,
                   num_sms: int | None = None, hopper: bool = False, bits: int = 4) -> TritonConfig:
    """Tiles by expected tokens per expert, for layers the shipped table (`wna16moe.tuning`) does not cover
    (other shapes, tensor- or expert-parallel shards, other cards): the configurations that won most often in
    the measurements of benchmarks/NOTES.md.

    On Hopper (`hopper`: sm_90 with NVIDIA PTX, where the H200 table was measured) the Gluon decode kernel
    (`decode`) runs every row count, as in every int4 entry of the H200 table (words are stored in fragment
    tiles there, paired, which the Triton kernel reads only with a second load per word: 2.2-4.5x slower at
    8 and 64-85 rows per expert, v47); int8 too (at 6 rows per expert its 8-row blocks at 2 stages were 8-15%
    faster than the Triton kernel's 16-row blocks on three shapes off the table, v48). See `_decode_default`
    for its tiles. Elsewhere the smallest M block while experts see few rows (decode streams each expert's
    weights once), larger blocks as the work turns compute-bound. Small groups (32) prefer M blocks above the
    group size, where the kernel scales weights instead of partial sums.

    At decode, GEMM2 (N = H, K = I) launches one program per touched expert and N tile: when that is too
    few to keep `num_sms` busy (mixtral: 2 experts x 64 tiles), K is split. For one token GEMM1's K is split
    in two, in four where its programs are few (qwen3-30b-a3b: 8 pairs x 12 tiles): it won at M = 1 in the
    graph-ranked H200 sweep (NOTES.md v12), by 5-18%, and every H200 entry at M = 1 on the decode kernel has it.
    """
    per_expert = num_tokens * top_k / num_experts
    if hopper:
        return _decode_default(num_tokens, top_k, num_experts, group_size, hidden_size, intermediate_size, num_sms,
                               bits)
    if per_expert <= 20:
        split, split1 = 1, 1
        if hidden_size and intermediate_size and num_sms:
            split = _gemm2_split(num_tokens, top_k, num_experts, hidden_size, intermediate_size, 64, 8 * num_sms, 4)
            split1 = _gemm1_split(num_tokens, top_k, hidden_size, intermediate_size, 64, num_sms)
        if group_size is not None and group_size < 64:
            # Small groups scale every weight pair: 256-wide GEMM2 tiles amortise the loop's fixed part over more
            # weights (kimi-k2 at M = 8-512: 0.72-0.82x -> 0.83-0.99x MARLIN, H200 v12 vs v14 sweeps).
            return TritonConfig(16, 64, 256, split_k2=split, num_warps=4, num_stages=3, split_k1=split1)
        return TritonConfig(16, 64, 64, split_k2=split, num_warps=4, num_stages=4, split_k1=split1)
    if group_size is not None and group_size < 64:
        # Small groups: M blocks of 64 scale the weights once instead of every group's partial sums.
        if per_expert <= 100:
            return TritonConfig(16, 64, 64, num_warps=4, num_stages=3)
        if per_expert <= 1024:
            return TritonConfig(64, 64, 64, num_warps=4, num_stages=3)
        return TritonConfig(64, 128, 128, num_warps=8, num_stages=3)
    if per_expert <= 1024:
        return TritonConfig(32, 128, 128, num_warps=4, num_stages=4)
    return TritonConfig(128, 128, 128, num_warps=8, num_stages=3)


# From this intermediate size (per rank), the decode defaults put 33-56 rows per expert on 128-row blocks, else on
# 64-row ones (`_decode_default`); on any layer those in ROWS_FOR_96_ROW_BLOCKS (above the first, up to the second)
# on 96-row blocks, and those above on 128-row ones.
LONG_I = 2048
ROWS_FOR_96_ROW_BLOCKS = (56, 86)
# Rows per expert above the first up to the second (int8: above the first): the decode defaults' 128-row blocks
# become 144-row ones, which take an expert's few rows past a multiple of 128 into its last block
# (`_decode_default`, NOTES.md v87, v89).
ROWS_FOR_144_ROW_BLOCKS = (107, 155)
# From these rows per expert (to 10) the int4 decode defaults take 16-row blocks (`_decode_default`).
INT4_16_ROW_FROM = 7
# Below these rows per expert (from 10), int4 at groups of 32 and 64 takes mma.sync blocks instead of the
# warpgroup-mma tile: on layers of at least `WIDE_HIDDEN` and `MANY_EXPERTS` 32-row ones, 128 / 256 wide at three
# programs per SM, elsewhere the 16-row tile (`_decode_default`).
SMALL_GROUP_MMA_BELOW = 14
WIDE_HIDDEN = 4096
MANY_EXPERTS = 128
REGISTERS_PER_SM = 65536  # sm_80 to sm_100


def registers_for_programs(programs: int, num_warps: int = 4) -> int:
    """The most registers per thread at which `programs` programs of `num_warps` warps fit an SM's register file
    (allocated per thread in steps of 8): a `max_registers` that buys one more program per SM (168 for three 4-warp
    programs, 128 for four)."""
    return REGISTERS_PER_SM // (programs * num_warps * 32) // 8 * 8


def _decode_default(num_tokens: int, top_k: int, num_experts: int, group_size: int | None, hidden_size: int | None,
                    intermediate_size: int | None, num_sms: int | None, bits: int) -> TritonConfig:
    """`default_config` on the decode kernel, from the H200 table's tilings and the v47 trials of shapes off the table.
    Below 10 rows per expert (int8: 8): 8-row blocks (int4: 16 from 7 rows, 5-13% faster at 3 of 4 shapes at 8 rows, 4%
    slower at qwen3-30b-a3b, v47; 7-17% slower than 8-row blocks at 4.5-5.5 rows, v72; int8 at 6 rows: 8 rows level with
    16 on two shapes, 13% faster on the third, v48), GEMM1 128 and GEMM2 256 wide, 2 stages for one token (its K-split
    programs are many) and 4 for more up to 4 rows (v47, three shapes off the table at M = 8: 4-13% faster than 2
    stages; level with 3 over M = 2-16) on 8-row blocks (3 at groups of 32 and 64, v72), 2 above (v72), 2 on int4's
    16-row ones, capped at three programs per SM (v71), and 2 for int8, whose tiles are twice the bytes (v47: 4 stages
    35-58% slower at M = 2-16), and int8 from 2 tokens to 4 rows per expert 64 / 128 wide (v50), GEMM2's K split to ~4
    programs per SM (8 at 128 wide: the same split); 10-32 rows (int8: 8-32, v50: 9-10% faster than 8-row blocks at 8
    rows on three shapes off the table): 32-row blocks that shrink to their rows, 64 / 128 wide, 3 stages, on Hopper's
    warpgroup mmas (v34: 4-10% faster at every such H200 entry but kimi-k2 M = 512, level; int4 at groups of 32 and 64
    below 14 rows: mma.sync, on layers from `WIDE_HIDDEN` and `MANY_EXPERTS` 128 / 256 wide, 2 stages, three programs
    per SM, elsewhere the 16-row tile, v73); above 32 rows, where an expert's rows no longer fit one 32-row block:
    64-row blocks at 8 warps, 128 / 256 wide (v47: 10-25% faster than 32-row blocks at 64-128 rows on all four shapes,
    and than 128-row blocks at three, level at the fourth; v55: 5-32% faster at 34-62 rows on all four, int4 and int8,
    but qwen3-30b-a3b int4 at 37 rows, 5% slower); above 96 rows: 128-row blocks (v55, int4: 4-21% faster than 64-row
    blocks at 100-120 rows on all four shapes; at 83-94 rows level to 22% faster on the big experts but 30% slower on
    qwen3-30b-a3b, which favours 64-row blocks up to ~106 rows, v56; int8, v56: 7-31% faster at 104-120 rows on all
    four). From 33 to 96 rows, layers whose intermediate size is at least `LONG_I` take the same tiles on 128-row blocks
    instead (v61, int4 and int8: 3-12% faster on mixtral, deepseek-v3 and kimi-k2 at 34-72 rows, level on mixtral at
    40-50 rows and on llama-4-scout; within 2% either way at I = 1408 and 1536, 4-7% slower on qwen3-30b-a3b,
    I = 768), and every layer above 56 rows up to 86 (`ROWS_FOR_96_ROW_BLOCKS`) 96-row blocks at 2 stages (v81: 5-21%
    faster than the 128-row defaults in every round at 11 int4 points on mixtral, deepseek-v3, kimi-k2, llama-4-scout
    and a 64-expert layer, and 2-12% at three W8A16 points; at 53-56 rows level, at 90-109 up to 15% slower; v82:
    6-23% faster than the 64-row defaults at 60-81 rows on qwen3-30b-a3b and glm-4.5-air, int4; v83: W8A16 11-20% at
    69 rows on both). Above 86 rows every layer takes 128-row blocks, 128 / 256 wide at 3 stages (v84: 16-25% faster
    than 64-row blocks at 91 and 95 rows on qwen3-30b-a3b and glm-4.5-air, int4 and W8A16, every round; GEMM2 128 wide
    1.4-13.6% slower than 256 wide at 87-300 rows on five shapes, every int4 round), 144-row ones on the same tiling
    above 107 rows up to 155 (`ROWS_FOR_144_ROW_BLOCKS`, v87: in both processes and every round 4-15% faster at 123
    and 130 rows on mixtral and glm-4.5-air, W8A16 8.8% at 130; 1.3-11% at 110-150 rows on glm-4.5-air and
    qwen3-235b-a22b; +1.1 and +9% at 104 rows, +1.0 to +1.6% at 160-170), and for int8 above 155 too (v89: 1-4%
    faster at 156-512 rows on glm-4.5-air, qwen3-235b-a22b and llama-4-scout in 35 of 36 rounds, the other +0.1%,
    level where no expert ends a few rows past a multiple of 128: int8's 128 + 16 loop costs nothing measurable)."""
    per_expert = num_tokens * top_k / num_experts
    if per_expert > ROWS_FOR_96_ROW_BLOCKS[1]:
        # Near 128 rows per expert about half the experts hold a few rows past a 128-row block: 144-row blocks
        # take them in the expert's one block (the alignment's extra rows), at the 128 + 16 loop's cost there
        # (int4's; int8's is too small to show, so int8 takes them wherever an expert may end past 128 rows).
        absorb = ROWS_FOR_144_ROW_BLOCKS[0] < per_expert and (bits == 8 or per_expert <= ROWS_FOR_144_ROW_BLOCKS[1])
        return TritonConfig(144 if absorb else 128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
    if per_expert > 32:
        if per_expert > ROWS_FOR_96_ROW_BLOCKS[0]:
            # Most experts' rows fit one 96-row block, where 64-row blocks take two and a 128-row block idles a
            # quarter of its rows or more; its ring (2 stages, split at 64 rows) keeps two programs per SM.
            return TritonConfig(96, 128, 256, num_warps=8, num_stages=2, decode=True, wgmma=True)
        # A 128-row block multiplies an expert's rows in its 64-row loop (up to 64 live rows) or its 128-row
        # one, both unrolled by the ring's depth (one CTA barrier per tile), and 65-96 in the 64 + 32 loop; a
        # 64-row block's loops index the ring at run time (two). Why short intermediate sizes lose with it at
        # 33-56 rows is not profiled (v61, before the 64 + 32 loop); above 86 rows they win with it (v84).
        long_i = intermediate_size is not None and intermediate_size >= LONG_I
        return TritonConfig(128 if long_i else 64, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
    small_groups = group_size is not None and group_size <= 64  # (four / two times group 128's scales per tile)
    # int4 groups of 32 and 64 at 10-13 rows per expert: the warpgroup-mma tile was slower at 29 of 31 points (v73)
    small_group_rows = bits == 4 and small_groups and 10 <= per_expert < SMALL_GROUP_MMA_BELOW
    wide_layer = (hidden_size or 0) >= WIDE_HIDDEN and num_experts >= MANY_EXPERTS
    if (per_expert >= 10 and (wide_layer or not small_group_rows)) or (bits == 8 and per_expert >= 8):
        if small_group_rows:
            # on wide layers: mma.sync 128 / 256 wide at 2 stages, capped at three programs per SM, 0.6-24% faster
            # than the warpgroup-mma tile at 10-13 rows per expert on four layers (H = 4096-7168, 128-256 experts),
            # 16 points, every round, and 2.4-9.7% at five fresh points on four more; at 14-24 rows -2.8 to +16.6%
            # (v73). Narrower layers or fewer experts take the 16-row tile below. Group 128 at 10-16 rows: -8.4 to
            # +3.5%, left on wgmma.
            return TritonConfig(32, 128, 256, num_warps=4, num_stages=2, max_registers=registers_for_programs(3),
                                decode=True)
        split = 1  # int8 on few experts: GEMM2's K split as at 2-4 rows (v64: mixtral-8x22b M = 32 -7%)
        if bits == 8 and hidden_size and intermediate_size and num_sms:
            split = _gemm2_split(num_tokens, top_k, num_experts, hidden_size, intermediate_size, 128, 16 * num_sms, 16)
        # int8 capped at three programs per SM: its paired-word GEMM2 compiles to 174 registers (197 with zero
        # points), two programs per SM (v69). Capped: 0.8-3% faster at 8 of 10 points (six shapes off the table
        # and deepseek-v3, 9-20 rows per expert), level and +1.4% at llama-4-scout's two (v69-v70); the table's
        # 32-row int8 entries gained 1-5% from it.
        registers = registers_for_programs(3) if bits == 8 else None
        return TritonConfig(32, 64, 128, split_k2=split, num_warps=4, num_stages=3, max_registers=registers,
                            decode=True, wgmma=True)
    # int8 at 2-4 rows per expert: half as wide (v50: -6 to -11% at M = 8 and 32 on three shapes off the table;
    # at one token 14% slower); from 1.5 rows per expert GEMM2's K split to ~16 programs per SM of at least 16 K
    # tiles, and a ring 3 deep where GEMM1's K is long (v64: mixtral-8x22b M = 8 / 16 and llama-4-scout M = 32 /
    # 64 10-15% faster; 3 stages 6% slower at H = 2048, the split 3% slower below 2 rows; v65 at 1.5 rows:
    # mixtral-8x22b M = 6 -16%, within 2% on two more shapes; at 1 row -3.5% to +9.8%, so not there)
    narrow = bits == 8 and num_tokens > 1 and per_expert <= 4
    long_split = narrow and per_expert >= 1.5
    block_n1, block_n2 = (64, 128) if narrow else (128, 256)
    split, split1 = 1, 1
    if hidden_size and intermediate_size and num_sms:
        target, min_tiles = (16, 16) if long_split else (8, 3) if narrow else (4, 3)
        split = _gemm2_split(num_tokens, top_k, num_experts, hidden_size, intermediate_size, block_n2,
                             target * num_sms, min_tiles)
        split1 = _gemm1_split(num_tokens, top_k, hidden_size, intermediate_size, 128, 2 * num_sms)
    stages = 2 if num_tokens == 1 or bits == 8 else 4
    if stages == 4 and small_groups:
        # groups of 32 and 64: 3 stages 5-13% (group 64: 0.6-6%) faster than 4 at 1.5-3.5 rows per expert on five
        # (four) shapes, every point and round; at group 32 4 stages 1-7% faster at three of 24 points at 0.5-1 row
        # (v72)
        stages = 3
    if long_split and (hidden_size or 0) >= 4096:
        stages = 3
    block_m, registers = 8, None
    if per_expert >= INT4_16_ROW_FROM and bits == 4:
        # int4 16-row blocks at three programs per SM: 4 stages hold two by shared memory, 2 stages uncapped two by
        # registers (178-180 at group 128). Both fields: 4-13.5% faster than 4 stages uncapped on six shapes off the
        # table at 6 and 9 rows per expert, every round; 2 stages alone +0.2 to -11%, the cap alone +1 to -4% (v71).
        # Groups of 32 and 64 keep it to 13 rows on layers below WIDE_HIDDEN or MANY_EXPERTS: 0.9-7.8% faster than the
        # warpgroup-mma tile at six points on three layers, every round, where the capped 32-row mma.sync tile was
        # -2.2 to +8.9% (v73)
        block_m, stages, registers = 16, 2, registers_for_programs(3)
    elif per_expert > 4 and bits == 4:
        # below 7 rows the 8-row tile still wins, its ring 2 deep: 7-25% faster than the 16-row tile at 4.25-6 rows
        # on seven shapes off the table, level on average at 7 (-11% to +8%); 4 stages -6 to +13% against 2, 8-13%
        # slower at group 32 (v72)
        stages = 2
    return TritonConfig(block_m, block_n1, block_n2, split_k2=split, num_warps=4, num_stages=stages, split_k1=split1,
                        max_registers=registers, decode=True)


# Rows per expert that bound a wide table entry's range between the table's rows (`entry_runs`): where the
# defaults' wide tiles change (two ranges of equal defaults, 128 x 256 at 33-56 rows on long intermediate sizes and
# above 86, stay apart), and 96, above which a 128-row block's rows mostly fill its 128-row loop, not the 64 + 32 one.
WIDE_RANGE_EDGES = (32, ROWS_FOR_96_ROW_BLOCKS[0], ROWS_FOR_96_ROW_BLOCKS[1], 96)


def entry_or_default(tuned: tuple[int, dict[str, Any]] | None, num_tokens: int,
                     defaults: Callable[[int], TritonConfig], rows_per_token: float) -> TritonConfig:
    """What runs `num_tokens` rows: the table's entry at its nearest measured M (`tuning.tuned_config`), else the
    defaults (`defaults(M)`). At an M between the table's, the entry runs only where it multiplies blocks of the
    size the defaults pick for this M (a narrow entry, 8 or 16 rows, where the defaults are narrow, of the size
    they take at the entry's own M if narrow there: v72; a wide one at the same size): rows per expert moved into
    another size's range outdate the entry's tiling. On the H200's four shapes at M = 16-4096 between its rows, this
    took the defaults at 6 of 18 points: 9-19% faster than the nearest entry at five (qwen3-30b-a3b
    M = 256 and 1024, mixtral M = 256, deepseek-v3 M = 4096, kimi-k2 M = 16), 1% slower at mixtral M = 64; at the
    other twelve the entry was faster or within 1% (NOTES.md v48). A wide entry also stays in its own M's range of
    the defaults (`entry_runs`; `rows_per_token` is top-k / experts): mixtral's 128-row entries for 100 and
    128 rows were 5-8% slower than the defaults at 60-85 rows (NOTES.md v61), its 128 x 128 one for 100 rows 5-14%
    at 90-95 (v84)."""
    if tuned is None:
        return defaults(num_tokens)
    measured_m, fields = tuned
    entry = TritonConfig(**fields)
    return entry if entry_runs(entry, measured_m, num_tokens, defaults, rows_per_token) else defaults(num_tokens)


def entry_runs(entry: TritonConfig, measured_m: int, num_tokens: int, defaults: Callable[[int], TritonConfig],
               rows_per_token: float) -> bool:
    """Whether the table's entry measured at `measured_m` runs `num_tokens` rows where it is the nearest entry: at
    its own M; between the table's rows, narrow ones (8 or 16 rows) where the defaults are narrow too, of the size
    they pick at the entry's own M where that is narrow (int4 turns from 8- to 16-row blocks at 7 rows per expert,
    and each size wins on its side: v72), wide ones at the defaults' block size within the defaults' range of their
    own M (`entry_or_default`): the same defaults, between the same `WIDE_RANGE_EDGES`."""
    if measured_m == num_tokens:
        return True
    default, measured_default = defaults(num_tokens), defaults(measured_m)
    if max(entry.block_m, default.block_m) < 32:
        return measured_default.block_m >= 32 or default.block_m == measured_default.block_m

    def wide_range(tokens: int) -> int:
        return sum(tokens * rows_per_token > edge for edge in WIDE_RANGE_EDGES)

    # The defaults' 144-row blocks (ROWS_FOR_144_ROW_BLOCKS) count as their 128-row ones: a 128-row entry runs its
    # range through that band, measured on the tiling it runs (a 144-row entry only at its own M).
    default, measured_default = _unabsorbed(default), _unabsorbed(measured_default)
    return (entry.block_m == default.block_m and default == measured_default
            and wide_range(num_tokens) == wide_range(measured_m))


def _unabsorbed(config: TritonConfig) -> TritonConfig:
    """A configuration whose blocks hold the alignment's extra rows (`_extra_rows`: 144-row ones) as the one of the
    blocks they extend (128 rows)."""
    return replace(config, block_m=config.block_m - _extra_rows(config.block_m))


def _gemm2_split(num_tokens: int, top_k: int, num_experts: int, hidden_size: int, intermediate_size: int,
                 block_n: int, target_programs: int, min_tiles: int) -> int:
    """GEMM2's K split: the largest power of two that keeps its programs (touched experts x N tiles x split)
    within `target_programs` and at least `min_tiles` K tiles per split (at least 1)."""
    programs = min(num_experts, num_tokens * top_k) * -(-hidden_size // block_n)
    k_tiles = -(-intermediate_size // TILE_K)
    split = max(1, min(target_programs // programs, k_tiles // min_tiles))
    return 1 << (split.bit_length() - 1)


def _gemm1_split(num_tokens: int, top_k: int, hidden_size: int, intermediate_size: int, block_n: int,
                 few_programs: int) -> int:
    """GEMM1's K split for one token (none for more, nor for H under 8 tiles): four where its programs (pairs x
    N tiles) are fewer than `few_programs`, else two."""
    if num_tokens != 1 or hidden_size < 8 * TILE_K:
        return 1
    return 4 if top_k * -(-intermediate_size // block_n) < few_programs else 2


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _prepare_projection(weight: QuantizedWeight, rows_out: int, cols_out: int, row_blocks: list[tuple[int, int]],
                        device: torch.device, name: str, fragment: bool) -> dict[str, torch.Tensor]:
    """Pack one projection [E, N, K] into the kernel layout, expert by expert into preallocated buffers.

    `row_blocks` maps source row ranges to destination row offsets (w13: gate and up halves, each padded).
    Columns are padded to `cols_out`; act-order columns are put in group order.
    """
    s = weight.scheme
    e, n, k = weight.shape
    groups_out = s.num_groups(cols_out)
    tiles, r = -(-cols_out // TILE_K), words_per_tile(s.bits)
    out = {
        name: torch.zeros(*((e, tiles * r // FRAGMENT_WORDS, rows_out, FRAGMENT_WORDS) if fragment
                            else (e, tiles * r, rows_out)), dtype=torch.int32, device=device),
        f"{name}_scales": torch.zeros(e, groups_out, rows_out, dtype=s.scale_dtype, device=device),
    }
    if s.zero_point:
        out[f"{name}_zeros"] = torch.zeros(e, groups_out, rows_out, dtype=torch.uint8, device=device)
    if s.act_order:
        out[f"{name}_perm"] = torch.arange(cols_out, dtype=torch.int32, device=device).repeat(e, 1)
    for expert in range(e):
        codes = weight.codes[expert].to(device)
        if s.act_order:
            order = weight.group_order(expert, name, "the TRITON backend").to(device)
            codes = codes[:, order]
            out[f"{name}_perm"][expert, :k] = order.to(torch.int32)
        padded = torch.zeros(n, cols_out, dtype=torch.uint8, device=device)
        padded[:, :k] = codes
        packed = tile_interleave(padded, s.bits, paired=fragment)  # (words paired in fragment tiles)
        scales = weight.scales[expert].to(device).t()
        zeros = None if weight.zeros is None else weight.zeros[expert].to(device).t()
        for (src_begin, src_end), dst in row_blocks:
            rows = slice(dst, dst + src_end - src_begin)
            out[name][expert, :, rows] = (fragment_tiles(packed[src_begin:src_end]) if fragment
                                          else packed[src_begin:src_end].t())
            out[f"{name}_scales"][expert, : scales.shape[0], rows] = scales[:, src_begin:src_end]
            if zeros is not None:
                out[f"{name}_zeros"][expert, : zeros.shape[0], rows] = zeros[:, src_begin:src_end]
    return out


def prepare_triton_weights(experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
    """Pure converter from canonical experts to the TRITON layout (module docstring), on `device`.

    Extra memory while converting: one expert's temporaries on top of the preallocated result.
    """
    h, i = experts.hidden_size, experts.intermediate_size
    i_pad = _round_up(i, INTERMEDIATE_ALIGN)
    fragment = stores_fragment_tiles(device)
    out = _prepare_projection(experts.w13, 2 * i_pad, h, [((0, i), 0), ((i, 2 * i), i_pad)], device, "w13", fragment)
    out.update(_prepare_projection(experts.w2, h, i_pad, [((0, h), 0)], device, "w2", fragment))
    return out


def stores_fragment_tiles(device: torch.device) -> bool:
    """Whether words are stored in fragment tiles on `device`, paired (`layout.py`): on Hopper with the
    PTX dequantization, where the Gluon decode kernels, which read only that layout, run the shipped table and the
    defaults (int4 paired, they skip a byte permute per word: up to 4.5% faster at M = 1-512 on an H200, none
    slower, NOTES.md v46; in fragment tiles, a thread's words of a column are one 16-byte load: int4 -1.1% over
    18 table rows, kimi-k2 M = 512 -13%, v48; int8 v51). Elsewhere Triton's kernel runs them, and the words stay
    plain: it reads paired words only with a second load, of each word's partner. (int8 paired since v68: a shift
    per odd slot instead of a byte permute per slot.)"""
    return _ptx_dequant(device) and torch.cuda.get_device_capability(device)[0] == 9


class TritonExperts(Experts):
    """Fused Triton grouped GEMMs with in-register dequantization."""

    NAME = NAME
    SUPPORTS_EXPERT_MAP = True
    TUNED = True
    _PLATFORMS: ClassVar[tuple[Platform, ...]] = (Platform.CUDA, Platform.ROCM, Platform.XPU)

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if not device.has_package("triton"):
            return fail(NO_TRITON)
        if device.platform == Platform.CPU:
            if os.environ.get("TRITON_INTERPRET") == "1":
                return OK  # the interpreter runs the kernels on CPU (tests)
            return fail("Triton needs a GPU (CPU only under TRITON_INTERPRET=1)")
        if device.platform == Platform.CUDA and (device.sm or 0) < MIN_CUDA_SM:
            return fail(f"needs CUDA sm{MIN_CUDA_SM}+ for bf16 tensor cores, the device is sm{device.sm}")
        if device.platform == Platform.XPU and not device.has_package(TRITON_XPU_PROVIDER):
            return fail("the installed Triton has no Intel XPU backend (triton.backends.intel, from Intel's "
                        "Triton build)")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.group_size not in SUPPORTED_GROUPS:
            return fail(f"group size {scheme.group_size} is not one of {SUPPORTED_GROUPS} (None = channel-wise)")
        return OK

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        return OK if activation in KERNEL_CODES else fail(f"activation {activation.value} is not implemented")

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        # Any I/tp is padded to INTERMEDIATE_ALIGN; a TP shard must still hold whole groups.
        return check_tp_groups(spec)

    def __init__(self, spec: LayerSpec, quant: MoEQuantConfig, device: torch.device) -> None:
        super().__init__(spec, quant, device)
        i = spec.intermediate_per_shard
        self.num_experts = spec.local_num_experts
        self.i_pad = _round_up(i, INTERMEDIATE_ALIGN)
        self.w13_bias = None
        if quant.w1_bias is not None:
            bias = torch.zeros(self.num_experts, 2 * self.i_pad, dtype=torch.float32, device=device)
            bias[:, :i] = quant.w1_bias[:, :i].float()
            bias[:, self.i_pad : self.i_pad + i] = quant.w1_bias[:, i:].float()
            self.w13_bias = bias
        self.w2_bias = None if quant.w2_bias is None else quant.w2_bias.float().to(device).contiguous()
        # The shipped table is keyed by card (or the stand-in of its compute capability); other devices (ROCm,
        # XPU, the interpreter) use default_config.
        self._card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._card else None
        self._capability = (torch.cuda.get_device_capability(device)
                            if self._card is not None and torch.version.cuda is not None else None)
        self._shape_key = ShapeKey.of(spec)
        self._configs: dict[int, TritonConfig] = {}
        self._fragment = stores_fragment_tiles(device)  # (as `prepare_weights` stores them)
        self._hopper = self._capability is not None and self._capability[0] == 9
        self._plans: PlanCache | None = None  # (launch plans: compiled kernels only, so CUDA devices only)
        # A persistent GEMM1's flags (`moe_gemm(share_flags=...)`), up to _FLAGGED_PROGRAMS_PER_SM per SM: zero,
        # and left so by every launch. This layer's own: layers run one after another on a stream.
        self._share_flags = (torch.zeros(_FLAGGED_PROGRAMS_PER_SM * self._num_sms, dtype=torch.int32, device=device)
                             if self._num_sms else None)
        # The alignment's counters and barrier counts (`moe_align_block_size(workspace=...)`): zero, left so.
        self._align_work = None
        if self._num_sms:
            from wna16moe.kernels.moe_align import align_workspace

            self._align_work = align_workspace(self.num_experts, device)
        if self._card is not None:
            from wna16moe.kernels.launch import PlanCache

            self._plans = PlanCache()

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        return prepare_triton_weights(experts, device)

    def config(self, num_tokens: int) -> TritonConfig:
        """The shipped tuned configuration for this card and shape (`entry_or_default`), else `default_config`."""
        if num_tokens not in self._configs:
            tuned = (tuned_config(self._card, self._shape_key, num_tokens, self._capability)
                     if self._card is not None else None)
            self._configs[num_tokens] = entry_or_default(tuned, num_tokens,
                                                         lambda m: self.default_config(m, self.moe.top_k),
                                                         self.moe.top_k / self.num_experts)
        return self._configs[num_tokens]

    def default_config(self, num_tokens: int, top_k: int) -> TritonConfig:
        """`default_config` for this layer on this device (what runs where the table holds no entry)."""
        return default_config(num_tokens, top_k, self.num_experts, self.scheme.group_size, self.moe.hidden_size,
                              self.i_pad, self._num_sms, self._hopper, self.scheme.bits)

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor], config: TritonConfig | None = None) -> torch.Tensor:
        self.check_routed(hidden_states, topk_weights, topk_ids)
        return self._planned_forward(hidden_states, topk_weights, topk_ids, weights,
                                     config or self.config(hidden_states.shape[0]))

    def _planned_forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         weights: dict[str, torch.Tensor], cfg: TritonConfig) -> torch.Tensor:
        """`_forward`, replayed from a launch plan (kernels/launch.py) after its first run with the same key: the
        configuration and the inputs' layout, which are all that its launches' arguments other than pointers
        depend on (the weights are the layer's own: read by name)."""
        from wna16moe.kernels.launch import layout_key

        forward = partial(self._forward, hidden_states, topk_weights, topk_ids, weights, cfg)
        if self._plans is None or not hidden_states.shape[0]:
            return forward()
        names = tuple(weights)
        key = (cfg, names, torch.cuda.current_device(), layout_key(hidden_states, topk_weights, topk_ids))
        sources = [hidden_states, topk_weights, topk_ids, *(weights[name] for name in names),
                   *(b for b in (self.w13_bias, self.w2_bias, self._share_flags, self._align_work) if b is not None)]
        return self._plans.run(key, sources, forward)

    def _forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 weights: dict[str, torch.Tensor], cfg: TritonConfig) -> torch.Tensor:
        """Both GEMMs over the pairs of topk_ids [T, K'] (local ids, -1 left out) -> [T, H]."""
        from wna16moe.kernels.activation import split_k_activation
        from wna16moe.kernels.cast import cast
        from wna16moe.kernels.grid_dependence import chained_launch
        from wna16moe.kernels.launch import scratch
        from wna16moe.kernels.moe_align import moe_align_block_size
        from wna16moe.kernels.moe_gemm import moe_gemm

        moe, scheme, quant = self.moe, self.scheme, self.quant
        t, top_k = topk_ids.shape
        group = scheme.group_size or -1
        ptx = _ptx_dequant(hidden_states.device)
        # The Gluon kernel reads words in fragment tiles only (stored where it runs): else the same tiles on
        # moe_gemm.
        if cfg.decode and not self._fragment:
            cfg = replace(cfg, decode=False, block_m=max(_power_of_two_block(cfg.block_m), 16), wgmma=False,
                          persistent=0, carry=0, specialize=False)
        if cfg.wgmma and self._capability != (9, 0):  # (an sm_90 instruction)
            cfg = replace(cfg, block_m=_power_of_two_block(cfg.block_m), wgmma=False, carry=0, specialize=False)
        pdl = cfg.pdl if chained_launch(hidden_states.device) else PDL_OFF
        gemm_pdl = min(pdl, RELEASE_AT_WAIT)  # (RELEASE_EARLY is the activation pass's alone)
        # Blocks straight from the ids, without the alignment launch, where a block's rows hold every token and
        # pairs do not outnumber experts: the grid holds a block per pair, those of an expert's later pairs idle
        # (qwen3-30b-a3b M = 8 -4.4%; mixtral M = 8, 16 pairs over 8 experts, +1.6%: NOTES.md v42).
        rows = _power_of_two_block(cfg.block_m)  # (48, 96 and 144 rows: aligned blocks only)
        if t <= rows and t * top_k <= self.num_experts:
            if rows != cfg.block_m:
                cfg = replace(cfg, block_m=rows)
            blocks = (None, topk_ids.reshape(-1), None)
        else:
            blocks = moe_align_block_size(topk_ids, self.num_experts, cfg.block_m, gemm_pdl, self._align_work,
                                          extra_rows=_extra_rows(cfg.block_m))
        common = dict(bits=scheme.bits, group_size=group, top_k=top_k, block_m=cfg.block_m,
                      max_registers=cfg.max_registers, decode=cfg.decode, fast_dequant=ptx, swap_ab=cfg.swap_ab,
                      pdl=gemm_pdl, shrink=cfg.shrink, wgmma=cfg.wgmma, persistent=cfg.persistent)
        # (more programs per SM than the layer's flags cover: a zeroed temporary)
        flags = self._share_flags if cfg.persistent <= _FLAGGED_PROGRAMS_PER_SM else None
        gemm1 = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, share_flags=flags, **common)
        intermediate = scratch((t * top_k, self.i_pad), hidden_states.dtype, hidden_states.device)
        # GEMM2 accumulates into `out`; GEMM1's programs clear it on the way (no separate fill launch).
        out = scratch((t, moe.hidden_size), torch.float32, hidden_states.device)
        activation = dict(act=KERNEL_CODES[moe.activation], alpha=_or(quant.gemm1_alpha, SWIGLU_OAI_ALPHA),
                          beta=_or(quant.gemm1_beta, 1.0),
                          limit=_clamp_limit(moe.activation, quant.gemm1_clamp_limit))
        w13 = (hidden_states, weights["w13"], weights["w13_scales"], weights.get("w13_zeros"), weights.get("w13_perm"),
               self.w13_bias)
        if cfg.split_k1 > 1:
            partials = scratch((cfg.split_k1, t * top_k, 2 * self.i_pad), torch.float32, hidden_states.device)
            moe_gemm(*w13, partials, None, *blocks, gated=True, block_n=cfg.block_n1, split_k=cfg.split_k1,
                     zero_out=out, **gemm1)
            split_k_activation(partials, topk_ids, self.w13_bias, intermediate, pdl=pdl, **activation)
        else:
            moe_gemm(*w13, intermediate, None, *blocks, gated=True, block_n=cfg.block_n1, zero_out=out, **activation,
                     **gemm1)
        moe_gemm(intermediate, weights["w2"], weights["w2_scales"], weights.get("w2_zeros"), weights.get("w2_perm"),
                 self.w2_bias, out, topk_weights.reshape(-1), *blocks, gated=False, block_n=cfg.block_n2,
                 split_k=cfg.split_k2, num_warps=cfg.gemm2_warps, num_stages=cfg.gemm2_stages, carry=cfg.carry,
                 specialize=cfg.specialize, **common)
        # (with PDL it launches as GEMM2's dependent, kernels/cast.py)
        return cast(out, hidden_states.dtype, gemm_pdl)


class BatchedTritonExperts(TritonExperts):
    """The TRITON kernels on the batched format [E_local, max_tokens, H] (see the module docstring)."""

    NAME = BATCHED_NAME
    ACTIVATION_FORMAT = ActivationFormat.BATCHED
    TUNED = False  # (its configurations are `default_config`'s)

    def apply_batched(self, hidden_states: torch.Tensor, num_tokens: torch.Tensor, weights: dict[str, torch.Tensor],
                      config: TritonConfig | None = None) -> torch.Tensor:
        e, m, h = hidden_states.shape
        ids, ones = batched_pairs(num_tokens, m, hidden_states.device)
        cfg = config or self.default_config(e * m, 1)
        out = self._planned_forward(hidden_states.reshape(e * m, h), ones, ids, weights, cfg)
        return out.view(e, m, h)


def _extra_rows(block_m: int) -> int:
    """The alignment's extra rows for blocks of `block_m` rows (`moe_align_block_size`): 144-row blocks hold 128
    pairs but an expert's last, which takes up to 16 more, so that only that block runs the 128 + 16 loop (mixtral
    M = 2048 -2.7%, qwen3-30b-a3b M = 8192 level, where blocks of up to 144 pairs each were 24% slower; NOTES.md v86).
    48- and 96-row blocks stay whole: taking 32 or 64 pairs but the last read +0.5% at qwen3-30b-a3b M = 1376 on the
    defaults' 96-row blocks, level at deepseek-v3 M = 2048."""
    return 16 if block_m == 144 else 0


def _power_of_two_block(block_m: int) -> int:
    """The block a configuration of 48, 96 or 144 rows runs as where it cannot run as one (no warpgroup mmas, blocks
    straight from the ids): 32, 64 or 128 rows. Powers of two stay."""
    return 1 << (block_m.bit_length() - 1)


def _ptx_dequant(device: torch.device) -> bool:
    """The PTX dequantization (kernels/dequant.py) runs on NVIDIA GPUs, not under the interpreter."""
    return device.type == "cuda" and torch.version.cuda is not None and os.environ.get("TRITON_INTERPRET") != "1"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _clamp_limit(activation: Activation, limit: float | None) -> float | None:
    """SWIGLU_OAI clamps at SWIGLU_OAI_LIMIT unless told otherwise (as activations.swiglu_oai); SILU only when
    given."""
    if activation == Activation.SWIGLU_OAI:
        return SWIGLU_OAI_LIMIT if limit is None else limit
    return limit if activation == Activation.SILU else None
