"""Shipped TRITON launch configurations, measured per (card, scheme, layer shape, M) on the device.

The table (`tuned_triton.json` beside this file) is built from a `wna16moe bench --sweep` results file:

    python -m wna16moe.tuning benchmarks/results/<card>-<date>-sweep.json   # rewrites the shipped table

For each measured row it keeps the fastest configuration the sweep timed (`triton-best`). Nothing is tuned
at import or at the first call: a layer whose card and shape are in the table uses the entry of the
nearest measured M (in log scale); any other layer uses `experts.triton.default_config`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("tuned_triton.json")


@dataclass(frozen=True)
class ShapeKey:
    """What a tuned entry is keyed on besides the card: the weight format and the kernels' problem size."""

    bits: int
    group_size: int | None
    hidden_size: int
    intermediate_size: int  # per TP shard, before padding
    num_experts: int  # local to the EP rank
    top_k: int

    def as_text(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        return (f"int{self.bits}_{group} H={self.hidden_size} I={self.intermediate_size} E={self.num_experts} "
                f"k={self.top_k}")


@cache
def _load() -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """card -> shape text -> M -> config fields."""
    if not TABLE_PATH.exists():
        return {}
    raw = json.loads(TABLE_PATH.read_text())
    return {card: {shape: {int(m): cfg for m, cfg in by_m.items()} for shape, by_m in shapes.items()}
            for card, shapes in raw["cards"].items()}


def tuned_config(card: str, key: ShapeKey, num_tokens: int) -> dict[str, Any] | None:
    """The shipped configuration fields for this card and shape at the measured M nearest `num_tokens`."""
    by_m = _load().get(card, {}).get(key.as_text())
    if not by_m:
        return None
    target = math.log2(max(num_tokens, 1))
    nearest = min(by_m, key=lambda m: (abs(math.log2(m) - target), m))
    return by_m[nearest]


def build_table(results: dict[str, Any], shape_keys: dict[str, ShapeKey]) -> dict[str, Any]:
    """The table for one sweep results file (rows of backend `triton-best`), keyed by its card."""
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results["rows"]:
        if row["backend"] != "triton-best" or row["shape"] not in shape_keys:
            continue
        entries.setdefault(shape_keys[row["shape"]].as_text(), {})[str(row["M"])] = row["config"]
    return {"card": results["card"], "commit": results["commit"], "date": results["date"], "entries": entries}


def main(argv: list[str] | None = None) -> int:
    from wna16moe.scheme import WeightScheme
    from wna16moe.shapes import model_shape

    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        raise SystemExit("usage: python -m wna16moe.tuning RESULTS.json [...]  (from `wna16moe bench --sweep`)")
    table: dict[str, Any] = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"cards": {}}
    for path in paths:
        results = json.loads(path.read_text())
        keys = {}
        for row in results["rows"]:
            shape = model_shape(row["shape"])
            scheme = WeightScheme.from_name(row["scheme"])
            keys[row["shape"]] = ShapeKey(scheme.bits, scheme.group_size, shape.hidden_size,
                                          shape.intermediate_size, shape.num_experts, shape.top_k)
        built = build_table(results, keys)
        table["cards"].setdefault(built["card"], {}).update(built["entries"])
        table.setdefault("sources", []).append(f"{path.name} (commit {built['commit']}, {built['date']})")
    TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
