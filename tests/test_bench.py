"""The benchmark's sweep logic on the CPU (kernels interpreted, timers replaced): what it checks, times, ranks;
and its timer on a GPU.

The timings themselves need a GPU (`python -m wna16moe.bench`); here the timers return made-up times so that
the choice of `triton-best` is known, and one configuration is made to compute garbage.
"""

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from triton_env import DEVICE

from wna16moe import MoEConfig, QuantizedExperts, WeightScheme, bench, tuning
from wna16moe.experts.base import LayerSpec
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.experts.triton import PDL_OFF, RELEASE_AFTER_LOOP, RELEASE_AT_WAIT, TritonConfig, TritonExperts

E, K, H, INTER = 4, 2, 128, 64


def _script(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (its own imports of the other scripts resolve: the folder is on sys.path)."""
    folder = Path(__file__).parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_gemm1(m: int) -> TritonConfig:
    """The sweep's candidate that splits GEMM1's K in two around the tiny layer's base configuration."""
    spec = LayerSpec(MoEConfig(E, K, H, INTER, dtype=torch.float16), WeightScheme.from_name("int4_g32_sym"))
    experts = QuantizedExperts.quantize(torch.randn(E, 2 * INTER, H), torch.randn(E, H, INTER), spec.scheme)
    return replace(TritonExperts(spec, experts.quant_config(), DEVICE).config(m), split_k1=2)


def _sweep(monkeypatch: pytest.MonkeyPatch, m: int, eager: dict, graph: dict, wrong: TritonConfig | None = None,
           marlin: object | None = None, sweep: str = "grid", budgets: list[float] | None = None) -> list[dict]:
    """Rows of `_bench_tokens` for a tiny layer; a configuration's made-up times come from `eager` / `graph`
    (default 100 / 90 µs; or callables of the configuration); `marlin`: a stand-in MARLIN kernel (its `apply`
    gets no configuration); `sweep`: "grid" or "search"; `budgets` gets each timing's budget in ms."""
    budgets = [] if budgets is None else budgets
    scheme = WeightScheme.from_name("int4_g32_sym")
    experts = QuantizedExperts.quantize(torch.randn(E, 2 * INTER, H) * 0.1, torch.randn(E, H, INTER) * 0.1, scheme)
    cfg = MoEConfig(E, K, H, INTER, dtype=torch.float16)
    spec = LayerSpec(cfg, scheme)
    kernel = TritonExperts(spec, experts.quant_config(), DEVICE)
    emulation = EmulationExperts(spec, experts.quant_config(), DEVICE)
    if wrong is not None:
        apply = kernel.apply
        monkeypatch.setattr(kernel, "apply", lambda *args: apply(*args) * (3.0 if args[-1] == wrong else 1.0))

    def config_of(fn: object) -> TritonConfig | None:
        last = fn.args[-1] if isinstance(fn, partial) else None
        return last if isinstance(last, TritonConfig) else None

    def timer(times: dict | Callable, default_us: float) -> Callable:
        def timed(fn: object, budget_ms: float = 60.0) -> float:
            budgets.append(budget_ms)
            return times(config_of(fn)) if callable(times) else times.get(config_of(fn), default_us)

        return timed

    monkeypatch.setattr(bench, "_bench", timer(eager, 100.0))
    monkeypatch.setattr(bench, "_bench_graph", timer(graph, 90.0))
    return bench._bench_tokens("tiny", m, scheme, cfg, kernel, TritonExperts.prepare_weights(experts, DEVICE),
                               emulation, EmulationExperts.prepare_weights(experts, DEVICE), None,
                               None if marlin is None else (marlin, {}), 1000, sweep,
                               {"copy_gbps": 1000.0, "matmul_tflops": 100.0}, lambda line: None)


class _Marlin:
    """A MARLIN stand-in: the float32 reference (from the emulation backend), times `factor`; it records the
    tokens and routing it was given."""

    def __init__(self, factor: float) -> None:
        self.factor, self.calls = factor, []

    def apply(self, x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor, weights: dict) -> torch.Tensor:
        self.calls.append((x, tw, ids))
        return self.reference * self.factor


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_marlin_peer_runs_on_the_same_routing_and_is_checked(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    marlin = _Marlin(factor)
    references = []
    real_apply = EmulationExperts.apply

    def remember(self: EmulationExperts, *args: torch.Tensor) -> torch.Tensor:
        references.append(args)
        marlin.reference = real_apply(self, *args)
        return marlin.reference

    monkeypatch.setattr(EmulationExperts, "apply", remember)
    rows = _sweep(monkeypatch, 4, eager={}, graph={}, marlin=marlin)
    # MARLIN got the tokens and routing of the reference TRITON was checked against.
    for given, checked in zip(marlin.calls[0], references[0][:3], strict=True):
        assert given is checked
    backends = {r["backend"] for r in rows}
    if factor == 1.0:
        assert "marlin" in backends and "marlin-wrong" not in backends
    else:  # a wrong output is listed, untimed
        assert "marlin-wrong" in backends and "marlin" not in backends


def test_small_m_ranks_every_candidate_by_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    # The slowest eager candidate replays fastest: it must win (eager time at small M is host time).
    split = _split_gemm1(2)
    rows = _sweep(monkeypatch, 2, eager={split: 500.0}, graph={split: 20.0})
    best = next(r for r in rows if r["backend"] == "triton-best")
    assert TritonConfig(**best["config"]) == split and best["us_graph"] == 20.0 and best["us_eager"] == 500.0
    assert next(r for r in rows if r["backend"] == "triton")["us_graph"] == 90.0


def test_a_wrong_candidate_is_listed_and_never_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = _split_gemm1(2)
    rows = _sweep(monkeypatch, 2, eager={wrong: 1.0}, graph={wrong: 1.0}, wrong=wrong)
    listed = [r for r in rows if r["backend"] == "triton-wrong"]
    assert [TritonConfig(**r["config"]) for r in listed] == [wrong] and listed[0]["relative_error"] > 1e-2
    assert TritonConfig(**next(r for r in rows if r["backend"] == "triton-best")["config"]) != wrong


def test_a_wrong_default_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    scheme = WeightScheme.from_name("int4_g32_sym")
    experts = QuantizedExperts.quantize(torch.randn(E, 2 * INTER, H), torch.randn(E, H, INTER), scheme)
    default = TritonExperts(LayerSpec(MoEConfig(E, K, H, INTER, dtype=torch.float16), scheme), experts.quant_config(),
                            DEVICE).config(2)
    with pytest.raises(RuntimeError, match="triton output is wrong"):
        _sweep(monkeypatch, 2, eager={}, graph={}, wrong=default)


def test_warm_up_runs_the_call_until_the_device_has_run_it_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """At least `calls` calls, then on in rounds of as many until `warm_ms` of device time (read after a
    synchronization) has passed; each call after a flush unless told not to."""
    clock = iter([0.0, 0.1, 0.2, 0.3, 0.4])  # seconds: the start, then one reading per round
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    synced: list[int] = []
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(len(calls)))
    monkeypatch.setattr(bench, "_flush_l2", lambda: calls.append("flush"))
    bench._warm_up(lambda: calls.append("call"), calls=4, warm_ms=250.0, flush=True)
    assert calls == ["flush", "call"] * 12  # rounds ending at 100, 200, 300 ms
    assert synced == [8, 16, 24]
    calls.clear()
    clock = iter([0.0, 0.001])
    bench._warm_up(lambda: calls.append("call"), calls=3, warm_ms=0.0, flush=False)
    assert calls == ["call"] * 3


@pytest.mark.gpu
def test_bench_times_gpu_work() -> None:
    """The event timer measures the call (a 256 MiB copy lands between 100 GB/s and 20 TB/s) and leaves its L2
    flush buffer allocated once."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = torch.randn(1 << 26, device="cuda")
    dst = torch.empty_like(src)
    us = bench._bench(lambda: dst.copy_(src), warmup=2, warm_ms=0)
    gbps = 2 * src.numel() * 4 / us / 1e3
    assert 100 < gbps < 20000, gbps
    assert torch.equal(dst, src)
    assert len(bench._FLUSH_BUFFERS) == 1


def test_tokens_and_routing_are_fixed_per_shape_and_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run times the same routing for a (shape, M), another M draws another."""
    real_apply = EmulationExperts.apply
    drawn = []
    for m in (4, 4, 6):
        marlin = _Marlin(1.0)

        def reference(self: EmulationExperts, *args: torch.Tensor, marlin: _Marlin = marlin) -> torch.Tensor:
            marlin.reference = real_apply(self, *args)
            return marlin.reference

        monkeypatch.setattr(EmulationExperts, "apply", reference)
        _sweep(monkeypatch, m, eager={}, graph={}, marlin=marlin)
        drawn.append(marlin.calls[0])
    for first, again in zip(drawn[0], drawn[1], strict=True):
        assert torch.equal(first, again)
    assert not torch.equal(drawn[0][0][:1], drawn[2][0][:1])


@pytest.mark.parametrize(("name", "scheme_name", "scheme_wanted"), [
    ("kimi-k2", None, "int4_g32_sym"),  # the model's own group size
    ("qwen3-30b-a3b", "int8_g128_sym", "int8_g128_sym"),
])
def test_random_layer_of_a_model_shape(name: str, scheme_name: str | None, scheme_wanted: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Small stand-in shapes keep the random experts cheap; the layer must follow whatever the shape says.
    from wna16moe import shapes
    real = shapes.model_shape(name)
    monkeypatch.setattr(bench, "model_shape", lambda _: replace(real, hidden_size=128, intermediate_size=128,
                                                                num_experts=8))
    spec, experts = bench.random_layer(name, torch.device("cpu"), scheme_name)
    assert spec.scheme == WeightScheme.from_name(scheme_wanted) and spec.moe.dtype == torch.bfloat16
    assert (spec.moe.num_experts, spec.moe.hidden_size, spec.moe.intermediate_size) == (8, 128, 128)
    assert experts.w13.codes.shape == (8, 256, 128) and experts.w2.codes.shape == (8, 128, 128)


def test_layer_cases_draw_the_same_inputs_per_shape_and_m() -> None:
    # The scripts' cases (try_configs, and through it ab_trees): a layer per shape, and per M the bench's seeded
    # tokens and routing with the float32 reference; drawn again, the same (runs compare routing for routing).
    case = [f"H={H},I={INTER},E={E},k={K},g=32:1,3"]
    first, again = (list(bench.layer_cases(case, DEVICE)) for _ in range(2))
    assert [(name, m) for name, m, *_ in first] == [(case[0].split(":")[0], 1), (case[0].split(":")[0], 3)]
    for (_, m, kernel, weights, inputs, reference), (*_, inputs_again, _) in zip(first, again, strict=True):
        x, topk_weights, topk_ids = inputs
        assert x.shape == (m, H) and topk_weights.shape == topk_ids.shape == (m, K) and reference.shape == (m, H)
        assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_again, strict=True))
        assert torch.isfinite(reference).all() and reference.abs().sum() > 0
        assert isinstance(kernel, TritonExperts) and weights["w13"].dtype == torch.int32


