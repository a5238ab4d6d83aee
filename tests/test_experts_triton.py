"""TRITON backend: the weight converter, capability checks, and the fused kernels against EMULATION.

CPU: the kernels run under TRITON_INTERPRET=1 on tiny shapes (fp16: the interpreter's bf16 dot is wrong).
GPU (marker gpu): real model shapes (H, I) with M from 1 to 8192 in bf16 and fp16, including CUDA-graph
capture and replay; relative Frobenius error against EMULATION below 1e-2.
"""

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton_env import (
    DEVICE,
    DTYPES,
    HAS_CUDA,
    outputs_on_fresh_tokens,
    random_experts,
    record_launches,
    replay_on_fresh_inputs,
    triton_and_emulation,
    triton_beside_emulation,
)

from wna16moe import (
    Activation,
    ActivationFormat,
    MoEConfig,
    ParallelConfig,
    WeightScheme,
    open_checkpoint,
)
from wna16moe.device import DeviceInfo
from wna16moe.errors import InvalidInputError
from wna16moe.experts.base import LayerSpec, relative_error
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.triton import (
    MANY_EXPERTS,
    RELEASE_AFTER_LOOP,
    RELEASE_AT_WAIT,
    RELEASE_EARLY,
    WIDE_HIDDEN,
    BatchedTritonExperts,
    TritonConfig,
    TritonExperts,
    prepare_triton_weights,
    registers_for_programs,
    stores_fragment_tiles,
)
from wna16moe.kernels import moe_gemm as moe_gemm_module
from wna16moe.kernels.layout import (
    TILE_K,
    exchange_halves,
    fragment_tiles,
    tile_deinterleave,
    tile_interleave,
    unfragment_tiles,
)
from wna16moe.kernels.moe_align import moe_align_block_size
from wna16moe.kernels.moe_gemm import _tile_from_slots, moe_gemm
from wna16moe.layer import WNA16MoE
from wna16moe.routing import softmax_topk

# ----- converter -----

