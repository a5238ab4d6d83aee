"""The shipped TRITON configuration table: building it from a sweep, looking entries up, and its contents."""

import json
from pathlib import Path

import pytest

from wna16moe import tuning
from wna16moe.experts.triton import TritonConfig, default_config
from wna16moe.tuning import ShapeKey, build_table, tuned_config

KEY = ShapeKey(4, 128, 4096, 14336, 8, 2)


def _row(backend: str, m: int, block_m: int) -> dict:
    config = {"block_m": block_m, "block_n1": 64, "block_n2": 64, "split_k2": 1, "num_warps": 4, "num_stages": 3}
    return {"backend": backend, "shape": "mixtral", "M": m, "config": config}


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    results = {"card": "Card X", "commit": "abc", "date": "2026-11-28",
               "rows": [_row("triton", 1, 99), _row("triton-best", 1, 16), _row("triton-best", 128, 32),
                        _row("triton-best", 8192, 128), _row("bf16", 8192, 0)]}
    built = build_table(results, {"mixtral": KEY})
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"cards": {built["card"]: built["entries"]}}))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    tuning._load.cache_clear()
    yield path
    tuning._load.cache_clear()


def test_build_keeps_only_the_best_rows(table: Path) -> None:
    entries = json.loads(table.read_text())["cards"]["Card X"][KEY.as_text()]
    assert sorted(entries, key=int) == ["1", "128", "8192"]
    assert entries["1"]["block_m"] == 16  # the triton-best row, not the default's


@pytest.mark.parametrize(("tokens", "block_m"), [(1, 16), (4, 16), (12, 32), (100, 32), (1000, 32), (3000, 128),
                                                 (100000, 128)])
def test_lookup_takes_the_nearest_measured_m(table: Path, tokens: int, block_m: int) -> None:
    assert tuned_config("Card X", KEY, tokens)["block_m"] == block_m


def test_unknown_card_or_shape_has_no_entry(table: Path) -> None:
    assert tuned_config("Card Y", KEY, 1) is None
    assert tuned_config("Card X", ShapeKey(4, 32, 4096, 14336, 8, 2), 1) is None


def test_shipped_table_is_valid() -> None:
    tuning._load.cache_clear()
    cards = tuning._load()
    for shapes in cards.values():
        for by_m in shapes.values():
            for cfg in by_m.values():
                TritonConfig(**cfg)  # every entry is a complete configuration


def test_default_config_splits_gemm2_when_few_programs() -> None:
    # mixtral at M = 1: 2 experts x 64 N tiles of GEMM2 on 132 SMs -> split K (a power of two)
    cfg = default_config(1, 2, 8, 128, hidden_size=4096, intermediate_size=14336, num_sms=132)
    assert cfg.split_k2 > 1 and cfg.split_k2 & (cfg.split_k2 - 1) == 0
    # deepseek-v3 at M = 1: 8 experts x 112 tiles already fill the GPU
    assert default_config(1, 8, 256, 128, hidden_size=7168, intermediate_size=2048, num_sms=132).split_k2 == 1
    assert default_config(1, 2, 8, 128).split_k2 == 1  # no device facts: no split
