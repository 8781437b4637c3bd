"""Scans -> cached uint8 arrays through the runtime's own decode and resize -> tf.data."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from edge_runtime.contract import ResizePolicy
from edge_runtime.decode import InputError, load_gray
from edge_runtime.preprocess import fit_to_square
from training.augment import AugmentConfig, make_augmenter

log = logging.getLogger(__name__)


def load_images(
    paths: Sequence[str | Path],
    size: int,
    policy: ResizePolicy = ResizePolicy.LETTERBOX,
    *,
    workers: int = 4,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode and fit every file once, exactly as the device will.

    Returns:
        ``(images, failures)``: uint8 ``[N, size, size, 1]`` (a failed file leaves a black image
        at its index) and ``(path, reason)`` for each failure, so callers can drop or report them.
    """
    images = np.zeros((len(paths), size, size, 1), np.uint8)
    failures: list[tuple[str, str]] = []

    def one(index: int) -> None:
        try:
            images[index, :, :, 0] = fit_to_square(load_gray(paths[index]), size, policy)
        except InputError as exc:
            failures.append((exc.path, exc.reason))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(paths))))
    for path, reason in failures:
        log.warning("%s: skipped: %s", path, reason)
    return images, failures


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int,
    augment: AugmentConfig | None = None,
    sample_weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """A batched tf.data pipeline over in-memory arrays; augmented and shuffled when training."""
    tensors = (images, labels) if sample_weights is None else (images, labels, sample_weights)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment is not None:
        augmenter = make_augmenter(augment, seed)
        ds = ds.map(lambda x, *rest: (augmenter(x), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
