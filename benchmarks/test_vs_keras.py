"""The runtime against the Keras model: ``predict`` latency and the speed-up gate.

Runs last (file order) so that TensorFlow's threads cannot disturb the other measurements.
"""

from __future__ import annotations

from benchmarks.test_speed import BATCH, _batch, _entry
from benchmarks.timing import interleaved
from edge_runtime.classifier import Classifier
from edge_runtime.io.decode import load_gray
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import Precision

DESIGN_KERAS_SPEEDUP = 10.0  # DESIGN.md section 7's budget
KERAS_SCANS = 16


def test_keras_predict(benchmark, keras_model, models, scans):
    images = _batch(models, scans, 1)
    out = benchmark(lambda: keras_model.predict(images, verbose=0))
    assert out["probabilities"].shape[0] == 1


def _keras_vs_runtime(keras_model, model_files, models, scans, ratio_log) -> float:
    """Per scan, both end to end from the file: Keras decodes and letterboxes with the same
    function and calls ``predict`` once per scan (how a Keras app handles arriving files); the
    runtime classifies the folder. Both sides run as they ship, on the whole machine: TensorFlow
    and onnxruntime each with their default thread pools (one thread per core). Measured once
    per session, interleaved."""
    if "runtime_speedup_vs_keras_predict" not in ratio_log:
        spec = models[Precision.INT8].spec
        folder = scans[:KERAS_SCANS]

        def keras_per_scan():
            for path in folder:
                image = make_batch([load_gray(path)], spec.input_size, spec.resize_policy)
                keras_model.predict(image, verbose=0)

        with Classifier.from_path(model_files[Precision.INT8], batch_size=BATCH) as clf:
            t = interleaved(
                {"runtime": lambda: clf.classify(folder), "keras": keras_per_scan},
                rounds=9,
                warmup=1,
            )
        ratio = t["keras"].median / t["runtime"].median
        ratio_log["runtime_speedup_vs_keras_predict"] = _entry(ratio, DESIGN_KERAS_SPEEDUP, t)
    return ratio_log["runtime_speedup_vs_keras_predict"]["value"]


def test_gate_runtime_at_least_10x_faster_than_keras(
    keras_model, model_files, models, scans, ratio_log
):
    """DESIGN.md section 7's budget; fails the build below it."""
    ratio = _keras_vs_runtime(keras_model, model_files, models, scans, ratio_log)
    assert ratio >= DESIGN_KERAS_SPEEDUP, (
        f"the runtime is {ratio:.1f}x faster than Keras predict per scan; the budget is >= "
        f"{DESIGN_KERAS_SPEEDUP}x"
    )
