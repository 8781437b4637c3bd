"""Lesion-free views of lesion scans: the wider side beside the lesion (its box widened by a
margin) mirrored onto the lesion's half, cut to the scan's aspect ratio, so the view is lesion-free
tissue of the same scanner. ``edge-train --lesion-free-normals`` trains on them as "normal" (with
the lesion side, mirrored alike, as the seam control) when one source has no normal scans; the
lesion-free probe (:mod:`training.probes.lesionfree`) asks a trained model about them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from edge_runtime.io.decode import InputError
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import ResizePolicy
from training.data.datasets import Sample, read_scan
from training.data.masks import load_lesion_mask

log = logging.getLogger(__name__)

MARGIN = 0.05  # of the scan's width, added to each side of the lesion's box


MIN_FREE = 0.4  # of the scan's width: narrower lesion-free sides are not tested


LESION_FREE, LESION_SIDE = "lesion-free", "lesion side"


def free_side(lesion: np.ndarray) -> slice | None:
    """Columns of the wider side beside the lesion's box (widened by :data:`MARGIN`); None when
    it is narrower than :data:`MIN_FREE` of the scan."""
    width = lesion.shape[1]
    columns = np.flatnonzero(lesion.any(axis=0))
    margin = round(MARGIN * width)
    left, right = max(0, columns[0] - margin), min(width, columns[-1] + 1 + margin)
    if max(left, width - right) < MIN_FREE * width:
        return None
    return slice(0, left) if left >= width - right else slice(right, width)


def mirrored(gray: np.ndarray, side: slice) -> np.ndarray:
    """The ``side`` columns with their mirror image on the other side, at most the scan's width."""
    strip = gray[:, side]
    width = gray.shape[1]
    if side.start == 0:
        return np.ascontiguousarray(np.concatenate([strip, strip[:, ::-1]], axis=1)[:, :width])
    return np.ascontiguousarray(np.concatenate([strip[:, ::-1], strip], axis=1)[:, -width:])


def scan_aspect(view: np.ndarray, scan_width: int) -> np.ndarray:
    """``view`` with its deepest rows cut so that it has the scan's aspect ratio: a view narrower
    than its scan would otherwise be letterboxed with wider side bands than any real scan of it,
    a cue to which kind of view it is."""
    height, width = view.shape[:2]
    rows = round(height * width / scan_width)
    return np.ascontiguousarray(view[:rows]) if rows < height else view


def lesion_side(lesion: np.ndarray, free: slice) -> slice:
    """The columns that :func:`free_side` leaves: the scan's edge through the lesion."""
    return slice(free.stop, lesion.shape[1]) if free.start == 0 else slice(0, free.start)


def lesion_scan_views(sample: Sample) -> tuple[float, dict[str, np.ndarray]]:
    """Read a lesion scan and its masks; return the free side's share of the scan's width and
    ``{LESION_FREE: ..., LESION_SIDE: ...}``, each side mirrored and cut to the scan's aspect
    ratio (:func:`scan_aspect`); ``(0.0, {})`` when the lesion leaves no room (:func:`free_side`).

    Raises:
        InputError: the scan or a mask cannot be decoded.
    """
    free_width, views, _ = _views_and_masks(sample)
    return free_width, views


def _views_and_masks(
    sample: Sample,
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`lesion_scan_views` plus the lesion mask (0/255) mirrored alike for each view."""
    gray = read_scan(sample.path)
    lesion = load_lesion_mask(sample.masks, gray.shape)
    free = free_side(lesion) if lesion.any() else None
    if free is None:
        return 0.0, {}, {}
    width = gray.shape[1]
    sides = {LESION_FREE: free, LESION_SIDE: lesion_side(lesion, free)}
    mask = lesion.astype(np.uint8) * 255
    views = {view: scan_aspect(mirrored(gray, side), width) for view, side in sides.items()}
    masks = {view: scan_aspect(mirrored(mask, side), width) for view, side in sides.items()}
    return (free.stop - free.start) / width, views, masks


def lesion_free_views_wanted(asked: bool | None, samples: Sequence[Sample]) -> bool:
    """Whether to train on lesion-free views: as ``asked``, or, when ``asked`` is None, whenever
    one source has normal scans and another has none, the mix in which a model can learn
    "this source is never normal".

    Raises:
        ValueError: asked for, but no scan is normal, so the views could not be labelled.
    """
    sources = {s.source for s in samples}
    with_normals = {s.source for s in samples if s.label == "normal"}
    if asked and not with_normals:
        classes = sorted({s.label for s in samples})
        raise ValueError(
            "--lesion-free-normals labels lesion-free views 'normal', but the data has no "
            f"normal class (classes: {classes})"
        )
    if asked is None:
        return bool(with_normals) and with_normals != sources
    return asked


def training_views(
    samples: Sequence[Sample], input_size: int, policy: ResizePolicy
) -> list[tuple[int, np.ndarray, str, np.ndarray]]:
    """Both mirrored views of every lesion scan with room beside its lesion, for training:
    ``(index into samples, preprocessed image [S, S, 1], label, its lesion mask [S, S, 1])``,
    the mask (0-255, fitted like the image) mirrored with the view.

    The lesion-free side is labelled ``normal``: lesion-free tissue from the scanners of sources
    that have no normal scans; its mask is empty. The lesion side keeps the scan's label and its
    mirrored lesion, so that a mirror seam says nothing about the class. Unreadable files are
    skipped with a warning naming the file.
    """
    made = []
    for index, sample in enumerate(samples):
        if sample.label == "normal" or not sample.masks:
            continue
        try:
            _, views, masks = _views_and_masks(sample)
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)
            continue
        for view, image in views.items():
            made.append(
                (
                    index,
                    make_batch([image], input_size, policy)[0],
                    "normal" if view == LESION_FREE else sample.label,
                    make_batch([masks[view]], input_size, policy)[0],
                )
            )
    return made
