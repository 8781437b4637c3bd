"""Stability training adds KL(p(clean) || p(noisy)) to the loss, and only that."""

from __future__ import annotations

import numpy as np
import pytest


def _sensitive_model(keras):
    inputs = keras.Input((4, 4, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1.0 / 255)(inputs))
    weights = keras.initializers.RandomNormal(stddev=2.0, seed=0)
    dense = keras.layers.Dense(3, activation="softmax", kernel_initializer=weights)
    return keras.Model(inputs, dense(x))


@pytest.mark.parametrize(
    ("weight", "noise_std", "adds_term"), [(0.0, 50.0, False), (100.0, 50.0, True)]
)
def test_reported_loss_is_cross_entropy_plus_weighted_divergence(weight, noise_std, adds_term):
    keras = pytest.importorskip("keras")
    from training.stability import StabilityTrainer

    keras.utils.set_random_seed(0)
    model = _sensitive_model(keras)
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 1), dtype=np.uint8)
    labels = np.eye(3, dtype="float32")[np.arange(8) % 3]
    trainer = StabilityTrainer(model, weight=weight, noise_std=noise_std, seed=0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    reported = float(trainer.train_on_batch(images, labels))
    cross_entropy = float(
        np.mean(keras.losses.categorical_crossentropy(labels, model.predict(images, verbose=0)))
    )
    if adds_term:
        assert reported > cross_entropy + 0.05
    else:
        assert reported == pytest.approx(cross_entropy, rel=1e-4)
