"""The shipped TRITON configuration table: building it from a sweep, looking entries up, and its contents."""

import json
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from wna16moe import tuning
from wna16moe.device import DeviceInfo
from wna16moe.experts.triton import (
    LONG_I,
    MANY_EXPERTS,
    ROWS_FOR_96_ROW_BLOCKS,
    ROWS_FOR_144_ROW_BLOCKS,
    SMALL_GROUP_MMA_BELOW,
    WIDE_HIDDEN,
    TritonConfig,
    default_config,
    entry_or_default,
    registers_for_programs,
)
from wna16moe.kernels.moe_gemm_decode import BLOCK_MS, SPLIT_BLOCK_MS
from wna16moe.oracle import explain
from wna16moe.shapes import model_shape
from wna16moe.tuning import ShapeKey, build_table, triton_vs_marlin, tuned_config

KEY = ShapeKey(4, 128, 4096, 14336, 8, 2)
QWEN = ShapeKey(4, 128, 2048, 768, 128, 8)


def hopper_defaults(key: ShapeKey) -> Callable[[int], TritonConfig]:
    """`default_config` of a layer keyed `key` on a 132-SM Hopper, as a function of the token count."""
    return lambda tokens: default_config(tokens, key.top_k, key.num_experts, key.group_size, key.hidden_size,
                                         key.intermediate_size, 132, hopper=True, bits=key.bits)


def _row(backend: str, m: int, block_m: int, us: float = 100.0, shape: str = "mixtral") -> dict:
    config = {"block_m": block_m, "block_n1": 64, "block_n2": 64, "split_k2": 1, "num_warps": 4, "num_stages": 3}
    return {"backend": backend, "shape": shape, "scheme": "int4_g128_sym", "M": m, "config": config, "us_eager": us,
            "us_graph": None}


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # mixtral: MARLIN 2x faster at both measured M; qwen3: TRITON 1.5x faster.
    results = {"card": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-11-28",
               "rows": [_row("triton", 1, 99), _row("triton-best", 1, 16), _row("triton-best", 128, 32),
                        _row("triton-best", 8192, 128), _row("bf16", 8192, 0), _row("marlin", 1, 0, 50.0),
                        _row("marlin", 8192, 0, 50.0), _row("triton-best", 1, 16, 100.0, "qwen3-30b-a3b"),
                        _row("marlin", 1, 0, 150.0, "qwen3-30b-a3b")]}
    built = build_table(results, {"mixtral": KEY, "qwen3-30b-a3b": QWEN})
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"cards": {built["card"]: built["entries"]}, "speed": {built["card"]: built["speed"]}}))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    tuning._load.cache_clear()
    yield path
    tuning._load.cache_clear()


def test_build_keeps_only_the_best_rows(table: Path) -> None:
    entries = json.loads(table.read_text())["cards"]["NVIDIA H100 80GB HBM3"][KEY.as_text()]
    assert sorted(entries, key=int) == ["1", "128", "8192"]
    assert entries["1"]["block_m"] == 16  # the triton-best row, not the default's


def test_build_keeps_the_default_where_it_replays_faster() -> None:
    # Older sweeps ranked small M by eager time: a default that replays faster as a graph is kept instead.
    best, default = _row("triton-best", 1, 16, 80.0), _row("triton", 1, 32, 90.0)
    best["us_graph"], default["us_graph"] = 70.0, 60.0
    marlin = _row("marlin", 1, 0, 120.0)
    built = build_table({"card": "C", "commit": "abc", "date": "d", "rows": [best, default, marlin]},
                        {"mixtral": KEY})
    assert built["entries"][KEY.as_text()]["1"]["block_m"] == 32
    assert built["speed"][f"{KEY.as_text()} int4_g128_sym"]["1"] == {"triton_us": 60.0, "marlin_us": 120.0}


def test_a_served_run_refreshes_speed_and_keeps_the_entries(table: Path, tmp_path: Path) -> None:
    # `wna16moe bench` without --sweep: "triton" rows ran the entries of their day, beside MARLIN; an entry a trial
    # changed since (here block_m 16, served at 8) stays as it is
    before = json.loads(table.read_text())["cards"]["NVIDIA H100 80GB HBM3"]
    served = _row("triton", 1, 8, 40.0)
    results = {"card": "NVIDIA H100 80GB HBM3", "commit": "def", "date": "2026-11-29",
               "rows": [served, _row("marlin", 1, 0, 60.0), _row("bf16", 1, 0, 90.0)]}
    path = tmp_path / "served.json"
    path.write_text(json.dumps(results))
    assert tuning.main([str(path)]) == 0
    after = json.loads(table.read_text())
    assert after["cards"]["NVIDIA H100 80GB HBM3"] == before
    assert after["speed"]["NVIDIA H100 80GB HBM3"][f"{KEY.as_text()} int4_g128_sym"]["1"] == {
        "triton_us": 40.0, "marlin_us": 60.0}


def test_a_later_sweep_replaces_only_its_token_counts(table: Path, tmp_path: Path) -> None:
    before = json.loads(table.read_text())["cards"]["NVIDIA H100 80GB HBM3"][KEY.as_text()]
    results = {"card": "NVIDIA H100 80GB HBM3", "commit": "def", "date": "2026-11-29",
               "rows": [_row("triton-best", 1, 64), _row("marlin", 1, 0, 50.0)]}
    sweep = tmp_path / "decode-sweep.json"
    sweep.write_text(json.dumps(results))
    assert tuning.main([str(sweep)]) == 0
    after = json.loads(table.read_text())
    entries = after["cards"]["NVIDIA H100 80GB HBM3"][KEY.as_text()]
    assert entries["1"]["block_m"] == 64 and before["1"]["block_m"] == 16  # replaced
    assert entries["8192"] == before["8192"] and entries["128"] == before["128"]  # kept
    assert set(after["speed"]["NVIDIA H100 80GB HBM3"][f"{KEY.as_text()} int4_g128_sym"]) == {"1", "8192"}
    assert after["sources"] == ["decode-sweep.json (commit def, 2026-11-29)"]


@pytest.mark.parametrize(("tokens", "block_m"), [(1, 16), (4, 16), (12, 32), (100, 32), (1000, 32), (3000, 128),
                                                 (100000, 128)])
def test_lookup_takes_the_nearest_measured_m(table: Path, tokens: int, block_m: int) -> None:
    measured_m, fields = tuned_config("NVIDIA H100 80GB HBM3", KEY, tokens)
    assert fields["block_m"] == block_m and fields == json.loads(table.read_text())["cards"][
        "NVIDIA H100 80GB HBM3"][KEY.as_text()][str(measured_m)]


def test_unknown_card_or_shape_has_no_entry(table: Path) -> None:
    assert tuned_config("Card Y", KEY, 1) is None
    assert triton_vs_marlin("Card Y", KEY, "int4_g128_sym") is None
    assert tuned_config("NVIDIA H100 80GB HBM3", ShapeKey(4, 32, 4096, 14336, 8, 2), 1) is None


