"""Both GEMMs of a one-token forward in one launch (kernels/moe_decode_fused.py) against EMULATION.

CPU: the configuration's checks, the launcher's input checks, and the unfused fallback where a fused launch cannot
run (the interpreter has no Gluon). GPU (marker gpu): the fused forward, with `moe_gemm` made to fail so that
nothing silently runs unfused, against the float32 reference: both GEMM1 forms (K split, whose partial sums GEMM2
finishes; unsplit), zero points, int8, groups of 32, every activation with SwiGLU's clamp, biases, pairs left
out, act-order checkpoints, and forwards back to back in a CUDA graph (the counters reset after each launch).
"""

from dataclasses import replace

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA, random_experts, triton_beside_emulation

import wna16moe.kernels.moe_gemm as moe_gemm_module
from wna16moe import Activation, MoEConfig, WeightScheme, open_checkpoint
from wna16moe.experts.base import relative_error
from wna16moe.experts.triton import TritonConfig
from wna16moe.kernels.moe_decode_fused import moe_decode_fused, sync_size
from wna16moe.routing import softmax_topk


def fused_config(split_k1: int, **fields: object) -> TritonConfig:
    return TritonConfig(8, 64, 128, split_k2=2, split_k1=split_k1, num_warps=4, num_stages=2, num_stages2=3,
                        decode=True, fused=True, **fields)


def test_fused_needs_the_decode_kernels_8_row_blocks_at_one_warp_count() -> None:
    for fields in (dict(decode=False), dict(block_m=16), dict(num_warps2=8)):
        with pytest.raises(ValueError, match="fused"):
            replace(fused_config(4), **fields)
    assert fused_config(4, num_warps2=4).fused  # (GEMM2's warps equal to GEMM1's: GEMM1's)


