"""The lesion output's cost: INT8 with its ``lesion`` output against the same INT8 model cut to
its classification outputs, batch 1, one thread, interleaved in one run (issue: <= 1.25x)."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from benchmarks.test_speed import _batch, _entry
from benchmarks.timing import interleaved
from edge_runtime.model.contract import CAM, INPUT_NAME, LESION, PROBABILITIES, Precision

MAX_LESION_SLOWDOWN = 1.25


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_gate_the_lesion_output_costs_at_most_a_quarter_more(
    model_files, models, scans, ratio_log, tmp_path
):
    int8 = model_files[Precision.INT8]
    if not models[Precision.INT8].spec.has_lesion:
        pytest.skip(f"{int8} has no lesion output")
    cut = tmp_path / "classification-only.onnx"
    onnx.utils.extract_model(str(int8), str(cut), [INPUT_NAME], [PROBABILITIES, CAM])
    full, plain = _session(int8), _session(cut)

    images = _batch(models, scans, 1)
    t = interleaved(
        {
            "with_lesion": lambda: full.run([PROBABILITIES, CAM, LESION], {INPUT_NAME: images}),
            "classification_only": lambda: plain.run([PROBABILITIES, CAM], {INPUT_NAME: images}),
        },
        rounds=200,
        warmup=10,
    )
    slowdown = t["with_lesion"].median / t["classification_only"].median
    ratio_log["int8_lesion_output_slowdown"] = _entry(slowdown, MAX_LESION_SLOWDOWN, t, "<=")
    assert slowdown <= MAX_LESION_SLOWDOWN, (
        f"INT8 with its lesion output runs {slowdown:.2f}x the classification-only model "
        f"(medians {t['with_lesion'].median * 1e3:.2f} vs "
        f"{t['classification_only'].median * 1e3:.2f} ms); the gate is <= {MAX_LESION_SLOWDOWN}x"
    )
