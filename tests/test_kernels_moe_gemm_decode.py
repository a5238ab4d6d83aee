"""kernels/moe_gemm_decode.py: the Gluon decode GEMMs inside the TRITON backend, against EMULATION.

GPU (marker gpu): every scheme family (int4/int8, groups 32-128 and channel-wise, zero points; act-order and AWQ
from the checkpoint fixtures), both activation dtypes, blocks of 8 and 16 rows and wide blocks of 32 to 128 rows
(activations through shared memory, weights scaled in the asm), ring depths 2-5, K splits in both GEMMs, one
token (a block per pair) and aligned blocks, persistent programs (items split between them), bias and clamp,
a CUDA-graph replay. CPU: the argument checks, and a `decode` configuration running on `moe_gemm` under the
interpreter (Gluon has none).
Compilation for sm_90 and sm_80 is checked on the CPU in test_kernels_compile.py.
"""

from dataclasses import replace

import pytest
import torch
from triton_env import (
    DEVICE,
    DTYPES,
    HAS_CUDA,
    random_experts,
    record_launches,
    replay_on_fresh_inputs,
    triton_and_emulation,
    triton_beside_emulation,
)

from wna16moe import Activation, MoEConfig, WeightScheme, open_checkpoint
from wna16moe.experts.base import relative_error
from wna16moe.experts.triton import TritonConfig
from wna16moe.kernels.moe_gemm import GROUPED_FROM_K, moe_gemm
from wna16moe.kernels.moe_gemm_decode import ring_bytes
from wna16moe.routing import softmax_topk


