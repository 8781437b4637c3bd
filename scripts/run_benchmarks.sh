#!/usr/bin/env bash
# Run the benchmarks and write docs/benchmarks.md (a Markdown table of the results).
# usage: scripts/run_benchmarks.sh   (inside the environment of `pip install -e ".[dev]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench
EDGE_CLASSIFY_RATIOS_JSON=.bench/ratios.json python -m pytest benchmarks -q \
    --benchmark-json .bench/benchmarks.json --benchmark-min-rounds 10 "$@"
python -m benchmarks.report .bench/benchmarks.json --ratios .bench/ratios.json \
    --output docs/benchmarks.md
echo "wrote docs/benchmarks.md"