def test_a_card_borrows_the_stand_in_of_its_capability(table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape by shape: a card without entries for a shape takes those of the card measured for its compute
    capability; the speed rows, a measurement of one card, are never borrowed."""
    monkeypatch.setitem(tuning.STAND_INS, (9, 0), "NVIDIA H100 80GB HBM3")
    assert tuned_config("NVIDIA H800", KEY, 1, (9, 0))[1]["block_m"] == 16
    assert tuned_config("NVIDIA H800", KEY, 1, (8, 0)) is None and tuned_config("NVIDIA H800", KEY, 1) is None
    assert triton_vs_marlin("NVIDIA H800", KEY, "int4_g128_sym") is None
    assert tuning.STAND_INS[(9, 0)] in json.loads(table.read_text())["cards"]


def test_the_stand_ins_are_measured_cards() -> None:
    tuning._load.cache_clear()
    assert all(card in tuning._load()["cards"] for card in tuning.STAND_INS.values())


def test_shipped_table_is_valid() -> None:
    tuning._load.cache_clear()
    cards = tuning._load()["cards"]
    for shapes in cards.values():
        for by_m in shapes.values():
            for cfg in by_m.values():
                assert _launchable(TritonConfig(**cfg))  # every entry is a complete, launchable configuration


def _launchable(cfg: TritonConfig) -> bool:
    """What the kernels take: power-of-two tiles and warps, a few pipeline stages; tl.dot's 16-row minimum, or
    for the decode kernel its blocks of rows (48, 96 and 144 on wgmma), whole 16-feature MMA tiles per warp and as
    few as 2 warps."""
    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    warps, stages = (cfg.num_warps, cfg.gemm2_warps), (cfg.num_stages, cfg.gemm2_stages)  # GEMM1's, GEMM2's
    if cfg.decode:
        blocks = (cfg.block_m in BLOCK_MS and cfg.block_n1 % (16 * warps[0]) == 0
                  and cfg.block_n2 % (16 * warps[1]) == 0)
    else:
        blocks = cfg.block_m >= 16
    rows = pow2(cfg.block_m) or (cfg.wgmma and cfg.block_m in SPLIT_BLOCK_MS)
    return (blocks and rows and all(pow2(x) for x in (cfg.block_n1, cfg.block_n2, *warps))
            and all(w in ((2, 4, 8) if cfg.decode else (4, 8)) for w in warps) and all(2 <= s <= 6 for s in stages)
            and cfg.split_k1 in (1, 2, 4, 8)
            and cfg.split_k2 in (1, 2, 4, 8, 16) and (cfg.max_registers is None or 64 <= cfg.max_registers <= 255))


def _default_for(shape: str, tokens: int) -> tuple[TritonConfig, float]:
    """The default configuration of a model shape at `tokens` on a 132-SM Hopper, and its pairs per expert."""
    s = model_shape(shape)
    return (default_config(tokens, s.top_k, s.num_experts, s.group_size, s.hidden_size, s.intermediate_size, 132,
                           hopper=True), tokens * s.top_k / s.num_experts)


ALL_SHAPES_AND_M = pytest.mark.parametrize(("shape", "tokens"), [
    (shape, tokens) for shape in ("mixtral", "qwen3-30b-a3b", "deepseek-v3", "kimi-k2")
    for tokens in (1, 8, 128, 512, 2048, 8192)])


@ALL_SHAPES_AND_M
def test_sweep_candidates_are_launchable(shape: str, tokens: int) -> None:
    # A field added to TritonConfig once shifted positional candidates (warps into split_k1, stages into warps).
    from wna16moe.bench import _sweep_configs

    base, per_expert = _default_for(shape, tokens)
    candidates = _sweep_configs(base, per_expert)
    assert candidates[0] == base and len(set(candidates)) == len(candidates)
    assert all(_launchable(c) for c in candidates), [c for c in candidates if not _launchable(c)]


@ALL_SHAPES_AND_M
def test_search_moves_are_launchable(shape: str, tokens: int) -> None:
    from wna16moe.bench import _search_groups

    base, per_expert = _default_for(shape, tokens)
    moved = []
    for fields in (fields for group in _search_groups(per_expert) for fields in group):
        try:
            moved.append(replace(base, **fields))
        except ValueError:  # a setting the base cannot take (shrink on a decode base): the search skips it
            continue
    # From a decode base, tiles of 32 at 4 warps (or 64 at 8) leave the decode kernel's tilings
    # (`TritonConfig.decode_tiling_error`): the search skips them unmeasured.
    moved = [c for c in moved if c.decode_tiling_error() is None]
    assert moved and all(_launchable(c) for c in moved), [c for c in moved if not _launchable(c)]


def test_search_tries_persistent_narrow_blocks_and_leaves_them() -> None:
    """From a narrow decode base the search offers persistent programs (v41's one win, qwen3-30b-a3b M = 32);
    its tile moves reset them, so that a persistent pick can still move to wide blocks."""
    from wna16moe.bench import _search_groups

    base, per_expert = _default_for("qwen3-30b-a3b", 32)
    assert base.decode and base.block_m == 8, base
    groups = _search_groups(per_expert)
    persistent = [replace(base, **fields) for group in groups for fields in group if fields.get("persistent")]
    assert {c.persistent for c in persistent} == {2, 3}
    wide = [replace(persistent[0], **fields) for fields in groups[0] if fields["block_m"] >= 32]
    assert wide and all(c.persistent == 0 for c in wide)


@pytest.mark.parametrize(("shape", "tokens"), [("deepseek-v3", 512), ("qwen3-30b-a3b", 512)])
def test_search_leaves_a_wgmma_base(shape: str, tokens: int) -> None:
    """Hopper's default at 10-64 rows per expert is a 32-row decode block on wgmma; the search's tile moves
    (narrower blocks, the Triton kernel; 32- and 64-row decode blocks on mma.sync, as cards before Hopper run
    them) must still apply to it, and a later group turns wgmma back on."""
    from wna16moe.bench import _search_groups

    base, per_expert = _default_for(shape, tokens)
    assert (base.decode, base.block_m, base.wgmma) == (True, 32, True), base
    groups = _search_groups(per_expert)
    moved = [replace(base, **fields) for fields in groups[0]]
    assert any(c.block_m < 32 or not c.decode for c in moved), moved
    assert any(c.decode and not c.wgmma for c in moved), moved
    assert replace(replace(base, wgmma=False), **next(g for g in groups if {"wgmma": True} in g)[0]) == base


def test_search_reaches_64_row_wgmma_blocks_from_128_row_ones() -> None:
    """kimi-k2 M = 2048 (43 rows per expert) ships 128-row wgmma blocks; 64-row ones at 8 warps on wgmma (the
    W8A16 entry there, v34-v55 trials) are one tile move away, not only through their slower mma.sync form, from
    which the wgmma move never starts when that form loses to the base."""
    from wna16moe.bench import _search_groups

    base = TritonConfig(128, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
    moved = [replace(base, **fields) for fields in _search_groups(16384 / 384)[0]]
    assert TritonConfig(64, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True) in moved
    assert all(c.decode_tiling_error() is None for c in moved if c.decode)


def test_decode_sweep_caps_registers_of_wide_gemm2_tiles() -> None:
    from wna16moe.bench import _sweep_configs

    base = default_config(8, 8, 256, 128, 7168, 2048, 132, hopper=True)
    capped = [c for c in _sweep_configs(base, 8 * 8 / 256) if c.max_registers is not None]
    capped_base = replace(base, max_registers=96)
    assert capped_base in capped and all(c.block_n2 >= 128 or c == capped_base for c in capped)
    assert not any(c.max_registers for c in _sweep_configs(default_config(8192, 8, 256, 128), 256.0))


def test_default_config_splits_gemm2_when_few_programs() -> None:
    # mixtral at M = 1: 2 experts x 64 N tiles of GEMM2 on 132 SMs -> split K (a power of two)
    cfg = default_config(1, 2, 8, 128, hidden_size=4096, intermediate_size=14336, num_sms=132)
    assert cfg.split_k2 > 1 and cfg.split_k2 & (cfg.split_k2 - 1) == 0
    # deepseek-v3 at M = 1: 8 experts x 112 tiles already fill the GPU
    assert default_config(1, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132).split_k2 == 1
    assert default_config(1, 2, 8, 128).split_k2 == 1  # no device facts: no split


@pytest.mark.parametrize(
    ("shape", "tokens", "split_k2", "stages"),
    [
        ((2, 8, 6144, 16384), 8, 4, 3),  # mixtral-8x22b, 2 rows per expert: split to ~16 programs per SM, 3 deep
        ((2, 8, 6144, 16384), 16, 4, 3),  # 4 rows
        ((2, 8, 6144, 16384), 6, 4, 3),  # 1.5 rows (v65: -16%)
        ((2, 8, 6144, 16384), 4, 2, 2),  # 1 row: as before (v65: +9.8% with the split and 3 stages)
        ((1, 16, 5120, 8192), 8, 2, 2),  # llama-4-scout below 1.5 rows per expert: as before (split 4: 3% slower)
        ((1, 16, 5120, 8192), 32, 2, 3),
        ((6, 64, 2048, 1408), 32, 1, 2),  # deepseek-v2-lite: GEMM2's 11 K tiles, GEMM1's K short (3 stages 6% slower)
    ],
)
def test_default_config_int8_narrow_blocks(shape: tuple[int, int, int, int], tokens: int, split_k2: int,
                                           stages: int) -> None:
    """W8A16 at 1.5-4 rows per expert on Hopper (NOTES.md v64, v65)."""
    top_k, experts, h, i = shape
    cfg = default_config(tokens, top_k, experts, 128, h, i, 132, hopper=True, bits=8)
    assert (cfg.decode, cfg.block_m, cfg.block_n1, cfg.block_n2) == (True, 8, 64, 128)
    assert (cfg.split_k2, cfg.num_stages) == (split_k2, stages), cfg


def test_default_config_int8_32_row_blocks_split_gemm2_on_few_experts() -> None:
    """W8A16 at 8-32 rows per expert: GEMM2's K split where experts x column tiles are few (NOTES.md v64)."""
    mixtral_8x22b = default_config(32, 2, 8, 128, 6144, 16384, 132, hopper=True, bits=8)
    assert (mixtral_8x22b.block_m, mixtral_8x22b.wgmma, mixtral_8x22b.split_k2) == (32, True, 4)
    glm_air = default_config(256, 8, 128, 128, 4096, 1408, 132, hopper=True, bits=8)
    assert (glm_air.block_m, glm_air.split_k2) == (32, 1)  # 128 experts fill the GPU
    int4 = default_config(64, 2, 8, 128, 6144, 16384, 132, hopper=True)  # 16 rows per expert
    assert (int4.block_m, int4.split_k2) == (32, 1)  # int4: not measured


def test_registers_for_programs_per_sm() -> None:
    # 65536 registers per SM, allocated per thread in steps of 8 (NOTES.md v69: 174 registers held two 4-warp
    # programs, 168 three)
    assert [registers_for_programs(p) for p in (3, 4, 5)] == [168, 128, 96]
    assert registers_for_programs(1, num_warps=8) == 256 and registers_for_programs(2, num_warps=8) == 128


def test_default_config_caps_int8_32_row_blocks_at_three_programs_per_sm() -> None:
    """The int8 32-row tile's registers capped where three 4-warp programs fit an SM (NOTES.md v69-v70); int4's
    tile (155-160 registers, three per SM already) and the other int8 tiles are left to the compiler."""
    for tokens in (128, 256, 512):  # 8, 16 and 32 rows per expert
        assert default_config(tokens, 8, 128, 128, 4096, 1408, 132, hopper=True, bits=8).max_registers == 168
    assert default_config(256, 8, 128, 128, 4096, 1408, 132, hopper=True).max_registers is None
    for tokens in (64, 1024, 4096):  # 4, 64 and 256 rows per expert
        assert default_config(tokens, 8, 128, 128, 4096, 1408, 132, hopper=True, bits=8).max_registers is None


@pytest.mark.parametrize("group_size", [128, 64, 32])
def test_default_config_int4_16_row_blocks_at_two_stages_three_programs_per_sm(group_size: int) -> None:
    """int4 from 7 rows per expert (to 10): 16-row blocks at 2 stages, registers capped where three 4-warp programs
    fit an SM (NOTES.md v71: 4-13.5% faster than 4 stages uncapped on six shapes off the table); above 4 rows and
    below 7, 8-row blocks at 2 stages (v72: 7-17% faster than the 16-row tile at 4.5-5.5 rows); up to 4 rows they
    keep 4 stages, 3 at groups of 32 and 64 (v72: 0.6-13% faster). 8-row blocks keep the compiler's registers."""
    for tokens in (224, 256, 316):  # deepseek-v3's shape: 7, 8 and 9.9 rows per expert
        cfg = default_config(tokens, 8, 256, group_size, 7168, 2048, 132, hopper=True)
        assert (cfg.block_m, cfg.num_stages, cfg.max_registers) == (16, 2, registers_for_programs(3)), cfg
    deep = 4 if group_size == 128 else 3  # groups of 32 and 64: 3 stages at 2-4 rows (v72)
    for tokens, stages in ((96, deep), (128, deep), (129, 2), (160, 2), (223, 2)):  # 3, 4, 4.03, 5 and 6.97 rows
        narrow = default_config(tokens, 8, 256, group_size, 7168, 2048, 132, hopper=True)
        assert (narrow.block_m, narrow.num_stages, narrow.max_registers) == (8, stages, None), tokens
    assert default_config(1, 8, 256, group_size, 7168, 2048, 132, hopper=True).num_stages == 2  # one token


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_default_config_int4_small_groups_take_mma_sync_blocks_below_14_rows(group_size: int) -> None:
    """int4 at groups of 32 and 64 from 10 rows per expert to below 14 leaves the warpgroup-mma tile (NOTES.md v73): on
    layers of at least WIDE_HIDDEN and MANY_EXPERTS 32-row mma.sync blocks, 128 / 256 wide, 2 stages, capped at three
    programs per SM (0.6-24% faster on four layers); on narrower layers, fewer experts or unknown sizes the 16-row
    tile (0.9-7.8% faster on three). Group 128, more rows and int8 keep the warpgroup-mma tile."""
    small = group_size <= 64
    wgmma_tile = (32, 64, 128, 3, None, True)
    capped = registers_for_programs(3)

    def tile(tokens: int, experts: int, hidden: int | None, bits: int = 4) -> tuple:
        cfg = default_config(tokens, 8, experts, group_size, hidden, 2048 if hidden else None, 132, hopper=True,
                             bits=bits)
        assert _launchable(cfg)
        return cfg.block_m, cfg.block_n1, cfg.block_n2, cfg.num_stages, cfg.max_registers, cfg.wgmma

    few = MANY_EXPERTS // 2
    for rows in (10, 11, 12.97):
        tokens = round(rows * 32)  # deepseek-v3's shape: 256 experts, top 8
        assert tile(tokens, 256, 7168) == ((32, 128, 256, 2, capped, False) if small else wgmma_tile), rows
        narrow = (16, 128, 256, 2, capped, False) if small else wgmma_tile
        assert tile(tokens, 256, WIDE_HIDDEN - 1024) == narrow, rows  # a narrower layer
        assert tile(round(rows * few / 8), few, 7168) == narrow, rows  # fewer experts
        assert tile(tokens, 256, None) == narrow, rows  # sizes unknown
        assert tile(tokens, 256, 7168, bits=8)[5], rows  # int8
    for tokens in (448, 1024):  # 14 and 32 rows per expert
        assert tile(tokens, 256, 7168) == wgmma_tile and tile(tokens, 256, 2048) == wgmma_tile, tokens


def test_default_config_splits_gemm1_for_one_token() -> None:
    """One token: GEMM1's K in two, in four when its programs would not fill the SMs; never for more tokens."""
    assert default_config(1, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132).split_k1 == 2
    assert default_config(1, 8, 128, 128, hidden_size=2048, intermediate_size=768, num_sms=132).split_k1 == 4
    assert default_config(2, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132).split_k1 == 1
    assert default_config(1, 8, 256, 128).split_k1 == 1  # no device facts: no split


def test_default_config_widens_gemm2_for_small_groups_at_decode() -> None:
    kimi = default_config(8, 8, 384, 32, hidden_size=7168, intermediate_size=2048, num_sms=132)
    assert (kimi.block_m, kimi.block_n1, kimi.block_n2) == (16, 64, 256)
    assert default_config(8, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132).block_n2 == 64


def test_default_config_never_swaps_ab_by_default() -> None:
    # deepseek-v3 at M = 2048 (64 rows per expert): the decode kernel's 96-row blocks on Hopper, the Triton
    # kernel's plain blocks elsewhere; swap-AB is left to the tuned table
    hopper = default_config(2048, 8, 256, 128, hopper=True)
    assert (hopper.decode, hopper.block_m, hopper.wgmma, hopper.swap_ab) == (True, 96, True, False)
    assert not default_config(2048, 8, 256, 128).swap_ab


@pytest.mark.parametrize("group_size", [128, 32])
def test_default_config_prefills_on_128_row_decode_blocks_on_hopper(group_size: int) -> None:
    # deepseek-v3 at M = 8192 and 4096 (256 and 128 rows per expert): the decode kernel's 128-row blocks on wgmma,
    # GEMM2 256 wide (NOTES.md v84), 144-row ones at 128 rows (v87); off Hopper the Triton kernel
    for tokens, block_m in ((8192, 128), (4096, 144)):
        hopper = default_config(tokens, 8, 256, group_size, 7168, 2048, 132, hopper=True)
        assert hopper == TritonConfig(block_m, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
        assert not default_config(tokens, 8, 256, group_size, 7168, 2048, 132).decode


@pytest.mark.parametrize(("rows", "int4_block_m", "int8_block_m"), [
    (97, 128, 128), (107, 128, 128), (107.5, 144, 144), (130, 144, 144), (155, 144, 144), (155.5, 128, 144),
    (256, 128, 144), (2048, 128, 144)])
@pytest.mark.parametrize("bits", [4, 8])
def test_hopper_defaults_take_144_row_blocks_past_107_rows_per_expert(rows: float, int4_block_m: int,
                                                                       int8_block_m: int, bits: int) -> None:
    """Above 107 rows per expert the defaults' 128-row blocks become 144-row ones on the same tiling on any layer:
    int4 up to 155 (ROWS_FOR_144_ROW_BLOCKS, NOTES.md v87), int8 at every row count above (v89)."""
    assert ROWS_FOR_144_ROW_BLOCKS == (107, 155)
    block_m = int4_block_m if bits == 4 else int8_block_m
    tokens = round(rows * 128 / 8)  # 128 experts, top 8
    config = default_config(tokens, 8, 128, 128, 4096, 1536, 132, hopper=True, bits=bits)
    assert config == TritonConfig(block_m, 128, 256, num_warps=8, num_stages=3, decode=True, wgmma=True)
    assert default_config(tokens, 8, 128, 128, 4096, 1536, 132, bits=bits).block_m != 144  # (off Hopper)


@pytest.mark.parametrize("group_size", [128, 32])
@pytest.mark.parametrize(("tokens", "block_m"), [(1, 8), (32, 8), (128, 8), (160, 8), (224, 16), (256, 16),
                                                 (316, 16), (320, 32), (1024, 32), (1056, 128), (1792, 128),
                                                 (1824, 96), (2048, 96), (2752, 96), (2784, 128), (3072, 128),
                                                 (3104, 128), (8192, 128)])
def test_default_config_on_hopper_is_the_decode_kernel_at_every_row_count(group_size: int, tokens: int,
                                                                          block_m: int) -> None:
    """deepseek-v3's shape (256 experts, top 8): rows per expert = tokens / 32. On Hopper the decode kernel at
    every row count: 8-row blocks below 7 (int8: below 8), 16 below 10, then blocks on warpgroup mmas (int8: from
    8 rows), 32 rows up to 32 per expert, 128 rows above (its intermediate size is LONG_I) but for 96 above 56
    rows up to 86 (ROWS_FOR_96_ROW_BLOCKS); int8 the same tiles, its narrow rings shallower, and from 2 tokens to
    4 rows per expert half as wide (the same GEMM2 K split); never the decode kernel off Hopper."""
    hopper = default_config(tokens, 8, 256, group_size, 7168, 2048, 132, hopper=True)
    assert _launchable(hopper)
    small_group_mma = group_size <= 64 and 10 <= tokens / 32 < SMALL_GROUP_MMA_BELOW  # (v73)
    wgmma = block_m >= 32 and not small_group_mma
    assert (hopper.decode, hopper.block_m, hopper.wgmma, hopper.swap_ab) == (True, block_m, wgmma, False)
    int8 = default_config(tokens, 8, 256, group_size, 7168, 2048, 132, hopper=True, bits=8)
    assert _launchable(int8)
    wide_int8 = TritonConfig(32, 64, 128, num_warps=4, num_stages=3, decode=True, wgmma=True)
    if (block_m == 16 and tokens >= 8 * 32) or small_group_mma:  # int8 from 8 rows per expert: the wgmma tile
        expected = wide_int8
    elif block_m == 16:  # (int8's 8-row blocks are not capped)
        expected = replace(hopper, block_m=8, max_registers=None)
    else:
        expected = hopper
    if 1 < tokens <= 4 * 32:  # int8 from 2 tokens to 4 rows per expert: half as wide, the same GEMM2 K split
        expected = replace(expected, block_n1=64, block_n2=128)
    if expected.block_m == 32:  # int8's 32-row blocks capped at three programs per SM
        expected = replace(expected, max_registers=168)
    if expected.block_m == 128 and tokens / 32 > 107:  # int8's 144-row blocks above 107 rows (v89)
        expected = replace(expected, block_m=144)
    assert replace(int8, num_stages=expected.num_stages) == expected
    assert not default_config(tokens, 8, 256, group_size, 7168, 2048, 132).decode


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("rows", "intermediate_size", "block_m"), [
    (33, 2048, 128), (56, 14336, 128), (57, 14336, 96), (86, 2048, 96), (87, 2048, 128), (96, 2048, 128),
    (97, 2048, 128), (33, 768, 64), (56, 768, 64), (57, 768, 96), (60, 1536, 96), (86, 768, 96), (87, 768, 128),
    (96, LONG_I - 128, 128), (97, 768, 128), (32, 2048, 32)])
def test_hopper_defaults_take_128_row_blocks_from_33_rows_where_intermediate_is_long(
        rows: int, intermediate_size: int, block_m: int, bits: int) -> None:
    """From 33 to 56 rows per expert, 128-row blocks (64-row loops up to 64 live rows, unrolled) where the layer's
    intermediate size is at least LONG_I, 64-row ones below it (NOTES.md v61); on every layer 96-row ones at 2
    stages above 56 rows up to 86 (NOTES.md v81, v82) and 128-row ones above (v84); the same 128 / 256 wide tiles
    up to 96 rows."""
    assert ROWS_FOR_96_ROW_BLOCKS == (56, 86)
    tokens = rows * 128 // 8  # 128 experts, top 8
    config = default_config(tokens, 8, 128, 128, 4096, intermediate_size, 132, hopper=True, bits=bits)
    assert config.block_m == block_m
    if 32 < rows <= 96:
        assert (config.block_n1, config.block_n2, config.num_warps, config.num_stages, config.wgmma) == (
            128, 256, 8, 2 if block_m == 96 else 3, True)
    unknown = default_config(tokens, 8, 128, 128, hopper=True, bits=bits)  # no sizes: the short layers' blocks
    assert unknown.block_m == (64 if 32 < rows <= 56 else block_m)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_entry_of_144_row_blocks_runs_only_at_its_own_m(bits: int) -> None:
    """mixtral's M = 2048 entries (int4 v86, W8A16 v87) take 144-row blocks: at M = 2048 the entry, and beside it
    (~512 rows per expert, where the defaults take 128-row blocks for int4 and 144-row ones for int8), the defaults
    (`entry_runs`)."""
    key = ShapeKey(bits, 128, 4096, 14336, 8, 2)
    defaults = hopper_defaults(key)
    for tokens in (2048, 1900, 2200):
        tuned = tuned_config("NVIDIA H200", key, tokens)
        entry = TritonConfig(**tuned[1])
        assert tuned[0] == 2048 and entry.block_m == 144 and defaults(tokens).block_m == (128 if bits == 4 else 144)
        assert entry_or_default(tuned, tokens, defaults, 2 / 8) == (entry if tokens == 2048 else defaults(tokens))


def test_between_the_tables_m_the_entry_runs_only_at_the_defaults_block_size() -> None:
    """The shipped H200 entries for qwen3-30b-a3b (128 experts, top 8): at a measured M the entry always; between
    them the nearest entry where its blocks are the size the defaults pick (narrow 8 or 16 rows both, on the side
    of 7 rows per expert of its own M, or one wide size), else the defaults (NOTES.md v48, v72)."""
    defaults = hopper_defaults(QWEN)

    def pick(tokens: int) -> tuple[TritonConfig, TritonConfig, TritonConfig]:
        tuned = tuned_config("NVIDIA H200", QWEN, tokens)
        return entry_or_default(tuned, tokens, defaults, 8 / 128), TritonConfig(**tuned[1]), defaults(tokens)

    chosen, entry, default = pick(32)  # measured: the entry, whatever the defaults say
    assert chosen == entry != default
    chosen, entry, default = pick(256)  # 16 rows per expert: 32-row defaults, the M = 150 entry narrow
    assert (entry.block_m, default.block_m) == (16, 32) and chosen == default
    chosen, entry, default = pick(800)  # 50 rows per expert: 64-row defaults, the M = 512 entry's 32 (v55)
    assert (entry.block_m, default.block_m) == (32, 64) and chosen == default
    chosen, entry, default = pick(4096)  # 256 rows per expert: the M = 2048 entry's 128-row blocks, as the defaults
    assert entry.block_m == default.block_m == 128 and chosen == entry != default
    for tokens in (1950, 3000):  # 122 and 188 rows per expert: the M = 2048 entry through the defaults' 144-row band
        chosen, entry, default = pick(tokens)
        assert entry.block_m == 128 and default.block_m == (144 if tokens < 2480 else 128) and chosen == entry
    chosen, entry, default = pick(16)  # 1 row per expert: both narrow
    assert entry.block_m < 32 and default.block_m < 32 and chosen == entry
    assert entry_or_default(None, 16, defaults, 8 / 128) == default


def test_a_narrow_entry_runs_between_rows_where_the_defaults_take_its_own_ms_narrow_size() -> None:
    """int4 narrow blocks turn from 8 to 16 rows at 7 rows per expert, each faster on its side (NOTES.md v72): an
    entry measured on one side does not run on the other, where the defaults do; an entry whose own M has wide
    defaults (W8A16 at 8 rows per expert) runs wherever they are narrow."""
    def picks(key: ShapeKey, tokens: int) -> tuple[TritonConfig, TritonConfig, TritonConfig]:
        defaults = hopper_defaults(key)
        tuned = tuned_config("NVIDIA H200", key, tokens)
        assert tuned is not None
        return (entry_or_default(tuned, tokens, defaults, key.top_k / key.num_experts), defaults(tokens),
                TritonConfig(**tuned[1]))

    # deepseek-v3's M = 128 entry (8-row blocks at 4 rows per expert): the 16-row defaults from 224 (7 rows)
    deepseek = ShapeKey(4, 128, 7168, 2048, 256, 8)
    chosen, default, entry = picks(deepseek, 240)
    assert (entry.block_m, default.block_m) == (8, 16) and chosen == default
    chosen, default, entry = picks(deepseek, 220)
    assert entry.block_m == default.block_m == 8 and chosen == entry != default
    # mixtral's M = 32 entry (16-row blocks at 8 rows): the 8-row defaults at 20 (5 rows)
    chosen, default, entry = picks(KEY, 20)
    assert (entry.block_m, default.block_m) == (16, 8) and chosen == default
    # W8A16 qwen3-30b-a3b's M = 128 entry (16-row; the int8 defaults are 32-row blocks at 8 rows): below it
    chosen, default, entry = picks(replace(QWEN, bits=8), 100)
    assert (entry.block_m, default.block_m) == (16, 8) and chosen == entry


def test_a_wide_entry_runs_between_rows_only_in_its_own_ms_range_of_the_defaults() -> None:
    """kimi-k2's int4 M = 512 entry (32-row mma.sync blocks at 10.7 rows per expert) between the table's rows: the
    defaults take 32-row blocks from 10 rows, on mma.sync below 14 (groups of 32 on a wide layer, NOTES.md v73) and
    on warpgroup mmas from there; the entry runs in its own range only (M = 480-671), the defaults from M = 672."""
    kimi = ShapeKey(4, 32, 7168, 2048, 384, 8)
    defaults = hopper_defaults(kimi)
    tuned = tuned_config("NVIDIA H200", kimi, 512)
    assert tuned is not None and tuned[0] == 512
    entry = TritonConfig(**tuned[1])
    assert (entry.block_m, entry.wgmma) == (32, False)
    assert entry_or_default(tuned, 671, defaults, 8 / 384) == entry
    assert entry_or_default(tuned, 672, defaults, 8 / 384) == defaults(672) != entry
    assert (defaults(672).block_m, defaults(672).wgmma) == (32, True)
    assert tuning.spans(tuning.rows_taking([128, 512, 2048], 512, tuned[1], kimi)) == "480-671"  # of 257-1024


def test_every_shipped_wide_entry_runs_one_unbroken_range_of_rows() -> None:
    """Between the table's rows a wide entry runs one unbroken range of M around its own (`rows_taking`), never
    across a range where the defaults' tiles differ (128 x 256 at 33-56 rows per expert on long intermediate sizes
    and above 86 are equal defaults, with 96-row blocks between): on every card and shape of the shipped table."""
    tuning._load.cache_clear()
    for shapes in tuning._load()["cards"].values():
        for text, by_m in shapes.items():
            bits, group, h, i, e, k = re.fullmatch(r"int(\d+)_(?:g(\d+)|channel) H=(\d+) I=(\d+) E=(\d+) k=(\d+)",
                                                   text).groups()
            key = ShapeKey(int(bits), int(group) if group else None, int(h), int(i), int(e), int(k))
            measured = sorted(int(m) for m in by_m)
            for m, fields in ((int(m), f) for m, f in by_m.items() if f["block_m"] >= 32):
                taking = tuning.rows_taking(measured, m, fields, key)
                assert m in taking and taking == list(range(taking[0], taking[-1] + 1)), (text, m)


def test_a_wide_entry_measured_above_96_rows_per_expert_stays_above() -> None:
    """mixtral's int4 M = 400 entry (128-row blocks 128 wide, 100 rows per expert): the defaults take 128-row blocks
    above 86 rows, one configuration, but at 87-96 rows most blocks run the 64 + 32 loop, and there the entry's tile
    was 5-14% slower than the defaults' (NOTES.md v84): the defaults run up to M = 384 (96 rows), the entry from 385.
    Long intermediate sizes' 128-row defaults at 33-56 rows stay apart from those above 86 as well."""
    defaults = hopper_defaults(KEY)
    entry = {"block_m": 128, "block_n1": 128, "block_n2": 128, "num_warps": 8, "num_stages": 3, "decode": True,
             "wgmma": True}
    assert defaults(380) == defaults(400) and defaults(380).block_m == 128
    assert entry_or_default((400, entry), 384, defaults, 2 / 8) == defaults(384) != TritonConfig(**entry)
    assert entry_or_default((400, entry), 385, defaults, 2 / 8) == TritonConfig(**entry)
    assert tuning.rows_taking([128, 400, 8192], 400, entry, KEY)[0] == 385
    assert defaults(200) == defaults(400)  # 50 rows per expert: I = 14336 is long
    assert entry_or_default((400, entry), 200, defaults, 2 / 8) == defaults(200)


def test_hopper_decode_default_splits_by_programs() -> None:
    # mixtral at M = 1: 2 experts x 16 GEMM2 tiles of 256 -> K split to ~4 programs per SM (a power of two);
    # GEMM1 2 pairs x 112 tiles, fewer than 2 per SM -> split in four
    mixtral = default_config(1, 2, 8, 128, hidden_size=4096, intermediate_size=14336, num_sms=132, hopper=True)
    assert (mixtral.decode, mixtral.split_k2, mixtral.split_k1, mixtral.num_stages) == (True, 16, 4, 2)
    # deepseek-v3 at M = 128 (4 rows per expert): every expert touched, 28 tiles each: no split, 4 stages
    deepseek = default_config(128, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132, hopper=True)
    assert (deepseek.split_k2, deepseek.split_k1, deepseek.num_stages) == (1, 1, 4)
    # qwen3-30b-a3b at M = 1: GEMM2 is 6 tiles deep: at most two splits of 3
    qwen3 = default_config(1, 8, 128, 128, hidden_size=2048, intermediate_size=768, num_sms=132, hopper=True)
    assert (qwen3.split_k2, qwen3.split_k1) == (2, 4)


@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
def test_hopper_decode_default_ring_depth(tokens: int) -> None:
    """qwen3-235b-a22b's shape (128 experts, top 8): 2 stages for one token, 4 for more; int8 tiles, twice the
    bytes, always 2."""
    int4, int8 = (default_config(tokens, 8, 128, 128, 4096, 1536, 132, hopper=True, bits=bits) for bits in (4, 8))
    assert int4.decode and int8.decode and (int4.block_m, int8.block_m) == (8, 8)
    assert (int4.num_stages, int8.num_stages) == (2 if tokens == 1 else 4, 2)


def test_speed_is_the_geometric_mean_of_same_run_times(table: Path) -> None:
    speedup, tokens = triton_vs_marlin("NVIDIA H100 80GB HBM3", KEY, "int4_g128_sym")
    assert speedup == pytest.approx(0.5) and tokens == [1, 8192]  # only M where both were timed
    assert triton_vs_marlin("NVIDIA H100 80GB HBM3", QWEN, "int4_g128_sym")[0] == pytest.approx(1.5)
    assert triton_vs_marlin("NVIDIA H100 80GB HBM3", QWEN, "int4_g128_zp") is None  # only the measured scheme


@pytest.mark.parametrize(("shape", "winner", "other"), [("qwen3-30b-a3b", "triton", "marlin"),
                                                         ("mixtral", "marlin", "triton")])
def test_oracle_prefers_the_measured_faster_backend(table: Path, shape: str, winner: str, other: str) -> None:
    report = explain(model_shape(shape).moe_config(), "int4_g128_sym", device=DeviceInfo.named("h100"))
    verdicts = {c.backend.value: c for c in report.candidates}
    assert report.chosen.backend.value == winner
    assert f"{winner} measured" in verdicts[winner].reason and f"faster than {other}" in verdicts[winner].reason
    assert verdicts[other].verdict.value == "eligible" and "measured" in verdicts[other].reason


def test_oracle_keeps_the_priority_without_measurements(table: Path) -> None:
    # deepseek-v3 is not in this table, nor is any card but the H100: the priority list decides, silently
    # (TRITON first on sm_90, MARLIN on sm_80).
    report = explain(model_shape("deepseek-v3").moe_config(), "int4_g128_sym", device=DeviceInfo.named("h100"))
    assert report.chosen.backend.value == "triton" and "measured" not in report.chosen.reason
    a100 = explain(model_shape("qwen3-30b-a3b").moe_config(), "int4_g128_sym", device=DeviceInfo.named("a100"))
    assert a100.chosen.backend.value == "marlin" and "measured" not in a100.chosen.reason


def _trial(m: int, block_n2: int, us: tuple[float, ...], shipped: bool = False, entry_m: int | None = None,
           **fields: Any) -> list[dict]:
    config = {"block_m": 16, "block_n1": 64, "block_n2": block_n2, "split_k2": 1, "num_warps": 4, "num_stages": 3,
              **fields}
    return [{"shape": "mixtral", "scheme": "int4_g128_sym", "M": m, "round": r, "config": config, "us_graph": t,
             "shipped": shipped, "entry_m": entry_m} for r, t in enumerate(us)]


def test_trials_replace_an_entry_only_where_a_variant_wins_every_round() -> None:
    rows = (_trial(1, 64, (100.0, 100.0), shipped=True) + _trial(1, 128, (90.0, 91.0))
            + _trial(1, 256, (85.0, 89.0))  # the lowest median of the two that won both rounds
            + _trial(8, 64, (100.0, 100.0), shipped=True) + _trial(8, 128, (80.0, 99.0))  # wins one round only
            + _trial(32, 64, (100.0, 100.0), shipped=True) + _trial(32, 128, (99.0, 99.0)))  # by less than 2%
    entries: dict = {}
    replaced, held_back = tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY})
    assert replaced == [("mixtral", 1)] and held_back == []
    assert entries[KEY.as_text()] == {"1": rows[4]["config"]}