def test_coordinate_search_finds_a_joint_move_and_measures_each_configuration_once() -> None:
    # The fastest GEMM2 needs two fields at once (128 wide AND split 16): neither alone helps, as on mixtral.
    start = TritonConfig(16, 64, 64, split_k2=2)
    measured = []

    def cost(c: TritonConfig) -> float:
        measured.append(c)
        joint = 0.7 if (c.block_n2, c.split_k2) == (128, 16) else 1.0
        return 100.0 * joint * (1.2 if c.block_n1 == 32 else 1.0) * (0.99 if c.num_stages == 5 else 1.0)

    best = bench.coordinate_search(cost, start, bench._search_groups(1.0))
    assert (best.block_n2, best.split_k2) == (128, 16)
    assert best.block_n1 == 64 and best.num_stages == start.num_stages  # 1% is below the search's 2% bar
    assert len(measured) == len(set(measured))


def test_coordinate_search_skips_configurations_that_fail() -> None:
    start = TritonConfig(16, 64, 64)
    best = bench.coordinate_search(lambda c: None if c.block_n2 == 256 else (50.0 if c.block_n2 == 128 else 100.0),
                                   start, bench._search_groups(1.0))
    assert best.block_n2 == 128
    with pytest.raises(RuntimeError, match="could not be measured"):
        bench.coordinate_search(lambda c: None, start, bench._search_groups(1.0))


