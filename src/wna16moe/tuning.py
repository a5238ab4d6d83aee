"""Shipped TRITON launch configurations, measured per (card, scheme, layer shape, M) on the device.

The table (`tuned_triton.json` beside this file) is built from a `wna16moe bench --sweep` results file:

    python -m wna16moe.tuning benchmarks/results/<card>-<date>-sweep.json   # rewrites the shipped table

For each measured row it keeps the fastest configuration the sweep timed (`triton-best`). Variants outside the
sweep's grid, timed against the shipped configuration by `benchmarks/try_configs.py`, replace an entry only
where they were faster in every round (`apply_trials`):

    python -m wna16moe.tuning --trials benchmarks/results/<card>-<date>-try.json

A trial timed with `try_configs.py --span` also holds the entry's times inside the span of M it runs
(`span_points`): the change must not lose there either.

Nothing is tuned at import or at the first call: a layer whose card and shape are in the table uses the entry
of the nearest measured M (in log scale), between the table's M only where its block size suits that M
(`TritonExperts.config`). A card the table does not hold for that shape borrows the entries of
the card measured for its compute capability (`STAND_INS`: an H100 runs the H200's, same SMs and
architecture); any other layer uses `experts.triton.default_config`.

Where the sweep also timed MARLIN (the same run), the table keeps both times per M ("speed", keyed by shape
and exact scheme; a run without --sweep, the table as served, refreshes them and leaves the entries as they
are, even where a trial changed them since): the oracle then puts the faster of TRITON and MARLIN first for
that card, shape and scheme (geometric mean over the measured M), and says so in `explain`. Speed is never
borrowed: it is a measurement of one card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from wna16moe.experts.base import LayerSpec
    from wna16moe.experts.triton import TritonConfig

TABLE_PATH = Path(__file__).with_name("tuned_triton.json")
# The card whose tuned entries stand in, shape by shape, for cards of its compute capability that were not
# measured on that shape (the H200 for the H100, H800, GH200: 132 SMs there, same sm_90 kernels).
STAND_INS: dict[tuple[int, int], str] = {(9, 0): "NVIDIA H200"}


@dataclass(frozen=True)
class ShapeKey:
    """What a tuned entry is keyed on besides the card: the weight format and the kernels' problem size."""

    bits: int
    group_size: int | None
    hidden_size: int
    intermediate_size: int  # per TP shard, before padding
    num_experts: int  # local to the EP rank
    top_k: int

    @classmethod
    def of(cls, spec: LayerSpec) -> ShapeKey:
        """The key of a layer: its scheme and the problem size of this rank's kernels."""
        return cls(spec.scheme.bits, spec.scheme.group_size, spec.moe.hidden_size, spec.intermediate_per_shard,
                   spec.local_num_experts, spec.moe.top_k)

    def as_text(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        return (f"int{self.bits}_{group} H={self.hidden_size} I={self.intermediate_size} E={self.num_experts} "
                f"k={self.top_k}")


@cache
def _load() -> dict[str, Any]:
    """The table file: {"cards": card -> shape text -> M -> config, "speed": card -> shape text -> M ->
    {"triton_us", "marlin_us"}}."""
    return json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}


def tuned_card(card: str, key: ShapeKey, capability: tuple[int, int] | None = None) -> str | None:
    """The card whose shipped entries this card runs for this shape: itself, else the `STAND_INS` card of its
    compute `capability`; None where neither was measured on the shape (`default_config` then)."""
    cards = _load().get("cards", {})
    for candidate in (card, STAND_INS.get(capability) if capability is not None else None):
        if candidate is not None and cards.get(candidate, {}).get(key.as_text()):
            return candidate
    return None


def entry_rows(card: str, key: ShapeKey, capability: tuple[int, int] | None = None) -> dict[int, dict[str, Any]]:
    """The shipped configuration fields by measured M that this card (or its stand-in, `tuned_card`) runs for this
    shape; empty where neither was measured on it."""
    source = tuned_card(card, key, capability)
    by_m = _load()["cards"][source][key.as_text()] if source is not None else {}
    return {int(m): fields for m, fields in by_m.items()}