def test_trials_count_a_repeated_variant_at_its_slowest() -> None:
    # The same variant listed twice: one of its round-1 timings loses, so it must not replace the entry.
    rows = (_trial(1, 64, (100.0, 100.0), shipped=True) + _trial(1, 128, (88.0, 109.0))
            + _trial(1, 128, (89.0, 92.0)))
    entries: dict = {}
    assert tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY}) == ([], [])
    assert entries[KEY.as_text()] == {}


def test_trials_count_a_repeated_incumbent_at_its_fastest() -> None:
    # The shipped configuration timed twice: its faster round-1 timing (95) is the one to beat by 2%.
    rows = (_trial(1, 64, (100.0, 95.0), shipped=True) + _trial(1, 64, (100.0, 100.0), shipped=True)
            + _trial(1, 128, (90.0, 96.0)))
    assert tuning.apply_trials({}, {"rows": rows}, {"mixtral": KEY}) == ([], [])
    rows[-1]["us_graph"] = 93.0
    assert tuning.apply_trials({}, {"rows": rows}, {"mixtral": KEY}) == ([("mixtral", 1)], [])


def test_trials_measure_against_the_current_entry_where_it_was_timed() -> None:
    # The entry already holds the 128-wide tile, timed again in this file: 256 must beat it, not the shipped one.
    rows = _trial(1, 64, (100.0, 100.0), shipped=True) + _trial(1, 128, (80.0, 80.0)) + _trial(1, 256, (79.0, 79.0))
    entries = {KEY.as_text(): {"1": rows[2]["config"]}}
    assert tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY}) == ([], [])
    assert entries[KEY.as_text()]["1"]["block_n2"] == 128