def test_coordinate_search_never_measures_a_tiling_the_decode_kernel_rejects() -> None:
    # From a 32-row decode base at 4 warps, GEMM1's 32-wide move is not a tiling of that kernel (16 x 4 rows).
    measured: list[TritonConfig] = []

    def cost(c: TritonConfig) -> float:
        measured.append(c)
        return 100.0

    start = TritonConfig(32, 128, 256, num_warps=4, num_stages=2, decode=True, wgmma=True)
    bench.coordinate_search(cost, start, bench._search_groups(16.0))
    assert start in measured and len(measured) > 5
    assert all(c.decode_tiling_error() is None for c in measured)
    assert any(f.get("block_n1") == 32 for group in bench._search_groups(16.0) for f in group)


def test_coordinate_search_offers_the_decode_kernel_at_decode() -> None:
    # Where the Gluon decode kernel is faster, the search moves to it and tunes on from there.
    start = TritonConfig(16, 64, 64)
    best = bench.coordinate_search(lambda c: (60.0 if c.decode else 100.0) * (0.9 if c.num_stages == 2 else 1.0),
                                   start, bench._search_groups(1.0))
    assert best.decode and best.block_m == 8 and best.num_stages == 2
    assert any(f.get("block_m") == 16 for f in bench._search_groups(6.0)[0])  # 16-row blocks once experts see > 4
    assert any(f.get("block_m") == 32 for f in bench._search_groups(0.2)[0])  # wide blocks (they shrink) at any M
    # past decode only its wide blocks, as tilings among the Triton kernel's (32 and 64 rows on mma.sync and wgmma)
    mid = [f for group in bench._search_groups(200.0) for f in group if f.get("decode")]
    assert [(f["block_m"], f["num_warps"], f["wgmma"]) for f in mid] == [
        (32, 4, False), (64, 8, False), (32, 4, True), (64, 8, True), (128, 8, True), (128, 4, True)]


def test_coordinate_search_reaches_16_row_blocks_at_2_stages_from_8_row_ones() -> None:
    # v70: at int4 qwen3-30b-a3b M = 143-159 16-row blocks at 2 stages beat the 8-row entry by 5-9%, at 4 stages
    # they lost to it; the stage group moves the stages of the base's own blocks only.
    start = TritonConfig(8, 128, 256, num_warps=4, num_stages=2, decode=True)

    def cost(c: TritonConfig) -> float:
        return 90.0 if (c.block_m, c.num_stages) == (16, 2) else 103.0 if c.block_m == 16 else 100.0

    assert (bench.coordinate_search(cost, start, bench._search_groups(9.0))
            == replace(start, block_m=16, decode=True, max_registers=None, wgmma=False, persistent=0))


