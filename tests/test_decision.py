"""The malignant operating point and the unfamiliar-scan flag
(edge_runtime.postprocess.decision)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.classifier import Classifier
from edge_runtime.model.contract import ModelSpec
from edge_runtime.postprocess.decision import (
    decide,
    lesion_verdict,
    malignant_operating_point,
    unfamiliar_scores,
    unfamiliar_stats,
)
from tests.onnx_models import CLASSES, make_contract_model


def test_a_malignant_threshold_calls_malignant_below_the_top_class():
    p = np.array([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_array_equal(decide(p, CLASSES, 0.0), [1, 1, 2])
    np.testing.assert_array_equal(decide(p, CLASSES, 0.25), [2, 1, 2])
    # above the top class's own probability, a malignant top-1 gives way to the next class
    np.testing.assert_array_equal(decide(p, CLASSES, 0.65), [1, 1, 1])


def test_the_operating_point_reaches_the_asked_sensitivity_at_the_highest_threshold():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.3
    p = np.clip(np.where(truth, 0.6, 0.3) + rng.normal(0, 0.15, 400), 0, 1)
    point = malignant_operating_point(p, truth, 0.9)
    assert point["sensitivity"] >= 0.9
    assert np.mean(p[truth] >= point["threshold"] + 1e-9) < 0.9  # any higher misses the bar
    assert 0 < point["specificity"] < 1 and point["malignant_scans"] == truth.sum()
    assert malignant_operating_point(p, np.zeros(400, bool)) is None


def test_unfamiliar_scores_are_small_for_training_like_features_and_large_far_away():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    centres = rng.normal(0, 3, (3, 16))
    features = centres[labels] + rng.normal(0, 1, (600, 16))
    stats = unfamiliar_stats(features, labels, 3)
    near = unfamiliar_scores(centres[labels[:50]] + rng.normal(0, 1, (50, 16)), stats)
    far = unfamiliar_scores(rng.normal(0, 1, (50, 16)) + 20, stats)
    assert near.max() < 1.6 < 5 < far.min()
    with pytest.raises(ValueError, match="for 16 features"):
        unfamiliar_scores(features[:, :8], stats)
    with pytest.raises(ValueError, match="not supported"):
        unfamiliar_scores(features, {**stats, "method": "energy"})


def test_features_that_never_vary_give_finite_scores_and_nan_features_no_threshold():
    from export.call_rules import choose_unfamiliar

    flat = np.ones((6, 4), np.float32)  # a dead model: every scan the same features
    labels = np.array([0, 1, 2, 0, 1, 2])
    stats = unfamiliar_stats(flat, labels, 3)
    assert min(stats["scale"]) > 0
    assert np.isfinite(unfamiliar_scores(flat + 1, stats)).all()
    broken = np.full((6, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="threshold is nan: the model's features are not finite"):
        choose_unfamiliar(lambda images: broken[: len(images)], flat, labels, flat, 3)


def _scan(path, dark: bool):
    image = np.full((64, 64), 40 if dark else 220, np.uint8)
    cv2.imwrite(str(path), image)
    return path


def test_the_classifier_flags_unfamiliar_scans_and_abstains(tmp_path):
    # the tiny model's features are its pooled class scores: a dark and a bright scan differ
    plain = make_contract_model(tmp_path / "plain.onnx", features=True)
    with Classifier.from_path(plain) as clf:
        dark = clf._model.session.run(
            ["features"], {"image": np.full((1, 64, 64, 1), 40, np.uint8)}
        )
    stats = unfamiliar_stats(
        np.repeat(dark[0], 4, axis=0) + 1e-3 * np.arange(4)[:, None], np.array([0, 1, 2, 0]), 3
    )
    spec = ModelSpec(class_names=CLASSES, input_size=64, unfamiliar={**stats, "threshold": 3.0})
    model = make_contract_model(tmp_path / "m.onnx", spec=spec, features=True)
    scans = [_scan(tmp_path / "dark.png", True), _scan(tmp_path / "bright.png", False)]
    with Classifier.from_path(model, check_input=False) as clf:  # flat frames: no scans
        dark_result, bright_result = clf.classify(scans)
    assert not dark_result.unfamiliar and not dark_result.abstained
    assert bright_result.unfamiliar and bright_result.abstained


def test_the_classifier_applies_the_models_operating_point_and_an_override(tmp_path):
    spec = ModelSpec(class_names=CLASSES, input_size=64, malignant_threshold=0.05)
    model = make_contract_model(tmp_path / "m.onnx", spec=spec)
    scan = _scan(tmp_path / "s.png", True)
    with Classifier.from_path(model) as clf:
        assert clf.malignant_threshold == 0.05
        (low,) = clf.classify([scan])
    with Classifier.from_path(model, malignant_threshold=0.0) as clf:
        (plain,) = clf.classify([scan])
    assert low.label == "malignant"  # P(malignant) ~ 1/3 >= 0.05
    top = max(plain.probabilities, key=plain.probabilities.get)
    assert plain.label == top
    with pytest.raises(ValueError, match="malignant_threshold must be in"):
        Classifier.from_path(model, malignant_threshold=1.0)


def test_the_lesion_head_rule_calls_normal_exactly_when_no_lesion_is_found():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3]])
    found = np.array([True, False, True, False])
    np.testing.assert_array_equal(decide(p, CLASSES, 0.0, found), [1, 0, 2, 0])
    # the malignant threshold applies to scans with a lesion only
    np.testing.assert_array_equal(decide(p, CLASSES, 0.05, found), [2, 0, 2, 0])


def test_the_lesion_verdict_follows_the_normal_rule():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3]])
    found = np.array([True, False, True, True])
    assert lesion_verdict("classifier", found, p, CLASSES, 0.0) is None
    assert lesion_verdict("lesion_head", None, p, CLASSES, 0.0) is None
    np.testing.assert_array_equal(lesion_verdict("lesion_head", found, p, CLASSES, 0.0), found)
    gated = lesion_verdict("lesion_head_or_classifier", found, p, CLASSES, 0.0)
    np.testing.assert_array_equal(gated, [False, False, False, True])  # rows 0, 2: top-1 normal
    np.testing.assert_array_equal(decide(p, CLASSES, 0.0, gated), [0, 0, 0, 1])
    # the operating point can take a scan out of "normal": row 2's P(malignant) 0.3 >= 0.25
    gated = lesion_verdict("lesion_head_or_classifier", found, p, CLASSES, 0.25)
    np.testing.assert_array_equal(gated, [False, False, True, True])
    gated = lesion_verdict("lesion_head_or_classifier", found, p, CLASSES, 0.05)
    np.testing.assert_array_equal(gated, [True, False, True, True])
    # the normal gate: P(normal) >= 0.2 calls normal too (row 3: 0.2)
    gated = lesion_verdict("lesion_head_or_classifier", found, p, CLASSES, 0.0, normal_gate=0.2)
    np.testing.assert_array_equal(gated, [False, False, False, False])
    # the gate never overrides the malignant operating point
    risky = np.array([[0.2, 0.3, 0.5]])
    kept = lesion_verdict("lesion_head_or_classifier", np.array([True]), risky, CLASSES, 0.27, 0.15)
    np.testing.assert_array_equal(kept, [True])
    np.testing.assert_array_equal(decide(risky, CLASSES, 0.27, kept), [2])
    with pytest.raises(ValueError, match="unknown normal rule"):
        lesion_verdict("mystery", found, p, CLASSES, 0.0)


def test_a_lesion_model_shows_its_lesion_probability_as_the_heatmap(tmp_path):
    model = make_contract_model(tmp_path / "m.onnx", lesion_stride=4)
    image = np.full((64, 96), 220, np.uint8)
    cv2.circle(image, (30, 30), 10, 20, -1)
    with Classifier.from_path(model) as clf:
        (result,) = clf.classify([image], heatmaps=True)
    assert result.heatmap.shape == image.shape
    assert result.heatmap[30, 30] > 200 and result.heatmap[5, 90] < 30  # dark on bright tissue