@pytest.mark.parametrize("scheme_name", ["int4_g32_sym", "int4_g64_zp", "int8_g128_sym", "int8_ch_zp"])
def test_prepared_layout_dequantizes_to_the_canonical_weights(scheme_name: str) -> None:
    # I = 40 is padded to 64: the padded rows must carry zero scales.
    scheme = WeightScheme.from_name(scheme_name)
    e, h, i = 3, 128, 40
    experts = random_experts(e, h, i, scheme, torch.device("cpu"))
    prepared = prepare_triton_weights(experts, torch.device("cpu"))
    i_pad = 64
    assert prepared["w13"].shape == (e, h * scheme.bits // 32, 2 * i_pad)  # H = 128: one K tile
    codes = tile_deinterleave(prepared["w13"].transpose(1, 2), scheme.bits, h)  # [E, 2I', H]
    gate_up = torch.cat([codes[:, :i], codes[:, i_pad:i_pad + i]], dim=1)
    assert torch.equal(gate_up, experts.w13.codes)
    scales = prepared["w13_scales"].transpose(1, 2)
    assert torch.equal(torch.cat([scales[:, :i], scales[:, i_pad:i_pad + i]], dim=1), experts.w13.scales)
    assert (scales[:, i:i_pad] == 0).all() and (scales[:, i_pad + i:] == 0).all()
    w2_codes = tile_deinterleave(prepared["w2"].transpose(1, 2), scheme.bits, i_pad)
    assert torch.equal(w2_codes[..., :i], experts.w2.codes)
    if scheme.zero_point:
        zeros = prepared["w13_zeros"].transpose(1, 2)
        assert torch.equal(torch.cat([zeros[:, :i], zeros[:, i_pad:i_pad + i]], dim=1), experts.w13.zeros)


def test_act_order_is_a_column_permutation() -> None:
    experts = open_checkpoint("tests/data/qwen3moe-gptq-w4-g32-descact").load_layer(0)
    prepared = prepare_triton_weights(experts, torch.device("cpu"))
    perm = prepared["w13_perm"][0].long()
    assert torch.equal(torch.sort(perm).values, torch.arange(256))
    g_idx = experts.w13.g_idx[0].long()
    assert torch.equal(g_idx[perm], torch.arange(256) // 32)  # groups are contiguous after the permutation
    codes = tile_deinterleave(prepared["w13"][0, :, :128].t(), 4, 256)
    assert torch.equal(codes, experts.w13.codes[0, :128][:, perm])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("paired", [False, True])
def test_tile_interleave_round_trip_and_slot_order(bits: int, paired: bool) -> None:
    kd = 300  # three tiles, the last one partial (zero-padded)
    codes = torch.randint(0, 1 << bits, (5, kd), dtype=torch.uint8)
    words = tile_interleave(codes, bits, paired)
    r = TILE_K * bits // 32
    assert words.shape == (5, 3 * r)
    assert torch.equal(tile_deinterleave(words, bits, kd, paired), codes)
    # slot j of word r in tile t holds kd = t * TILE_K + j * R + r (paired: once the halves are exchanged back)
    plain = exchange_halves(words) if paired else words
    assert torch.equal(plain, tile_interleave(codes, bits))
    t, j, row = 1, 2, 3
    assert int((plain[0, t * r + row] >> (bits * j)) & ((1 << bits) - 1)) == int(codes[0, t * TILE_K + j * r + row])
    if paired:  # word rows 2m and 2m + 1 hold (kd, kd + 1) at the same bits of their two halves
        m, i, half_slots, mask = 3, 1, 16 // bits, (1 << bits) - 1
        first, second = int(words[0, t * r + 2 * m]), int(words[0, t * r + 2 * m + 1])
        for word, slot in ((first, i), (second, half_slots + i)):
            kd = t * TILE_K + slot * r + 2 * m
            assert (word >> (bits * i)) & mask == int(codes[0, kd])
            assert (word >> (16 + bits * i)) & mask == int(codes[0, kd + 1])


@pytest.mark.parametrize("scheme_name", ["int4_g64_zp", "int8_g128_sym"])
def test_fragment_tiles_hold_the_paired_words_in_fragment_order(scheme_name: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Hopper's layout (where `stores_fragment_tiles`): per half tile of 16 word rows (int4: a K tile; int8: half
    of one), each column's 16 words contiguous (paired), position p = 4q + 2h + l holding word row
    8h + 2q + l, so that mma thread q's rows 2q, 2q + 1, 2q + 8, 2q + 9 are 16 contiguous bytes;
    `unfragment_tiles` undoes it."""
    import wna16moe.experts.triton as backend

    scheme = WeightScheme.from_name(scheme_name)
    e, h, i = 2, 300, 40  # three K tiles, the last one partial
    experts = random_experts(e, h, i, scheme, torch.device("cpu"))
    plain = prepare_triton_weights(experts, torch.device("cpu"))
    monkeypatch.setattr(backend, "stores_fragment_tiles", lambda device: True)
    hopper = prepare_triton_weights(experts, torch.device("cpu"))
    assert {name: t.shape for name, t in hopper.items() if name not in ("w13", "w2")} == {
        name: t.shape for name, t in plain.items() if name not in ("w13", "w2")}
    halves = scheme.bits // 4  # half tiles per K tile
    assert hopper["w13"].shape == (e, 3 * halves, 128, 16) and hopper["w2"].shape == (e, halves, h, 16)
    for name in ("w13", "w2"):
        words = plain[name].transpose(1, 2)  # [E, N_total, tiles * R]
        words = exchange_halves(words)
        assert hopper[name].is_contiguous() and torch.equal(unfragment_tiles(hopper[name]), words)
    words = plain["w13"].transpose(1, 2)
    words = exchange_halves(words)
    for q, h_, l_ in ((0, 0, 0), (1, 1, 0), (3, 1, 1), (2, 0, 1)):  # the last K tile's last half tile
        half = 3 * halves - 1
        assert torch.equal(hopper["w13"][:, half, :, 4 * q + 2 * h_ + l_], words[:, :, half * 16 + 8 * h_ + 2 * q + l_])


@pytest.mark.parametrize("scheme_name", ["int4_g32_sym", "int4_g128_zp", "int8_g64_zp"])
def test_fragment_tiles_read_as_plain_words(scheme_name: str) -> None:
    """Triton's kernel reads fragment tiles (the Gluon kernels' layout, a 4-D w; paired words with each word's
    partner): the same GEMM1 (gate and up halves) as from plain words, bit for bit (different words would not
    be)."""
    scheme = WeightScheme.from_name(scheme_name)
    e, h, i, t, k = 4, 256, 64, 5, 2
    experts = random_experts(e, h, i, scheme)
    w = prepare_triton_weights(experts, torch.device("cpu"))
    plain = w["w13"].to(DEVICE)
    words = plain.transpose(1, 2)
    tiles = fragment_tiles(exchange_halves(words))
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    _, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=False)
    blocks = moe_align_block_size(ids, e, 16)
    outs = []
    for words in (plain, tiles):
        inter = torch.full((t * k, i), float("nan"), dtype=torch.float16, device=DEVICE)
        moe_gemm(x, words, w["w13_scales"].to(DEVICE), w["w13_zeros"].to(DEVICE) if "w13_zeros" in w else None,
                 None, None, inter, None, *blocks, bits=scheme.bits, group_size=scheme.group_size, top_k=k, gated=True,
                 block_m=16, block_n=32)
        outs.append(inter)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


# ----- capabilities -----

def test_capabilities() -> None:
    spec = LayerSpec(MoEConfig(8, 2, 256, 128), WeightScheme.from_name("int4_g128_sym"))
    assert TritonExperts.is_supported(spec, DeviceInfo.named("h100")).ok
    assert TritonExperts.is_supported(spec, DeviceInfo.named("mi300x")).ok
    v100 = TritonExperts.is_supported(spec, DeviceInfo.named("v100"))
    assert not v100.ok and "sm80" in v100.reason
    bare = TritonExperts.is_supported(spec, DeviceInfo.named("h100-bare"))
    assert not bare.ok and "Triton >= 3.6 is not installed" in bare.reason
    tp_ep = LayerSpec(MoEConfig(8, 2, 256, 128), WeightScheme.from_name("int4_g32_sym"),
                      ParallelConfig(tp_size=4, ep_size=2))  # I/tp = 32: whole groups; EP through the expert map
    assert TritonExperts.is_supported(tp_ep, DeviceInfo.named("h100")).ok
    split = LayerSpec(MoEConfig(8, 2, 256, 128), WeightScheme.from_name("int4_g64_sym"), ParallelConfig(tp_size=4))
    assert "shape: I/tp=32 (intermediate_size=128, tp_size=4) is not a multiple of group_size 64" in \
        TritonExperts.is_supported(split, DeviceInfo.named("h100")).reason


@pytest.mark.parametrize(("version", "enough"), [("3.6.0", True), ("3.7.1+git2a3b", True), ("4.0.0", True),
                                                 ("3.5.1", False), ("3.2.0", False), (None, True), ("dev", True)])
def test_triton_older_than_the_kernels_counts_as_absent(version: str | None, enough: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The Gluon kernels and the launch path need Triton 3.6: with an older one the oracle skips TRITON and says
    # why, instead of the first forward failing on an import. (An unreadable version gets the benefit of the
    # doubt.)
    import wna16moe.device as device

    assert device.triton_recent_enough(version) == enough
    if version is None:
        return
    monkeypatch.setattr(device.importlib.metadata, "version", lambda distribution: version)
    device._current.cache_clear()
    try:
        assert DeviceInfo.current("cpu").has_package("triton") == enough
    finally:
        device._current.cache_clear()


# ----- kernels against EMULATION (interpreter on CPU, compiled on GPU) -----

CASES = [
    # scheme, activation, E, H, I, T, top-k -- what it exercises
    ("int4_g32_sym", Activation.SILU, 8, 64, 96, 5, 2),          # I padded 96 -> 128, g32 tiles
    ("int4_g64_zp", Activation.GELU, 4, 128, 64, 3, 2),          # zero points, exact GELU
    ("int4_g128_sym", Activation.GELU_TANH, 4, 128, 64, 9, 4),   # K tile = group
    ("int8_ch_sym", Activation.SWIGLU_OAI, 6, 64, 64, 7, 3),     # channel-wise int8, clamped SwiGLU
    ("int8_g32_zp", Activation.SILU, 4, 64, 32, 4, 4),           # int8 zero points, top-k = E
    ("int4_ch_zp", Activation.SILU, 3, 64, 64, 1, 1),            # T = 1, top-k = 1
    ("int4_g64_zp", Activation.GELU, 8, 128, 64, 1, 4),          # T = 1: one block per pair, no alignment
    ("int4_g128_zp", Activation.SILU, 4, 256, 256, 6, 2),        # rows loaded a tile ahead, with zero points
    ("int8_g128_sym", Activation.SILU, 4, 512, 256, 3, 2),       # int8, four K tiles per GEMM1 program
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("scheme_name", "act", "e", "h", "i", "t", "k"), CASES)
def test_triton_matches_emulation(scheme_name: str, act: Activation, e: int, h: int, i: int, t: int, k: int,
                                  dtype: torch.dtype) -> None:
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    out, ref = triton_and_emulation(experts, MoEConfig(e, k, h, i, activation=act, dtype=dtype), t)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("config", [
    TritonConfig(16, 32, 32, split_k2=2),   # split-K in GEMM2 (atomic partial sums)
    TritonConfig(32, 64, 16, split_k2=1),   # larger M block than tokens per expert, narrow GEMM2 tiles
    TritonConfig(16, 128, 128, split_k2=3),  # N tiles wider than I' (masked), uneven split of 2 K tiles
    TritonConfig(64, 64, 64),  # BLOCK_M above the group size: scales applied to the weights
    TritonConfig(16, 32, 32, split_k1=2),  # GEMM1 partial sums, then the activation pass
    TritonConfig(16, 64, 64, split_k1=3, split_k2=2),  # uneven split: one program gets no K tile
    TritonConfig(16, 64, 128, max_registers=96),  # registers capped (ptxas .maxnreg on a GPU)
    TritonConfig(16, 32, 64, num_stages=2, num_warps2=8, num_stages2=3),  # GEMM2's own warps and ring depth
])
@pytest.mark.parametrize("scheme_name", ["int4_g32_zp", "int8_g32_sym"])
def test_configs_agree(config: TritonConfig, scheme_name: str) -> None:
    experts = random_experts(4, 128, 64, WeightScheme.from_name(scheme_name))
    out, ref = triton_and_emulation(experts, MoEConfig(4, 2, 128, 64, dtype=torch.float16), 6, config=config)
    assert relative_error(out, ref) < 1e-2


SHRINK_CONFIGS = [TritonConfig(64, 64, 64, shrink=2), TritonConfig(64, 32, 64, split_k2=2, shrink=1)]
if HAS_CUDA:  # the prefill tiles (wgmma), swapped and not
    SHRINK_CONFIGS += [TritonConfig(128, 128, 128, num_warps=8, num_stages=3, swap_ab=True, shrink=2),
                       TritonConfig(128, 64, 128, num_warps=4, num_stages=3, swap_ab=True, shrink=1),
                       TritonConfig(64, 128, 128, num_warps=4, num_stages=3, shrink=2)]


@pytest.mark.parametrize("config", SHRINK_CONFIGS, ids=lambda c: f"bm{c.block_m}-shrink{c.shrink}-swap{c.swap_ab:d}")
@pytest.mark.parametrize("scheme_name", ["int4_g32_zp", "int8_g128_sym"])
def test_blocks_shrink_to_their_rows(config: TritonConfig, scheme_name: str) -> None:
    """Blocks whose real rows fit in a half or a quarter of the block multiply only those (`shrink`): experts
    routed a whole block and a quarter more plus one row, half a block and one row, half, a quarter, nothing,
    and all but one row of a block; every routed row must come out as EMULATION's."""
    e, h, i, bm = 7, 256, 128, config.block_m
    counts = [bm + bm // 4 + 1, bm // 2 + 1, bm // 2, bm // 4, 0, bm - 1, 3]
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, MoEConfig(e, 1, h, i))
    for dtype in DTYPES:
        ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
        ids = ids[torch.randperm(len(ids))][:, None].to(DEVICE)
        x = torch.randn(len(ids), h, dtype=dtype, device=DEVICE)
        tw = torch.rand(len(ids), 1, device=DEVICE) + 0.5
        out = kernel.apply(x, tw, ids, weights, config)
        assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2, dtype


def test_wgmma_settings_are_checked() -> None:
    assert TritonConfig(32, 64, 128, decode=True, wgmma=True).wgmma
    with pytest.raises(ValueError, match="wide blocks"):
        TritonConfig(16, 64, 128, decode=True, wgmma=True)
    with pytest.raises(ValueError, match="wide blocks"):
        TritonConfig(64, 64, 128, swap_ab=True, wgmma=True)


def test_blocks_of_48_96_and_144_rows_need_wgmma_without_carry() -> None:
    assert TritonConfig(48, 64, 128, num_stages=3, decode=True, wgmma=True).decode_tiling_error() is None
    assert TritonConfig(144, 128, 128, num_warps=8, num_stages=2, decode=True, wgmma=True).decode_tiling_error() is None
    assert TritonConfig(96, 128, 256, num_warps=8, num_stages=2, decode=True, wgmma=True).block_m == 96
    for config in (dict(wgmma=False), dict(carry=1, num_stages=3), dict(wgmma=False, decode=False)):
        with pytest.raises(ValueError, match="48, 96 or 144"):
            TritonConfig(**dict(block_m=48, block_n1=64, block_n2=128, decode=True, wgmma=True) | config)


def test_gemm2_runs_its_own_warps_and_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    from wna16moe.kernels import moe_gemm as module

    launches = []
    launch = module.moe_gemm
    monkeypatch.setattr(module, "moe_gemm", lambda *a, **kw: launches.append(kw) or launch(*a, **kw))
    config = TritonConfig(16, 32, 64, num_warps=4, num_stages=2, num_warps2=8, num_stages2=3)
    experts = random_experts(4, 128, 64, WeightScheme.from_name("int4_g32_zp"))
    out, ref = triton_and_emulation(experts, MoEConfig(4, 2, 128, 64, dtype=torch.float16), 5, config=config)
    assert relative_error(out, ref) < 1e-2
    gemms = [(kw["gated"], kw["num_warps"], kw["num_stages"]) for kw in launches]
    assert gemms == [(True, 4, 2), (False, 8, 3)]
    same = TritonConfig(16, 32, 64, num_warps=8, num_stages=3)
    assert (same.gemm2_warps, same.gemm2_stages) == (8, 3)  # None: GEMM1's
    # GEMM2's settings equal to GEMM1's are GEMM1's: the same configuration (searches and trials count it once)
    assert TritonConfig(16, 32, 64, num_warps=8, num_stages=3, num_warps2=8, num_stages2=3) == same


def test_decode_tilings_are_checked_per_gemm() -> None:
    split = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, decode=True, wgmma=True, num_warps2=4,
                         num_stages2=2)
    assert split.decode_tiling_error() is None
    narrow = TritonConfig(128, 128, 64, num_warps=4, num_stages=3, decode=True, num_warps2=8)
    assert "block_n=64 must be a multiple of 16 x num_warps=128" in narrow.decode_tiling_error()
    shallow = TritonConfig(128, 128, 128, num_warps=8, decode=True, num_stages2=1)
    assert "num_stages must be 2" in shallow.decode_tiling_error()
    assert TritonConfig(16, 32, 64, num_warps2=2).decode_tiling_error() is None  # (the Triton kernel's)