def test_arguments_are_checked() -> None:
    a = torch.zeros(2, 128, dtype=torch.float16)
    w = torch.zeros(1, 1, 128, 16, dtype=torch.int32)  # (int4 fragment tiles: one K tile of 128 columns)
    scales = torch.ones(1, 1, 128, dtype=torch.float16)
    out = torch.zeros(2, 128)
    args = (a, w, scales, None, None, None, out, torch.ones(2), None, torch.zeros(2, dtype=torch.int32), None)
    common = dict(bits=4, group_size=128, top_k=1, gated=False, decode=True)
    plain = (a, torch.zeros(1, 16, 128, dtype=torch.int32), *args[2:])
    for bits in (4, 8):  # (plain int8 words: [1, 32, 128])
        with pytest.raises(ValueError, match=r"reads words in fragment tiles.*shape \[1, 16, 128\]"):
            moe_gemm(*plain, block_m=8, block_n=64, **common | {"bits": bits})
    narrow = (a, torch.zeros(1, 1, 128, 8, dtype=torch.int32), *args[2:])
    with pytest.raises(ValueError, match=r"shape \[1, 1, 128, 8\]: fragment tiles are \[E, half tiles, N_total, 16\]"):
        moe_gemm(*narrow, block_m=8, block_n=64, **common)
    with pytest.raises(ValueError, match="block_m"):
        moe_gemm(*args, block_m=24, block_n=64, **common)
    with pytest.raises(ValueError, match="block_n"):
        moe_gemm(*args, block_m=8, block_n=48, **common)
    for stages in (1, 9):  # (2 to 8: one wait-and-fence asm text per depth)
        with pytest.raises(ValueError, match="num_stages"):
            moe_gemm(*args, block_m=8, block_n=64, num_stages=stages, **common)
    with pytest.raises(ValueError, match="shrink"):
        moe_gemm(*args, block_m=32, block_n=64, shrink=1, **common)
    with pytest.raises(ValueError, match="shrink"):  # (this module's kernel: blocks of 16 rows at least)
        moe_gemm(*args, block_m=16, block_n=64, shrink=1, **common | {"decode": False})
    with pytest.raises(ValueError, match="group_size"):
        moe_gemm(*args, block_m=8, block_n=64, bits=4, group_size=24, top_k=1, gated=False, decode=True)
    with pytest.raises(ValueError, match="wide blocks"):  # (wgmma: blocks of 32 rows and more)
        moe_gemm(*args, block_m=16, block_n=64, wgmma=True, **common)
    with pytest.raises(ValueError, match="wgmma"):
        moe_gemm(*args, block_m=32, block_n=64, wgmma=True, **common | {"decode": False})
    with pytest.raises(ValueError, match="persistent"):
        moe_gemm(*args, block_m=16, block_n=64, persistent=2, **common | {"decode": False})
    with pytest.raises(ValueError, match=r"carry.*needs wgmma"):
        moe_gemm(*args, block_m=32, block_n=64, carry=1, **common)
    with pytest.raises(ValueError, match=r"carry.*0 to 4"):
        moe_gemm(*args, block_m=32, block_n=64, wgmma=True, carry=5, **common)
    with pytest.raises(ValueError, match="carry"):
        moe_gemm(*args, block_m=32, block_n=64, carry=1, **common | {"decode": False})
    with pytest.raises(ValueError, match=r"specialize runs a GEMM2 on 128 x 128 or 128 x 256 wgmma.*block_m=64"):
        moe_gemm(*args, block_m=64, block_n=128, num_warps=8, wgmma=True, specialize=True, **common)
    with pytest.raises(ValueError, match=r"specialize runs a GEMM2.*gated=True"):
        moe_gemm(*args, block_m=128, block_n=128, num_warps=8, wgmma=True, specialize=True, **common | {"gated": True})
    with pytest.raises(ValueError, match="specialize"):
        moe_gemm(*args, block_m=128, block_n=64, specialize=True, **common | {"decode": False})
    many = (torch.zeros(17, 128, dtype=torch.float16), w, scales, None, None, None, torch.zeros(17, 128),
            torch.ones(17), None, torch.zeros(17, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="17 tokens need block_m >= 17"):  # (blocks from the ids: a row a token)
        moe_gemm(*many, block_m=16, block_n=64, **common)


def test_a_ring_past_the_gpus_shared_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring's bytes are known before the launch (`ring_bytes`, exact against the compiler in
    test_kernels_compile.py): a tiling past the GPU's shared memory gets an error naming its settings, not
    Triton's OutOfResources at the first call. int8 GEMM1, 128 x 128 blocks: 3 stages fit Hopper's 227 KB, 4 not."""
    import wna16moe.kernels.moe_gemm as launcher

    hopper = 227 * 1024
    assert ring_bytes(4, True, False, 128, 128, 128, 3) == 148992  # (ptxas's figure, v37)
    assert ring_bytes(8, True, False, 128, 128, 128, 3) <= hopper < ring_bytes(8, True, False, 128, 128, 128, 4)
    monkeypatch.setattr(launcher, "_max_shared_memory", lambda device: hopper)
    a = torch.zeros(2, 256, dtype=torch.float16)
    w = torch.zeros(1, 2 * 2, 256, 16, dtype=torch.int32)  # (fragment tiles: two K tiles of two halves)
    scales = torch.ones(1, 2, 256, dtype=torch.float16)
    out = torch.zeros(4, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"num_stages=4 x block_m=128 x block_n=128 \(8-bit, gated\).*shared memory"):
        moe_gemm(a, w, scales, None, None, None, out, None, None, torch.zeros(4, dtype=torch.int32), None, bits=8,
                 group_size=128, top_k=2, gated=True, block_m=128, block_n=128, num_warps=8, num_stages=4,
                 decode=True, wgmma=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
def test_gpu_a_ring_past_shared_memory_is_refused_before_the_launch() -> None:
    """The same refusal from the GPU's own limit (Triton's cached query), where the kernel would not launch."""
    a = torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randint(-2**31, 2**31 - 1, (1, 2 * 2, 256, 16), dtype=torch.int32, device=DEVICE)
    scales = torch.rand(1, 2, 256, dtype=torch.bfloat16, device=DEVICE)
    out = torch.full((4, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"num_stages=4 x block_m=128 .*shared memory, this GPU 2\d{5}"):
        moe_gemm(a, w, scales, None, None, None, out, None, None, torch.zeros(4, dtype=torch.int32, device=DEVICE),
                 None, bits=8, group_size=128, top_k=2, gated=True, block_m=128, block_n=128, num_warps=8,
                 num_stages=4, decode=True, wgmma=True)
    assert out.isnan().all()  # (nothing launched)


def _recorded_launch(monkeypatch: pytest.MonkeyPatch, decode: bool, a: torch.Tensor, n: int = 64,
                     max_registers: int | None = None) -> tuple[tuple[int, int], tuple, dict]:
    """The grid, arguments and keywords `moe_gemm` launches one kernel with for a GEMM1 of 3 tokens, top-2, over
    4 experts, N = n, K = a.shape[1] (the launch recorded instead of run)."""
    launches = record_launches(monkeypatch, "_moe_gemm_decode_kernel" if decode else "_moe_gemm_kernel")
    tiles = -(-a.shape[1] // 128)
    w = torch.zeros(4, tiles, 2 * n, 16, dtype=torch.int32)
    scales = torch.ones(4, tiles, 2 * n, dtype=torch.float16)
    out = torch.empty(3 * 2, n, dtype=torch.float16)
    ids = torch.tensor([0, 1, 2, 3, 1, 0], dtype=torch.int32)
    moe_gemm(a, w, scales, None, None, None, out, None, None, ids, None, bits=4, group_size=128, top_k=2, gated=True,
             block_m=8 if decode else 16, block_n=64, decode=decode, zero_out=torch.empty(3, 256),
             max_registers=max_registers)
    (launch,) = launches
    return launch


@pytest.mark.parametrize("decode", [False, True], ids=["moe_gemm-kernel", "decode-kernel"])
def test_launch_binds_every_kernel_parameter(decode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kernels go through one launcher: each must get every one of its parameters and only those (a
    missing or extra constexpr fails only when the GPU compiles it), and the decode kernel its ring depth."""
    import wna16moe.kernels.moe_gemm as launcher

    kernel = getattr(launcher, "_moe_gemm_decode_kernel" if decode else "_moe_gemm_kernel")
    grid, args, kwargs = _recorded_launch(monkeypatch, decode, torch.randn(3, 256, dtype=torch.float16),
                                          max_registers=128)
    options = {"num_warps", "num_stages", "maxnreg"}
    bound = list(kernel.arg_names[: len(args)]) + [k for k in kwargs if k not in options]
    assert sorted(bound) == sorted(kernel.arg_names) and len(bound) == len(kernel.arg_names)
    assert grid == (6 * 1, 1) and kwargs["maxnreg"] == 128 and kwargs["num_warps"] == 4
    if decode:
        assert kwargs["STAGES"] == 3 and kwargs["NUM_WARPS"] == 4 and "num_stages" not in kwargs
        assert kwargs["WGMMA"] is False
    else:
        assert kwargs["num_stages"] == 3


