"""Training says when it failed: chance accuracy, a flat loss, a pinned temperature, thin splits."""

from __future__ import annotations

import numpy as np

from export.parity import compare, lesion_gate, thin_evidence
from training.evaluation.diagnostics import check_run
from training.evaluation.metrics import TEMPERATURE_RANGE, evaluate

CLASSES = ("normal", "benign", "malignant")


def _run(test_probs, *, per_class: int = 21, temperature: float = 1.0):
    """Labels and splits with per_class / 3 images of each class in each split."""
    labels = np.tile(np.arange(3), per_class)
    splits = np.tile(np.repeat(["train", "val", "test"], 3), per_class // 3)
    y_test = labels[splits == "test"]
    metrics = evaluate(y_test, test_probs(y_test), CLASSES, n_boot=0)
    return metrics | {"temperature": temperature}, labels, splits


def _good(y):
    return np.eye(3)[y] * 0.8 + 0.2 / 3


def _falling():
    return [{"loss": 1.1 - 0.1 * i, "val_loss": 1.1 - 0.1 * i} for i in range(6)]


def test_a_model_that_learned_on_enough_images_gets_no_warning():
    metrics, labels, splits = _run(_good)
    assert check_run(_falling(), metrics, labels, splits, CLASSES) == []


def test_a_chance_model_with_a_flat_loss_and_a_pinned_temperature_is_named_so():
    """The README's synthetic path once trained exactly this: all one class, T at 20."""
    metrics, labels, splits = _run(
        lambda y: np.tile([0.3, 0.4, 0.3], (len(y), 1)), temperature=TEMPERATURE_RANGE[1]
    )
    rows = [{"loss": 1.10, "val_loss": 1.10 + 0.05 * i} for i in range(7)]
    warnings = check_run(rows, metrics, labels, splits, CLASSES)
    text = "\n".join(warnings)
    assert "test accuracy 0.333 is at chance" in text
    assert "predicted one class for every test image" in text
    assert "the training loss fell less than 10% (first epoch 1.100 -> best later 1.100)" in text
    assert "the weights kept are those of epoch 1" in text
    assert "calibration temperature is at its upper bound (20.000)" in text
    assert len(warnings) == 4


def test_a_split_with_a_handful_of_images_per_class_says_its_metrics_mean_little():
    metrics, labels, splits = _run(_good, per_class=6)  # 2 per class in val and test
    warnings = check_run(_falling(), metrics, labels, splits, CLASSES)
    assert [w.split(" split")[0] for w in warnings] == ["the val", "the test"]
    assert "only 2 normal, 2 benign, 2 malignant image(s) (of 6)" in warnings[1]
    assert "--folds K" in warnings[1] and "cv_metrics.json sums up all the folds" in warnings[1]


def test_a_loss_that_fell_9_percent_is_said_to_have_fallen_less_than_10():
    metrics, labels, splits = _run(_good)
    rows = [{"loss": 1.071}, {"loss": 1.0}, {"loss": 0.975}]
    (warning,) = check_run(rows, metrics, labels, splits, CLASSES)
    assert warning.startswith("the training loss fell less than 10% (first epoch 1.071 -> best")
    assert "did not fall" not in warning


def test_an_accuracy_below_chance_is_called_below_chance():
    metrics, labels, splits = _run(lambda y: np.eye(3)[(y + 1) % 3] * 0.8 + 0.2 / 3)  # all wrong
    warnings = check_run(_falling(), metrics, labels, splits, CLASSES)
    assert any(w.startswith("test accuracy 0.000 is below chance (") for w in warnings)


def test_a_parity_gate_on_a_handful_of_images_says_the_evidence_is_thin():
    probs = np.eye(3)[[0, 1, 2] * 9]
    small = compare("onnx-int8 vs onnx-fp32", probs, probs)
    assert "only 27 held-out images" in thin_evidence(small)
    assert "moves top-1 agreement by up to 3.7%" in thin_evidence(small)
    maps = np.zeros((20, 8, 8, 1), np.float32)
    maps[:, 2:6, 2:6] = 0.9
    outlines = thin_evidence(lesion_gate(maps, maps, 0.5))
    assert "only 20 held-out images" in outlines
    assert "moves the mean Dice of the outlines by up to 5.0%" in outlines
    big = np.eye(3)[[0, 1, 2] * 40]
    assert thin_evidence(compare("onnx-int8 vs onnx-fp32", big, big)) is None
