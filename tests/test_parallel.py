"""Tensor and expert parallelism on one process: expert ranges and maps, TP shards of the weights (their
dequantized values against the full layer's, and the sum of the shards' outputs against the full output),
group-boundary and act-order handling, reading an EP rank's experts from a checkpoint, capability checks
(expert maps, activation formats), and the kernels with remote (-1) experts and the batched format.
The multi-process layers are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from conftest import CT_W4_G32_SYM, GPTQ_W4_G32_DESCACT, HIDDEN, INTERMEDIATE, NUM_EXPERTS, random_experts
from triton_env import DEVICE

from wna16moe import (
    ActivationFormat,
    BackendError,
    InvalidInputError,
    MoEConfig,
    ParallelConfig,
    UnsupportedError,
    WeightScheme,
    open_checkpoint,
)
from wna16moe.config import expert_range
from wna16moe.device import DeviceInfo
from wna16moe.distributed import (
    AllToAll,
    Batched,
    ExpertPlacement,
    FixedAllToAll,
    MoEGroups,
    NoParallel,
    make_prepare_finalize,
    select_experts,
    shard_biases,
    shard_experts,
    tp_columns,
    tp_shard,
)
from wna16moe.experts.base import OK, Experts, LayerSpec
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.triton import BatchedTritonExperts, TritonConfig, TritonExperts
from wna16moe.layer import WNA16MoE
from wna16moe.oracle import Backend, select_backend
from wna16moe.quantized import QuantizedExperts
from wna16moe.routing import softmax_topk
from wna16moe.shapes import model_shape

E, K, H, I = 8, 2, 64, 128  # noqa: E741 (I is the intermediate size)
CPU = torch.device("cpu")


def _emulate(experts: QuantizedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None) -> torch.Tensor:
    """EMULATION on canonical experts (any E, I): [T, H] float32."""
    cfg = MoEConfig(experts.num_experts, ids.shape[1], experts.hidden_size, experts.intermediate_size,
                    dtype=x.dtype)
    quant = experts.quant_config(w1_bias=w13_bias, w2_bias=w2_bias)
    kernel = EmulationExperts(LayerSpec(cfg, experts.scheme), quant, x.device)
    return kernel.apply(x, weights, ids, EmulationExperts.prepare_weights(experts, x.device)).float()


# ----- expert ranges and maps ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_experts", "ep_size"), [(8, 1), (8, 2), (8, 3), (6, 4), (256, 16), (5, 5)])
def test_expert_ranges_partition_the_experts(num_experts: int, ep_size: int) -> None:
    ranges = [expert_range(num_experts, ep_size, r) for r in range(ep_size)]
    assert [e for rng in ranges for e in rng] == list(range(num_experts))  # contiguous, in rank order
    sizes = [len(rng) for rng in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for rank, rng in enumerate(ranges):
        placement = ExpertPlacement(num_experts, ep_size, rank)
        expected = torch.tensor([e - rng.start if e in rng else -1 for e in range(num_experts)], dtype=torch.int32)
        assert torch.equal(placement.expert_map(), expected)
        assert ParallelConfig(ep_size=ep_size, ep_rank=rank).local_experts(num_experts) == rng
    owners = ExpertPlacement(num_experts, ep_size).owners()
    assert owners.tolist() == [next(r for r, rng in enumerate(ranges) if e in rng) for e in range(num_experts)]


def test_parallel_config_layout() -> None:
    p = ParallelConfig(tp_size=2, tp_rank=1, ep_size=4, ep_rank=2, batched=True)
    assert (p.world_size, p.rank, p.activation_format) == (8, 5, ActivationFormat.BATCHED)
    with pytest.raises(InvalidInputError, match="num_experts=3 is fewer than ep_size=4"):
        p.local_experts(3)
    with pytest.raises(InvalidInputError, match="num_experts=4 is fewer than ep_size=8"):
        LayerSpec(MoEConfig(4, 2, H, I), WeightScheme(4, 32), ParallelConfig(ep_size=8))


def test_layer_spec_format_follows_the_parallel_config() -> None:
    scheme = WeightScheme(4, 32)
    batched = LayerSpec(MoEConfig(E, K, H, I), scheme, ParallelConfig(ep_size=2, batched=True))
    assert batched.activation_format == ActivationFormat.BATCHED and batched.local_num_experts == 4
    assert LayerSpec(MoEConfig(E, K, H, I), scheme).activation_format == ActivationFormat.STANDARD
    single = LayerSpec(MoEConfig(E, K, H, I), scheme, activation_format=ActivationFormat.BATCHED)
    assert single.activation_format == ActivationFormat.BATCHED
    with pytest.raises(InvalidInputError, match="contradicts the parallel config"):
        LayerSpec(MoEConfig(E, K, H, I), scheme, ParallelConfig(batched=True), ActivationFormat.STANDARD)


# ----- TP shards --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme_name", ["int4_g32_sym", "int8_g32_zp", "int4_ch_zp", "int4_g32_zp_actorder"])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_shards_hold_the_full_weights_columns(scheme_name: str, tp_size: int) -> None:
    scheme = WeightScheme.from_name(scheme_name)
    experts = random_experts(scheme, 3, H, I)
    w13, w2 = experts.dequantize()
    seen = torch.zeros(3, I, dtype=torch.int64)
    for rank in range(tp_size):
        shard = tp_shard(experts, tp_size, rank)
        cols = tp_columns(experts.w2, tp_size, rank)
        assert shard.intermediate_size == I // tp_size and cols.shape == (3, I // tp_size)
        s13, s2 = shard.dequantize()
        for e in range(3):
            assert torch.equal(s13[e], torch.cat([w13[e, cols[e]], w13[e, I + cols[e]]]))
            assert torch.equal(s2[e], w2[e][:, cols[e]])
        seen.scatter_add_(1, cols, torch.ones_like(cols))
        if scheme.act_order:  # whole groups of the shard's own, each of exactly group_size columns
            counts = torch.stack([torch.bincount(g.long(), minlength=shard.w2.scales.shape[2])
                                  for g in shard.w2.g_idx])
            assert (counts == scheme.group_size).all()
        elif scheme.group_size is not None:
            assert torch.equal(cols[0], torch.arange(rank * I // tp_size, (rank + 1) * I // tp_size))
    assert (seen == 1).all()  # the shards partition I


@pytest.mark.parametrize("scheme_name", ["int4_g32_sym", "int4_g32_zp_actorder"])
def test_tp_shard_outputs_sum_to_the_layer_output(scheme_name: str) -> None:
    """The math of TP with biases: per-shard outputs (w2 bias on rank 0 only) add up to the full output."""
    experts = random_experts(WeightScheme.from_name(scheme_name), E, H, I)
    w13_bias, w2_bias = torch.randn(E, 2 * I), torch.randn(E, H)
    x = torch.randn(5, H, dtype=torch.bfloat16)
    weights, ids = softmax_topk(torch.randn(5, E), K, renormalize=True)
    full = _emulate(experts, x, weights, ids, w13_bias, w2_bias)
    total = torch.zeros_like(full)
    for rank in range(2):
        parallel = ParallelConfig(tp_size=2, tp_rank=rank)
        shard = shard_experts(experts, parallel, E)
        b13, b2 = shard_biases(w13_bias, w2_bias, experts, parallel, E)
        assert rank == 0 or not b2.any()
        total += _emulate(shard, x, weights, ids, b13, b2)
    assert torch.allclose(total, full, rtol=2e-2, atol=2e-2 * float(full.abs().max()))


def test_tp_group_split_is_an_error_that_suggests_ep() -> None:
    experts = random_experts(WeightScheme(4, 64), 2, H, 96)  # I/tp = 48 is not a multiple of 64
    with pytest.raises(UnsupportedError, match=r"I/tp=48 .* is not a multiple of group_size 64: a quantization group "
                                               r"would straddle two TP shards; .* or expert parallelism \(ep_size\)"):
        tp_shard(experts, 2, 0)
    spec = LayerSpec(model_shape("qwen3-30b-a3b").moe_config(), WeightScheme(4, 128), ParallelConfig(tp_size=4))
    for cls in (TritonExperts, BatchedTritonExperts, EmulationExperts):
        assert "I/tp=192 (intermediate_size=768, tp_size=4) is not a multiple of group_size 128" in \
            cls.supports_shape(spec).reason
    with pytest.raises(BackendError, match="or expert parallelism"):
        select_backend(spec, device=DeviceInfo.named("h100"))


def test_act_order_with_uneven_groups_cannot_be_sharded() -> None:
    experts = random_experts(WeightScheme(4, 32, act_order=True), 2, H, I)
    experts.w2.g_idx[1] = torch.arange(I, dtype=torch.int32) // 32
    experts.w2.g_idx[1, 64:72] = 0  # group 0 has 40 columns, group 2 only 24: TP rank 0 would get 72 columns
    with pytest.raises(UnsupportedError, match="w2 g_idx of expert 1 puts 72 columns into the groups of TP rank 0, "
                                               "expected I/tp=64"):
        tp_shard(experts, 2, 0)


def test_shard_experts_takes_all_or_the_ranks_experts() -> None:
    experts = random_experts(WeightScheme(4, 32), E, H, I)
    parallel = ParallelConfig(tp_size=2, tp_rank=1, ep_size=3, ep_rank=2)  # experts 6, 7
    from_all = shard_experts(experts, parallel, E)
    from_local = shard_experts(select_experts(experts, range(6, 8)), parallel, E)
    assert from_all.num_experts == 2 and from_all.intermediate_size == I // 2
    assert torch.equal(from_all.w13.codes, from_local.w13.codes) and torch.equal(from_all.w2.scales,
                                                                                 from_local.w2.scales)
    assert torch.equal(from_all.w2.codes, experts.w2.codes[6:8, :, I // 2:])
    with pytest.raises(InvalidInputError, match="experts hold 3 experts; expected all 8 or this EP rank's 2"):
        shard_experts(select_experts(experts, range(3)), parallel, E)
    with pytest.raises(InvalidInputError, match=r"w13_bias must be \[E=8, 256\]"):
        shard_biases(torch.zeros(E, I), None, experts, parallel, E)


def test_layer_keeps_only_its_shard() -> None:
    experts = random_experts(WeightScheme(4, 32), E, H, I)
    parallel = ParallelConfig(tp_size=2, tp_rank=1, ep_size=2, ep_rank=1)
    layer = WNA16MoE(experts, MoEConfig(E, K, H, I), device="cpu", backend="emulation", parallel=parallel,
                     groups=MoEGroups(), w2_bias=torch.randn(E, H))
    shard = tp_shard(select_experts(experts, range(4, 8)), 2, 1)
    assert torch.equal(layer.w13_codes, shard.w13.codes) and torch.equal(layer.w2_codes, shard.w2.codes)
    assert not layer.kernel.quant.w2_bias.any()  # TP rank 1: the bias is added by rank 0
    assert "tp=2 ep=2 dp=1" in repr(layer)
    with pytest.raises(InvalidInputError, match=r"experts are \(E, H, I\) = \(3, 64, 128\) .* \(or this EP rank's 4\)"):
        WNA16MoE(select_experts(experts, range(3)), MoEConfig(E, K, H, I), device="cpu", parallel=parallel,
                 groups=MoEGroups())


# ----- checkpoints: an EP rank's experts only -----------------------------------------------------------------

def test_load_layer_reads_only_the_expert_range(monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = open_checkpoint(GPTQ_W4_G32_DESCACT)
    full = ckpt.load_layer(1)
    read: list[str] = []
    get = ckpt.source.get

    def spy(key: str) -> torch.Tensor:
        read.append(key)
        return get(key)

    monkeypatch.setattr(ckpt.source, "get", spy)
    part = ckpt.load_layer(1, range(3, 6))
    assert {int(key.split(".experts.")[1].split(".")[0]) for key in read} == {3, 4, 5}
    expected = select_experts(full, range(3, 6))
    for got, want in ((part.w13, expected.w13), (part.w2, expected.w2)):
        assert got.zeros is None and want.zeros is None
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.g_idx, want.g_idx)


@pytest.mark.parametrize("experts", [range(0), range(7, 9), range(0, 8, 2)])
def test_load_layer_rejects_bad_ranges(experts: range) -> None:
    with pytest.raises(InvalidInputError, match="must be a non-empty contiguous range within"):
        open_checkpoint(CT_W4_G32_SYM).load_layer(0, experts)


def test_from_checkpoint_reads_only_the_ranks_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt_cls = type(open_checkpoint(CT_W4_G32_SYM))
    asked: list[range | None] = []
    load = ckpt_cls.load_layer

    def spy(self: object, layer: int, experts: range | None = None) -> QuantizedExperts:
        asked.append(experts)
        return load(self, layer, experts)

    monkeypatch.setattr(ckpt_cls, "load_layer", spy)
    parallel = ParallelConfig(ep_size=4, ep_rank=3)
    layer = WNA16MoE.from_checkpoint(CT_W4_G32_SYM, 0, parallel=parallel, device="cpu", backend="emulation",
                                     groups=MoEGroups())
    assert asked == [parallel.local_experts(NUM_EXPERTS)] == [range(6, 8)]
    assert layer.w13_codes.shape == (2, 2 * INTERMEDIATE, HIDDEN)


# ----- capability checks --------------------------------------------------------------------------------------

class _NoMap(Experts):
    NAME = "emulation"


class _BatchedNoMap(Experts):
    NAME = "emulation"
    ACTIVATION_FORMAT = ActivationFormat.BATCHED


def test_expert_map_is_declared() -> None:
    ep = ParallelConfig(ep_size=2)
    assert _NoMap.supports_parallel(ep).reason == ("expert parallelism (ep_size=2) in the standard format needs an "
                                                   "expert map (remote experts as -1), which this kernel does not take")
    assert _NoMap.supports_parallel(ParallelConfig(tp_size=4)) == OK
    assert _BatchedNoMap.supports_parallel(ParallelConfig(ep_size=2)) == OK  # local buffers only, no map
    for cls in (TritonExperts, EmulationExperts):
        assert cls.SUPPORTS_EXPERT_MAP and cls.supports_parallel(ep) == OK


def test_oracle_picks_by_the_activation_format() -> None:
    h100, cfg, scheme = DeviceInfo.named("h100"), model_shape("mixtral").moe_config(), "int4_g128_sym"
    standard = select_backend(cfg, scheme, device=h100, parallel=ParallelConfig(tp_size=2, ep_size=4))
    assert standard.backend in (Backend.MARLIN, Backend.TRITON)
    assert standard.kernel.ACTIVATION_FORMAT == ActivationFormat.STANDARD
    batched = select_backend(cfg, scheme, device=h100, parallel=ParallelConfig(ep_size=4, batched=True))
    assert batched.backend in (Backend.BATCHED_MARLIN, Backend.BATCHED_TRITON)
    assert batched.kernel.ACTIVATION_FORMAT == ActivationFormat.BATCHED
    report = {c.kernel: c for c in batched.report.candidates}
    assert report[BatchedTritonExperts].verdict.value in ("chosen", "eligible")
    assert report[TritonExperts].failed == (("format", "needs the standard activation format, the layer uses "
                                                       "batched"),)
    with pytest.raises(BackendError, match="no backend can run this layer"):
        select_backend(cfg, scheme, device=DeviceInfo.named("cpu"), parallel=ParallelConfig(ep_size=2, batched=True))


def test_prepare_finalize_choice() -> None:
    groups = MoEGroups()
    assert type(make_prepare_finalize(ParallelConfig(), E, groups, CPU)) is NoParallel
    a2a = make_prepare_finalize(ParallelConfig(ep_size=2, dp_size=2, dp_rank=0), E, groups, CPU)
    assert type(a2a) is AllToAll
    batched = make_prepare_finalize(ParallelConfig(ep_size=2, dp_size=2, batched=True), E, groups, CPU)
    assert type(batched) is Batched and type(batched.inner) is AllToAll
    with pytest.raises(UnsupportedError, match="data-parallel tokens need expert parallelism with ep_size == dp_size"):
        make_prepare_finalize(ParallelConfig(dp_size=2), E, groups, CPU)
    with pytest.raises(UnsupportedError, match="dp_rank == ep_rank"):
        make_prepare_finalize(ParallelConfig(ep_size=2, ep_rank=1, dp_size=2, dp_rank=0), E, groups, CPU)
    with pytest.raises(InvalidInputError, match=r"needs torch\.distributed initialized"):
        MoEGroups.create(ParallelConfig(tp_size=2))
    fixed = make_prepare_finalize(ParallelConfig(ep_size=2, dp_size=2, max_tokens_per_rank=4), E, groups, CPU)
    assert type(fixed) is FixedAllToAll and fixed.capacity == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(ep_size=2, dp_size=2, max_tokens_per_rank=0), "max_tokens_per_rank=0 must be at least 1"),
    (dict(ep_size=2, max_tokens_per_rank=8), "dp_size=1"),
    (dict(ep_size=2, dp_size=2, batched=True, max_tokens_per_rank=8), "batched=True"),
])
def test_max_tokens_per_rank_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        ParallelConfig(**kwargs)


# ----- kernels: remote experts and the batched format ----------------------------------------------------------

@pytest.mark.parametrize("config", [None, TritonConfig(16, 32, 32, split_k1=2, split_k2=2)], ids=["default", "split-k"])
@pytest.mark.parametrize("scheme_name", ["int4_g32_zp", "int8_ch_sym"])
def test_triton_skips_remote_experts(scheme_name: str, config: TritonConfig | None) -> None:
    experts = random_experts(WeightScheme.from_name(scheme_name), 4, H, 64)
    cfg = MoEConfig(4, 3, H, 64, dtype=torch.float16)
    x = torch.randn(9, H, dtype=torch.float16)
    weights, ids = softmax_topk(torch.randn(9, 4), 3, renormalize=True)
    ids[torch.rand(9, 3) < 0.4] = -1  # pairs whose expert another EP rank owns
    ids[4] = -1  # a token with no local expert at all
    kernel = TritonExperts(LayerSpec(cfg, experts.scheme), experts.quant_config(), DEVICE)
    out = kernel.apply(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), kernel.prepare_weights(experts, DEVICE),
                       config)
    ref = _emulate(experts, x, weights, ids)
    assert torch.equal(out[4].cpu(), torch.zeros(H, dtype=torch.float16))
    assert float((out.float().cpu() - ref).norm() / ref.norm()) < 1e-2


def test_triton_skips_remote_experts_of_one_token() -> None:
    # One token: one block per pair, no alignment; a remote pair's block does nothing.
    experts = random_experts(WeightScheme.from_name("int4_g32_zp"), 4, H, 64)
    kernel = TritonExperts(LayerSpec(MoEConfig(4, 3, H, 64, dtype=torch.float16), experts.scheme),
                           experts.quant_config(), DEVICE)
    x = torch.randn(1, H, dtype=torch.float16)
    weights, ids = softmax_topk(torch.randn(1, 4), 3, renormalize=True)
    ids[0, 1] = -1
    out = kernel.apply(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), kernel.prepare_weights(experts, DEVICE))
    ref = _emulate(experts, x, weights, ids)
    assert float((out.float().cpu() - ref).norm() / ref.norm()) < 1e-2


def test_batched_triton_matches_each_expert() -> None:
    e, m = 4, 5
    experts = random_experts(WeightScheme.from_name("int4_g32_sym"), e, H, 64)
    cfg = MoEConfig(e, 2, H, 64, dtype=torch.float16)
    bias = torch.randn(e, H)
    kernel = BatchedTritonExperts(LayerSpec(cfg, experts.scheme, activation_format=ActivationFormat.BATCHED),
                                  experts.quant_config(w2_bias=bias), DEVICE)
    num_tokens = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    x = torch.full((e, m, H), float("nan"), dtype=torch.float16)  # rows past num_tokens are garbage
    for expert, n in enumerate(num_tokens.tolist()):
        x[expert, :n] = torch.randn(n, H).half()
    out = kernel.apply_batched(x.to(DEVICE), num_tokens.to(DEVICE), kernel.prepare_weights(experts, DEVICE)).cpu()
    assert out.shape == (e, m, H)
    for expert, n in enumerate(num_tokens.tolist()):
        assert torch.equal(out[expert, n:], torch.zeros(m - n, H, dtype=torch.float16))
        if n:
            rows = x[expert, :n]
            ref = _emulate(experts, rows, torch.ones(n, 1), torch.full((n, 1), expert, dtype=torch.int32),
                           w2_bias=bias)
            assert float((out[expert, :n].float() - ref).norm() / ref.norm()) < 1e-2


def test_single_rank_batched_layer_matches_emulation() -> None:
    """ParallelConfig(batched=True) on one rank: Batched(NoParallel) around BATCHED_TRITON."""
    experts = random_experts(WeightScheme.from_name("int4_g64_zp"), E, H, 64)
    cfg = MoEConfig(E, K, H, 64, dtype=torch.float16)
    layer = WNA16MoE(experts, cfg, device=DEVICE, backend="batched_triton", parallel=ParallelConfig(batched=True))
    reference = WNA16MoE(experts, cfg, device=DEVICE, backend="emulation")
    x = torch.randn(7, H, dtype=torch.float16, device=DEVICE)
    logits = torch.randn(7, E, device=DEVICE)
    logits[:, 2] += 10.0  # every token's first choice: one expert holds all 7 rows
    out, ref = layer(x, logits).float(), reference(x, logits).float()
    assert float((out - ref).norm() / ref.norm()) < 1e-2


def test_bench_hands_parallel_runs_to_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from wna16moe.bench import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="--tp 2 x --ep 2 needs 4 ranks: run under torchrun --nproc-per-node 4"):
        main(["--tp", "2", "--ep", "2", "--dp"])
