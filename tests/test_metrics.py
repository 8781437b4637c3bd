"""training.evaluation.metrics: hand-computed examples, calibration, bootstrap, fold summaries,
JSON output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from training.evaluation.metrics import (
    apply_temperature,
    binary_auc,
    evaluate,
    evaluate_subsets,
    expected_calibration_error,
    fit_temperature,
    summarize_folds,
)

NAMES = ["normal", "benign", "malignant"]


def _onehot_probs(pred: list[int], k: int = 3, confidence: float = 0.8) -> np.ndarray:
    probs = np.full((len(pred), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _random_case(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = _softmax(rng.normal(size=(n, 3)) * 2)
    y = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    return y, probs


def _no_numpy(obj: object) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str)
            _no_numpy(value)
    elif isinstance(obj, list):
        for value in obj:
            _no_numpy(value)
    else:
        assert obj is None or type(obj) in (int, float, str, bool), (obj, type(obj))
        if isinstance(obj, float):
            assert math.isfinite(obj)


# Truth and prediction of the hand-worked example:
#   true normal:    predicted normal, normal, benign
#   true benign:    predicted benign, benign, malignant
#   true malignant: predicted malignant, malignant, malignant, normal
Y = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
PRED = [0, 0, 1, 1, 1, 2, 2, 2, 2, 0]


def test_evaluate_matches_hand_computed_confusion_matrix_and_rates():
    m = evaluate(np.array(Y), _onehot_probs(PRED), NAMES, n_boot=0)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    mal = m["per_class"]["malignant"]
    assert mal["sensitivity"] == pytest.approx(3 / 4)
    assert mal["specificity"] == pytest.approx(5 / 6)  # 6 non-malignant, 1 called malignant
    assert mal["precision"] == pytest.approx(3 / 4)
    assert mal["f1"] == pytest.approx(3 / 4)
    assert mal["support"] == 4
    normal = m["per_class"]["normal"]
    assert normal["sensitivity"] == pytest.approx(2 / 3)
    assert normal["specificity"] == pytest.approx(6 / 7)
    assert normal["precision"] == pytest.approx(2 / 3)
    # F1: normal 2/3, benign 2/3, malignant 3/4.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)


def test_evaluate_agrees_with_sklearn_on_random_predictions():
    y, probs = _random_case()
    m = evaluate(y, probs, NAMES, n_boot=0)
    pred = probs.argmax(axis=1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    for i, name in enumerate(NAMES):
        assert m["roc_auc"][name] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    assert m["malignant_auc"] == m["roc_auc"]["malignant"]
    assert m["nll"] == pytest.approx(-np.log(probs[np.arange(len(y)), y]).mean())
    assert m["brier"] == pytest.approx(((probs - np.eye(3)[y]) ** 2).sum(axis=1).mean())


def test_macro_f1_of_a_subset_without_a_class_is_over_the_classes_it_has():
    y = np.array([1, 1, 1, 2, 2])  # no normal scan, like BUS-BRA
    pred = np.array([1, 0, 1, 2, 1])  # one benign scan called normal
    m = evaluate(y, _onehot_probs(pred), NAMES, n_boot=0)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=[1, 2], average="macro"))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)  # benign 2/3, malignant 2/3


def test_evaluate_reports_none_for_a_class_absent_from_the_test_set():
    y = np.array([0, 0, 1, 1])
    m = evaluate(y, _onehot_probs([0, 1, 1, 1]), NAMES, n_boot=50)
    assert m["roc_auc"]["malignant"] is None
    assert m["malignant_auc"] is None
    assert m["per_class"]["malignant"]["sensitivity"] is None
    assert m["per_class"]["malignant"]["support"] == 0
    assert m["ci95"]["malignant_sensitivity"] is None
    assert m["ci95"]["malignant_auc"] is None
    json.dumps(m, allow_nan=False)


def test_evaluate_output_is_plain_json_without_numpy_types_or_nan():
    y, probs = _random_case(n=120)
    m = evaluate(y.astype(np.int32), probs.astype(np.float32), NAMES)
    _no_numpy(m)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text)["n"] == 120


def test_evaluate_on_an_empty_test_set_returns_nones():
    m = evaluate(np.zeros(0, int), np.zeros((0, 3)), NAMES)
    assert m["n"] == 0 and m["accuracy"] is None
    json.dumps(m, allow_nan=False)


def test_evaluate_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="must hold indices in"):
        evaluate(np.array([0, 3]), _onehot_probs([0, 1]), NAMES)
    with pytest.raises(ValueError, match="same length"):
        evaluate(np.array([0, 1, 2]), _onehot_probs([0, 1]), NAMES)
    with pytest.raises(ValueError, match="must name every column"):
        evaluate(np.array([0, 1]), _onehot_probs([0, 1]), NAMES[:2])


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
    y, probs = _random_case(n=500)
    m = evaluate(y, probs, NAMES, n_boot=1000, seed=3)
    assert m["ci95"] == evaluate(y, probs, NAMES, n_boot=1000, seed=3)["ci95"]
    for key, point in [
        ("accuracy", m["accuracy"]),
        ("macro_f1", m["macro_f1"]),
        ("malignant_sensitivity", m["per_class"]["malignant"]["sensitivity"]),
        ("malignant_auc", m["malignant_auc"]),
    ]:
        lo, hi = m["ci95"][key]
        assert lo < point < hi, key
        assert hi - lo < 0.2, key


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.5, 1.0, size=n)
    pred = rng.integers(0, 2, size=n)
    probs = np.zeros((n, 2))
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), 1 - pred] = 1 - conf
    correct = rng.random(n) < conf  # right with probability equal to the confidence
    y = np.where(correct, pred, 1 - pred)
    assert expected_calibration_error(probs, y) < 0.02

    over = np.tile([[0.99, 0.01]], (100, 1))
    y_over = np.array([0] * 60 + [1] * 40)  # 99% confident, 60% right
    assert expected_calibration_error(over, y_over) == pytest.approx(0.39)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(6000, 3))
    true_probs = _softmax(logits / 2.0)
    y = (rng.random(len(logits))[:, None] > true_probs.cumsum(axis=1)).sum(axis=1)
    temperature = fit_temperature(_softmax(logits), y)
    assert isinstance(temperature, float)
    assert temperature == pytest.approx(2.0, rel=0.1)
    calibrated = apply_temperature(_softmax(logits), temperature)
    assert np.allclose(calibrated, true_probs, atol=0.05)


def test_fit_temperature_is_one_for_an_empty_validation_set():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_apply_temperature_keeps_the_argmax_and_normalises_rows():
    _, probs = _random_case(n=200)
    for t in (0.3, 1.0, 2.5):
        out = apply_temperature(probs, t)
        assert np.array_equal(out.argmax(axis=1), probs.argmax(axis=1))
        assert np.allclose(out.sum(axis=1), 1.0)
    assert np.allclose(apply_temperature(probs, 1.0), probs)
    assert apply_temperature(probs, 3.0).max() < probs.max()
    with pytest.raises(ValueError, match="positive finite"):
        apply_temperature(probs, 0.0)


def test_binary_auc_matches_sklearn_with_ties_and_gives_an_interval():
    rng = np.random.default_rng(2)
    positive = rng.random(300) < 0.4
    scores = np.round(rng.random(300) * 0.6 + 0.4 * positive, 1)  # many ties
    out = binary_auc(positive, scores)
    assert out["auc"] == pytest.approx(roc_auc_score(positive, scores))
    lo, hi = out["ci95"]
    assert lo < out["auc"] < hi
    assert out["n"] == 300 and out["n_positive"] == int(positive.sum())
    assert binary_auc(np.ones(5, bool), np.arange(5.0)) == {
        "auc": None,
        "ci95": None,
        "n": 5,
        "n_positive": 5,
    }


def test_evaluate_subsets_skips_empty_masks():
    y, probs = _random_case(n=100)
    masks = {
        "busi": np.arange(100) < 60,
        "busbra": np.arange(100) >= 60,
        "none": np.zeros(100, bool),
    }
    out = evaluate_subsets(y, probs, NAMES, masks, n_boot=20)
    assert list(out) == ["busi", "busbra"]
    assert out["busi"]["n"] == 60 and out["busbra"]["n"] == 40
    with pytest.raises(ValueError, match="boolean mask"):
        evaluate_subsets(y, probs, NAMES, {"bad": np.arange(100)})


def test_summarize_folds_gives_t_intervals_cut_to_the_metric_range_and_pools_the_matrix():
    folds = []
    for i, acc in enumerate([0.70, 0.80, 0.90]):
        y = np.array(Y)
        m = evaluate(y, _onehot_probs(PRED), NAMES, n_boot=0)
        m["accuracy"] = acc
        m["temperature"] = 1.0 + i
        folds.append(m)
    s = summarize_folds(folds)
    assert s["folds"] == 3 and s["n"] == 30
    acc = s["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.8)
    assert acc["std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert acc["ci95"] == pytest.approx([0.8 - half, 1.0], rel=1e-5)  # cut where accuracy ends
    temperature = s["metrics"]["temperature"]
    assert temperature["mean"] == pytest.approx(2.0)
    assert temperature["ci95"] == pytest.approx([0.0, 2.0 + 4.302653 / math.sqrt(3)], rel=1e-5)
    assert "n" not in s["metrics"]
    assert s["per_class"]["malignant"]["sensitivity"]["mean"] == pytest.approx(0.75)
    assert s["per_class"]["malignant"]["sensitivity"]["std"] == pytest.approx(0.0)
    assert s["confusion_matrix"] == [[6, 3, 0], [0, 6, 3], [3, 0, 9]]
    json.dumps(s, allow_nan=False)


def test_summarize_folds_ignores_undefined_values_and_handles_one_fold():
    a = {"n": 5, "accuracy": 0.5, "malignant_auc": None}
    b = {"n": 5, "accuracy": 0.7, "malignant_auc": 0.9}
    s = summarize_folds([a, b])
    assert s["metrics"]["malignant_auc"] == {"mean": 0.9, "std": None, "ci95": None, "n": 1}
    assert s["metrics"]["accuracy"]["n"] == 2
    assert s["confusion_matrix"] is None


def test_the_vectorised_bootstrap_is_sklearn_on_each_resample():
    """One AUC and one F1 definition: each bootstrap row equals sklearn on that resample."""
    from training.evaluation.metrics import _macro_f1, _resample_counts, _weighted_auc

    rng = np.random.default_rng(3)
    scores = np.round(rng.random(80), 1)  # ties
    positive = rng.random(80) < 0.4
    counts = _resample_counts(80, 5, seed=0)
    for row, auc in zip(counts, _weighted_auc(scores, positive, counts), strict=True):
        assert auc == pytest.approx(roc_auc_score(positive, scores, sample_weight=row))
    y, probs = _random_case(n=90)
    pred = probs.argmax(1)
    for row in _resample_counts(90, 3, seed=1):
        index = np.repeat(np.arange(90), row)
        cm = np.zeros((3, 3))
        np.add.at(cm, (y[index], pred[index]), 1)
        expected = f1_score(
            y[index], pred[index], labels=np.unique(y[index]), average="macro", zero_division=0
        )
        assert float(_macro_f1(cm)) == pytest.approx(expected)


def test_training_and_the_runtime_scale_by_one_temperature_function():
    from edge_runtime.postprocess.calibration import apply_temperature as runtime

    _, probs = _random_case(n=50)
    probs32 = probs.astype(np.float32)
    for t in (0.5, 0.76, 2.0):
        np.testing.assert_allclose(runtime(probs32, t), apply_temperature(probs32, t), atol=1e-6)
    assert runtime(probs32, 1.0) is probs32  # the runtime skips T == 1