def tuned_config(card: str, key: ShapeKey, num_tokens: int,
                 capability: tuple[int, int] | None = None) -> tuple[int, dict[str, Any]] | None:
    """The measured M nearest `num_tokens` (in log scale) and the shipped configuration fields there, for this
    card (or its stand-in, `tuned_card`) and shape."""
    by_m = entry_rows(card, key, capability)
    if not by_m:
        return None
    nearest = nearest_measured(list(by_m), num_tokens)
    return nearest, by_m[nearest]


def nearest_measured(measured: list[int], num_tokens: int) -> int:
    """The measured M whose entry runs `num_tokens` rows: the nearest in log scale, ties to the smaller."""
    target = math.log2(max(num_tokens, 1))
    return min(measured, key=lambda m: (abs(math.log2(m) - target), m))


def rows_running(measured: list[int], m: int) -> range:
    """The token counts (up to twice the largest measured M) that the entry at measured M `m` runs: a new entry
    changes what its neighbours between the measured M run, so they need timing too (benchmarks/NOTES.md v53)."""
    running = [t for t in range(1, 2 * max(measured) + 1) if nearest_measured(measured, t) == m]
    return range(running[0], running[-1] + 1)


def rows_taking(measured: list[int], m: int, fields: dict[str, Any], key: ShapeKey) -> list[int]:
    """Of the token counts nearest the measured M `m` (`rows_running`), those that run its entry `fields`
    (`runs_at`)."""
    return [t for t in rows_running(measured, m) if runs_at(fields, t, m, key)]


def runs_at(fields: dict[str, Any], tokens: int, m: int, key: ShapeKey) -> bool:
    """Whether the entry `fields` measured at M = `m` runs `tokens` rows where it is the nearest entry
    (`experts.triton.entry_runs`), the defaults as on the card it was measured on (Hopper where the entry is on the
    decode kernel, which runs only there)."""
    from wna16moe.experts.triton import TritonConfig, entry_runs

    return entry_runs(TritonConfig(**fields), m, tokens, table_defaults(key, fields.get("decode", False)),
                      key.top_k / key.num_experts)


def table_defaults(key: ShapeKey, hopper: bool) -> Callable[[int], TritonConfig]:
    """`default_config` of the layer keyed `key` as a function of the token count, on Hopper or elsewhere (no SM
    count: the table's rules are checked without one)."""
    from wna16moe.experts.triton import default_config

    return lambda tokens: default_config(tokens, key.top_k, key.num_experts, key.group_size, key.hidden_size,
                                         key.intermediate_size, hopper=hopper, bits=key.bits)


def span_points(measured: list[int], m: int, fields: dict[str, Any], key: ShapeKey) -> list[int]:
    """Token counts inside the span of the entry at measured M `m` (`rows_taking`), to time a change of that entry
    beyond `m` itself (benchmarks/NOTES.md v59-v60: an entry timed only at its own M hid an 18% loss in its span):
    the rows it runs nearest (in log scale) the midpoints between `m` and each end of the span."""
    taking = rows_taking(measured, m, fields, key)
    midpoints = [math.sqrt(m * end) for end in (taking[0], taking[-1]) if end != m]
    return sorted({min(taking, key=lambda t: (abs(math.log(t / mid)), t == m)) for mid in midpoints} - {m})