def test_launcher_names_what_is_wrong() -> None:
    """Shapes and types are checked before a launch (on any device)."""
    e, h, i, k = 4, 256, 128, 2
    w13 = (torch.zeros(e, 2, 2 * i, 16, dtype=torch.int32), torch.ones(e, 2, 2 * i), None, None, None)
    w2 = (torch.zeros(e, 1, h, 16, dtype=torch.int32), torch.ones(e, 1, h), None, None, None)
    good = dict(hidden_states=torch.randn(1, h), w13=w13, w2=w2, partials=torch.empty(2, k, 2 * i),
                intermediate=torch.empty(k, i), out=torch.empty(1, h), topk_weights=torch.rand(1, k),
                topk_ids=torch.tensor([[0, 1]], dtype=torch.int32),
                sync=torch.zeros(sync_size(k, i, 64), dtype=torch.int32), bits=4, group_size=128, block_n1=64,
                block_n2=64, split_k1=2, split_k2=1)
    cases = [
        (dict(hidden_states=torch.randn(2, h), topk_ids=torch.zeros(2, k, dtype=torch.int32)), "one token"),
        (dict(partials=torch.empty(2, k, i)), "partials must be contiguous float32"),
        (dict(partials=None), "partials must be"),
        (dict(intermediate=torch.empty(k, i, dtype=torch.bfloat16)), "intermediate must be"),
        (dict(out=torch.empty(1, h, dtype=torch.bfloat16)), "out must be contiguous float32"),
        (dict(sync=torch.zeros(sync_size(k, i, 64) - 1, dtype=torch.int32)), "sync must be int32"),
        (dict(w2=(torch.zeros(e, 1, h, 8, dtype=torch.int32), *w2[1:])), "w2 must be words in fragment tiles"),
        (dict(block_n1=48), "block_n"),
        (dict(group_size=8), "group_size"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            moe_decode_fused(**(good | change))


def test_fused_config_runs_unfused_where_it_cannot_run() -> None:
    """Under the interpreter (no Gluon) or on CPU a fused configuration runs the unfused kernels: same result as
    the same configuration unfused."""
    e, h, i, k = 8, 256, 128, 2
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g32_zp"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.float16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)
    x = torch.randn(1, h, dtype=cfg.dtype, device=DEVICE)
    tw, ids = softmax_topk(torch.randn(1, e, device=DEVICE), k, renormalize=True)
    if kernel._sync is not None:
        pytest.skip("a Hopper GPU runs it fused (test_gpu_*)")
    config = TritonConfig(8, 32, 32, split_k1=2, split_k2=2, decode=True, fused=True)
    out = kernel.apply(x, tw, ids, weights, config)
    assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2


# ----- GPU -----

needs_hopper = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9,
                                  reason="needs a Hopper GPU (words in fragment tiles)")


@pytest.fixture
def fused_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that falls back to the unfused kernels fails."""
    def unfused(*args: object, **kwargs: object) -> None:
        pytest.fail("the forward ran unfused")

    monkeypatch.setattr(moe_gemm_module, "moe_gemm", unfused)


def fused_beside_emulation(scheme_name: str, e: int, k: int, h: int, i: int, dtype: torch.dtype = torch.bfloat16,
                           activation: Activation = Activation.SILU, **quant_kwargs: object):
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    cfg = MoEConfig(e, k, h, i, activation=activation, dtype=dtype)
    return cfg, *triton_beside_emulation(experts, cfg, **quant_kwargs)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.usefixtures("fused_only")
@pytest.mark.parametrize("split_k1", [1, 4], ids=["unsplit", "split4"])
@pytest.mark.parametrize(("scheme_name", "h", "i"), [
    ("int4_g128_sym", 2048, 768), ("int4_g128_zp", 1024, 768), ("int4_g32_sym", 1088, 704),
    ("int8_g128_sym", 1024, 768), ("int8_ch_zp", 1088, 704)])
def test_gpu_fused_matches_emulation(scheme_name: str, h: int, i: int, split_k1: int) -> None:
    """Five forwards in a row with fresh tokens and routing (each launch must leave its counters at zero for
    the next), in bf16 and fp16; K not a whole number of tiles where the groups allow it."""
    for dtype in (torch.bfloat16, torch.float16):
        _, kernel, weights, emulation, emu_weights = fused_beside_emulation(scheme_name, 32, 8, h, i, dtype)
        for _ in range(5):
            x = torch.randn(1, h, dtype=dtype, device=DEVICE)
            tw, ids = softmax_topk(torch.randn(1, 32, device=DEVICE), 8, renormalize=True)
            out = kernel.apply(x, tw, ids, weights, fused_config(split_k1))
            ref = emulation.apply(x, tw, ids, emu_weights)
            assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2, (dtype, split_k1)
        assert not kernel._sync.any(), kernel._sync


@pytest.mark.gpu
@needs_hopper
@pytest.mark.usefixtures("fused_only")
@pytest.mark.parametrize("split_k1", [1, 4], ids=["unsplit", "split4"])
@pytest.mark.parametrize("activation", [Activation.SILU, Activation.GELU, Activation.SWIGLU_OAI])
def test_gpu_fused_activations_and_biases(activation: Activation, split_k1: int) -> None:
    """Each activation, SwiGLU's clamp and both biases (split over K, GEMM1's is added where its last split
    finishes the activation)."""
    e, k, h, i = 16, 4, 1024, 512
    quant = dict(w1_bias=torch.randn(e, 2 * i, device=DEVICE), w2_bias=torch.randn(e, h, device=DEVICE),
                 gemm1_clamp_limit=0.5)
    cfg, kernel, weights, emulation, emu_weights = fused_beside_emulation("int4_g128_zp", e, k, h, i,
                                                                          activation=activation, **quant)
    x = torch.randn(1, h, dtype=cfg.dtype, device=DEVICE)
    tw, ids = softmax_topk(torch.randn(1, e, device=DEVICE), k, renormalize=True)
    out = kernel.apply(x, tw, ids, weights, fused_config(split_k1))
    assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.usefixtures("fused_only")
@pytest.mark.parametrize("left_out", [1, 4], ids=["one-pair-left-out", "all-pairs-left-out"])
def test_gpu_fused_pairs_left_out(left_out: int) -> None:
    """Pairs of another EP rank (-1): their programs end at once, yet count, so that the launch still ends with
    its counters at zero, and GEMM1's programs still clear the output (all left out: zeros)."""
    e, k, h, i = 16, 4, 1024, 512
    cfg, kernel, weights, emulation, emu_weights = fused_beside_emulation("int4_g128_zp", e, k, h, i)
    for split_k1 in (1, 4):
        x = torch.randn(1, h, dtype=cfg.dtype, device=DEVICE)
        tw, ids = softmax_topk(torch.randn(1, e, device=DEVICE), k, renormalize=True)
        ids[0, :left_out] = -1
        out = kernel.apply(x, tw, ids, weights, fused_config(split_k1))
        ref = emulation.apply(x, tw, ids, emu_weights)
        if left_out == k:
            assert torch.equal(out, torch.zeros_like(out)), out
        else:
            assert relative_error(out, ref) < 1e-2, split_k1
        assert not kernel._sync.any(), kernel._sync


