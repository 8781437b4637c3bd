"""The Python API: results in input order, bad inputs isolated, arrays accepted."""

from __future__ import annotations

from unittest import mock

import cv2
import numpy as np
import pytest

from edge_runtime.classifier import Classifier, ClassifierOptions
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

    with mock.patch("edge_runtime.io.preprocess.cv2.resize", flaky):
        results = classifier.classify(good)
    assert results[0].ok
    assert not results[1].ok and "simulated OpenCV failure" in results[1].error


def test_arrays_are_accepted(classifier):
    gray = np.full((40, 60), 120, np.uint8)
    bgr = np.dstack([gray] * 3)
    results = classifier.classify([gray, bgr])
    assert all(r.ok for r in results)
    assert results[0].probabilities == pytest.approx(results[1].probabilities)


def test_one_path_or_one_image_is_refused_as_sources_and_a_stack_is_not(classifier, tmp_path):
    (scan,) = _scans(tmp_path, 1)
    gray = np.full((40, 60), 120, np.uint8)
    for one in (str(scan), scan, gray, np.dstack([gray] * 3)):  # would iterate chars or rows
        with pytest.raises(TypeError, match="not a collection; pass a list"):
            classifier.classify(one)
    assert len(classifier.classify(np.stack([gray, gray]))) == 2  # N x H x W: two images
    assert [r.ok for r in classifier.classify([scan, str(scan)])] == [True, True]


def test_a_folder_is_named_as_one_since_only_the_command_expands_folders(classifier, tmp_path):
    (result,) = classifier.classify([tmp_path])
    assert not result.ok and result.error.startswith("a folder, not a file")


def test_a_model_without_a_lesion_output_classifies_and_refuses_masks(classifier, tmp_path):
    assert not classifier.spec.has_lesion  # a contract v1 model
    results = classifier.classify(_scans(tmp_path, 2), heatmaps=True)
    assert all(r.ok and r.lesion is None and r.lesion_mask is None for r in results)
    assert all(r.heatmap is not None for r in results)
    with pytest.raises(ValueError, match=r"m\.onnx: this model has no lesion output.*masks=True"):
        classifier.iter_classify(_scans(tmp_path, 1), masks=True)


def test_batches_side_by_side_give_the_answers_of_one_at_a_time_in_input_order(tmp_path):
    model = make_contract_model(tmp_path / "m.onnx")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = _scans(tmp_path, 7)
    sources = [good[0], bad, *good[1:4], bad, *good[4:]]
    answers = {}
    for workers in (1, 3):
        with Classifier.from_path(model, batch_size=2, inference_workers=workers) as clf:
            answers[workers] = [
                (r.source, r.label, r.probabilities) if r.ok else (r.source, r.error)
                for r in clf.classify(sources)
            ]
    assert [source for source, *_ in answers[3]] == [str(s) for s in sources]
    assert answers[3] == answers[1]


def test_inference_workers_default_to_the_cores_left_by_the_threads_of_one_batch():
    with mock.patch("edge_runtime.classifier.usable_cores", return_value=4):
        assert ClassifierOptions(decode_workers=4).batches_at_once == 4
        assert ClassifierOptions(decode_workers=4, threads=2).batches_at_once == 2
        assert ClassifierOptions(decode_workers=1).batches_at_once == 1  # a Ray actor's
        assert ClassifierOptions(decode_workers=4, threads=8).batches_at_once == 1
        assert ClassifierOptions(decode_workers=4, inference_workers=3).batches_at_once == 3
    with pytest.raises(ValueError, match="inference_workers must be >= 1"):
        ClassifierOptions(inference_workers=0)