@pytest.mark.parametrize("per_expert", [16.0, 200.0])  # the decode groups and the prefill groups
def test_coordinate_search_caps_registers_where_one_more_program_fits(per_expert: float) -> None:
    # v69: a GEMM2 at 174 registers held two 4-warp programs per SM; capped at 168 it holds three.
    start = TritonConfig(32, 64, 128, num_warps=4, num_stages=3, decode=True, wgmma=True)
    best = bench.coordinate_search(lambda c: 95.0 if c.max_registers == 168 else 100.0, start,
                                   bench._search_groups(per_expert))
    assert best == replace(start, max_registers=168)


def test_coordinate_search_tries_where_kernels_release_the_next_at_decode() -> None:
    start = TritonConfig(8, 128, 256, decode=True)
    best = bench.coordinate_search(lambda c: 50.0 if c.pdl == RELEASE_AT_WAIT else 60.0, start,
                                   bench._search_groups(1.0))
    assert best.pdl == RELEASE_AT_WAIT and start.pdl == RELEASE_AFTER_LOOP
    assert bench.coordinate_search(lambda c: 50.0 if c.pdl == PDL_OFF else 60.0, start,
                                   bench._search_groups(1.0)).pdl == PDL_OFF


@pytest.mark.parametrize("per_expert", [1.0, 500.0], ids=["decode", "prefill"])
def test_coordinate_search_moves_each_gemms_warps_and_depth_apart(per_expert: float) -> None:
    # GEMM1 at 8 warps with GEMM2 at 4, and GEMM2 a stage deeper than GEMM1: each only as the two GEMMs' own moves
    start = TritonConfig(128, 128, 256, num_warps=4, num_stages=2, decode=True)

    def cost(c: TritonConfig) -> float:
        return (100.0 * (0.9 if (c.num_warps, c.gemm2_warps) == (8, 4) else 1.0)
                * (0.9 if (c.num_stages, c.gemm2_stages) == (2, 3) else 1.0))

    best = bench.coordinate_search(cost, start, bench._search_groups(per_expert))
    assert (best.num_warps, best.gemm2_warps, best.num_stages, best.gemm2_stages) == (8, 4, 2, 3), best


def test_coordinate_search_tries_wide_decode_blocks_on_wgmma() -> None:
    wide = TritonConfig(32, 128, 256, num_stages=3, decode=True)
    assert bench.coordinate_search(lambda c: 50.0 if c.wgmma else 60.0, wide, bench._search_groups(16.0)).wgmma
    # blocks the setting does not apply to skip the move
    narrow = TritonConfig(8, 128, 256, decode=True)
    assert not bench.coordinate_search(lambda c: 50.0 if c.wgmma else 60.0, narrow, bench._search_groups(1.0)).wgmma


def test_coordinate_search_tries_carried_mmas_at_prefill() -> None:
    start = TritonConfig(128, 128, 256, num_warps=8, num_stages=4, decode=True, wgmma=True)
    assert bench.coordinate_search(lambda c: 90.0 if c.carry == 2 else 100.0, start,
                                   bench._search_groups(500.0)).carry == 2
    # without wgmma the move is skipped
    plain = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, swap_ab=True)
    assert bench.coordinate_search(lambda c: 90.0 if c.carry else 100.0, plain, bench._search_groups(500.0)).carry == 0


def test_coordinate_search_tries_blocks_that_shrink_at_prefill() -> None:
    start = TritonConfig(128, 128, 128, num_warps=8, num_stages=3, swap_ab=True)
    best = bench.coordinate_search(lambda c: 80.0 if c.shrink == 2 else 100.0, start, bench._search_groups(500.0))
    assert best.shrink == 2 and best.block_m == 128 and start.shrink == 0
    # from the decode kernel's wide blocks the shrink moves are skipped, not an error
    decode = TritonConfig(32, 64, 128, decode=True)
    assert bench.coordinate_search(lambda c: 50.0 if c.decode else 100.0, decode,
                                   bench._search_groups(500.0)) == decode


