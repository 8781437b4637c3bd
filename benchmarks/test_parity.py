"""Accuracy parity of the benchmarked FP32 and INT8 models on real held-out scans.

The held-out list ships beside the bundled model (``edge_runtime/models/default.heldout.csv``:
``path`` relative to the shared data folder, ``label``); the scans themselves are not shipped,
so these tests skip with a reason where ``../shared`` is absent.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from benchmarks.conftest import SHARED
from edge_runtime.classifier import MODELS_DIR
from edge_runtime.contract import INPUT_NAME, PROBABILITIES, Precision
from edge_runtime.decode import load_gray
from edge_runtime.preprocess import make_batch
from export.parity import MIN_TOP1_AGREEMENT, compare, fp32_gate, int8_gate

HELDOUT = MODELS_DIR / "default.heldout.csv"


@pytest.fixture(scope="module")
def heldout(models):
    if os.environ.get("EDGE_CLASSIFY_BENCH_MODELS"):
        pytest.skip("held-out list belongs to the bundled model, not to EDGE_CLASSIFY_BENCH_MODELS")
    if not HELDOUT.is_file():
        pytest.skip(f"no bundled default model with its held-out list ({HELDOUT}) to check")
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real held-out scans not found under {data} (put ../shared beside the repo)")
    with open(HELDOUT, newline="") as handle:
        rows = list(csv.DictReader(handle))
    spec = models[Precision.FP32].spec
    images = make_batch(
        [load_gray(data / r["path"]) for r in rows], spec.input_size, spec.resize_policy
    )
    labels = np.array([spec.class_names.index(r["label"]) for r in rows])
    return images, labels


def _probabilities(model, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            model.session.run([PROBABILITIES], {INPUT_NAME: images[i : i + 32]})[0]
            for i in range(0, len(images), 32)
        ]
    )


def test_int8_matches_fp32_on_real_heldout_scans(models, heldout):
    images, labels = heldout
    report = int8_gate(
        _probabilities(models[Precision.FP32], images),
        _probabilities(models[Precision.INT8], images),
        labels,
    )
    assert report.passed, report.summary()
    assert report.top1_agreement >= MIN_TOP1_AGREEMENT


def test_keras_matches_onnx_fp32(models, heldout, request):
    if not os.environ.get("EDGE_CLASSIFY_KERAS_MODEL"):
        pytest.skip("set EDGE_CLASSIFY_KERAS_MODEL to the run's model.keras to compare with Keras")
    keras_model = request.getfixturevalue("keras_model")
    images, labels = heldout
    keras_probs = keras_model.predict(images, batch_size=32, verbose=0)["probabilities"]
    report = fp32_gate(keras_probs, _probabilities(models[Precision.FP32], images), labels)
    assert report.passed, report.summary()


def test_parity_check_can_fail(models, heldout):
    """The comparison itself must be able to fail: shuffled predictions do not pass."""
    images, labels = heldout
    probs = _probabilities(models[Precision.FP32], images)
    shuffled = probs[np.random.default_rng(0).permutation(len(probs))]
    assert not compare("shuffled", probs, shuffled, labels, min_agreement=0.99).passed