def test_shrink_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="shrink"):
        TritonConfig(128, 128, 128, shrink=3)
    with pytest.raises(ValueError, match="decode kernel"):
        TritonConfig(32, 64, 128, decode=True, shrink=1)


def test_persistent_applies_to_narrow_decode_blocks_only() -> None:
    assert TritonConfig(8, 128, 256, decode=True, persistent=3).persistent == 3
    for config in (dict(block_m=16), dict(block_m=32, decode=True), dict(block_m=8, decode=True, persistent=-1)):
        with pytest.raises(ValueError, match="persistent"):
            TritonConfig(block_n1=64, block_n2=64, **{"persistent": 2} | config)


def test_pdl_settings_are_checked() -> None:
    assert TritonConfig(8, 64, 128, split_k1=4, decode=True, pdl=RELEASE_EARLY).pdl == RELEASE_EARLY
    # without a K-split GEMM1 there is no activation pass to release early: the same launches as at the wait
    assert TritonConfig(8, 64, 128, decode=True, pdl=RELEASE_EARLY).pdl == RELEASE_AT_WAIT
    for pdl in (-1, 4):
        with pytest.raises(ValueError, match="pdl"):
            TritonConfig(8, 64, 128, pdl=pdl)


def test_carry_needs_wgmma() -> None:
    assert TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True, carry=2).carry == 2
    for config in (dict(carry=1), dict(wgmma=True, carry=5), dict(wgmma=True, carry=-1)):
        with pytest.raises(ValueError, match="carry"):
            TritonConfig(32, 128, 256, decode=True, **config)