def spans(rows: list[int]) -> str:
    """Sorted integers as runs: [1, 2, 3, 7] -> "1-3, 7"."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def triton_vs_marlin(card: str, key: ShapeKey, scheme_name: str) -> tuple[float, list[int]] | None:
    """Geometric mean over the measured M of MARLIN's time / TRITON's time (above 1: TRITON is faster) on
    this card, shape and exact scheme, with those M; None where the shipped table has no same-run
    measurement."""
    by_m = _load().get("speed", {}).get(card, {}).get(f"{key.as_text()} {scheme_name}")
    if not by_m:
        return None
    ratios = [math.log(t["marlin_us"] / t["triton_us"]) for t in by_m.values()]
    return math.exp(sum(ratios) / len(ratios)), sorted(int(m) for m in by_m)


def build_table(results: dict[str, Any], shape_keys: dict[str, ShapeKey]) -> dict[str, Any]:
    """The table for one sweep results file (rows of backend `triton-best`), keyed by its card."""
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    best: dict[tuple[str, str, int], float] = {}
    served: dict[tuple[str, int], tuple[float, bool]] = {}  # the entry kept: graph replay time where timed
    # Rows a sweep or search ranked; a served run's (no "triton-best" row) give speed only: they ran the entries
    # of their day, and an entry changed since (`apply_trials`) must not go back to them.
    ranked = {(row["shape"], row["M"]) for row in results["rows"] if row["backend"] == "triton-best"}
    for row in results["rows"]:
        if row["shape"] not in shape_keys or "us_eager" not in row:  # untimed rows (`triton-wrong`)
            continue
        times = [t for t in (row["us_eager"], row.get("us_graph")) if t is not None]
        best[row["backend"], row["shape"], row["M"]] = min(times)
        # The sweep's pick, or the default configuration where that was faster as served (older sweeps ranked
        # small M by eager time only).
        if row["backend"] in ("triton-best", "triton"):
            us = row["us_graph"] if row.get("us_graph") is not None else row["us_eager"]
            rank = (us, row["backend"] == "triton")  # a tie goes to the sweep's pick
            if rank < served.get((row["shape"], row["M"]), (float("inf"), True)):
                served[row["shape"], row["M"]] = rank
                if (row["shape"], row["M"]) in ranked:
                    entries.setdefault(shape_keys[row["shape"]].as_text(), {})[str(row["M"])] = row["config"]
                best["triton-best", row["shape"], row["M"]] = min(times)
    speed: dict[str, dict[str, dict[str, float]]] = {}
    for (backend, shape, m), marlin_us in best.items():
        if backend == "marlin" and ("triton-best", shape, m) in best:
            scheme = next(r["scheme"] for r in results["rows"] if r["shape"] == shape)
            speed.setdefault(f"{shape_keys[shape].as_text()} {scheme}", {})[str(m)] = {
                "triton_us": best["triton-best", shape, m], "marlin_us": marlin_us}
    return {"card": results["card"], "commit": results["commit"], "date": results["date"], "entries": entries,
            "speed": speed}


MIN_TRIAL_GAIN = 0.02  # a trial's variant must beat the incumbent by this much in every round
SPAN_TOLERANCE = 0.01  # ... and be no slower than this elsewhere in the entry's span (captures differ by ~1%)


def apply_trials(entries: dict[str, dict[str, Any]], results: dict[str, Any], shape_keys: dict[str, ShapeKey],
                 min_gain: float = MIN_TRIAL_GAIN) -> tuple[list[tuple[str, int]], list[str]]:
    """Update one card's `entries` from a `benchmarks/try_configs.py` results file (rows: shape, M, round,
    config, us_graph, shipped; `entry_m` where the shipped configuration is the table's entry at another M). Per
    (shape, M) the incumbent is the entry in `entries` where the file timed it, else the file's shipped
    configuration; a configuration faster than the incumbent in every round by at least `min_gain` replaces it,
    the lowest median of those. A configuration timed more than once in a round (a variant that repeats another)
    counts there at its slowest as a challenger and at its fastest as the incumbent.

    Rows timed at another M of an entry's span (`try_configs.py --span`: `entry_m` is not M) never make an entry
    of their own. There the challenger is compared with the entry if it would run that M in the entry's place
    (`runs_at`), else the defaults, which would run it then (`--variant default`); where that is slower than the
    entry by more than `SPAN_TOLERANCE`, or the defaults were not timed, the challenger is held back. Where no
    configuration wins by `min_gain`, one faster than the incumbent in every round by less replaces it if what would
    run each timed point of the span beats the entry there by `min_gain` (NOTES.md v89: a 144-row entry level at its
    own M hands its span to faster 144-row defaults). Returns the (shape, M) replaced, and a line per challenger held
    back."""
    from wna16moe.experts.triton import TritonConfig

    # (shape, M) -> config -> round -> every timing of that round, µs
    rounds: dict[tuple[str, int], dict[str, dict[int, list[float]]]] = {}
    # (shape, entry's M) -> M of its span -> config -> every timing there, µs; and the entry's config there
    span: dict[tuple[str, int], dict[int, dict[str, list[float]]]] = {}
    span_entry: dict[tuple[str, int, int], str] = {}
    configs: dict[str, dict[str, Any]] = {}
    shipped: dict[tuple[str, int], str] = {}
    for row in results["rows"]:
        if row.get("us_graph") is None:
            continue
        name = json.dumps(row["config"], sort_keys=True)
        configs[name] = row["config"]
        entry_m = row.get("entry_m")
        if entry_m is not None and entry_m != row["M"]:
            span.setdefault((row["shape"], entry_m), {}).setdefault(row["M"], {}).setdefault(name, []).append(
                row["us_graph"])
            if row["shipped"]:
                span_entry[row["shape"], entry_m, row["M"]] = name
            continue
        timings = rounds.setdefault((row["shape"], row["M"]), {}).setdefault(name, {})
        timings.setdefault(row["round"], []).append(row["us_graph"])
        if row["shipped"]:
            shipped[row["shape"], row["M"]] = name
    replaced, held_back = [], []
    for (shape, m), by_config in rounds.items():
        by_m = entries.setdefault(shape_keys[shape].as_text(), {})
        incumbent = json.dumps(by_m.get(str(m)), sort_keys=True)
        incumbent = incumbent if incumbent in by_config else shipped.get((shape, m))
        if incumbent is None:  # neither the entry nor the shipped configuration was timed
            continue
        base = by_config[incumbent]
        ahead = [name for name, us in by_config.items() if name != incumbent and _beats(us, base, 0.0)]
        faster = [name for name in ahead if _beats(by_config[name], base, min_gain)]
        # (challengers ahead by less than min_gain: each must win by min_gain at every span point, and at one at least)
        by_span = {name: False for name in ahead if name not in faster}
        for point, at_point in sorted(span.get((shape, m), {}).items()):
            entry = at_point.get(span_entry.get((shape, m, point), ""))
            for name in [n for n in faster + list(by_span) if entry]:
                won = f"{shape} M = {m}: {_fields_changed(configs[incumbent], configs[name])} won at M = {m}"
                if runs_at(configs[name], point, m, shape_keys[shape]):
                    after, what = at_point.get(name), "is"
                else:  # between the table's rows the challenger would leave this M to the defaults
                    default = table_defaults(shape_keys[shape], configs[name].get("decode", False))(point)
                    after, what = next((us for other, us in at_point.items()
                                        if TritonConfig(**configs[other]) == default), None), "leaves the defaults"
                    if after is None and name in faster:
                        faster.remove(name)
                        held_back.append(f"{won}, where it leaves M = {point} to the defaults, not timed there "
                                         f"(--variant default): entry kept")
                        continue
                if name in by_span:
                    if after is not None and max(after) < min(entry) * (1 - min_gain):
                        by_span[name] = True
                    else:
                        del by_span[name]
                    continue
                if after is None:  # (the challenger not timed at this point: nothing to hold it back by)
                    continue
                change = statistics.median(after) / statistics.median(entry) - 1
                if change > SPAN_TOLERANCE:
                    faster.remove(name)
                    held_back.append(f"{won} but {what} {100 * change:+.1f}% at M = {point}: entry kept")
        winners = faster or [name for name, won_span in by_span.items() if won_span]
        if winners:
            by_m[str(m)] = configs[min(winners, key=lambda name: statistics.median(
                [t for timings in by_config[name].values() for t in timings]))]
            replaced.append((shape, m))
    return replaced, held_back


def _beats(timings: dict[int, list[float]], base: dict[int, list[float]], gain: float) -> bool:
    """Whether `timings` (round -> timings) beat `base` by `gain` in every round of `base`, slowest vs. fastest."""
    return timings.keys() == base.keys() and all(max(timings[r]) < min(base[r]) * (1 - gain) for r in base)


def _fields_changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The fields `after` changes, as "field=value ..."."""
    return " ".join(f"{k}={after[k]}" for k in sorted(after) if before.get(k) != after[k])