ROWS_128 = {"block_m": 128, "num_warps": 8, "decode": True, "wgmma": True}  # mixtral's 128-row decode blocks


@pytest.mark.parametrize("at_span_point, kept", [((101.0, 100.5), False), ((103.0, 102.0), True)])
def test_trials_change_an_entry_only_where_the_change_holds_across_its_span(at_span_point: tuple[float, float],
                                                                           kept: bool) -> None:
    # The 128-wide variant of a 128-row entry wins by 5% at the entry's own M = 512 in every round; at M = 600 of
    # its span (try_configs --span: entry_m 512), where it would run too, it is level with the entry (within
    # SPAN_TOLERANCE) or 2.5% slower, which keeps the entry. At M = 800 it is 20% faster, but a span point never
    # makes an entry of its own.
    rows = [row for m, b128, b64 in ((512, (95.0, 95.0), (100.0, 100.0)), (600, at_span_point, (100.0, 100.0)),
                                     (800, (80.0, 80.0), (100.0, 100.0)))
            for row in _trial(m, 64, b64, shipped=True, entry_m=512, **ROWS_128)
            + _trial(m, 128, b128, entry_m=512, **ROWS_128)]
    entries = {KEY.as_text(): {"512": rows[0]["config"]}}
    replaced, held_back = tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY})
    assert set(entries[KEY.as_text()]) == {"512"}
    assert entries[KEY.as_text()]["512"]["block_n2"] == (64 if kept else 128)
    assert replaced == ([] if kept else [("mixtral", 512)])
    assert held_back == (["mixtral M = 512: block_n2=128 won at M = 512 but is +2.5% at M = 600: entry kept"]
                         if kept else [])