def test_persistent_launch_and_where_it_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """`persistent` launches that many programs per SM (at most one per item, and as many as their rings fit in
    its shared memory) over aligned narrow blocks, and one program per block and tile where its ring cannot run
    on: K split, act-order columns, wide blocks, fewer K tiles than ring stages."""
    import wna16moe.kernels.moe_gemm as launcher

    launches = record_launches(monkeypatch, "_moe_gemm_decode_kernel")
    monkeypatch.setattr(launcher, "_num_sms", lambda index: 2)
    e, k, n, blocks = 4, 512, 256, 10
    a = torch.randn(12, k, dtype=torch.float16)
    w = torch.zeros(e, k // 128, n, 16, dtype=torch.int32)
    scales = torch.ones(e, k // 128, n, dtype=torch.float16)
    out = torch.zeros(6, n)
    aligned = (torch.zeros(blocks * 8, dtype=torch.int32), torch.zeros(blocks, dtype=torch.int32),
               torch.tensor([blocks * 8], dtype=torch.int32))

    def launch(block_m: int = 8, split_k: int = 1, a_perm: torch.Tensor | None = None, stages: int = 3,
               kd: int = k) -> tuple[tuple[int, int], bool]:
        moe_gemm(a[:, :kd], w, scales, None, a_perm, None, out, torch.ones(12), *aligned, bits=4, group_size=128,
                 top_k=2, gated=False, block_m=block_m, block_n=64, split_k=split_k, decode=True, num_stages=stages,
                 persistent=3, wgmma=block_m >= 32)
        grid, _, kwargs = launches.pop()
        return grid, kwargs["PERSISTENT"]

    assert launch() == ((3 * 2, 1), True)  # 40 items (10 blocks x 4 tiles) on 3 programs x 2 SMs
    assert launch(split_k=2) == ((blocks * 4, 2), False)
    assert launch(a_perm=torch.zeros(e, k, dtype=torch.int32)) == ((blocks * 4, 1), False)
    assert launch(block_m=32) == ((blocks * 4, 1), False)
    assert launch(stages=5) == ((blocks * 4, 1), False)  # 4 K tiles
    ring = ring_bytes(4, False, False, 128, 8, 64, 3)
    monkeypatch.setattr(launcher, "_max_shared_memory", lambda device: 2 * ring + 1000)
    assert launch() == ((2 * 2, 1), True)  # two rings fit an SM's shared memory, not three


def test_persistent_gemm1_hands_split_items_through_flags_and_a_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A persistent GEMM1 gets a float32 workspace slot per program for the sums of an item it shares, and the
    caller's flags (a zeroed temporary without them); flags that are too few or not int32 are refused. GEMM2 needs
    neither."""
    import wna16moe.kernels.moe_gemm as launcher

    launches = record_launches(monkeypatch, "_moe_gemm_decode_kernel")
    monkeypatch.setattr(launcher, "_num_sms", lambda index: 2)
    e, k, n, blocks = 4, 512, 128, 10
    w = torch.zeros(e, k // 128, 2 * n, 16, dtype=torch.int32)
    scales = torch.ones(e, k // 128, 2 * n, dtype=torch.float16)
    aligned = (torch.zeros(blocks * 8, dtype=torch.int32), torch.zeros(blocks, dtype=torch.int32),
               torch.tensor([blocks * 8], dtype=torch.int32))

    def launch(flags: torch.Tensor | None) -> tuple[tuple[int, int], dict]:
        moe_gemm(torch.randn(6, k, dtype=torch.float16), w, scales, None, None, None,
                 torch.empty(12, n, dtype=torch.float16), None, *aligned, bits=4, group_size=128, top_k=2, gated=True,
                 block_m=8, block_n=64, decode=True, num_stages=2, persistent=3, share_flags=flags)
        grid, _, kwargs = launches.pop()
        return grid, kwargs

    flags = torch.zeros(8, dtype=torch.int32)
    grid, kwargs = launch(flags)
    assert grid == (6, 1) and kwargs["PERSISTENT"] and kwargs["flags_ptr"] is flags
    assert kwargs["part_ptr"].shape == (6, 2, 64, 8) and kwargs["part_ptr"].dtype == torch.float32
    temporary = launch(None)[1]["flags_ptr"]
    assert temporary.dtype == torch.int32 and temporary.numel() == 6 and not temporary.any()
    for bad in (torch.zeros(5, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="share_flags"):
            launch(bad)


def test_blocks_of_48_and_96_rows_are_wgmma_blocks_from_the_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """48 and 96 rows multiply as 32 + 16 and 64 + 32 on warpgroup mmas: the launcher refuses them elsewhere, and
    their ring holds the block's rows (in two buffers), no more."""
    record_launches(monkeypatch, "_moe_gemm_decode_kernel")
    w = torch.zeros(4, 2, 128, 16, dtype=torch.int32)
    scales = torch.ones(4, 2, 128, dtype=torch.float16)
    a, out = torch.randn(6, 256, dtype=torch.float16), torch.empty(6, 64, dtype=torch.float16)
    aligned = (torch.zeros(96, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), torch.tensor([96]))
    for block_m, blocks, wgmma in ((48, aligned, False), (96, (None, torch.zeros(6, dtype=torch.int32), None), True)):
        with pytest.raises(ValueError, match="48, 96"):
            moe_gemm(a, w, scales, None, None, None, out, None, *blocks, bits=4, group_size=128, top_k=2, gated=True,
                     block_m=block_m, block_n=64, decode=True, wgmma=wgmma)
    moe_gemm(a, w, scales, None, None, None, out, None, *aligned, bits=4, group_size=128, top_k=2, gated=True,
             block_m=48, block_n=64, decode=True, wgmma=True)
    words_and_scales = ring_bytes(4, True, False, 128, 0, 64, 2)
    assert ring_bytes(4, True, False, 128, 48, 64, 2) - words_and_scales == 2 * 48 * 128 * 2
    assert ring_bytes(4, False, False, 128, 144, 128, 2) - ring_bytes(4, False, False, 128, 128, 128, 2) == 2 * 16 * 256


def test_decode_rows_go_through_cp_async_only_in_16_byte_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """cp.async moves 4, 8 or 16 bytes: the decode kernel copies rows of scales and activations with it only
    when N, K, the strides and the pointers are whole 16-byte pieces (ALIGNED), else through registers."""
    def aligned(a: torch.Tensor, n: int = 64) -> bool:
        return _recorded_launch(monkeypatch, True, a, n)[2]["ALIGNED"]

    wider = torch.randn(3, 272, dtype=torch.float16)  # rows 544 bytes apart
    assert aligned(torch.randn(3, 256, dtype=torch.float16)) and aligned(wider[:, 16:])
    assert not aligned(wider[:, 1:257])  # K = 256, rows 544 bytes apart, from a pointer 2 bytes past them
    assert not aligned(torch.randn(3, 264, dtype=torch.float16))  # K = 264: rows of 528 bytes
    assert not aligned(torch.randn(3, 256, dtype=torch.float16), n=72)  # scale rows of 72 columns


@pytest.mark.skipif(HAS_CUDA, reason="the fallback of interpreter runs")
@pytest.mark.parametrize("config", [TritonConfig(8, 64, 64, decode=True), TritonConfig(32, 64, 64, decode=True),
                                    TritonConfig(32, 64, 64, decode=True, wgmma=True),
                                    TritonConfig(32, 64, 64, num_stages=3, decode=True, wgmma=True, carry=1),
                                    TritonConfig(48, 64, 64, decode=True, wgmma=True)],
                         ids=["bm8", "bm32", "wgmma", "wgmma-carry", "bm48"])
def test_decode_config_runs_on_moe_gemm_without_ptx(config: TritonConfig) -> None:
    experts = random_experts(4, 128, 64, WeightScheme.from_name("int4_g32_zp"))
    out, ref = triton_and_emulation(experts, MoEConfig(4, 2, 128, 64, dtype=torch.float16), 6, config)
    assert relative_error(out, ref) < 1e-2


DECODE_CONFIGS = [
    TritonConfig(8, 64, 64, decode=True),  # a 4-deep cp.async ring
    TritonConfig(16, 128, 128, split_k1=2, split_k2=3, num_stages=3, decode=True),  # uneven split: an idle program
    TritonConfig(32, 64, 128, split_k2=2, num_stages=3, decode=True),  # wide blocks
    TritonConfig(8, 64, 256, split_k2=2, num_stages=2, decode=True),  # N tiles wider than I' (masked)
    TritonConfig(16, 32, 64, num_warps=2, max_registers=96, num_stages=3, decode=True),
    TritonConfig(8, 128, 128, num_stages=5, decode=True),
    TritonConfig(64, 64, 64, split_k1=2, num_stages=2, decode=True),
    TritonConfig(64, 128, 256, num_warps=8, num_stages=4, decode=True),
    # persistent programs: one per SM, GEMM2 256 wide (masked last tile), a 2-deep ring; two per SM at 16 rows
    TritonConfig(8, 128, 256, num_stages=2, decode=True, persistent=1),
    TritonConfig(16, 64, 128, num_stages=3, decode=True, persistent=2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=["bm8", "bm16-split", "bm32", "bm8-wide-2stages",
                                                     "bm16-w2", "bm8-5stages", "bm64-split", "bm64-w8",
                                                     "bm8-persistent", "bm16-persistent"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g128_zp", "int4_g32_sym", "int4_g64_zp",
                                         "int4_ch_sym", "int8_g128_sym", "int8_g128_zp", "int8_g64_sym"])
def test_gpu_decode_matches_emulation(scheme_name: str, config: TritonConfig) -> None:
    _check_against_emulation(scheme_name, config)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", [DECODE_CONFIGS[0], DECODE_CONFIGS[1], DECODE_CONFIGS[2]],
                         ids=["bm8", "bm16-split", "bm32"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int8_g128_zp"])
def test_gpu_narrow_blocks_in_groups_match_emulation(scheme_name: str, config: TritonConfig) -> None:
    """Both GEMMs reducing over GROUPED_FROM_K or more: narrow blocks go through the column tiles 8 row blocks at
    a time (`moe_gemm.group_m`), the last group short."""
    _check_against_emulation(scheme_name, config, i=GROUPED_FROM_K, h=GROUPED_FROM_K + 128)


def _check_against_emulation(scheme_name: str, config: TritonConfig, i: int = 384, h: int | None = None,
                             tokens: tuple[int, ...] = (1, 3, 40, 300), e: int = 16, top_k: int = 4) -> None:
    """TRITON with `config` against EMULATION, both dtypes, by default t = 1 to 300 tokens over 16 experts (top-4:
    every row count a wide block shrinks to). H, by default, is not a whole number of 128-deep tiles where the groups
    allow it (the masked last tile of GEMM1)."""
    if h is None:
        h = 1152 if "g128" in scheme_name else 1088
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    for dtype in DTYPES:
        for t in tokens:
            out, ref = triton_and_emulation(experts, MoEConfig(e, top_k, h, i, dtype=dtype), t, config)
            assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2, (scheme_name, dtype, t)


# Wide blocks on Hopper's warpgroup mmas: 32 rows (4 warps, GEMM2 256 wide, K-split GEMM1), 64 rows at 8 warps,
# 128 rows at 8 warps (GEMM2 128 and 256 wide) and at 4 (one warpgroup, 2 stages: two programs per SM), and
# GEMM2 alone at 4.
WGMMA_CONFIGS = [
    TritonConfig(32, 128, 256, num_stages=3, decode=True, wgmma=True),
    TritonConfig(32, 64, 128, split_k1=2, split_k2=2, num_stages=2, decode=True, wgmma=True),
    TritonConfig(64, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True),
    TritonConfig(128, 128, 128, num_warps=8, num_stages=3, decode=True, wgmma=True),
    TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True),  # (int8 at 4: 258 KB)
    TritonConfig(128, 64, 64, num_warps=4, num_stages=2, decode=True, wgmma=True),
    # GEMM2 at one warpgroup, 2 stages, beside GEMM1 at 8 warps: two GEMM2 programs per SM
    TritonConfig(128, 128, 128, num_warps=8, num_stages=3, decode=True, wgmma=True, num_warps2=4, num_stages2=2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", WGMMA_CONFIGS, ids=["bm32", "bm32-split", "bm64-w8", "bm128-w8", "bm128-n256",
                                                    "bm128-w4", "bm128-gemm2-w4"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g128_zp", "int4_g32_sym", "int4_ch_sym",
                                         "int8_g128_sym", "int8_g128_zp", "int8_g64_zp"])
def test_gpu_decode_wgmma_matches_emulation(scheme_name: str, config: TritonConfig) -> None:
    _check_against_emulation(scheme_name, config)


# Blocks of 48, 96 and 144 rows (32 + 16, 64 + 32 and 128 + 16 in two accumulators): at t = 300 over 16 experts,
# top-4, an expert's 75 +- 8 rows fill a 48-row block and leave 19-35 for a second one (its 32-row loop or, past 32,
# the split one), and fit one 96-row block (the 64 + 32 loop) and one 144-row block (the 64 + 32 loop as a 128-row
# block's); at t = 540 (135 +- 10 rows) a 144-row block, 128 pairs each but an expert's last (the alignment's extra
# rows), runs its 128-row loop, the 128 + 16 one, or 128 rows and a second block; t = 40 runs the shrunk 16-row
# loops; t = 1 and 3 take their blocks from the ids, as 64, 128 and 256 rows. GEMM2 64, 128 and 256 wide, 2 and 3
# stages, 8 warps from 96 rows. 128-row blocks at t = 300 multiply their 65-96 live rows in the same 64 + 32 loop (at
# 8 and 4 warps).
SPLIT_ROW_CONFIGS = [
    TritonConfig(48, 64, 128, num_stages=3, decode=True, wgmma=True),
    TritonConfig(48, 64, 64, num_stages=2, decode=True, wgmma=True, max_registers=168),
    TritonConfig(96, 128, 256, num_warps=8, num_stages=2, decode=True, wgmma=True),
    TritonConfig(144, 128, 128, num_warps=8, num_stages=2, decode=True, wgmma=True),
    TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True),
    TritonConfig(128, 64, 128, num_stages=2, decode=True, wgmma=True),
    TritonConfig(144, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", SPLIT_ROW_CONFIGS, ids=["bm48", "bm48-n64-capped", "bm96-w8", "bm144-w8",
                                                           "bm128-w8-mid", "bm128-w4-mid", "bm144-n256-s3"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g32_zp", "int4_ch_sym", "int8_g128_zp"])
def test_gpu_blocks_of_48_96_and_144_rows_match_emulation(scheme_name: str, config: TritonConfig) -> None:
    _check_against_emulation(scheme_name, config, tokens=(1, 3, 40, 300, 540))


# Blocks found in the ids (no alignment pass) of many tokens: 50, 80 and 120 tokens, top-2 over 256 experts, a
# 128-row block per pair (the one of an expert's first token works) in its 64-row, 64 + 32 (the last 32 rows' pairs
# found in the ids as the first 64's) and 128-row loops.
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int8_g128_zp"])
def test_gpu_token_blocks_of_many_tokens_match_emulation(scheme_name: str) -> None:
    _check_against_emulation(scheme_name, SPLIT_ROW_CONFIGS[4], tokens=(50, 80, 120), e=256, top_k=2)


# GEMM2 leaving each tile's last mmas in flight (`carry`; int8 tiles have 4 slots: all of them at 4), its ring
# one tile less ahead, over 7 K tiles (I = 896): the ring wraps, and the loop unrolled by 3 or 4 stages ends
# mid-round.
CARRY_CONFIGS = [
    TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True, carry=1),
    TritonConfig(64, 128, 256, num_warps=8, num_stages=4, decode=True, wgmma=True, carry=2),
    TritonConfig(32, 128, 256, num_stages=3, decode=True, wgmma=True, carry=4),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", CARRY_CONFIGS, ids=["bm128-carry1", "bm64-carry2", "bm32-carry4"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g32_zp", "int4_ch_sym", "int8_g128_zp"])
def test_gpu_decode_wgmma_carry_matches_emulation(scheme_name: str, config: TritonConfig) -> None:
    _check_against_emulation(scheme_name, config, i=896)


# GEMM2 on warp-specialized programs (kernels/moe_gemm_ws.py) over 7 K tiles, so that each stage's mbarriers
# complete phases 0 and 1 within a block: 256 wide at 3 stages, 128 wide at 4. (At 1 and 3 tokens the blocks come
# from the ids and GEMM2 runs on the decode kernel.)
SPECIALIZE_CONFIGS = [
    TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True, specialize=True),
    TritonConfig(128, 128, 128, num_warps=8, num_stages=3, num_stages2=4, decode=True, wgmma=True, specialize=True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", SPECIALIZE_CONFIGS, ids=["256-wide-3-stages", "128-wide-4-stages"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g32_zp", "int4_ch_sym", "int8_g128_zp"])
def test_gpu_warp_specialized_gemm2_matches_emulation(scheme_name: str, config: TritonConfig) -> None:
    _check_against_emulation(scheme_name, config, i=896)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("fixture", ["qwen3moe-gptq-w4-g32-descact", "qwen3moe-awq-gemm-w4-g32"])
def test_gpu_decode_wgmma_on_checkpoints(fixture: str) -> None:
    """Act-order columns gathered into the swizzled activation ring, AWQ zero points."""
    ckpt = open_checkpoint(f"tests/data/{fixture}")
    experts = ckpt.load_layer(1)
    for config in WGMMA_CONFIGS:
        for t in (5, 200):
            out, ref = triton_and_emulation(experts, replace(ckpt.moe_config(), dtype=torch.bfloat16), t, config)
            assert relative_error(out, ref) < 1e-2, (config, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("scheme_name", ["int4_ch_sym", "int8_ch_zp"])
def test_gpu_decode_with_rows_off_16_bytes(scheme_name: str) -> None:
    """H = 520 and I = 200 (channel-wise groups allow them): rows of scales, zero points and a wide block's
    activations are not whole 16-byte pieces, and reach shared memory through registers instead of cp.async
    (on sm_90 also into a 128-row block's unrolled stages: 600 tokens, ~150 rows per expert)."""
    e, h, i = 8, 520, 200
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    cases = [(config, t) for config in DECODE_CONFIGS[:3] for t in (1, 7, 90)]
    if torch.cuda.get_device_capability()[0] == 9:
        cases += [(WGMMA_CONFIGS[3], t) for t in (7, 90, 600)]
    for config, t in cases:
        out, ref = triton_and_emulation(experts, MoEConfig(e, 2, h, i, dtype=torch.bfloat16), t, config)
        assert relative_error(out, ref) < 1e-2, (scheme_name, config, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fixture", ["qwen3moe-gptq-w4-g32-descact", "qwen3moe-awq-gemm-w4-g32"])
def test_gpu_decode_on_checkpoints(fixture: str) -> None:
    """Real checkpoints: GPTQ act-order (activation columns gathered by the permutation), AWQ zero points."""
    ckpt = open_checkpoint(f"tests/data/{fixture}")
    experts = ckpt.load_layer(1)
    for dtype in DTYPES:
        for config in DECODE_CONFIGS[:3] + DECODE_CONFIGS[-1:]:
            for t in (1, 5, 40, 200):
                out, ref = triton_and_emulation(experts, replace(ckpt.moe_config(), dtype=dtype), t, config)
                assert relative_error(out, ref) < 1e-2, (dtype, config, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("activation", [Activation.SILU, Activation.SWIGLU_OAI, Activation.GELU])
def test_gpu_decode_bias_and_clamp(activation: Activation) -> None:
    e, h, i = 8, 512, 192
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_sym"))
    for config in DECODE_CONFIGS[:3]:
        for t in (1, 9, 70):
            cfg = MoEConfig(e, 2, h, i, activation=activation, dtype=torch.bfloat16)
            out, ref = triton_and_emulation(experts, cfg, t, config, w1_bias=torch.randn(e, 2 * i, device=DEVICE),
                                            w2_bias=torch.randn(e, h, device=DEVICE), gemm1_clamp_limit=0.5)
            assert relative_error(out, ref) < 1e-2, (activation, config, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 24, 400])
def test_gpu_decode_under_a_cuda_graph(t: int) -> None:
    e, k, h, i = 32, 4, 2048, 768
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_zp"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.bfloat16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)
    config = TritonConfig(8 if t < 100 else 32, 64, 128, split_k1=2 if t == 1 else 1, split_k2=2, decode=True)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(t, h, dtype=cfg.dtype, device=DEVICE)
        return (x, *softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True))

    first, fresh = draw(), draw()
    captured = replay_on_fresh_inputs(lambda *a: kernel.apply(*a, config), first, fresh, weights)
    assert relative_error(captured, emulation.apply(*fresh, emu_weights)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", [
    TritonConfig(8, 128, 256, num_stages=2, decode=True, persistent=3),
    TritonConfig(8, 64, 128, num_stages=3, decode=True, persistent=4, max_registers=128),
    TritonConfig(16, 128, 256, num_stages=2, decode=True, persistent=2),
], ids=["bm8-3", "bm8-3stages-4", "bm16-2"])
def test_gpu_persistent_programs_split_items(config: TritonConfig) -> None:
    """Persistent programs take equal shares of the items' K tiles, so that with many more items than programs
    most shares begin and end inside an item: GEMM1's earlier program finishes such an item with the sums its
    later one parked, GEMM2 adds both parts (its bias once). Against EMULATION with biases, in eager forwards and
    CUDA-graph replays; every flag is zero again after each."""
    e, k, h, i = 64, 8, 2176, 768  # (17 K tiles in GEMM1: shares rarely end on an item's edge)
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_zp"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.bfloat16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(
        experts, cfg, w1_bias=torch.randn(e, 2 * i, device=DEVICE), w2_bias=torch.randn(e, h, device=DEVICE))

    def draw(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(t, h, dtype=cfg.dtype, device=DEVICE)
        return (x, *softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True))

    for t in (40, 300):
        inputs = draw(t)
        out = kernel.apply(*inputs, weights, config)
        assert relative_error(out, emulation.apply(*inputs, emu_weights)) < 1e-2, t
        assert not kernel._share_flags.any()
    first, fresh = draw(300), draw(300)
    captured = replay_on_fresh_inputs(lambda *a: kernel.apply(*a, config), first, fresh, weights)
    assert relative_error(captured, emulation.apply(*fresh, emu_weights)) < 1e-2
    assert not kernel._share_flags.any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 40])
