"""Training schedule helpers."""

from __future__ import annotations

import numpy as np
import pytest


def test_class_weights_are_tempered_and_average_one():
    pytest.importorskip("tensorflow")
    from training.fit import class_weights

    labels = np.array([0] * 10 + [1] * 90)
    full = class_weights(labels, 3, power=1.0)
    half = class_weights(labels, 3, power=0.5)
    for weights in (full, half):
        assert np.dot([weights[0], weights[1]], [10, 90]) == pytest.approx(100)
        assert weights[2] == 0.0
    assert full[0] / full[1] == pytest.approx(9.0)
    assert half[0] / half[1] == pytest.approx(3.0)