@pytest.mark.parametrize(("m", "budget_ms"), [(4, 60.0), (2048, bench.PREFILL_BUDGET_MS)])
def test_prefill_rows_are_timed_over_a_longer_budget(m: int, budget_ms: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # At the power cap the clock dips for stretches of calls: prefill medians span several of them.
    budgets: list[float] = []
    rows = _sweep(monkeypatch, m, eager={}, graph={}, sweep="", budgets=budgets)
    assert rows[0]["backend"] == "triton" and set(budgets) == {budget_ms}


def test_search_mode_ships_the_fastest_configuration_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # Graph replays made up so that the 128-wide GEMM2 split 4 is fastest: the search must reach and report it.
    # A 5-stage pipeline is 1% faster still: below the search's bar, so not shipped.
    def graph(c: TritonConfig | None) -> float:
        us = 40.0 if c is not None and (c.block_n2, c.split_k2) == (128, 4) else 90.0
        return us * (0.99 if c is not None and c.num_stages == 5 else 1.0)

    rows = _sweep(monkeypatch, 2, eager={}, graph=graph, sweep="search")
    best = TritonConfig(**next(r for r in rows if r["backend"] == "triton-best")["config"])
    assert (best.block_n2, best.split_k2) == (128, 4) and best.num_stages != 5
    assert next(r for r in rows if r["backend"] == "triton-best")["us_graph"] == 40.0


def test_search_pick_that_falls_behind_when_timed_again_is_not_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The 128-wide GEMM2 split 4 is 50% faster on its first timing only (a lucky measurement): the confirmation
    # rounds time it again at the default's speed, so the default ships.
    timed: dict[TritonConfig, int] = {}

    def graph(c: TritonConfig | None) -> float:
        lucky = c is not None and (c.block_n2, c.split_k2) == (128, 4)
        timed[c] = timed.get(c, 0) + 1
        return 45.0 if lucky and timed[c] == 1 else 90.0

    rows = _sweep(monkeypatch, 2, eager={}, graph=graph, sweep="search")
    shipped = next(r for r in rows if r["backend"] == "triton-best")
    default = next(r for r in rows if r["backend"] == "triton")
    assert shipped["config"] == default["config"] and shipped["us_graph"] == 90.0
    assert max(timed.values()) == 2  # the pick was timed again, and once was enough to drop it


def test_try_configs_times_each_variant_once_and_reports_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    try_configs = _script("try_configs")
    shipped = TritonConfig(16, 128, 256, num_stages=3)  # an entry of the Triton kernel
    default = TritonConfig(32, 64, 128, num_stages=3, decode=True, wgmma=True)
    texts = ["num_stages=4", "wgmma=1", "decode=1,block_m=32,wgmma=1", "num_stages=4", "num_stages=3", "default"]
    variants = try_configs.variants_of(shipped, texts, "mixtral M=32", default)
    assert variants == [shipped, replace(shipped, num_stages=4), replace(shipped, decode=True, block_m=32, wgmma=True),
                        default]
    out = capsys.readouterr().out
    assert "mixtral M=32 wgmma=1: not on this entry" in out
    assert out.count("the same configuration as one before it") == 2
    # each round starts one configuration later: none is always timed first
    orders = [try_configs.round_order(variants, rnd) for rnd in range(5)]
    assert [order[0] for order in orders] == variants + variants[:1]
    assert all(sorted(map(str, order)) == sorted(map(str, variants)) for order in orders)


def test_try_configs_times_the_defaults_at_span_points_a_variant_would_leave_them() -> None:
    # mixtral's 128-row entry at M = 512: a 144-row variant would not run M = 600 of the entry's span (the defaults
    # never pick 144 rows), so the defaults are timed there too; a 256-wide variant would run it, and the entry's
    # own M needs no defaults.
    try_configs = _script("try_configs")
    key = tuning.shape_key("mixtral")
    entry = TritonConfig(128, 64, 128, num_warps=4, num_stages=2, decode=True, wgmma=True)
    default = TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
    rows144, wide = replace(entry, block_m=144, num_warps=8), replace(entry, block_n2=256)
    assert try_configs.with_defaults_where_left([entry, rows144], default, 600, 512, key) == [entry, rows144, default]
    assert try_configs.with_defaults_where_left([entry, wide], default, 600, 512, key) == [entry, wide]
    assert try_configs.with_defaults_where_left([entry, rows144], default, 512, 512, key) == [entry, rows144]
    assert try_configs.with_defaults_where_left([entry, rows144, default], default, 600, 512, key) == [
        entry, rows144, default]


class _StubKernel:
    """What try_configs.py asks of a TRITON layer, without a GPU: its entry (`shipped`), its defaults, a forward."""

    spec = SimpleNamespace(scheme=SimpleNamespace(name="int4_g128_sym"))
    moe = SimpleNamespace(top_k=8)

    def __init__(self, shipped: TritonConfig, default: TritonConfig) -> None:
        self.shipped, self.default = shipped, default

    def default_config(self, m: int, top_k: int) -> TritonConfig:
        return self.default

    def config(self, m: int) -> TritonConfig:
        return self.shipped

    def apply(self, *args: object) -> torch.Tensor:
        return torch.ones(4)


@pytest.mark.parametrize("m", [32, 2048])
def test_try_configs_records_no_warm_round(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every configuration is timed once more than recorded, in a round before the others (a configuration's first
    # graph in a process read fast, NOTES.md v55), and the recorded rounds are 0 .. rounds - 1.
    try_configs = _script("try_configs")
    shipped = TritonConfig(16, 128, 256, num_stages=3)

    timings: list[float] = []  # (each timing's budget, ms)
    kernel = _StubKernel(shipped, shipped)
    monkeypatch.setattr(try_configs, "layer_cases", lambda *a: iter([("mixtral", m, kernel, {}, (None,) * 3,
                                                                      torch.ones(4))]))
    monkeypatch.setattr(try_configs, "_bench_graph", lambda fn, budget_ms: timings.append(budget_ms) or 10.0)
    written: list[list[dict]] = []
    monkeypatch.setattr(try_configs, "write_results", lambda path, rows: written.append(rows))
    monkeypatch.setattr(sys, "argv", ["try_configs.py", f"mixtral:{m}", "--variant", "num_stages=4", "--rounds", "3"])
    try_configs.main()
    rows = written[0]
    assert len(timings) == 2 * 4 and len(rows) == 2 * 3
    assert sorted(r["round"] for r in rows) == [0, 0, 1, 1, 2, 2]
    assert set(timings) == {60.0 if m < 2048 else bench.PREFILL_BUDGET_MS}  # (prefill: over the cap's dips)


def test_try_configs_writes_its_results_after_every_case(monkeypatch: pytest.MonkeyPatch) -> None:
    # A device call cut short (its 10-minute limit) still returns the cases that finished: the file is written
    # after each (shape, M), with every row so far.
    try_configs = _script("try_configs")
    shipped = TritonConfig(16, 128, 256, num_stages=3)
    kernel = _StubKernel(shipped, shipped)
    monkeypatch.setattr(try_configs, "layer_cases", lambda *a: iter(
        [("mixtral", m, kernel, {}, (None,) * 3, torch.ones(4)) for m in (8, 32)]))
    monkeypatch.setattr(try_configs, "_bench_graph", lambda fn, budget_ms: 10.0)
    written: list[list[dict]] = []
    monkeypatch.setattr(try_configs, "write_results", lambda path, rows: written.append(list(rows)))
    monkeypatch.setattr(sys, "argv", ["try_configs.py", "mixtral:8,32", "--variant", "num_stages=4"])
    try_configs.main()
    assert [sorted({r["M"] for r in rows}) for rows in written] == [[8], [8, 32]]
    assert [len(rows) for rows in written] == [4, 8]


def test_try_configs_span_times_each_entry_inside_the_rows_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # --span adds the entry's span points after each M (the H200 table's qwen3-30b-a3b M = 8192 entry runs
    # 4097-16384) and marks every row with the entry's M, so that `tuning --trials` reads the points as evidence
    # for that entry; an M that is not a row of the table is refused, naming the rows.
    try_configs = _script("try_configs")
    from wna16moe import tuning

    entries = tuning.entry_rows("NVIDIA H200", tuning.shape_key("qwen3-30b-a3b"))
    entry = TritonConfig(**entries[8192])
    assert try_configs.with_span_points(["qwen3-30b-a3b:8192"], None, lambda key: entries) == [
        "qwen3-30b-a3b:8192,5793,11585"]
    with pytest.raises(SystemExit, match="M = 5600 is not a row of the table \\(rows: 1, 8, "):
        try_configs.with_span_points(["qwen3-30b-a3b:5600"], None, lambda key: entries)
    assert try_configs.entry_row(entries, 5793, entry) == 8192
    assert try_configs.entry_row(entries, 5793, replace(entry, num_stages=4)) is None  # (the defaults ran there)

    asked: list[list[str]] = []

    def layer_cases(cases: list[str], *args: object) -> object:
        asked.append(cases)
        name, ms = cases[0].split(":")
        return iter([(name, int(m), _StubKernel(entry, replace(entry, num_stages=4)), {}, (None,) * 3,
                      torch.ones(4)) for m in ms.split(",")])

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(try_configs, "layer_cases", layer_cases)
    monkeypatch.setattr(try_configs, "_bench_graph", lambda fn, budget_ms: 10.0)
    written: list[list[dict]] = []
    monkeypatch.setattr(try_configs, "write_results", lambda path, rows: written.append(rows))
    monkeypatch.setattr(sys, "argv", ["try_configs.py", "qwen3-30b-a3b:8192", "--span", "--variant", "num_stages2=3"])
    try_configs.main()
    assert asked == [["qwen3-30b-a3b:8192,5793,11585"]]
    assert sorted({r["M"] for r in written[0]}) == [5793, 8192, 11585]
    assert {r["entry_m"] for r in written[0]} == {8192} and len(written[0]) == 3 * 2 * 2


def test_replay_spread_records_the_forwards_allocations_in_order() -> None:
    # (address, bytes) of what the forward allocates, through torch.empty and torch.zeros, and nothing after
    replay_spread, empty = _script("replay_spread"), torch.empty
    with replay_spread.recorded_allocations() as record:
        first = torch.empty(10, dtype=torch.float32)
        second = torch.zeros(3, 4, dtype=torch.float64)
    torch.empty(5)
    assert record == [(first.data_ptr(), 40), (second.data_ptr(), 96)]
    assert torch.empty is empty


@pytest.mark.parametrize(("tokens", "num_experts", "top_k"), [(512, 8, 2), (64, 128, 8), (6, 4, 2)])
def test_balanced_routing_gives_every_expert_as_many_rows(tokens: int, num_experts: int, top_k: int) -> None:
    routing_balance = _script("routing_balance")
    ids = routing_balance.balanced_ids(tokens, num_experts, top_k, DEVICE)
    assert ids.shape == (tokens, top_k) and ids.dtype == torch.int32
    assert all(len(set(row)) == top_k for row in ids.tolist())  # (a token's experts are distinct)
    rows = torch.bincount(ids.flatten().long(), minlength=num_experts)
    assert rows.max() - rows.min() <= 1 and int(rows.sum()) == tokens * top_k


def test_blocks_needed_counts_each_experts_partial_block() -> None:
    # rows per expert 3, 0, 5 over blocks of 4: 1 + 0 + 2
    ids = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2], dtype=torch.int32).reshape(4, 2)
    assert _script("routing_balance").blocks_needed(ids, 3, 4) == 3


def test_results_name_the_commit_given_over_git(monkeypatch: pytest.MonkeyPatch) -> None:
    # (a tree copied to a device machine carries a stale .git: the caller names the commit it measures)
    monkeypatch.setenv("WNA16MOE_COMMIT", "feedbee")
    assert bench.commit_id() == "feedbee"
    monkeypatch.delenv("WNA16MOE_COMMIT")
    assert bench.commit_id() not in ("feedbee", "")


def _run_ab_trees(monkeypatch: pytest.MonkeyPatch, ab_trees: ModuleType, fake_run: Callable[..., list[dict]],
                  arguments: list[str]) -> list[dict]:
    """ab_trees.main() on `arguments` with `fake_run` for its try_configs processes: what it wrote, each time."""
    written: list[dict] = []
    monkeypatch.setattr(ab_trees, "run_try_configs", fake_run)
    monkeypatch.setattr(ab_trees, "write_results", lambda path, rows, **extra: written.append({"rows": rows, **extra}))
    monkeypatch.setattr(sys, "argv", ["ab_trees.py", *arguments])
    ab_trees.main()
    return written


def test_ab_trees_alternates_the_trees_and_compares_their_shipped_rows(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    ab_trees = _script("ab_trees")
    calls: list[str] = []  # the src folder each process imported the package from, in order
    times = {"base": iter([100.0, 104.0, 98.0, 102.0]), "new": iter([90.0, 94.0, 92.0, 96.0])}

    def fake_run(src: str, cases: list[str], options: list[str], log: Path) -> list[dict]:
        tree = "base" if src == str((tmp_path / "src").resolve()) else "new"
        calls.append(tree)
        assert cases == ["mixtral:8"] and options == ["--rounds", "2", "--base", "shipped"] and log.parent == tmp_path
        shipped = [{"shape": "mixtral", "M": 8, "round": r, "us_graph": next(times[tree]), "shipped": True}
                   for r in range(2)]
        return [*shipped, {"shape": "mixtral", "M": 8, "round": 0, "us_graph": 1.0, "shipped": False}]

    written = _run_ab_trees(monkeypatch, ab_trees, fake_run, [str(tmp_path / "src"), "mixtral:8", "--processes", "2",
                                                             "--logs", str(tmp_path), "--out", "ab.json"])
    assert calls == ["base", "new", "base", "new"]
    assert len(written) == 2  # after each pair
    final = written[-1]
    assert [(r["tree"], r["process"]) for r in final["rows"] if r["shipped"]] == [
        ("base", 0), ("base", 0), ("new", 0), ("new", 0), ("base", 1), ("base", 1), ("new", 1), ("new", 1)]
    # only the shipped entry's timings count; the variant's 1.0 µs would otherwise dominate both means
    assert final["summary"] == [{"shape": "mixtral", "M": 8, "base_us": 101.0, "new_us": 93.0,
                                 "change_pct": round(100 * (93 / 101 - 1), 2),
                                 "base_rounds": [100.0, 104.0, 98.0, 102.0], "new_rounds": [90.0, 94.0, 92.0, 96.0]}]


def test_ab_trees_takes_the_changed_tree_from_new(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--new` names the changed tree (a branch exported beside the base), so that the change reads with its sign
    whichever tree the command runs from."""
    ab_trees = _script("ab_trees")
    seen: list[str] = []

    def fake_run(src: str, cases: list[str], options: list[str], log: Path) -> list[dict]:
        seen.append(src)
        return [{"shape": "mixtral", "M": 8, "round": 0, "us_graph": 50.0 + len(seen), "shipped": True}]

    written = _run_ab_trees(monkeypatch, ab_trees, fake_run, [str(tmp_path / "main"), "mixtral:8", "--new",
                                                             str(tmp_path / "branch"), "--processes", "1",
                                                             "--logs", str(tmp_path)])
    assert seen == [str((tmp_path / "main").resolve()), str((tmp_path / "branch").resolve())]
    assert written[-1]["new"] == str(tmp_path / "branch")
    assert written[-1]["summary"][0]["change_pct"] == round(100 * (52 / 51 - 1), 2)


def test_ab_trees_names_trees_that_time_differently(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A base tree whose bench.py differs (an older warm-up) is not a like-for-like A/B: it is said so."""
    ab_trees = _script("ab_trees")
    for tree, text in (("base", "WARM_MS = 0\n"), ("new", "WARM_MS = 250.0\n"), ("same", "WARM_MS = 250.0\n")):
        (tmp_path / tree / "wna16moe").mkdir(parents=True)
        (tmp_path / tree / "wna16moe" / "bench.py").write_text(text)

    def fake_run(src: str, cases: list[str], options: list[str], log: Path) -> list[dict]:
        return [{"shape": "mixtral", "M": 8, "round": 0, "us_graph": 50.0, "shipped": True}]

    for base, differs in (("base", True), ("same", False)):
        written = _run_ab_trees(monkeypatch, ab_trees, fake_run, [str(tmp_path / base), "mixtral:8", "--new",
                                                                 str(tmp_path / "new"), "--processes", "1",
                                                                 "--logs", str(tmp_path)])
        assert written[-1]["bench_differs"] is differs
        assert ("bench.py differ" in capsys.readouterr().out) is differs


def test_register_audit_compiles_each_gemm_of_an_entry_as_it_launches() -> None:
    audit = _script("register_audit")
    entry = asdict(TritonConfig(32, 64, 128, num_warps=4, num_stages=3, decode=True, wgmma=True, max_registers=168,
                                num_stages2=2, split_k2=2))
    gemm1, gemm2 = audit.launches("int8_g128 H=2048 I=768 E=128 k=8", 128, entry)
    assert (gemm1["gated"], gemm1["block_n"], gemm1["stages"], gemm1["split_k"]) == (True, 64, 3, 1)
    assert (gemm2["gated"], gemm2["block_n"], gemm2["stages"], gemm2["split_k"], gemm2["warps"]) == (
        False, 128, 2, 2, 4)
    assert gemm1["bits"] == 8 and gemm1["group"] == 128 and gemm1["maxnreg"] == gemm2["maxnreg"] == 168
    assert gemm1["pair"] == 0  # (aligned blocks: 128 tokens, 32-row blocks)
    narrow = asdict(TritonConfig(8, 128, 256, decode=True))
    one_token = audit.launches("int4_g32 H=7168 I=2048 E=384 k=8", 1, narrow)
    assert all(case["pair"] == 1 and case["group"] == 32 and "maxnreg" not in case for case in one_token)
    assert [case["pair"] for case in audit.launches("int4_g32 H=7168 I=2048 E=384 k=8", 8, narrow)] == [2, 2]
    specialized = asdict(TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True,
                                      specialize=True))
    assert len(audit.launches("int4_g128 H=7168 I=2048 E=256 k=8", 8192, specialized)) == 1
    loop = ["LDL.64 R4, [R1+0x10]", "@!P0 STL [R1+0x8], R9", "LDS.U R2, [R3]", "STS [R3], R2", "@P1 LDL R7, [R1]"]
    assert audit.local_accesses(loop) == {"LDL": 2, "STL": 1}


def test_try_configs_summary_names_each_variant_by_its_fields_against_the_base_per_round() -> None:
    # Each configuration's line names only the fields where it differs from the base, in --variant syntax (flags
    # 0 / 1, "none"), and each round's change is against the base in that same round, not a mean over rounds.
    try_configs = _script("try_configs")
    base = asdict(TritonConfig(32, 128, 256, num_stages=4, decode=True))
    variant = asdict(TritonConfig(32, 64, 128, num_stages=3, decode=True, wgmma=True, max_registers=168))
    rows = [{"shape": "kimi-k2", "M": 512, "round": r, "config": c, "us_graph": us, "shipped": c is base}
            for r, c, us in ((0, base, 200.0), (0, variant, 190.0), (1, variant, 210.0), (1, base, 210.0))]
    assert try_configs.summary(rows) == [
        "kimi-k2 M=512 base: 200.0 | 210.0 us",
        "kimi-k2 M=512 block_n1=64,block_n2=128,num_stages=3,max_registers=168,wgmma=1: "
        "190.0 (-5.0%) | 210.0 (+0.0%) us"]
    unset = dict(variant, max_registers=None)
    assert try_configs.variant_text(unset, variant) == "max_registers=none"


def test_try_configs_summarize_prints_saved_results_without_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # --summarize reads saved files and times nothing (no GPU here); without cases or files the command is an error.
    try_configs = _script("try_configs")
    base = asdict(TritonConfig(16, 128, 256, num_stages=2, decode=True))
    rows = [{"shape": "mixtral", "M": 32, "round": r, "config": c, "us_graph": us, "shipped": c is base}
            for r, c, us in ((0, base, 100.0), (0, dict(base, num_stages=3), 97.0))]
    saved = tmp_path / "try.json"
    saved.write_text(json.dumps({"card": "x", "rows": rows}))
    monkeypatch.setattr(sys, "argv", ["try_configs.py", "--summarize", str(saved)])
    try_configs.main()
    assert capsys.readouterr().out.splitlines() == ["mixtral M=32 base: 100.0 us",
                                                    "mixtral M=32 num_stages=3: 97.0 (-3.0%) us"]
    monkeypatch.setattr(sys, "argv", ["try_configs.py"])
    with pytest.raises(SystemExit):
        try_configs.main()