def test_gpu_program_timeline(t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`moe_gemm(trace=...)` leaves the results as they were and gives every program its stamps in order, on a real
    SM; GEMM2 (copying weights before it waits) ends after GEMM1 began; a trace too short is refused."""
    import wna16moe.kernels.moe_gemm as gemm_module  # (where the TRITON backend imports it from)
    import wna16moe.kernels.moe_gemm_decode as decode

    start, waited_at, loop_end, end, sm, fields = (field.value for field in (
        decode.TRACE_START, decode.TRACE_WAITED, decode.TRACE_LOOP_END, decode.TRACE_END, decode.TRACE_SM,
        decode.TRACE_FIELDS))

    e, k, h, i = 16, 4, 512, 768
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_sym"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.bfloat16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)
    config = TritonConfig(8, 64, 128, split_k1=2 if t == 1 else 1, split_k2=2, decode=True, num_stages=2, pdl=2)
    tw, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
    x = torch.randn(t, h, dtype=cfg.dtype, device=DEVICE)
    plain_moe_gemm, traces = gemm_module.moe_gemm, []

    def traced(*args, **kwargs):
        traces.append(torch.full((4096, fields), -1, dtype=torch.int64, device=DEVICE))
        return plain_moe_gemm(*args, trace=traces[-1], **kwargs)

    monkeypatch.setattr(gemm_module, "moe_gemm", traced)
    out = kernel.apply(x, tw, ids, weights, config)
    assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    for trace in traces:
        rows = trace[trace[:, start] >= 0]
        assert len(rows) > 0
        assert bool(((rows[:, sm] >= 0) & (rows[:, sm] < sms)).all())
        assert bool((rows[:, end] >= rows[:, start]).all())
        waited = rows[rows[:, waited_at] >= 0]  # (a prefetching GEMM2's idle blocks end before their wait)
        assert len(waited) > 0 and bool((waited[:, waited_at] >= waited[:, start]).all())
        ran = rows[rows[:, loop_end] >= 0]
        assert len(ran) > 0 and bool((ran[:, loop_end] >= ran[:, waited_at]).all())
        assert bool((ran[:, end] >= ran[:, loop_end]).all())
    assert traces[1][:, end].max() > traces[0][:, start].clamp_min(0).min()

    def too_short(*args, **kwargs):
        return plain_moe_gemm(*args, trace=torch.zeros(1, fields, dtype=torch.int64, device=DEVICE), **kwargs)

    monkeypatch.setattr(gemm_module, "moe_gemm", too_short)
    with pytest.raises(ValueError, match="trace"):
        kernel.apply(x, tw, ids, weights, config)
