"""Speed and accuracy-parity benchmarks (pytest-benchmark); see README "Benchmarks"."""
