"""The fused one-token forward (kernels/moe_mlp_decode.py): both GEMMs in one grid, then the partial rows summed.

CPU: the configuration's checks, `sum_partials` under the interpreter, and that a fused configuration runs the
unfused kernels where the decode kernel does not run. GPU (marker gpu): against EMULATION on every scheme the
decode kernel takes, with H and I off 128, bias and clamp, a pair left out, under a CUDA graph, with every
temporary poisoned.
"""

import pytest
import torch
from triton_env import (
    DEVICE,
    DTYPES,
    HAS_CUDA,
    random_experts,
    replay_on_fresh_inputs,
    triton_and_emulation,
    triton_beside_emulation,
)

from wna16moe import Activation, MoEConfig, WeightScheme
from wna16moe.experts.base import relative_error
from wna16moe.experts.triton import TritonConfig
from wna16moe.kernels.moe_mlp_decode import sum_partials
from wna16moe.routing import softmax_topk

FUSED = TritonConfig(8, 128, 256, num_stages=2, num_stages2=3, decode=True, fused=True)


@pytest.mark.parametrize("fields", [dict(block_n1=64), dict(block_m=16), dict(decode=False), dict(persistent=1)])
def test_fused_needs_a_128_wide_gemm1_on_8_row_blocks(fields: dict) -> None:
    base = dict(block_m=8, block_n1=128, block_n2=256, num_stages=2, decode=True, fused=True)
    with pytest.raises(ValueError, match="fused"):
        TritonConfig(**(base | fields))
    # (the K splits and GEMM2's warps are the unfused forward's: other token counts)
    assert TritonConfig(**(base | dict(split_k1=4, split_k2=2, num_warps2=8))).fused


@pytest.mark.parametrize(("rows", "cols"), [(1, 5), (37, 64), (70, 130)])
def test_sum_partials_adds_the_rows(rows: int, cols: int) -> None:
    partials = torch.randn(rows, cols, device=DEVICE)
    out = sum_partials(partials, torch.float16)
    assert out.shape == (1, cols) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), partials.sum(0, keepdim=True), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="float32"):
        sum_partials(partials.half(), torch.float16)


def test_fused_runs_unfused_where_the_decode_kernel_does_not() -> None:
    """Without the decode kernel (here the CPU; also ROCm, XPU) a fused configuration is the unfused forward."""
    if HAS_CUDA:
        pytest.skip("the CPU's path")
    experts = random_experts(8, 128, 192, WeightScheme.from_name("int4_g64_zp"))
    out, ref = triton_and_emulation(experts, MoEConfig(8, 2, 128, 192, dtype=torch.float16), 1, FUSED)
    assert relative_error(out, ref) < 1e-2


def _poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every floating-point torch.empty NaN-filled: a partial row or activation the kernels leave unwritten shows."""
    real = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[call-overload]
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def _fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the fused launches (so that a test cannot pass on the unfused path)."""
    import wna16moe.kernels.moe_mlp_decode as fused

    calls = []
    real = fused.moe_mlp_decode

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "moe_mlp_decode", counted)
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", [FUSED, TritonConfig(8, 128, 128, num_warps=8, num_stages=3, decode=True,
                                                        fused=True)], ids=["w4-n256", "w8-n128"])
@pytest.mark.parametrize("scheme_name", ["int4_g128_sym", "int4_g128_zp", "int4_g64_zp", "int4_g32_sym",
                                         "int4_ch_sym", "int8_g128_sym", "int8_g128_zp", "int8_g64_sym"])
def test_gpu_fused_matches_emulation(scheme_name: str, config: TritonConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token, both dtypes; H off 128 where the groups allow it, I = 320 (a last slice of 64 columns)."""
    calls = _fused_calls(monkeypatch)
    _poisoned_empty(monkeypatch)
    e, h, i = 16, 1152 if "g128" in scheme_name else 1088, 320
    experts = random_experts(e, h, i, WeightScheme.from_name(scheme_name))
    for dtype in DTYPES:
        out, ref = triton_and_emulation(experts, MoEConfig(e, 4, h, i, dtype=dtype), 1, config)
        assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-2, (scheme_name, dtype)
    assert len(calls) == len(DTYPES)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("activation", [Activation.SILU, Activation.SWIGLU_OAI, Activation.GELU])
def test_gpu_fused_bias_and_clamp(activation: Activation, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fused_calls(monkeypatch)
    e, h, i = 8, 512, 192
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_sym"))
    cfg = MoEConfig(e, 2, h, i, activation=activation, dtype=torch.bfloat16)
    out, ref = triton_and_emulation(experts, cfg, 1, FUSED, w1_bias=torch.randn(e, 2 * i, device=DEVICE),
                                    w2_bias=torch.randn(e, h, device=DEVICE), gemm1_clamp_limit=0.5)
    assert relative_error(out, ref) < 1e-2 and calls


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fused_leaves_out_pairs_and_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pair routed to no local expert (-1, expert parallelism) adds nothing; a captured forward replays on fresh
    tokens and routing."""
    calls = _fused_calls(monkeypatch)
    _poisoned_empty(monkeypatch)
    e, k, h, i = 32, 4, 2048, 768
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_zp"))
    cfg = MoEConfig(e, k, h, i, dtype=torch.bfloat16)
    kernel, weights, emulation, emu_weights = triton_beside_emulation(experts, cfg)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(1, h, dtype=cfg.dtype, device=DEVICE)
        return (x, *softmax_topk(torch.randn(1, e, device=DEVICE), k, renormalize=True))

    x, tw, ids = draw()
    ids[0, 1] = -1
    kept = ids.clone()
    kept[0, 1] = ids[0, 0]
    out = kernel.apply(x, tw, ids, weights, FUSED)
    # EMULATION of the three routed pairs: the left-out pair's weight on a duplicate of pair 0, taken out again
    expected = emulation.apply(x, tw.masked_fill(ids < 0, 0.0), kept, emu_weights)
    assert relative_error(out, expected) < 1e-2
    first, fresh = draw(), draw()
    captured = replay_on_fresh_inputs(lambda *a: kernel.apply(*a, FUSED), first, fresh, weights)
    assert relative_error(captured, emulation.apply(*fresh, emu_weights)) < 1e-2
    assert calls  # (the capture replays the launch plan the first forward recorded)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fused_entry_runs_other_token_counts_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry with `fused` serves the rows nearest it too: there its K splits run the two-kernel forward."""
    calls = _fused_calls(monkeypatch)
    e, h, i = 16, 1024, 384
    experts = random_experts(e, h, i, WeightScheme.from_name("int4_g128_sym"))
    config = TritonConfig(8, 128, 256, split_k1=4, split_k2=2, num_stages=2, decode=True, fused=True)
    for t in (2, 5):
        out, ref = triton_and_emulation(experts, MoEConfig(e, 4, h, i, dtype=torch.bfloat16), t, config)
        assert relative_error(out, ref) < 1e-2, t
    assert not calls
