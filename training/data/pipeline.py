"""Scans -> cached uint8 arrays through the runtime's own decode and resize -> tf.data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from edge_runtime.io.decode import InputError, load_gray
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.contract import LESION, PROBABILITIES, ResizePolicy
from training.augmentation.augment import AugmentConfig, make_augmenter
from training.model.segmentation import mask_targets

log = logging.getLogger(__name__)


def load_images(
    paths: Sequence[str | Path],
    size: int,
    policy: ResizePolicy = ResizePolicy.LETTERBOX,
    *,
    workers: int = 4,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode and fit every file once, exactly as the device will.

    ``transform``, if given, changes each decoded scan at its own resolution before it is fitted
    (``training.probes.marks.paint_out_marks`` for the unmarked copies).

    Returns:
        ``(images, failures)``: uint8 ``[N, size, size, 1]`` (a failed file leaves a black image
        at its index) and ``(path, reason)`` for each failure, so callers can drop or report them.
    """
    images = np.zeros((len(paths), size, size, 1), np.uint8)
    failures: list[tuple[str, str]] = []

    def one(index: int) -> None:
        try:
            gray = load_gray(paths[index])
            if transform is not None:
                gray = transform(gray)
            images[index, :, :, 0] = fit_to_square(gray, size, policy)
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
    num_classes: int,
    batch_size: int,
    training: bool,
    seed: int,
    augment: AugmentConfig | None = None,
    masks: np.ndarray | None = None,
    mask_known: np.ndarray | None = None,
    unmarked: np.ndarray | None = None,
    min_batches: int = 0,
) -> tf.data.Dataset:
    """A batched tf.data pipeline over in-memory arrays; augmented and shuffled when training.

    Yields ``(images, targets)``: uint8 ``[B, S, S, 1]`` and ``{"probabilities": one-hot
    [B, K]}``, plus, with ``masks`` (uint8 ``[N, S, S, 1]``) and ``mask_known`` (bool ``[N]``),
    ``"lesion"``: the mask at the lesion output's stride with its weight
    (:func:`training.model.segmentation.mask_targets`). Augmentation moves each mask with its scan.

    ``unmarked``: the same scans with their burned-in marks painted out; while training, each
    scan is drawn from it with probability ``augment.unmark``, so that the marks tell the model
    nothing about the label.

    ``min_batches``: when training, pass over the images as many times (each in a new order) as
    it takes for one iteration of the dataset, an epoch, to hold at least this many batches.
    """
    segment = masks is not None
    tensors: tuple = (images, labels)
    if segment:
        tensors += (masks, mask_known.astype(bool))
    swap = training and augment is not None and augment.unmark > 0 and unmarked is not None
    ds = tf.data.Dataset.from_tensor_slices((unmarked, *tensors) if swap else tensors)
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if swap:
        chance = float(augment.unmark)
        ds = ds.map(
            lambda clean, x, *rest: (
                tf.where(tf.random.uniform([], seed=seed) < chance, clean, x),
                *rest,
            )
        )
    passes = (max(0, min_batches - 1) * batch_size) // max(1, len(images)) + 1  # the fewest
    if training and passes > 1:
        ds = ds.repeat(passes)
    ds = ds.batch(batch_size)
    if training and augment is not None:
        augmenter = make_augmenter(augment, seed, size=int(images.shape[1]))

        def augmented(x, y, *mask):
            if not mask:
                return augmenter(x)[0], y
            x, moved = augmenter(x, mask[0])
            return x, y, moved, mask[1]

        ds = ds.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)

    def targets(x, y, *mask):
        out = {PROBABILITIES: tf.one_hot(y, num_classes)}
        if mask:
            out[LESION] = mask_targets(*mask)
        return x, out

    return ds.map(targets).prefetch(tf.data.AUTOTUNE)