def test_specialize_needs_128_row_wgmma_blocks_at_8_warps() -> None:
    assert TritonConfig(128, 128, 128, num_warps=8, decode=True, wgmma=True, specialize=True).specialize
    assert TritonConfig(128, 128, 256, num_warps=8, decode=True, wgmma=True, specialize=True).specialize
    for config in (dict(block_m=64), dict(block_n2=64), dict(num_warps2=4), dict(carry=1), dict(split_k2=2),
                   dict(wgmma=False)):
        with pytest.raises(ValueError, match="specialize"):
            TritonConfig(**dict(block_m=128, block_n1=128, block_n2=128, num_warps=8, decode=True, wgmma=True,
                                specialize=True) | config)


@pytest.mark.parametrize("config", [None, TritonConfig(16, 32, 32, split_k1=2, split_k2=2)],
                         ids=["default", "split-k"])
@pytest.mark.parametrize("activation", [Activation.SILU, Activation.SWIGLU_OAI])
def test_bias_and_clamp(activation: Activation, config: TritonConfig | None) -> None:
    e, h, i = 4, 256, 64
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_sym"))
    out, ref = triton_and_emulation(experts, MoEConfig(e, 2, h, i, activation=activation, dtype=torch.float16), 5,
                                    config=config, w1_bias=torch.randn(e, 2 * i, device=DEVICE),
                                    w2_bias=torch.randn(e, h, device=DEVICE), gemm1_clamp_limit=0.5)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("t", [1, 2, 5, 12])
@pytest.mark.parametrize("block_m", [16, 32])
def test_blocks_from_the_ids_match_emulation(t: int, block_m: int) -> None:
    """For a few tokens the GEMMs find their blocks in topk_ids (kernels/token_blocks.py): with experts shared
    by several tokens, ids of another EP rank (-1), a token naming an expert twice (bad routing, but each of its
    pairs must still count once) and experts nobody routed to."""
    e, h, i, k = 24, 128, 64, 2
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_zp"))
    spec = LayerSpec(MoEConfig(e, k, h, i, dtype=torch.float16), experts.scheme)
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    weights = torch.rand(t, k, device=DEVICE)
    ids = torch.randint(0, 6, (t, k), device=DEVICE)  # (experts 6 and on: never routed to)
    ids[0, 1] = ids[0, 0]  # a token naming an expert twice
    ids[-1, -1] = -1
    ref = EmulationExperts(spec, experts.quant_config(), DEVICE).apply(
        x, weights, ids, EmulationExperts.prepare_weights(experts, DEVICE))
    out = TritonExperts(spec, experts.quant_config(), DEVICE).apply(
        x, weights, ids, TritonExperts.prepare_weights(experts, DEVICE), TritonConfig(block_m, 32, 32))
    assert relative_error(out, ref) < 1e-2


BAD_ID_CONFIGS = [TritonConfig(16, 32, 32), TritonConfig(16, 32, 32, split_k1=2)]
if HAS_CUDA:  # the decode kernel, narrow and wide blocks
    BAD_ID_CONFIGS += [TritonConfig(8, 64, 64, decode=True), TritonConfig(8, 64, 64, decode=True, split_k1=2),
                       TritonConfig(32, 64, 64, decode=True, wgmma=True)]


@pytest.mark.parametrize("config", BAD_ID_CONFIGS, ids=str)
@pytest.mark.parametrize("t", [1, 5, 20])  # one pair per block, token blocks, aligned blocks (E = 24, k = 2)
def test_ids_past_the_experts_are_left_out(t: int, config: TritonConfig) -> None:
    """A caller's ids outside [-1, E) are left out like -1, on every way the kernels find their blocks, and
    never index weights, scales or biases (the reference raises on them)."""
    e, h, i, k = 24, 128, 64, 2
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_zp"))
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    weights = torch.rand(t, k, device=DEVICE)
    ids = torch.randint(0, e, (t, k), device=DEVICE)
    bad = torch.tensor([e, 31, 1 << 20, -2, -(1 << 30)], device=DEVICE)
    ids[:, 1] = bad[torch.arange(t, device=DEVICE) % bad.numel()]
    if t > 1:
        ids[1:, 0] = ids[0, 0]  # the good pairs share an expert: the bad ones sit in its token blocks
    kernel, prepared, emulation, emulation_weights = triton_beside_emulation(
        experts, MoEConfig(e, k, h, i, dtype=torch.float16), w1_bias=torch.randn(e, 2 * i, device=DEVICE),
        w2_bias=torch.randn(e, h, device=DEVICE))
    with pytest.raises(InvalidInputError, match="topk_ids holds expert"):
        emulation.apply(x, weights, ids, emulation_weights)
    ref = emulation.apply(x, weights, torch.where((ids >= 0) & (ids < e), ids, -1), emulation_weights)
    out = kernel.apply(x, weights, ids, prepared, config)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-2


