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


def test_freeze_batch_norm_reaches_nested_models_and_spares_other_layers():
    keras = pytest.importorskip("keras")
    from training.fit import _freeze_batch_norm

    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.BatchNormalization()])
    _freeze_batch_norm(outer)
    norms = [layer for model in (outer, inner) for layer in model.layers]
    assert all(
        not layer.trainable for layer in norms if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert inner.layers[0].trainable  # the Dense layer still learns
    before = [w.numpy().copy() for w in inner.layers[1].non_trainable_weights]
    outer(np.random.default_rng(0).normal(5.0, 3.0, (16, 4)).astype("float32"), training=True)
    after = [w.numpy() for w in inner.layers[1].non_trainable_weights]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # moving statistics untouched in training mode


def test_one_seed_gives_the_same_model_bit_for_bit():
    """Augmented training is deterministic, so a documented seed reproduces a model exactly."""
    keras = pytest.importorskip("keras")
    from training.augmentation.augment import AugmentConfig
    from training.fit import FitConfig, TrainingArrays, fit
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)
    config = FitConfig(
        epochs_frozen=0,
        epochs_finetune=2,
        batch_size=16,
        learning_rate=3e-3,
        augment=AugmentConfig(),
    )

    def train_once(seed: int) -> np.ndarray:
        keras.utils.set_random_seed(seed)
        model = build_classifier(3, backbone=Backbone("small-cnn"), input_size=32, weights=None)
        fit(
            model,
            TrainingArrays(images[:48], labels[:48]),
            TrainingArrays(images[48:], labels[48:]),
            config,
            pretrained=False,
        )
        return np.concatenate([w.ravel() for w in model.get_weights()])

    first = train_once(0)
    np.testing.assert_array_equal(train_once(0), first)
    assert np.abs(train_once(1) - first).max() > 1e-3  # and the seed does matter


@pytest.mark.parametrize("backbone", ["mobilenet-v2", "mobilenet-v3-small"])
def test_a_keras_application_from_scratch_learns_the_statistics_of_its_data(backbone):
    """Fifty training batches bring the stem's running mean most of the way to the data's.

    With Keras' momentum 0.999 it moves 5% of the way, and a model trained from scratch for a
    few epochs pools nearly the same features from every scan once exported.
    """
    keras = pytest.importorskip("keras")
    from training.model.backbones import Backbone, build_backbone

    model = build_backbone(Backbone(backbone), 32, weights=None)
    stem = next(x for x in model.layers if isinstance(x, keras.layers.BatchNormalization))
    images = np.random.default_rng(0).normal(0.5, 0.2, (8, 32, 32, 3)).astype("float32")
    for _ in range(50):
        model(images, training=True)
    target = model.get_layer(index=1)  # the stem convolution feeding that batch norm
    found = keras.Model(model.input, target.output)(images).numpy().mean(axis=(0, 1, 2))
    moved = stem.moving_mean.numpy()
    assert np.abs(moved - found).max() < 0.1 * np.abs(found).max()
