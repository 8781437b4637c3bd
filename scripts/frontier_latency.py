"""INT8 latency of frontier models as a ratio to the bundled model, measured in one run.

usage: python scripts/frontier_latency.py NAME=MODEL.onnx [...] [--rounds 5] [--runs 100]
           [--reference MODEL.onnx]

Each round times the reference (by default the bundled INT8 model; ``--reference`` names
another file, e.g. v3's INT8 file from git history once v3 is no longer bundled) and then every
named model with ``edge-classify bench``
(batch 1, one thread, the model alone: ``--no-recheck``), so that a busy host slows both sides of
each ratio alike. Prints one JSON object: per model its median latency (ms, median over rounds),
its ratio to the reference's time in the same round (median over rounds; the key keeps its
name ``ratio_to_bundled`` and the report names its ``reference``), and its size
with every file it needs (MB: the INT8 file; the FP32 recheck partner is not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BUNDLED = "int8"


def bench_ms(model: str, runs: int) -> float:
    command = [
        "edge-classify",
        "bench",
        "--model",
        model,
        "--threads",
        "1",
        "--batch-sizes",
        "1",
        "--runs",
        str(runs),
        "--warmup",
        "10",
        "--no-recheck",
        "--format",
        "jsonl",
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.splitlines()[-1])["batches"][0]["median_ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument(
        "--reference", default=BUNDLED, help="the model every ratio is to (default: bundled INT8)"
    )
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.models)
    reference: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in models}
    ratios: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        base = bench_ms(args.reference, args.runs)
        reference.append(base)
        for name, path in models.items():
            ms = bench_ms(path, args.runs)
            times[name].append(ms)
            ratios[name].append(ms / base)
    report = {
        "reference": args.reference,
        "reference_median_ms": statistics.median(reference),
        "models": {
            name: {
                "median_ms": statistics.median(times[name]),
                "ratio_to_bundled": statistics.median(ratios[name]),
                "int8_mb": Path(path).stat().st_size / 1e6,
            }
            for name, path in models.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
