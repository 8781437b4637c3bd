"""Pieces of one training run (training.run) that need no training."""

from __future__ import annotations

import numpy as np

from training.run import _Prepared, _training_arrays

CLASSES = ("normal", "benign", "malignant")


def _prepared(views, unmarked: bool) -> _Prepared:
    images = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1)
    return _Prepared(
        class_names=CLASSES,
        paths=[],
        labels=np.array([1, 2, 1, 0]),
        groups=["a", "b", "c", "d"],
        excluded=np.zeros(4, bool),
        images=images,
        samples=[],
        unmarked=images + 100 if unmarked else None,
        views=views,
        fingerprint="",
        sources=("s",),
    )


def _view(value: int) -> np.ndarray:
    return np.full((1, 1, 1), value, np.uint8)


def test_views_join_training_only_from_training_scans_and_stand_in_for_their_unmarked_copy():
    views = [(0, _view(50), "normal"), (0, _view(51), "benign"), (2, _view(52), "normal")]
    train = np.array([True, True, False, False])  # scan 2 is validation or test
    images, labels, unmarked = _training_arrays(_prepared(views, unmarked=True), train)
    assert images.ravel().tolist() == [0, 1, 50, 51]
    assert labels.tolist() == [1, 2, 0, 1]
    assert unmarked.ravel().tolist() == [100, 101, 50, 51]


def test_without_views_the_training_split_is_unchanged():
    images, labels, unmarked = _training_arrays(_prepared([], unmarked=False), np.ones(4, bool))
    assert images.ravel().tolist() == [0, 1, 2, 3] and labels.tolist() == [1, 2, 1, 0]
    assert unmarked is None