@pytest.mark.parametrize("defaults_us, kept", [(None, True), ((100.5, 100.5), False), ((104.0, 104.0), True)])
def test_a_challenger_that_leaves_span_points_to_the_defaults_is_judged_by_them(
        defaults_us: tuple[float, float] | None, kept: bool) -> None:
    # A 144-row challenger wins at the entry's M = 512, but between the table's rows it would not run (the defaults
    # never pick 144 rows), so M = 600 of the entry's span would run the defaults: those are compared with the entry
    # there, whatever the challenger's own time at 600 (a loss here); untimed, they hold the challenger back.
    default = asdict(hopper_defaults(KEY)(600))
    rows = (_trial(512, 64, (100.0, 100.0), shipped=True, entry_m=512, **ROWS_128)
            + _trial(512, 64, (90.0, 90.0), entry_m=512, **ROWS_128 | {"block_m": 144})
            + _trial(600, 64, (100.0, 100.0), shipped=True, entry_m=512, **ROWS_128)
            + _trial(600, 64, (130.0, 130.0), entry_m=512, **ROWS_128 | {"block_m": 144}))
    if defaults_us is not None:
        rows += [dict(row, config=default) for row in _trial(600, 0, defaults_us, entry_m=512)]
    entries = {KEY.as_text(): {"512": rows[0]["config"]}}
    replaced, held_back = tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY})
    assert entries[KEY.as_text()]["512"]["block_m"] == (128 if kept else 144)
    assert replaced == ([] if kept else [("mixtral", 512)])
    won = "mixtral M = 512: block_m=144 won at M = 512"
    assert held_back == ([] if not kept else
                         [f"{won}, where it leaves M = 600 to the defaults, not timed there (--variant default): "
                          "entry kept"] if defaults_us is None else
                         [f"{won} but leaves the defaults +4.0% at M = 600: entry kept"])


