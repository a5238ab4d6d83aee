"""Compile the Triton kernels for NVIDIA targets without a GPU and print PTX and SASS facts as JSON.

Run as a script (by tests/test_kernels_compile.py) in a process without TRITON_INTERPRET: triton decides at
decoration time whether a kernel is interpreted, and the other CPU tests interpret them. Pointers, sizes and
strides are specialized as divisible by 16, as at run time on real shapes. SASS comes from the ptxas and
nvdisasm that ship in the triton wheel; the GEMM's main loop is its longest backward branch.
"""

import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from wna16moe.kernels.activation import _split_k_activation_kernel
from wna16moe.kernels.moe_align import _align_one_program, _align_programs, _place_kernel
from wna16moe.kernels.moe_gemm import GROUPED_FROM_K, _moe_gemm_kernel, group_m
from wna16moe.kernels.moe_gemm_decode import _moe_gemm_decode_kernel
from wna16moe.kernels.moe_gemm_ws import _moe_gemm_ws_kernel
from wna16moe.kernels.topk_route import _topk_route_kernel

GEMM_SIGNATURE = {
    "a_ptr": "*bf16", "a_perm_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "bias_ptr": "*fp32",
    "out_ptr": "*bf16", "topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
    "num_padded_ptr": "*i32", "zero_ptr": "*fp32", "zero_numel": "i32", "N": "i32", "KD": "i32", "P": "i32",
    "num_m_blocks": "i32", "stride_am": "i32",
    "stride_we": "i32", "stride_wk": "i32", "stride_se": "i32", "stride_sg": "i32", "stride_om": "i32",
    "alpha": "fp32", "beta": "fp32", "limit": "fp32", "num_experts": "i32",
}
PTX_FACTS = ("mma.sync", "wgmma.mma_async", "cp.async", ".local", "bar.sync", "cvt.rn.bf16.s32", "cvt.rn.f16.s32",
             "lop3.b32", "prmt.b32", "st.global.v4", "add.v4.f32", "cp.async.mbarrier.arrive.noinc",
             "mbarrier.try_wait", "globaltimer")


DIVISIBLE_BY_16 = ("a_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "KD", "stride_am", "stride_we", "stride_wk",
                   "stride_se", "stride_sg", "stride_om")


def facts(ptx: str) -> dict[str, int]:
    """Counts of PTX_FACTS; where a programmatic dependent waits (the cp.async and global loads before the first
    griddepcontrol.wait, -1 without one) and releases its dependents (after the wait; the MMAs after it)."""
    counts = {name: ptx.count(name) for name in PTX_FACTS}
    wait = ptx.find("griddepcontrol.wait")
    before = ptx[:wait]
    release = ptx.find("griddepcontrol.launch_dependents")
    after_release = ptx[release:]
    return counts | {"copies_before_wait": -1 if wait < 0 else before.count("cp.async.cg"),
                     "loads_before_wait": -1 if wait < 0 else before.count("ld.global"),
                     "release_after_wait": release > wait >= 0,
                     "mma_after_release": -1 if release < 0 else after_release.count("mma.sync")
                     + after_release.count("wgmma.mma_async")}


def loops_by_length(sass: str) -> list[list[str]]:
    """The instructions of every loop in nvdisasm's text (one per backward branch), one iteration each,
    longest first."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            instructions.append(instruction.group(1))
    loops = [(labels[m.group(1)], i) for i, ins in enumerate(instructions)
             if (m := re.search(r"BRA.*`\((\.L_x_\d+)\)", ins)) and labels.get(m.group(1), i) < i]
    return [instructions[begin : end + 1] for begin, end in sorted(loops, key=lambda span: span[0] - span[1])]


def loop_instructions(sass: str) -> list[str]:
    """The instructions of the longest loop in nvdisasm's text, one iteration."""
    return loops_by_length(sass)[0]


