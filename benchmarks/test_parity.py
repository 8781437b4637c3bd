"""Accuracy parity of the benchmarked FP32 and INT8 models on real held-out scans.

The held-out list ships beside the bundled model (``edge_runtime/models/default.heldout.csv``:
``path`` relative to the shared data folder, ``label``); the scans themselves are not shipped,
so these tests skip with a reason where ``../shared`` is absent.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.conftest import probabilities
from edge_runtime.model.contract import Precision
from edge_runtime.model.cpu import int8_saturates
from edge_runtime.model.session import Provider, open_model
from edge_runtime.model.verify import verify_model_file
from export.parity import MIN_TOP1_AGREEMENT, compare, fp32_gate, int8_gate, int8_recheck_gate


def test_int8_matches_fp32_on_real_heldout_scans(models, model_files, heldout):
    """The INT8 gate on the answers the runtime gives: INT8, with the FP32 recheck of the scans
    it is unsure of where its metadata asks for one (edge_runtime.postprocess.recheck), and the
    file gate (edge_runtime.model.verify: top-1 and calls as made). On an x86
    CPU without VNNI, whose INT8 kernels saturate (the runtime serves FP32 there), the INT8 model is
    judged as exact integer kernels compute it, its QDQ graph run in float, as edge-export
    gates it on such a host."""
    images, labels = heldout
    fp32 = probabilities(models[Precision.FP32], images)
    saturating = int8_saturates()
    int8_model = models[Precision.INT8]
    if saturating:
        int8_model = open_model(
            model_files[Precision.INT8], provider=Provider.CPU, threads=1, exact_int8=True
        )
    int8 = probabilities(int8_model, images)
    margin = int8_model.spec.recheck_margin
    if margin > 0:
        report = int8_recheck_gate(fp32, int8, margin, labels)
        if not saturating:  # the runtime's own answers: those of this host's integer kernels,
            # with every rerun its metadata asks for, in top-1 and in the calls as made
            check = verify_model_file(model_files[Precision.INT8], images)
            assert check.passed, check.summary()
    else:
        report = int8_gate(fp32, int8, labels)
    assert report.passed, report.summary()
    assert report.top1_agreement >= MIN_TOP1_AGREEMENT


def test_keras_matches_onnx_fp32(models, heldout, request):
    if not os.environ.get("EDGE_CLASSIFY_KERAS_MODEL"):
        pytest.skip("set EDGE_CLASSIFY_KERAS_MODEL to the run's model.keras to compare with Keras")
    keras_model = request.getfixturevalue("keras_model")
    images, labels = heldout
    keras_probs = keras_model.predict(images, batch_size=32, verbose=0)["probabilities"]
    report = fp32_gate(keras_probs, probabilities(models[Precision.FP32], images), labels)
    assert report.passed, report.summary()


def test_parity_check_can_fail(models, heldout):
    """The comparison itself must be able to fail: shuffled predictions do not pass."""
    images, labels = heldout
    probs = probabilities(models[Precision.FP32], images)
    shuffled = probs[np.random.default_rng(0).permutation(len(probs))]
    assert not compare("shuffled", probs, shuffled, labels, min_agreement=0.99).passed