@pytest.mark.parametrize("defaults_us, kept", [(None, True), ((99.0, 99.0), True), ((95.0, 95.0), False)])
def test_a_challenger_level_at_its_m_replaces_the_entry_by_its_span(defaults_us: tuple[float, float] | None,
                                                                    kept: bool) -> None:
    # A 144-row challenger only 1% faster at the entry's M = 512 (under MIN_TRIAL_GAIN) leaves M = 600 of the entry's
    # span to the defaults: it replaces the entry only where those beat the entry there by MIN_TRIAL_GAIN (v89).
    default = asdict(hopper_defaults(KEY)(600))
    rows = (_trial(512, 64, (100.0, 100.0), shipped=True, entry_m=512, **ROWS_128)
            + _trial(512, 64, (99.0, 99.0), entry_m=512, **ROWS_128 | {"block_m": 144})
            + _trial(600, 64, (100.0, 100.0), shipped=True, entry_m=512, **ROWS_128))
    if defaults_us is not None:
        rows += [dict(row, config=default) for row in _trial(600, 0, defaults_us, entry_m=512)]
    entries = {KEY.as_text(): {"512": rows[0]["config"]}}
    replaced, held_back = tuning.apply_trials(entries, {"rows": rows}, {"mixtral": KEY})
    assert entries[KEY.as_text()]["512"]["block_m"] == (128 if kept else 144)
    assert replaced == ([] if kept else [("mixtral", 512)]) and held_back == []


