"""The training data pipeline: cached arrays, an optional transform, and unmarked copies."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from training.augmentation.augment import AugmentConfig
from training.data.pipeline import load_images, make_dataset

NO_CHANGE = AugmentConfig(rotation_deg=0, zoom=0, gain=0, contrast=0, gamma=0, noise=0, flip=False)


def test_load_images_applies_the_transform_before_fitting(tmp_path):
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), np.full((40, 60), 100, np.uint8))
    plain, _ = load_images([path], 32)
    inverted, failures = load_images([path], 32, transform=lambda gray: 255 - gray)
    assert not failures
    assert plain[0, 16, 16, 0] == 100 and inverted[0, 16, 16, 0] == 155


def _batches(unmark: float, training: bool = True) -> np.ndarray:
    images = np.zeros((64, 8, 8, 1), np.uint8)
    unmarked = np.full((64, 8, 8, 1), 255, np.uint8)
    ds = make_dataset(
        images,
        np.zeros(64, np.int64),
        num_classes=3,
        batch_size=16,
        training=training,
        seed=0,
        augment=replace(NO_CHANGE, unmark=unmark),
        unmarked=unmarked,
    )
    return np.concatenate([x.numpy() for x, _ in ds])


@pytest.mark.parametrize("unmark, expected", [(0.0, 0.0), (1.0, 1.0)])
def test_unmarked_copies_are_drawn_with_the_given_chance(unmark, expected):
    assert (_batches(unmark)[:, 0, 0, 0] == 255).mean() == expected


def test_about_half_the_scans_come_unmarked_at_one_half_and_none_outside_training():
    share = (_batches(0.5)[:, 0, 0, 0] == 255).mean()
    assert 0.25 < share < 0.75
    assert (_batches(1.0, training=False) == 0).all()


def test_a_small_training_set_is_passed_over_until_an_epoch_has_the_minimum_of_batches():
    """126 images at batch 32 are 4 steps; the README's synthetic run needs 20 an epoch."""
    images = np.arange(126, dtype=np.uint8).reshape(126, 1, 1, 1)

    def dataset(training: bool):
        return make_dataset(
            images,
            np.zeros(126, np.int64),
            num_classes=3,
            batch_size=32,
            training=training,
            seed=0,
            min_batches=20,
        )

    ds = dataset(training=True)
    seen = np.concatenate([x.numpy().ravel() for x, _ in ds])
    assert int(ds.cardinality()) == len(list(ds)) == 20  # 5 passes: the fewest that give 20
    assert len(seen) == 5 * 126 and np.array_equal(np.bincount(seen), np.full(126, 5))
    assert not np.array_equal(seen[:126], seen[126:252])  # each pass in a new order
    evaluation = dataset(training=False)
    assert int(evaluation.cardinality()) == 4  # validation is never repeated