def shape_key(shape_name: str, scheme_name: str | None = None) -> ShapeKey:
    """The table key of a model shape (`shapes.model_shape`) quantized as `scheme_name`; without one, as
    `bench.random_layer` quantizes by default (and early `try_configs.py` files were measured): int4 symmetric at
    the model's group size."""
    from wna16moe.scheme import WeightScheme
    from wna16moe.shapes import model_shape

    shape = model_shape(shape_name)
    scheme = WeightScheme.from_name(scheme_name or f"int4_g{shape.group_size}_sym")
    return ShapeKey(scheme.bits, scheme.group_size, shape.hidden_size, shape.intermediate_size, shape.num_experts,
                    shape.top_k)


def _shape_keys(rows: list[dict[str, Any]]) -> dict[str, ShapeKey]:
    """The table key of every shape in results rows (`shape_key` of the row's scheme)."""
    return {row["shape"]: shape_key(row["shape"], row.get("scheme")) for row in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wna16moe.tuning",
        description="Rebuild the shipped table (src/wna16moe/tuned_triton.json) from device results: entries and "
                    "speed rows from `wna16moe bench --sweep` or `--search` files, or, with --trials, the "
                    "configurations of `benchmarks/try_configs.py` files that beat the entry in every round.")
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--trials", action="store_true", help="the files are try_configs.py trials")
    args = parser.parse_args(argv)
    trials, paths = args.trials, args.results
    if missing := [str(p) for p in paths if not p.is_file()]:
        parser.error(f"no such results file: {', '.join(missing)}")
    table: dict[str, Any] = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"cards": {}}
    for path in paths:
        results = json.loads(path.read_text())
        keys = _shape_keys(results["rows"])
        if trials:
            card_entries = table.setdefault("cards", {}).setdefault(results["card"], {})
            before = copy.deepcopy(card_entries)
            replaced, held_back = apply_trials(card_entries, results, keys)
            for line in held_back:
                print(line)
            for shape, m in replaced:
                by_m = card_entries[keys[shape].as_text()]
                old = before.get(keys[shape].as_text(), {}).get(str(m))
                print(f"{shape} M = {m}: " + (f"the entry takes {_fields_changed(old, by_m[str(m)])} (was "
                                              f"{_fields_changed(by_m[str(m)], old)})" if old else "a new entry"))
                running = rows_taking([int(k) for k in by_m], m, by_m[str(m)], keys[shape])
                timed = sorted({row["M"] for row in results["rows"] if row["shape"] == shape} & set(running))
                if len(running) > 1:
                    print(f"{shape} M = {m}: the new entry runs M = {spans(running)}; {path.name} "
                          f"timed M = {', '.join(map(str, timed))}"
                          + (": time the others before committing it (try_configs.py --span)" if timed == [m] else ""))
            table.setdefault("sources", []).append(
                f"{path.name} (trials, commit {results['commit']}, {results['date']}): "
                + (", ".join(f"{shape} M = {m}" for shape, m in replaced) or "nothing replaced"))
            continue
        built = build_table(results, keys)
        # Per M: a sweep of some token counts replaces those entries and keeps the others.
        for section, new_entries in (("cards", built["entries"]), ("speed", built["speed"])):
            card_entries = table.setdefault(section, {}).setdefault(built["card"], {})
            for shape_text, by_m in new_entries.items():
                card_entries.setdefault(shape_text, {}).update(by_m)
        table.setdefault("sources", []).append(f"{path.name} (commit {built['commit']}, {built['date']})")
    TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
