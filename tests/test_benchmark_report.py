"""docs/benchmarks.md says on which side of each ratio gate a value passes."""

from __future__ import annotations

from benchmarks.report import render


def test_each_ratio_gate_is_printed_with_its_own_bound():
    ratios = {
        "cold_start_vs_library_imports": {"value": 1.4, "gate": 2.0, "bound": "<="},
        "int8_speedup_vs_fp32": {"value": 2.2, "gate": 2.0, "bound": ">="},
        "older_record_without_a_bound": {"value": 3.0, "gate": 1.0},
    }
    text = render({"benchmarks": []}, ratios)
    assert "| cold_start_vs_library_imports | 1.4 | <= 2.0 |" in text
    assert "| int8_speedup_vs_fp32 | 2.2 | >= 2.0 |" in text
    assert "| older_record_without_a_bound | 3.0 | >= 1.0 |" in text