def test_blocks_from_the_ids_replace_the_alignment_for_few_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """No alignment launch where a block's rows hold every token and pairs do not outnumber experts: one pair
    per block for one token, token rows for more (ID_BLOCKS 1, 2); aligned blocks otherwise."""
    import wna16moe.kernels.moe_align as align

    launches = record_launches(monkeypatch, "_moe_gemm_kernel")
    aligned = []
    real_align = align.moe_align_block_size
    monkeypatch.setattr(align, "moe_align_block_size", lambda *a, **kw: aligned.append(1) or real_align(*a, **kw))
    e, h, i, k = 40, 128, 64, 2
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_sym"))
    spec = LayerSpec(MoEConfig(e, k, h, i, dtype=torch.float16), experts.scheme)
    kernel = TritonExperts(spec, experts.quant_config(), DEVICE)
    weights = TritonExperts.prepare_weights(experts, DEVICE)
    # (tokens, block_m, ID_BLOCKS): 40 experts hold 20 tokens' pairs
    for t, block_m, expected in ((1, 16, 1), (9, 16, 2), (16, 16, 2), (17, 32, 2), (17, 16, 0), (21, 32, 0)):
        launches.clear()
        aligned.clear()
        topk_weights, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
        kernel.apply(torch.randn(t, h, dtype=torch.float16, device=DEVICE), topk_weights, ids, weights,
                     TritonConfig(block_m, 32, 32))
        assert [kwargs["ID_BLOCKS"] for _, _, kwargs in launches] == [expected, expected], (t, block_m)
        assert len(aligned) == (expected == 0), (t, block_m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_weights_in_the_activation_dtype(dtype: torch.dtype) -> None:
    # Routers often return fp16/bf16 weights: GEMM2 reads them as they are (no cast launch), as float32.
    e, h, i, t = 4, 128, 64, 5
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_sym"))
    spec = LayerSpec(MoEConfig(e, 2, h, i, dtype=dtype), experts.scheme)
    x = torch.randn(t, h, dtype=dtype, device=DEVICE)
    weights, ids = softmax_topk(torch.randn(t, e, device=DEVICE), 2, renormalize=True)
    weights = weights.to(dtype)
    ref = EmulationExperts(spec, experts.quant_config(), DEVICE).apply(
        x, weights.float(), ids, EmulationExperts.prepare_weights(experts, DEVICE))
    out = TritonExperts(spec, experts.quant_config(), DEVICE).apply(
        x, weights, ids, TritonExperts.prepare_weights(experts, DEVICE))
    assert relative_error(out, ref) < 1e-2


def test_gemm1_writes_every_routed_row() -> None:
    # Poison the intermediate with NaN: every routed pair's row must be overwritten by GEMM1.
    scheme = WeightScheme.from_name("int4_g32_sym")
    e, h, i, t, k = 4, 64, 64, 6, 2
    experts = random_experts(e, h, i, scheme)
    w = prepare_triton_weights(experts, DEVICE)
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    _, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=False)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, e, 16)
    inter = torch.full((t * k, i), float("nan"), dtype=torch.float16, device=DEVICE)
    moe_gemm(x, w["w13"], w["w13_scales"], None, None, None, inter, None, sorted_ids, expert_ids, num_padded,
             bits=4, group_size=32, top_k=k, gated=True, block_m=16, block_n=32)
    assert torch.isfinite(inter).all()


def test_a_tile_past_the_gpus_resources_names_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton refuses a compiled kernel whose pipelined buffers overflow shared memory only at its first launch.
    def refuse(*args: object, **kwargs: object) -> None:
        raise OutOfResources(243_712, 232_448, "shared memory")

    monkeypatch.setattr(moe_gemm_module, "launch", refuse)
    e, h, i, t, k = 4, 64, 64, 3, 2
    w = prepare_triton_weights(random_experts(e, h, i, WeightScheme.from_name("int8_g64_zp")), DEVICE)
    _, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=False)
    inter = torch.empty(t * k, i, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"block_m=16 x block_n=32 at num_warps=4, num_stages=3 \(8-bit, gated, "
                                         r"_moe_gemm_kernel\) does not fit this GPU: out of resource: shared memory"):
        moe_gemm(torch.randn(t, h, dtype=torch.float16, device=DEVICE), w["w13"], w["w13_scales"], w["w13_zeros"],
                 None, None, inter, None, *moe_align_block_size(ids, e, 16), bits=8, group_size=64, top_k=k,
                 gated=True, block_m=16, block_n=32)


@pytest.mark.parametrize(("t", "from_ids"), [(5, False), (1, True), (5, True)],
                         ids=["aligned", "one-block-per-pair", "blocks-from-ids"])
@pytest.mark.parametrize("numel", [1, 3000, 70_001])  # fewer elements than programs; more than a 1024-wide store
def test_gemm1_clears_gemm2_output(numel: int, t: int, from_ids: bool) -> None:
    # GEMM2's accumulator, poisoned: GEMM1's programs (idle ones included) must zero all of it and nothing more.
    e, h, i, k = 4, 64, 64, 2
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_sym"))
    w = prepare_triton_weights(experts, DEVICE)
    _, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=False)
    blocks = (None, ids.reshape(-1), None) if from_ids else moe_align_block_size(ids, e, 16)
    target = torch.full((numel + 1,), float("nan"), device=DEVICE)
    inter = torch.empty(t * k, i, dtype=torch.float16, device=DEVICE)
    moe_gemm(torch.randn(t, h, dtype=torch.float16, device=DEVICE), w["w13"], w["w13_scales"], None, None, None,
             inter, None, *blocks, bits=4, group_size=32, top_k=k, gated=True, block_m=16, block_n=32,
             zero_out=target[:numel])
    assert torch.equal(target[:numel], torch.zeros(numel, device=DEVICE)) and torch.isnan(target[numel])


def test_tokens_without_local_experts_come_out_zero() -> None:
    # Expert parallel: a token whose experts all live on other ranks (-1) gets a zero row (GEMM1 clears the sums).
    e, h, i, k, t = 8, 128, 64, 2, 5
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_zp"))
    kernel, weights, emulation, emulation_weights = triton_beside_emulation(experts, MoEConfig(e, k, h, i,
                                                                                               dtype=torch.float16))
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    topk_weights, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
    ids[2] = -1
    for config in (TritonConfig(16, 32, 32), TritonConfig(16, 32, 32, split_k2=2)):
        out = kernel.apply(x, topk_weights, ids, weights, config)
        assert torch.equal(out[2], torch.zeros(h, dtype=torch.float16, device=DEVICE))
        assert relative_error(out, emulation.apply(x, topk_weights, ids, emulation_weights)) < 1e-2