def test_span_points_lie_inside_the_rows_an_entry_runs() -> None:
    # Midway (in log scale) between the entry's M and each end of its span, on rows it runs: qwen3-30b-a3b's
    # M = 8192 entry runs 4097-16384; deepseek-v3 W8A16's 96-row M = 2048 entry runs 1793-2752, where the defaults
    # take the same 96-row blocks (above 56 rows per expert, up to 86), and a 128-row entry there only at its own
    # M; on 128 experts at I = 1536 (128 rows per expert at M = 2048) from 1537 (above 96 rows per expert, where a
    # 128-row block's rows mostly fill its 128-row loop); a one-token entry runs M = 1-2.
    wide = {"block_m": 128, "block_n1": 128, "block_n2": 256, "num_warps": 8, "decode": True, "wgmma": True}
    assert tuning.span_points([1, 8, 32, 128, 512, 2048, 8192], 8192, wide, QWEN) == [5793, 11585]
    deepseek = ShapeKey(8, 128, 7168, 2048, 256, 8)
    rows96 = {**wide, "block_m": 96, "num_stages": 2}
    assert tuning.rows_taking([512, 2048, 8192], 2048, rows96, deepseek)[::959] == [1793, 2752]
    assert tuning.span_points([512, 2048, 8192], 2048, rows96, deepseek) == [1916, 2374]
    assert tuning.span_points([512, 2048, 8192], 2048, wide, deepseek) == []
    assert tuning.span_points([512, 2048, 8192], 2048, wide, ShapeKey(8, 128, 4096, 1536, 128, 8)) == [1774, 2896]
    narrow = {"block_m": 16, "block_n1": 64, "block_n2": 64, "num_warps": 4}
    assert tuning.span_points([1, 8], 1, narrow, KEY) == [2]