def sass(cubin: bytes) -> str:
    """nvdisasm's text of a cubin."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def main_loop(cubin: bytes, per_tile: bool = False) -> dict[str, int]:
    """Instructions in the longest loop of the SASS (per thread, one iteration), and its opcode counts; with
    `per_tile`, per K tile of a loop that runs several (one cp.async wait, DEPBAR on SB0, per tile)."""
    loops = loops_by_length(sass(cubin))
    def tiles(loop: list[str]) -> int:
        return max(1, sum(ins.startswith("DEPBAR.LE SB0") for ins in loop)) if per_tile else 1

    loop = loops[0]
    n = tiles(loop)
    opcodes = collections.Counter(ins.split()[1 if ins.startswith("@") else 0].split(".")[0] for ins in loop)
    # (the second longest: a wide decode block's loop for fewer rows; spill stores over the whole loop, not per
    # tile: a 4-tile iteration with 2 would floor to 0)
    return {"loop_instructions": len(loop) // n,
            "shrunk_loop_instructions": len(loops[1]) // tiles(loops[1]) if len(loops) > 1 else 0,
            "loop_I2F": opcodes["I2F"] // n, "loop_STS": opcodes["STS"] // n, "loop_STL": opcodes["STL"],
            "loop_HMMA": opcodes["HMMA"] // n, "loop_HGMMA": opcodes["HGMMA"] // n,
            "loop_wgmma_waits": sum("WARPGROUP.DEPBAR" in ins for ins in loop) // n,
            "loop_LDSM": opcodes["LDSM"] // n, "loop_BAR": opcodes["BAR"] // n}


def compile_gemm(case: dict) -> dict[str, int]:
    gated = case["gated"]
    consts = dict(TOP_K=8, GATED=gated, ACT=3 if gated else 0, HAS_LIMIT=gated, BITS=case["bits"],
                  HAS_ZP=case["zp"], HAS_PERM=case["perm"], HAS_BIAS=True, GROUP_SIZE=case["group_in_tile"],
                  GROUP_IN_TILE=case["group_in_tile"],
                  SCALE_WEIGHTS=case["block_m"] > case["group_in_tile"],
                  SPLIT_K=1 if gated else 2, FAST_DEQUANT=case.get("fast", False), BLOCK_M=case["block_m"],
                  BLOCK_N=case["block_n"], SWAP_AB=case.get("swap", False), EVEN_K=case.get("even_k", True),
                  ID_BLOCKS=case.get("id_blocks", 0), ZERO_OUT=case["gated"], PDL=case.get("pdl", 0),
                  SHRINK=case.get("shrink", 0), FRAGMENT=case.get("fragment", False))
    act = "*" + case.get("dtype", "bf16")
    # Absent tensors are passed as others, as `moe_gemm` does (the activations for the permutation, the scales
    # for zero points and router weights): dead code must type-check with those too.
    signature = dict(GEMM_SIGNATURE, a_ptr=act, s_ptr=act, out_ptr=act if gated else "*fp32",
                     a_perm_ptr="*i32" if case["perm"] else act, z_ptr="*u8" if case["zp"] else act,
                     topk_w_ptr=act if gated else "*fp32")
    signature.update(dict.fromkeys(consts, "constexpr"))
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    kernel = triton.compile(ASTSource(_moe_gemm_kernel, signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", case["sm"], 32),
                            options={"num_warps": case["warps"], "num_stages": case.get("stages", 4),
                                     **({"maxnreg": case["maxnreg"]} if "maxnreg" in case else {})})
    return facts(kernel.asm["ptx"]) | main_loop(kernel.asm["cubin"])


def compile_decode_gemm(case: dict) -> dict[str, int]:
    """The Gluon decode GEMM (kernels/moe_gemm_decode.py) for sm_90: PTX facts, its main loop, shared memory.
    With `specialize`, its warp-specialized GEMM2 (kernels/moe_gemm_ws.py; `warps`: its first warpgroup's 4): PTX
    facts, the whole kernel's warpgroup mmas and waits on them, shared memory."""
    gated = case["gated"]
    group = case["group"]
    consts = dict(TOP_K=8, GATED=gated, ACT=3 if gated else 0, HAS_LIMIT=gated, BITS=case["bits"],
                  HAS_ZP=case["zp"], HAS_PERM=case["perm"], HAS_BIAS=True, GROUP_SIZE=group,
                  GROUP_IN_TILE=min(group, 128), SPLIT_K=case.get("split_k", 1), BLOCK_M=case["block_m"],
                  BLOCK_N=case["block_n"], EVEN_K=True, ALIGNED=case.get("aligned", True),
                  ID_BLOCKS=int(case["pair"]), ZERO_OUT=gated,
                  NUM_WARPS=case["warps"], STAGES=case.get("stages", 3), PDL=case.get("pdl", 0),
                  WGMMA=case.get("wgmma", False), GROUP_M=group_m(case["block_m"], case.get("k", GROUPED_FROM_K)),
                  PERSISTENT=case.get("persistent", False), CARRY=case.get("carry", 0), TRACE=case.get("trace", False))
    act = "*" + case.get("dtype", "bf16")
    out = act if gated and consts["SPLIT_K"] == 1 else "*fp32"
    signature = dict(GEMM_SIGNATURE, a_ptr=act, s_ptr=act, out_ptr=out, a_perm_ptr="*i32" if case["perm"] else act,
                     z_ptr="*u8" if case["zp"] else act, topk_w_ptr=act if gated else "*fp32",
                     trace_ptr="*i64" if consts["TRACE"] else act, flags_ptr="*i32", part_ptr="*fp32")
    signature.update(dict.fromkeys(consts, "constexpr"))
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    source = _moe_gemm_ws_kernel if case.get("specialize") else _moe_gemm_decode_kernel
    kernel = triton.compile(GluonASTSource(source, signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", case.get("sm", 90), 32),
                            options={"num_warps": case["warps"],
                                     **({"maxnreg": case["maxnreg"]} if "maxnreg" in case else {})})
    if case.get("specialize"):  # (its partitions' loops are not told apart by the loop finder: whole-kernel counts)
        text = sass(kernel.asm["cubin"])
        return facts(kernel.asm["ptx"]) | {"HGMMA": text.count(" HGMMA."),
                                           "wgmma_waits": text.count("WARPGROUP.DEPBAR"),
                                           "shared": kernel.metadata.shared}
    # (most of its loops run one K tile per ring stage, unrolled)
    return facts(kernel.asm["ptx"]) | main_loop(kernel.asm["cubin"], per_tile=True) | {"shared": kernel.metadata.shared}


def compile_align() -> dict[str, dict[str, int]]:
    """The alignment's kernels: the one program (atomics for the ranks between the counters' clear and their
    read, CTA barriers) at 4096 pairs, the cooperative programs (and their grid-wide barrier) and the grid's
    placing: the first two as every layer runs them (whole blocks), the placing with extra rows (48-row blocks of
    32 pairs but an expert's last, as the decode kernel's 144-row blocks take them)."""
    pointers = ("topk_ids_ptr", "sorted_ids_ptr", "expert_ids_ptr", "num_padded_ptr", "counts_ptr")
    cases = {"one_program": (_align_one_program, pointers,
                             dict(E_POW2=512, BLOCK_M=48, EXTRA=0, PAIRS=4096, TAIL=1024, PDL=1), 8),
             "cooperative": (_align_programs, (*pointers[:4], "work_ptr"),
                             dict(E_POW2=512, LOG2_E=9, BLOCK_M=48, BLOCK_M_POW2=64, EXTRA=0, CHUNK=512,
                                  BLOCK_CHUNK=64, PDL=1), 4),
             "place": (_place_kernel, (*pointers[:4], "rank_ptr", "counts_ptr"),
                       dict(E_POW2=512, LOG2_E=9, BLOCK_M=48, BLOCK_M_POW2=64, EXTRA=16, CHUNK=1024, BLOCK_CHUNK=64,
                            PDL=1), 4)}
    facts_by_kernel = {}
    for name, (kernel, names, consts, warps) in cases.items():
        signature = dict.fromkeys(names, "*i32") | dict(P="i32", E="i32", max_blocks="i32")
        compiled = triton.compile(ASTSource(kernel, signature | dict.fromkeys(consts, "constexpr"), constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        facts_by_kernel[name] = facts(ptx) | {"atom": ptx.count("atom.global"), "red": ptx.count("red.global")}
    return facts_by_kernel


def compile_route() -> dict[str, dict[str, int]]:
    """The routing kernel at one token (a warp, PDL) for softmax over 128 experts and DeepSeek-V3's groups."""
    signature = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32",
                 "num_experts": "i32", "group_size": "i32", "stride_t": "i32", "scale": "fp32"}
    variants = {"softmax": dict(TOP_K=8, SOFTMAX=True, N_GROUP=1, TOPK_GROUP=1, RENORMALIZE=True, HAS_BIAS=False,
                                GROUP_TILES=False, BLOCK_E=128, BLOCK_G=1),
                "grouped": dict(TOP_K=8, SOFTMAX=False, N_GROUP=8, TOPK_GROUP=4, RENORMALIZE=True, HAS_BIAS=True,
                                GROUP_TILES=True, BLOCK_E=256, BLOCK_G=8),
                "grouped-uneven": dict(TOP_K=6, SOFTMAX=False, N_GROUP=8, TOPK_GROUP=3, RENORMALIZE=True,
                                       HAS_BIAS=False, GROUP_TILES=False, BLOCK_E=256, BLOCK_G=8)}
    facts_by_variant = {}
    for name, consts in variants.items():
        consts = consts | dict(PDL=1, BLOCK_K=8)
        compiled = triton.compile(ASTSource(_topk_route_kernel, signature | dict.fromkeys(consts, "constexpr"),
                                            constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
        facts_by_variant[name] = facts(compiled.asm["ptx"]) | {"shared": compiled.metadata.shared}
    return facts_by_variant


def compile_activation() -> dict[str, dict[str, int]]:
    """The K-split GEMM1's activation pass released at its wait (2) and before it (3)."""
    signature = {"part_ptr": "*fp32", "expert_ptr": "*i32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32",
                 "P": "i32", "E": "i32", "stride_om": "i32", "alpha": "fp32", "beta": "fp32", "limit": "fp32"}
    facts_by_pdl = {}
    for pdl in (2, 3):
        consts = dict(SPLITS=4, ACT=0, HAS_LIMIT=False, HAS_BIAS=False, BLOCK=1024, PDL=pdl)
        compiled = triton.compile(ASTSource(_split_k_activation_kernel, signature | dict.fromkeys(consts, "constexpr"),
                                            constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        facts_by_pdl[str(pdl)] = facts(ptx) | {"releases": ptx.count("griddepcontrol.launch_dependents"),
                                               "release_before_wait": -1 < ptx.find("griddepcontrol.launch_dependents")
                                               < ptx.find("griddepcontrol.wait")}
    return facts_by_pdl


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    print(json.dumps({"gemm": [compile_gemm(c) for c in cases["gemm"]],
                      "decode": [compile_decode_gemm(c) for c in cases["decode"]],
                      "specialized": [compile_decode_gemm(c) for c in cases["specialized"]], "align": compile_align(),
                      "route": compile_route(), "activation": compile_activation()}))
