"""The unfamiliar-scan reference export writes: none for a model whose features never vary (a
collapsed network: INT8 rounding alone would move its scores)."""

from __future__ import annotations

import numpy as np

from export.call_rules import choose_unfamiliar


def _features(rng, labels: np.ndarray, collapsed: int) -> np.ndarray:
    """16 features that tell the classes apart, beside ``collapsed`` that stay at about
    +-0.002 whatever the scan (as a member whose batch-norm statistics never left their
    initial values pools them)."""
    centres = np.random.default_rng(0).normal(0, 2, (3, 16))
    healthy = centres[labels] + rng.normal(0, 1, (len(labels), 16))
    flat = np.resize([0.0019, -0.0019], collapsed) + rng.normal(0, 1e-9, (len(labels), collapsed))
    return np.concatenate([healthy, flat], axis=1).astype(np.float32)


def test_no_unfamiliar_rule_when_no_feature_varies():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    flat = _features(rng, labels, collapsed=40)[:, 16:]
    assert choose_unfamiliar(lambda f: f, flat, labels, flat, 3) == {}
