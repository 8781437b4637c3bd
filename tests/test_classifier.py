"""The Python API: results in input order, bad inputs isolated, arrays accepted."""

from __future__ import annotations

from unittest import mock

import cv2
import numpy as np
import pytest

from edge_runtime.classifier import Classifier
from tests.onnx_models import make_contract_model


@pytest.fixture()
def classifier(tmp_path):
    with Classifier.from_path(make_contract_model(tmp_path / "m.onnx"), batch_size=2) as clf:
        yield clf


def _scans(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"scan{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (50 + i, 70), dtype=np.uint8))
        paths.append(path)
    return paths


def test_results_keep_input_order_with_failures_between(classifier, tmp_path):
    good = _scans(tmp_path, 4)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sources = [bad, good[0], good[1], bad, good[2], good[3], tmp_path / "missing.png"]
    results = classifier.classify(sources)
    assert [r.source for r in results] == [str(s) for s in sources]
    assert [r.ok for r in results] == [False, True, True, False, True, True, False]
    assert results[-1].error == "file not found"


def test_unexpected_decoder_error_costs_one_input(classifier, tmp_path):
    good = _scans(tmp_path, 2)
    real = cv2.resize

    def flaky(image, *args, **kwargs):
        if image.shape[0] == 51:  # the second scan
            raise cv2.error("simulated OpenCV failure")
        return real(image, *args, **kwargs)

    with mock.patch("edge_runtime.preprocess.cv2.resize", flaky):
        results = classifier.classify(good)
    assert results[0].ok
    assert not results[1].ok and "simulated OpenCV failure" in results[1].error


def test_arrays_are_accepted(classifier):
    gray = np.full((40, 60), 120, np.uint8)
    bgr = np.dstack([gray] * 3)
    results = classifier.classify([gray, bgr])
    assert all(r.ok for r in results)
    assert results[0].probabilities == pytest.approx(results[1].probabilities)


def test_a_model_without_a_lesion_output_classifies_and_refuses_masks(classifier, tmp_path):
    assert not classifier.spec.has_lesion  # a contract v1 model
    results = classifier.classify(_scans(tmp_path, 2), heatmaps=True)
    assert all(r.ok and r.lesion is None and r.lesion_mask is None for r in results)
    assert all(r.heatmap is not None for r in results)
    with pytest.raises(ValueError, match=r"m\.onnx: this model has no lesion output.*masks=True"):
        classifier.iter_classify(_scans(tmp_path, 1), masks=True)
