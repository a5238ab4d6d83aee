"""Time a few named TRITON configurations against the shipped one on chosen shapes and M (graph replays after the
bench's L2 flush, each timing over ~2 s from M = 2048 as the bench's), each checked against the float32 reference
first, in two rounds (`--rounds`) after one that is not recorded (`--warm-rounds`): a quick A/B of launch
parameters that the sweep does not cover.
`python -m wna16moe.tuning --trials RESULTS.json` ships a variant that won every round.

    python benchmarks/try_configs.py kimi-k2:32,128 deepseek-v3:32 [--scheme int8_g128_sym] --variant num_warps=2 \
        --variant num_warps=2,block_n1=32

At the end it prints each configuration's time per round against the base's in the same round, named by the fields
where it differs (in `--variant` syntax); `--summarize FILE...` prints the same from saved results.

With `--base default` the first configuration is `default_config`'s instead (rows still say "shipped");
`--variant default` adds `default_config`'s as a variant of the shipped entry (the nearest table entry against
the defaults, at M between the table's). With `--span` each M (a row of the table) is timed also at two token
counts inside the span its entry runs (`tuning.span_points`), so that `tuning --trials` changes an entry only
where the change holds across that span (the defaults too there, where a variant would leave them those rows):

    python benchmarks/try_configs.py --span qwen3-30b-a3b:8192 --variant num_stages2=2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from wna16moe import tuning
from wna16moe.bench import _bench_graph, budget_ms, layer_cases, write_results
from wna16moe.experts.base import relative_error
from wna16moe.experts.triton import TritonConfig


def parse_variant(text: str) -> dict[str, int | bool | None]:
    """TritonConfig fields from "field=value,...": "none" unsets a field (max_registers=none); flags take 0 or 1."""
    fields: dict[str, int | bool | None] = {}
    for setting in text.split(","):
        name, value = setting.split("=")
        flag = isinstance(getattr(TritonConfig, name, None), bool)
        fields[name] = None if value == "none" else bool(int(value)) if flag else int(value)
    return fields


def variants_of(shipped: TritonConfig, texts: list[str], label: str, default: TritonConfig) -> list[TritonConfig]:
    """The shipped configuration, then each variant once ("default": `default`): one that does not apply to the
    shipped entry (wgmma=1 on an entry of the Triton kernel) or repeats one before it (a repeat would count twice
    in the table's rule) is reported and left out."""
    variants = [shipped]
    for text in texts:
        try:
            variant = default if text == "default" else replace(shipped, **parse_variant(text))
        except ValueError as error:
            print(f"{label} {text}: not on this entry ({error})", flush=True)
            continue
        if variant in variants:
            print(f"{label} {text}: the same configuration as one before it, skipped", flush=True)
            continue
        variants.append(variant)
    return variants


def with_span_points(cases: list[str], scheme: str | None,
                     entries_of: Callable[[tuning.ShapeKey], dict[int, dict[str, Any]]]) -> list[str]:
    """The "shape:M[,M...]" cases with each M's `tuning.span_points` added after it; `entries_of(key)`: the
    table's entries for a shape key by M. An M that is not one of its rows is an error naming the rows."""
    spanned = []
    for case in cases:
        name, ms = case.split(":")
        key = tuning.shape_key(name, scheme)
        entries = entries_of(key)
        points: list[int] = []
        for m in map(int, ms.split(",")):
            if m not in entries:
                raise SystemExit(f"--span: {name} M = {m} is not a row of the table (rows: "
                                 f"{', '.join(map(str, sorted(entries))) or 'none'})")
            points += [m, *tuning.span_points(list(entries), m, entries[m], key)]
        spanned.append(f"{name}:{','.join(map(str, dict.fromkeys(points)))}")
    return spanned


def with_defaults_where_left(variants: list[TritonConfig], default: TritonConfig, m: int, entry_m: int | None,
                             key: tuning.ShapeKey) -> list[TritonConfig]:
    """`variants` (the entry first), and at a point of the entry's span (`entry_m` is not `m`) the defaults too where
    a variant would leave M = `m` to them if it replaced the entry (a block size the defaults do not pick here:
    `tuning.runs_at`), since `tuning --trials` judges it there by the defaults' time."""
    if entry_m is None or entry_m == m or default in variants:
        return variants
    if all(tuning.runs_at(asdict(variant), m, entry_m, key) for variant in variants[1:]):
        return variants
    return [*variants, default]


def entry_row(entries: dict[int, dict[str, Any]], m: int, config: TritonConfig) -> int | None:
    """The table row whose entry `config` is, where M = `m` runs it; None where it is not the table's."""
    row = tuning.nearest_measured(list(entries), m) if entries else None
    return row if row is not None and TritonConfig(**entries[row]) == config else None


def round_order(variants: list[TritonConfig], rnd: int) -> list[TritonConfig]:
    """Round `rnd`'s order of the configurations: each round starts one later, so that none is always timed first
    (in v54 the first round of a process read 0.5-4% low for the entry timed first; NOTES.md)."""
    start = rnd % len(variants)
    return variants[start:] + variants[:start]


def variant_text(config: dict[str, Any], base: dict[str, Any]) -> str:
    """The fields of `config` that differ from `base`, as a `--variant` ("field=value,...", flags 0 / 1, "none")."""
    def value(v: Any) -> str:
        return "none" if v is None else str(int(v)) if isinstance(v, bool) else str(v)
    return ",".join(f"{f}={value(v)}" for f, v in config.items() if base.get(f) != v)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per case (shape, M) and configuration: its time in each round, and for a variant its change against
    the base (the shipped entry, or the defaults under --base default) in the same round."""
    times: dict[tuple[str, int], dict[str, dict[int, float]]] = {}
    bases: dict[tuple[str, int], str] = {}
    for row in rows:
        case, config = (row["shape"], row["M"]), json.dumps(row["config"])
        times.setdefault(case, {}).setdefault(config, {})[row["round"]] = row["us_graph"]
        if row["shipped"]:
            bases[case] = config
    lines = []
    for (shape, m), configs in times.items():
        base = bases.get((shape, m))
        for config, by_round in sorted(configs.items(), key=lambda item: item[0] != base):
            label = "base" if config == base else variant_text(json.loads(config), json.loads(base or "{}"))
            cells = [f"{us:.1f}" if config == base or r not in configs.get(base, {})
                     else f"{us:.1f} ({100 * (us / configs[base][r] - 1):+.1f}%)" for r, us in sorted(by_round.items())]
            lines.append(f"{shape} M={m} {label}: {' | '.join(cells)} us")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", help="shape:M[,M...]")
    parser.add_argument("--summarize", nargs="+", metavar="FILE", help="print saved results' summary; time nothing")
    parser.add_argument("--variant", action="append", default=[], help="field=value[,field=value...]")
    parser.add_argument("--scheme", help="weight scheme (default: int4 symmetric at the model's group size)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over the configurations (default 2; more where the margin is small)")
    parser.add_argument("--warm-rounds", type=int, default=1,
                        help="rounds timed first and not recorded (default 1: a configuration's first graph in a "
                             "process read up to 5%% fast, replay_spread.py, NOTES.md v55)")
    parser.add_argument("--base", choices=("shipped", "default"), default="shipped",
                        help="what the variants change: the shipped entry, or `default_config` (what a shape the "
                             "table does not hold runs)")
    parser.add_argument("--span", action="store_true",
                        help="time each M (a row of the table) also inside the span its entry runs")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.summarize:
        for path in args.summarize:
            print("\n".join(summary(json.loads(Path(path).read_text())["rows"])))
        return
    if not args.cases:
        parser.error("give the cases to time (shape:M[,M...]), or --summarize FILE...")
    if args.span and args.base != "shipped":
        parser.error("--span times changes of the table's entries: it takes --base shipped")
    device = torch.device("cuda")
    cases, entries_of = args.cases, None
    if args.span:  # (rows away from an entry's own M are then evidence for that entry, not rows of their own)
        entries_of = partial(tuning.entry_rows, torch.cuda.get_device_name(device),
                             capability=torch.cuda.get_device_capability(device))
        cases = with_span_points(args.cases, args.scheme, entries_of)
    rows = []
    for name, m, kernel, weights, (x, tw, ids), reference in layer_cases(cases, device, args.scheme):
        default = kernel.default_config(m, kernel.moe.top_k)
        shipped = kernel.config(m) if args.base == "shipped" else default
        entry_m = entry_row(entries_of(tuning.shape_key(name, args.scheme)), m, shipped) if entries_of else None
        variants = with_defaults_where_left(variants_of(shipped, args.variant, f"{name} M={m}", default), default, m,
                                            entry_m, tuning.shape_key(name, args.scheme))
        for rnd in range(-args.warm_rounds, args.rounds):  # rounds in turn, so that a drift over time shows
            for c in round_order(variants, rnd):
                try:
                    err = relative_error(kernel.apply(x, tw, ids, weights, c), reference)
                except Exception as error:  # a variant that does not compile is reported
                    print(f"{name} M={m} {c}: failed {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                # (from M = 2048 over ~2 s, several of the power cap's clock dips: NOTES.md v56-v57)
                us = _bench_graph(partial(kernel.apply, x, tw, ids, weights, c), budget_ms=budget_ms(m))
                if rnd < 0:
                    continue
                rows.append({"shape": name, "scheme": kernel.spec.scheme.name, "M": m, "round": rnd,
                             "config": asdict(c), "us_graph": us, "relative_error": err, "shipped": c == shipped,
                             "entry_m": entry_m})
                print(f"{name} M={m} r{rnd} {'shipped' if c == shipped else 'variant'} {us:9.1f} us err {err:.1e} "
                      f"{asdict(c)}", flush=True)
        write_results(args.out, rows)  # after every case: a device call cut short keeps the cases it finished
    print("\n".join(summary(rows)), flush=True)


if __name__ == "__main__":
    main()
