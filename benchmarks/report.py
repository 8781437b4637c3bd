"""Turn a ``--benchmark-json`` file (and the ratio log) into the Markdown table the README shows.

usage: python -m benchmarks.report BENCH.json [--ratios RATIOS.json] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(bench: dict, ratios: dict | None) -> str:
    """Markdown: one row per benchmark (median, IQR, per-image median), then the ratio gates."""
    info = bench.get("machine_info", {})
    lines = [
        "# Benchmarks",
        "",
        f"CPU: {info.get('cpu', {}).get('brand_raw') or cpu_model()}; "
        f"{info.get('cpu', {}).get('count', '?')} logical cores; Python "
        f"{info.get('python_version', platform.python_version())}; "
        f"run {bench.get('datetime', '?')[:19]}. Inference pinned to one thread.",
        "",
        "| benchmark | median ms | IQR ms | images per call | median ms per image |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in bench["benchmarks"]:
        stats = b["stats"]
        per_call = b.get("extra_info", {}).get("images_per_call", 1)
        lines.append(
            f"| {b['name']} | {stats['median'] * 1e3:.2f} | {stats['iqr'] * 1e3:.2f} | "
            f"{per_call} | {stats['median'] * 1e3 / per_call:.2f} |"
        )
    if ratios:
        lines += [
            "",
            "Ratio gates, both sides timed interleaved in the same run:",
            "",
            "| gate | measured | required |",
            "|---|---:|---:|",
        ]
        for name, entry in ratios.items():
            bound = entry.get("bound", ">=")
            lines.append(f"| {name} | {entry['value']} | {bound} {entry['gate']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--ratios", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    bench = json.loads(args.bench_json.read_text())
    ratios = json.loads(args.ratios.read_text()) if args.ratios and args.ratios.is_file() else None
    text = render(bench, ratios)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
