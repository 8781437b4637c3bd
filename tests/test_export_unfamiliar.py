"""The unfamiliar-scan reference export writes: INT8 rounding of features that never vary (a
collapsed ensemble member, dead units) must not move the scores of scans like the training ones."""

from __future__ import annotations

import numpy as np

from edge_runtime.model.verify import MAX_UNFAMILIAR_SCORE_CHANGE, unfamiliar_score_change
from edge_runtime.postprocess.decision import unfamiliar_scores
from export.call_rules import choose_unfamiliar


def _features(rng, labels: np.ndarray, collapsed: int) -> np.ndarray:
    """16 features that tell the classes apart, beside ``collapsed`` that stay at about
    +-0.002 whatever the scan (as a member whose batch-norm statistics never left their
    initial values pools them)."""
    centres = np.random.default_rng(0).normal(0, 2, (3, 16))
    healthy = centres[labels] + rng.normal(0, 1, (len(labels), 16))
    flat = np.resize([0.0019, -0.0019], collapsed) + rng.normal(0, 1e-9, (len(labels), collapsed))
    return np.concatenate([healthy, flat], axis=1).astype(np.float32)


def _int8(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The features as an 8-bit output calibrated on ``reference`` rounds them."""
    step = np.ptp(np.append(reference, 0.0)) / 255
    return (np.round(features / step) * step).astype(np.float32)


def test_features_that_never_vary_do_not_let_int8_rounding_move_the_scores():
    rng = np.random.default_rng(1)
    train_labels, test_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
    train = _features(rng, train_labels, collapsed=100)
    val, test = _features(rng, rng.integers(0, 3, 100), 100), _features(rng, test_labels, 100)
    stats = choose_unfamiliar(lambda f: f, train, train_labels, val, 3)
    fp32 = unfamiliar_scores(test, stats)
    int8 = unfamiliar_scores(_int8(test, train), stats)
    assert unfamiliar_score_change(int8, fp32) < MAX_UNFAMILIAR_SCORE_CHANGE
    assert np.mean(int8 > stats["threshold"]) <= 0.05  # scans like the training ones pass
    far = test.copy()
    far[:, :16] += 20
    assert (unfamiliar_scores(_int8(far, train), stats) > stats["threshold"]).all()


def test_no_unfamiliar_rule_when_no_feature_varies():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    flat = _features(rng, labels, collapsed=40)[:, 16:]
    assert choose_unfamiliar(lambda f: f, flat, labels, flat, 3) == {}
