"""Benchmark of whole MoE layers: see `wna16moe.bench` (same as `wna16moe bench` and `python -m wna16moe.bench`)."""

from wna16moe.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