@pytest.mark.parametrize("fixture", ["qwen3moe-gptq-w4-g32-descact", "qwen3moe-awq-gemm-w4-g32",
                                     "qwen3moe-w8a16-g128-sym", "qwen3moe-w4a16-g128-asym"])
def test_layer_on_fixtures(fixture: str) -> None:
    # Real checkpoints through the layer (act-order, AWQ zero points, int8) with expert biases.
    ckpt = open_checkpoint(f"tests/data/{fixture}")
    experts = ckpt.load_layer(1)
    cfg = replace(ckpt.moe_config(), dtype=torch.float16)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    kwargs = dict(device=DEVICE, w13_bias=torch.randn(e, 2 * i) * 0.1, w2_bias=torch.randn(e, h) * 0.1)
    ref = WNA16MoE(experts, cfg, backend="emulation", **kwargs)
    layer = WNA16MoE(experts, cfg, backend="triton", **kwargs)
    assert layer.backend.value == "triton"
    x = torch.randn(9, h, dtype=torch.float16, device=DEVICE)
    logits = x.float() @ ckpt.router_weight(1).float().to(DEVICE).t()
    assert relative_error(layer(x, logits), ref(x, logits)) < 1e-2


# ----- GPU: real shapes, every M, bf16, CUDA graphs -----

GPU_SHAPES = [
    # name, E (reduced for the big models to keep the test short), top-k, H, I, scheme
    ("mixtral", 8, 2, 4096, 14336, "int4_g128_sym"),
    ("qwen3-30b-a3b", 128, 8, 2048, 768, "int4_g128_zp"),
    ("deepseek-v3 (E=16)", 16, 8, 7168, 2048, "int8_g128_sym"),
    ("kimi-k2 (E=16)", 16, 8, 7168, 2048, "int4_g32_sym"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("name", "e", "k", "h", "i", "scheme_name"), GPU_SHAPES)
def test_gpu_real_shapes(name: str, e: int, k: int, h: int, i: int, scheme_name: str) -> None:
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    for dtype in (torch.bfloat16, torch.float16):
        kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, MoEConfig(e, k, h, i, dtype=dtype))
        for t in (1, 8, 32, 128, 512, 2048, 8192):
            x = torch.randn(t, h, dtype=dtype, device=DEVICE)
            tw, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
            ref = emulation.apply(x, tw, ids, emu_weights)
            out = kernel.apply(x, tw, ids, weights)
            assert relative_error(out, ref) < 1e-2, (name, dtype, t)
            x2 = torch.randn(t, h, dtype=dtype, device=DEVICE)
            tw2, ids2 = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
            captured = replay_on_fresh_inputs(kernel.apply, (x, tw, ids), (x2, tw2, ids2), weights)
            expected = emulation.apply(x2, tw2, ids2, emu_weights)
            assert relative_error(captured, expected) < 1e-2, (name, dtype, t, "graph")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ptx_dequant", [True, False], ids=["ptx-dequant", "plain-dequant"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g128_zp", "int4_g64_zp", "int8_g128_zp",
                                         "int4_g32_sym"])
def test_gpu_both_dequant_paths(scheme_name: str, ptx_dequant: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PTX dequantization (CUDA) and the plain path (ROCm, XPU) both against EMULATION on the GPU."""
    import wna16moe.experts.triton as triton_experts

    monkeypatch.setattr(triton_experts, "_ptx_dequant", lambda device: ptx_dequant)
    experts = random_experts(32, 1024, 512, WeightScheme.from_name(scheme_name))
    for dtype in (torch.bfloat16, torch.float16):
        for t in (1, 64, 1024):
            out, ref = triton_and_emulation(experts, MoEConfig(32, 4, 1024, 512, dtype=dtype), t)
            assert relative_error(out, ref) < 1e-2, (scheme_name, dtype, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", [
    TritonConfig(128, 128, 128, num_warps=8, num_stages=3, swap_ab=True),  # two warpgroups, wgmma
    TritonConfig(64, 128, 128, num_warps=4, num_stages=3, swap_ab=True),
    TritonConfig(128, 64, 64, num_warps=4, num_stages=3, swap_ab=True),
    TritonConfig(16, 64, 64, split_k2=2, swap_ab=True),  # decode-sized M block, split GEMM2
    # two warpgroups along the tokens (2 stages: on Hopper the words are paired, and their partner rows'
    # loads take shared memory too; 3 stages need ~246 KB there)
    TritonConfig(256, 64, 64, num_warps=8, num_stages=2, swap_ab=True),
], ids=["bm128-bn128-w8", "bm64-bn128-w4", "bm128-bn64-w4", "bm16-bn64-split2", "bm256-bn64-w8"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g128_zp", "int4_g32_sym", "int8_g128_zp",
                                         "int4_ch_sym", "int8_g64_sym"])
def test_gpu_swap_ab(scheme_name: str, config: TritonConfig) -> None:
    """Swap-AB (weights as the MMA's A operand, scaled in the dequantization) against EMULATION; H is not a
    whole number of 128-deep tiles where the groups allow it (the masked last tile of GEMM1)."""
    e, h, i = 16, 1152 if "g128" in scheme_name else 1088, 384
    scheme = WeightScheme.from_name(scheme_name)
    hopper = torch.cuda.get_device_capability()[0] == 9
    if hopper and scheme.bits == 8 and config.block_m == 128 and config.num_warps == 8:
        config = replace(config, num_stages=2)  # (3 stages do not fit: the test below)
    experts = random_experts(e, h, i, scheme)
    for dtype in (torch.bfloat16, torch.float16):
        for t in (1, 40, 700):
            out, ref = triton_and_emulation(experts, MoEConfig(e, 4, h, i, dtype=dtype), t, config=config)
            assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2, (scheme_name, dtype, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_a_tile_past_shared_memory_is_refused_by_its_config() -> None:
    """Hopper's paired int8 words and their partner rows take GEMM1's 128 x 128 8-warp tile at 3 stages to 238 KB
    of shared memory, past the 227 KB there (CPU compile; 139 KB at 2): an error that names the configuration."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("int8 words are paired on Hopper")
    e, h, i = 16, 1152, 384
    experts = random_experts(e, h, i, WeightScheme.from_name("int8_g128_zp"))
    config = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, swap_ab=True)
    with pytest.raises(ValueError, match=r"block_m=128 x block_n=128 at num_warps=8, num_stages=3 .* does not fit"):
        triton_and_emulation(experts, MoEConfig(e, 4, h, i, dtype=torch.bfloat16), 700, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("t", "i", "scheme_name", "expected"), [
    (1200, 512, "int4_g128_zp", TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)),
    (200, 512, "int4_g128_zp", TritonConfig(64, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)),
    (300, 512, "int4_g128_zp", TritonConfig(96, 128, 256, num_warps=8, num_stages=2, decode=True, wgmma=True)),
    (200, 2048, "int4_g128_zp", TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)),
    (300, 2048, "int4_g128_zp", TritonConfig(96, 128, 256, num_warps=8, num_stages=2, decode=True, wgmma=True)),
    (360, 512, "int4_g128_zp", TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)),
    (540, 512, "int4_g128_zp", TritonConfig(144, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)),
    (1100, 512, "int8_g128_sym", TritonConfig(144, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True))])