def test_trials_file_updates_the_table(table: Path, tmp_path: Path) -> None:
    trials = tmp_path / "try.json"
    trials.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "commit": "t1", "date": "2026-11-28",
                                  "rows": _trial(1, 64, (100.0, 100.0), shipped=True) + _trial(1, 256, (80.0, 81.0))}))
    assert tuning.main(["--trials", str(trials)]) == 0
    after = json.loads(table.read_text())
    assert after["cards"]["NVIDIA H100 80GB HBM3"][KEY.as_text()]["1"]["block_n2"] == 256
    assert after["sources"] == ["try.json (trials, commit t1, 2026-11-28): mixtral M = 1"]


def test_trials_name_what_each_replaced_entry_changes(table: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Each replaced entry prints the fields it changes and their values before, so that a change whose span holds
    # only its own M (which prints no span line) is still named; an entry where the table had none says so.
    entry = json.loads(table.read_text())["cards"]["NVIDIA H100 80GB HBM3"][KEY.as_text()]["128"]
    wider = dict(entry, block_n2=2 * entry["block_n2"])
    rows = _trial(3, 64, (100.0, 100.0), shipped=True) + _trial(3, 256, (80.0, 81.0))
    for config, us, shipped in ((entry, (100.0, 100.0), True), (wider, (80.0, 81.0), False)):
        rows += [dict(row, config=config) for row in _trial(128, 0, us, shipped=shipped)]
    trials = tmp_path / "try.json"
    trials.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "commit": "t1", "date": "2026-11-28",
                                  "rows": rows}))
    assert tuning.main(["--trials", str(trials)]) == 0
    out = capsys.readouterr().out
    assert (f"mixtral M = 128: the entry takes block_n2={2 * entry['block_n2']} (was block_n2={entry['block_n2']})"
            in out)
    assert "mixtral M = 3: a new entry" in out


def test_rows_running_an_entry_are_those_nearest_it_in_log_scale() -> None:
    # M = 3 is nearer 8 than 1 in log scale; M = 4 ties between 2 and 8 and goes to the smaller.
    assert tuning.rows_running([1, 8], 1) == range(1, 3) and tuning.rows_running([1, 8], 8) == range(3, 17)
    assert tuning.rows_running([1, 2, 8], 2) == range(2, 5)
    assert all(tuning.nearest_measured([1, 2, 8], t) == 2 for t in range(2, 5))
    assert tuning.nearest_measured([1, 2, 8], 5) == 8


def test_rows_taking_an_entry_are_those_where_the_defaults_pick_its_block_size() -> None:
    # W8A16 on 256 experts, top 8, measured at M = 512, 2048 and 8192 (64 rows per expert at 2048): of the rows
    # nearest the M = 2048 entry (1025-4096), one runs those where the defaults pick its block size within their
    # range of M = 2048: 96-row blocks above 56 rows up to 86 on any layer (M = 1793-2752), so a 96-row entry runs
    # that range, at I = 1536 as at deepseek-v3's I = 2048; 64- and 128-row ones run at 2048 alone. Measured at
    # M = 1400 (44 rows), a 64-row entry runs the rows nearest it where the defaults take 64-row blocks at I = 1536,
    # 33-56 rows (M = 1025-1792).
    key = ShapeKey(8, 128, 7168, 1536, 256, 8)
    wide = {"block_m": 128, "block_n1": 128, "block_n2": 256, "num_warps": 8, "decode": True, "wgmma": True}
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide, key) == [2048]
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide | {"block_m": 64}, key) == [2048]
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide | {"block_m": 96}, key) == list(range(1793, 2753))
    assert tuning.rows_taking([512, 1400, 8192], 1400, wide | {"block_m": 64}, key) == list(range(1025, 1793))
    deepseek = ShapeKey(8, 128, 7168, 2048, 256, 8)
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide | {"block_m": 96}, deepseek) == list(range(1793, 2753))
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide, deepseek) == [2048]
    assert tuning.rows_taking([512, 2048, 8192], 2048, wide | {"block_m": 64}, deepseek) == [2048]
    assert tuning.spans([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_trials_name_the_untimed_rows_a_new_entry_runs(table: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # The table measures mixtral at M = 1, 128 and 8192: a new M = 1 entry runs M = 1-11.
    trials = tmp_path / "try.json"
    trials.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "commit": "t1", "date": "2026-11-28",
                                  "rows": _trial(1, 64, (100.0, 100.0), shipped=True) + _trial(1, 256, (80.0, 81.0))}))
    assert tuning.main(["--trials", str(trials)]) == 0
    out = capsys.readouterr().out
    assert "mixtral M = 1: the new entry runs M = 1-11; try.json timed M = 1: time the others" in out


def test_main_names_a_missing_results_file(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = table.read_text()
    with pytest.raises(SystemExit):
        tuning.main(["--trials", str(tmp_path / "absent.json")])
    assert "absent.json" in capsys.readouterr().err
    assert table.read_text() == before
