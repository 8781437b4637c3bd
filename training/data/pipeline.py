"""Scans -> cached uint8 arrays through the runtime's own decode and resize -> tf.data.

A training scan is read as ``edge-classify`` reads it
(:func:`training.data.datasets.read_scan`), with what the decoders print while reading it caught
and logged under the file's name (:mod:`edge_runtime.io.capture`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from edge_runtime.io.capture import collecting, private_stderr
from edge_runtime.io.decode import InputError, display_path
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.contract import LESION, PROBABILITIES, ResizePolicy
from training.augmentation.augment import AugmentConfig, make_augmenter
from training.data.datasets import read_scan
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
    """Decode (:func:`read_scan`) and fit every file once, exactly as the device will.

    ``transform``, if given, changes each decoded scan at its own resolution before it is fitted
    (``training.probes.marks.paint_out_marks`` for the unmarked copies). What the decoders print
    and each file left out are logged under the file's name, in input order, then how many were
    left out.

    Returns:
        ``(images, failures)``: uint8 ``[N, size, size, 1]`` (a failed file leaves a black image
        at its index) and ``(path, reason)`` for each failure, in input order, with the path as
        given, so callers can drop or report them.
    """
    images = np.zeros((len(paths), size, size, 1), np.uint8)
    notes: list[list[str]] = [[] for _ in paths]
    reasons: dict[int, str] = {}

    def one(index: int) -> None:
        with collecting() as said:
            try:
                gray = read_scan(paths[index])
                if transform is not None:
                    gray = transform(gray)
                images[index, :, :, 0] = fit_to_square(gray, size, policy)
            except InputError as exc:
                reasons[index] = exc.reason
        notes[index] = said

    with ThreadPoolExecutor(workers, initializer=private_stderr) as pool:
        list(pool.map(one, range(len(paths))))
    for index, path in enumerate(paths):
        for message in notes[index]:
            log.warning("%s: %s", display_path(path), message)
        if index in reasons:
            log.warning("%s: left out: %s", display_path(path), reasons[index])
    if reasons:
        log.warning(
            "%d of %d scans left out (not readable as one image): see the warnings above",
            len(reasons),
            len(paths),
        )
    return images, [(str(paths[i]), reasons[i]) for i in sorted(reasons)]


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