def test_gpu_default_prefill_config(t: int, i: int, scheme_name: str, expected: TritonConfig) -> None:
    """A shape the tuned table does not hold runs `default_config`; at prefill on Hopper it takes the decode
    kernel's 64-row blocks from 33 rows per expert (128-row ones, which shrink to their 64-row loop, where the
    intermediate size is long), 96-row ones above 56 rows up to 86 and 128-row ones above, 144-row ones (128 pairs
    but an expert's last) above 107 rows up to 155 (int8: at every row count above 107; here t / 4 per expert), and
    the layer still matches EMULATION."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma defaults are Hopper's")
    e, k, h = 8, 2, 1024
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, MoEConfig(e, k, h, i))
    config = kernel.config(t)
    assert config == expected, config
    out, ref = outputs_on_fresh_tokens(kernel, weights, emulation, emu_weights, t)
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("scheme_name", ["int4_g128_zp", "int8_g128_sym"])
@pytest.mark.parametrize(("t", "block_m"), [(1, 8), (24, 8), (48, 8), (56, 16), (64, 16), (96, 32)])
def test_gpu_default_decode_config(scheme_name: str, t: int, block_m: int) -> None:
    """A shape the tuned table does not hold runs `default_config`; on Hopper, where experts see few rows (here
    t / 8 per expert), it takes the decode kernel, 8-row blocks below 7 rows, 16 below 10 (int8: 8 below 8)
    and 32-row blocks on wgmma from 10 (int8: 8), and the layer still matches EMULATION."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the decode defaults are Hopper's")
    e, k, h, i = 16, 2, 1024, 512
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, MoEConfig(e, k, h, i))
    config = kernel.config(t)
    if scheme_name.startswith("int8") and block_m == 16:
        block_m = 32 if t / 8 >= 8 else 8
    assert (config.decode, config.block_m, config.wgmma) == (True, block_m, block_m == 32), config
    out, ref = outputs_on_fresh_tokens(kernel, weights, emulation, emu_weights, t)
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("scheme_name", "e", "k", "h", "block_m"), [
    ("int4_g32_zp", MANY_EXPERTS, 8, WIDE_HIDDEN, 32), ("int4_g64_sym", MANY_EXPERTS, 8, WIDE_HIDDEN, 32),
    ("int4_g32_zp", 16, 2, 1024, 16)])