@pytest.mark.gpu
@needs_hopper
@pytest.mark.usefixtures("fused_only")
def test_gpu_fused_on_an_act_order_checkpoint() -> None:
    """GPTQ act-order (both projections' columns through a permutation) with zero points from a real checkpoint."""
    ckpt = open_checkpoint("tests/data/qwen3moe-gptq-w4-g32-descact")
    experts = ckpt.load_layer(1)
    cfg = replace(ckpt.moe_config(), dtype=torch.float16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)
    x = torch.randn(1, cfg.hidden_size, dtype=cfg.dtype, device=DEVICE)
    tw, ids = softmax_topk(torch.randn(1, cfg.num_experts, device=DEVICE), cfg.top_k, renormalize=True)
    for split_k1 in (1, 2):
        config = TritonConfig(8, 64, 64, split_k1=split_k1, num_warps=4, num_stages=2, decode=True, fused=True)
        out = kernel.apply(x, tw, ids, weights, config)
        assert relative_error(out, emulation.apply(x, tw, ids, emu_weights)) < 1e-2, split_k1


@pytest.mark.gpu
@needs_hopper
@pytest.mark.usefixtures("fused_only")
@pytest.mark.parametrize("pdl", [0, 1], ids=["plain", "pdl"])
def test_gpu_fused_forwards_back_to_back_in_a_graph(pdl: int) -> None:
    """Six fused forwards of one layer chained in one CUDA graph, each routing on the last one's output, replayed
    twice on fresh tokens: a launch that started before its counters were reset, or read GEMM1's output before
    it was final, shows as a step off the reference."""
    e, k, h, i, steps = 32, 8, 2048, 768, 6
    cfg, kernel, weights, emulation, emu_weights = fused_beside_emulation("int4_g128_zp", e, k, h, i)
    router = torch.randn(h, e, device=DEVICE) / h**0.5
    config = replace(fused_config(4), pdl=pdl)

    def step(x: torch.Tensor, apply) -> torch.Tensor:
        tw, ids = softmax_topk(x.float() @ router, k, renormalize=True)
        out = apply(x, tw, ids).float()
        return (out / out.norm(dim=1, keepdim=True).clamp_min(1e-6) * h**0.5).to(x.dtype)

    def chain(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = [x]
        for _ in range(steps):
            outputs.append(step(outputs[-1], lambda *a: kernel.apply(*a, weights, config)))
        return outputs

    chain(torch.randn(1, h, dtype=cfg.dtype, device=DEVICE))  # (compiles before the capture)
    static = torch.empty(1, h, dtype=cfg.dtype, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(static)
    for replay in range(2):
        static.copy_(torch.randn(1, h, dtype=cfg.dtype, device=DEVICE))
        graph.replay()
        for n in range(steps):
            expected = step(captured[n], lambda *a: emulation.apply(*a, emu_weights))
            assert relative_error(captured[n + 1], expected) < 2e-2, (replay, n)
    assert not kernel._sync.any(), kernel._sync


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("programs", [1, 7, 40])
def test_gpu_few_programs_take_many_blocks(programs: int) -> None:
    """Launched with fewer programs than blocks, each program runs GEMM1 blocks while any are left, then GEMM2
    blocks, one after another through the same ring: a block whose copies land in the next one's buffers, or a
    GEMM2 block that starts before every GEMM1 block is done, shows as an error."""
    e, k, h, i = 16, 8, 2048, 768
    cfg, kernel, weights, emulation, emu_weights = fused_beside_emulation("int8_g128_sym", e, k, h, i)
    for split_k1 in (1, 4):
        x = torch.randn(1, h, dtype=cfg.dtype, device=DEVICE)
        tw, ids = softmax_topk(torch.randn(1, e, device=DEVICE), k, renormalize=True)
        out = torch.full((1, h), float("nan"), device=DEVICE)  # (GEMM1 clears it)
        partials = torch.full((split_k1, k, 2 * i), float("nan"), device=DEVICE) if split_k1 > 1 else None
        w13 = (*(weights.get(f"w13{s}") for s in ("", "_scales", "_zeros", "_perm")), None)
        w2 = (*(weights.get(f"w2{s}") for s in ("", "_scales", "_zeros", "_perm")), None)
        moe_decode_fused(x, w13, w2, partials, torch.empty(k, i, dtype=cfg.dtype, device=DEVICE), out, tw, ids,
                         kernel._sync, bits=8, group_size=128, block_n1=64, block_n2=128, split_k1=split_k1,
                         split_k2=2, stages1=3, stages2=3, programs=programs)
        ref = emulation.apply(x, tw, ids, emu_weights).float()
        assert relative_error(out, ref) < 1e-2, (programs, split_k1)
        assert not kernel._sync.any(), kernel._sync