def test_gpu_default_small_groups_on_mma_sync(scheme_name: str, e: int, k: int, h: int, block_m: int) -> None:
    """int4 at groups of 32 and 64 at 11 rows per expert runs mma.sync blocks by default on Hopper (NOTES.md v73):
    on a layer of WIDE_HIDDEN and MANY_EXPERTS the capped 32-row tile, 128 / 256 wide, on a narrower one with fewer
    experts the 16-row tile; zero points included, and the layer still matches EMULATION."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the decode defaults are Hopper's")
    i = 256
    t = 11 * e // k
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, MoEConfig(e, k, h, i))
    config = kernel.config(t)
    assert (config.decode, config.block_m, config.block_n2, config.wgmma, config.max_registers) == (
        True, block_m, 256, False, registers_for_programs(3)), config
    out, ref = outputs_on_fresh_tokens(kernel, weights, emulation, emu_weights, t)
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [8, 40])
def test_gpu_batched_default_runs_the_decode_kernel_on_hopper(monkeypatch: pytest.MonkeyPatch, m: int) -> None:
    """BATCHED_TRITON's configurations are `default_config`'s at m rows per expert: on Hopper the decode kernel
    (words are stored in fragment tiles there), 16-row blocks at 8 rows and 64-row wgmma blocks at 40 (above 32
    rows per expert, NOTES.md v55); every expert's rows still match EMULATION's."""
    import wna16moe.kernels.moe_gemm as launcher

    if not stores_fragment_tiles(torch.device(DEVICE)):
        pytest.skip("words are stored in fragment tiles on Hopper only")
    e, h, i = 8, 1024, 512
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_zp"))
    spec = LayerSpec(MoEConfig(e, 2, h, i), experts.scheme, activation_format=ActivationFormat.BATCHED)
    kernel = BatchedTritonExperts(spec, experts.quant_config(), DEVICE)
    one_expert = LayerSpec(MoEConfig(e, 1, h, i), experts.scheme)
    emulation = EmulationExperts(one_expert, experts.quant_config(), DEVICE)
    emu_weights = EmulationExperts.prepare_weights(experts, DEVICE)
    tiles = []
    original = launcher.moe_gemm
    monkeypatch.setattr(launcher, "moe_gemm", lambda *args, **kw: (tiles.append((kw["decode"], kw["block_m"])),
                                                                   original(*args, **kw))[1])
    num_tokens = torch.randint(1, m + 1, (e,), dtype=torch.int32, device=DEVICE)
    x = torch.randn(e, m, h, dtype=torch.bfloat16, device=DEVICE)
    out = kernel.apply_batched(x, num_tokens, kernel.prepare_weights(experts, DEVICE))
    assert tiles == [(True, 16 if m == 8 else 64)] * 2, tiles
    for expert, n in enumerate(num_tokens.tolist()):
        ones = torch.ones(n, 1, device=DEVICE)
        ids = torch.full((n, 1), expert, dtype=torch.int32, device=DEVICE)
        ref = emulation.apply(x[expert, :n], ones, ids, emu_weights)
        assert relative_error(out[expert, :n], ref) < 1e-2, expert


@triton.jit
def _tile_from_slots_probe(out_ptr, R: tl.constexpr, N: tl.constexpr, PACK: tl.constexpr):
    r = tl.arange(0, R)[:, None]
    n = tl.arange(0, N)[None, :]
    # Slot j holds tile row j * R + r; each element encodes (row, column).
    if PACK == 8:
        slots = tuple((j * R + r) * 1000 + n for j in tl.static_range(8))
    else:
        slots = tuple((j * R + r) * 1000 + n for j in tl.static_range(4))
    tile = _tile_from_slots(slots, PACK)
    tl.store(out_ptr + tl.arange(0, PACK * R)[:, None] * N + n, tile)


@pytest.mark.parametrize("bits", [4, 8])
def test_tile_from_slots_is_slot_major(bits: int) -> None:
    # The swap-AB path joins the slots into one 128-deep operand: row k of the tile must be slot k // R, row k % R.
    pack, n = 32 // bits, 16
    r = TILE_K // pack
    out = torch.empty(TILE_K, n, dtype=torch.int32, device=DEVICE)
    _tile_from_slots_probe[(1,)](out, R=r, N=n, PACK=pack)
    expected = torch.arange(TILE_K, device=DEVICE)[:, None] * 1000 + torch.arange(n, device=DEVICE)[None, :]
    assert torch.equal(out, expected.to(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pdl", [RELEASE_AFTER_LOOP, RELEASE_AT_WAIT, RELEASE_EARLY],
                         ids=["release-after-loop", "release-at-wait", "release-early"])
@pytest.mark.parametrize("t", [1, 32, 512])
def test_gpu_chained_forwards(t: int, pdl: int) -> None:
    """Forwards back to back, each routing on the last one's output, as layers of a model, eagerly and as one
    CUDA graph: with programmatic dependent launch (kernels/grid_dependence.py) a kernel that read or wrote too
    early, or a buffer reused while the kernel before still used it, shows as a step off the reference.
    Released early, GEMM1 is split over K (its activation pass is what releases early)."""
    e, k, h, i, steps = 32, 4, 2048, 768, 6
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_zp"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.bfloat16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)
    router = torch.randn(h, e, device=DEVICE) / h**0.5

    def step(x: torch.Tensor, apply) -> torch.Tensor:
        tw, ids = softmax_topk(x.float() @ router, k, renormalize=True)
        out = apply(x, tw, ids).float()
        return (out / out.norm(dim=1, keepdim=True).clamp_min(1e-6) * h**0.5).to(x.dtype)

    config = replace(kernel.config(t), pdl=pdl, **({"split_k1": 4} if pdl == RELEASE_EARLY else {}))

    def chain(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = [x]
        for _ in range(steps):
            outputs.append(step(outputs[-1], lambda *a: kernel.apply(*a, weights, config)))
        return outputs

    def check(outputs: list[torch.Tensor], how: str) -> None:
        for n in range(steps):  # each step against the reference on the same input
            expected = step(outputs[n], lambda *a: emulation.apply(*a, emu_weights))
            assert relative_error(outputs[n + 1], expected) < 2e-2, (t, n, how)

    check(chain(torch.randn(t, h, dtype=cfg.dtype, device=DEVICE)), "eager")  # (compiles before the capture)
    static = torch.empty(t, h, dtype=cfg.dtype, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(static)
    static.copy_(torch.randn(t, h, dtype=cfg.dtype, device=DEVICE))
    graph.replay()
    check(captured, "graph")


@pytest.mark.parametrize(("t", "config"), [(1, None), (5, None), (5, TritonConfig(16, 32, 32, split_k1=2, split_k2=2)),
                                         (300, None)], ids=["ids-blocks", "aligned", "k-split", "many-program-align"])
def test_forward_runs_only_launches_and_allocations(t: int, config: TritonConfig | None) -> None:
    """A launch plan replays only launches and allocations (kernels/launch.py): a torch op added to the forward
    would turn plans off on the GPU without a failure. Under the interpreter every launch refuses the recording as
    interpreted; no other reason may appear."""
    from wna16moe.kernels.launch import recording

    e, k, h, i = 8, 2, 128, 64
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_zp"))
    kernel, weights, _, _ = triton_beside_emulation(experts, MoEConfig(e, k, h, i, dtype=torch.float16),
                                                    w1_bias=torch.randn(e, 2 * i, device=DEVICE))
    x = torch.randn(t, h, dtype=torch.float16, device=DEVICE)
    tw, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
    with recording() as rec:
        kernel._forward(x, tw, ids, weights, config or kernel.config(t))
    if HAS_CUDA:
        assert rec.refusals == [] and rec.launches
    else:
        assert rec.refusals and all("not a compiled Triton kernel" in why for why in rec.refusals), rec.refusals


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("scheme_name", ["int4_g128_zp", "int8_g128_sym", "int4_g32_sym"])
def test_gpu_forwards_replay_from_launch_plans(scheme_name: str) -> None:
    """After its first forward at a token count and input layout, TRITON replays the recorded launches (a
    `LaunchPlan`, kernels/launch.py) on new inputs. Every path of the forward (blocks from the ids, the one- and
    many-program alignments, whose counts start zeroed, K-split GEMM1, biases) matches EMULATION on fresh
    inputs in every replay, and rows off 16 bytes record a plan of their own."""
    e, k, h, i = 32, 4, 1024, 512
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    kernel, weights, emulation, emu_weights = triton_beside_emulation(
        experts, MoEConfig(e, k, h, i), w1_bias=torch.randn(e, 2 * i, device=DEVICE),
        w2_bias=torch.randn(e, h, device=DEVICE))
    for t, offset in ((1, 0), (8, 0), (64, 0), (2048, 0), (8, 1), (64, 1)):
        for _ in range(3):  # a recording, then two replays
            rows = torch.randn(t * h + offset, dtype=torch.bfloat16, device=DEVICE)
            x = rows[offset:].view(t, h)  # (offset 1: every row 2 bytes off 16)
            tw, ids = softmax_topk(torch.randn(t, e, device=DEVICE), k, renormalize=True)
            out = kernel.apply(x, tw, ids, weights)
            assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2, (t, offset)
        layouts = [(key[3][0], plan) for key, plan in kernel._plans.plans.items()]  # (x's shape, ..., alignment)
        plans = [plan for (shape, _, _, alignment), plan in layouts if shape == (t, h) and alignment == 2 * offset]
        assert len(plans) == 1 and plans[0] is not None, (t, offset, layouts)
