"""Does the model need the lesion to call a scan abnormal? Lesion-free views of held-out scans.

Only BUSI has normal scans, so a model could learn "looks like BUS-BRA, so not normal" instead
of reading the lesion. This asks it directly. From every held-out benign or malignant scan with a
lesion mask it takes the wider side beside the lesion (its box widened by a margin) and mirrors
that side onto the lesion's half, so the view is lesion-free tissue of the same scanner with the
scan's aspect ratio; a bare strip would not do, as a narrow strip of a normal scan is not called
normal either. BUSI's normal scans get the same treatment (their right half, mirrored) as the
control. A model that reads the lesion calls the lesion-free views normal about as often as the
normal controls, whatever their source; one that reads the source calls them abnormal anyway.
The lesion side of each scan, mirrored the same way, is the seam control: a model that has
learned "a mirrored view is normal" (``edge-train`` adds both kinds of view of its training
scans when one source lacks normal scans: :func:`training_views`) calls those normal too.

examples:
  python -m training.lesionfree runs/lite0
  python -m training.lesionfree runs/cv/cv/fold*    # every scan, by the fold that held it out
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.io.decode import InputError, load_gray
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import PROBABILITIES, ResizePolicy
from training.attention import load_lesion_mask
from training.checks import HeldOutCheck
from training.datasets import Sample

log = logging.getLogger(__name__)
LESIONFREE_FILE = "lesionfree.json"
MARGIN = 0.05  # of the scan's width, added to each side of the lesion's box
MIN_FREE = 0.4  # of the scan's width: narrower lesion-free sides are not tested


@dataclass(frozen=True)
class LesionFreeView:
    """One scan: what the model says on lesion-free tissue of it (all of a normal scan's)."""

    path: str
    source: str
    label: str
    free_width: float  # share of the scan's width the lesion-free view is mirrored from
    view: str  # LESION_FREE, or LESION_SIDE: the seam control
    predicted: str
    p_normal: float


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
    gray = load_gray(sample.path)
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


def measure(
    model,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    input_size: int,
    policy: ResizePolicy,
) -> list[LesionFreeView]:
    """Measure every normal scan, and both mirrored views (:func:`lesion_scan_views`) of every
    lesion scan whose mask leaves room; unreadable files are skipped with a warning naming the
    file.

    Raises:
        ValueError: the model has no ``normal`` class to answer with.
    """
    if "normal" not in class_names:
        raise ValueError(f"the model has no 'normal' class (classes: {list(class_names)})")
    normal = list(class_names).index("normal")
    kept, views = [], []
    for _, sample, free_width, made in _readable_views(enumerate(samples)):
        for view, image in made.items():
            kept.append((sample, free_width, view))
            views.append(make_batch([image], input_size, policy))
    if not views:
        return []
    probs = model.predict(np.concatenate(views), batch_size=64, verbose=0)[PROBABILITIES]
    return [
        LesionFreeView(
            path=str(sample.path),
            source=sample.source,
            label=sample.label,
            free_width=free_width,
            view=view,
            predicted=class_names[int(np.argmax(p))],
            p_normal=float(p[normal]),
        )
        for (sample, free_width, view), p in zip(kept, probs, strict=True)
    ]


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


def _readable_views(
    indexed: Iterable[tuple[int, Sample]],
) -> Iterator[tuple[int, Sample, float, dict[str, np.ndarray]]]:
    """``(index, sample, free width, views)`` per readable sample: a normal scan's right half
    mirrored (the control), both sides of a lesion scan (:func:`lesion_scan_views`). Unreadable
    files are skipped with a warning naming the file."""
    for index, sample in indexed:
        try:
            if sample.label == "normal":
                gray = load_gray(sample.path)
                width = gray.shape[1]
                made = {LESION_FREE: mirrored(gray, slice(width // 2, width))}
                yield index, sample, (width - width // 2) / width, made
            else:
                yield index, sample, *lesion_scan_views(sample)
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)


def summarize(rows: Sequence[LesionFreeView]) -> dict[str, dict[str, float]]:
    """Per source, lesion scans and normal controls apart: scans, the share of views called
    normal, and their mean probability of normal."""
    groups: dict[str, list[LesionFreeView]] = {}
    for row in rows:
        if row.label == "normal":
            kind = "normal scans (control)"
        else:
            kind = "lesion scans" if row.view == LESION_FREE else "lesion side (seam control)"
        groups.setdefault(f"{row.source} {kind}", []).append(row)
    return {
        name: {
            "n": len(group),
            "called_normal": float(np.mean([r.predicted == "normal" for r in group])),
            "mean_p_normal": float(np.mean([r.p_normal for r in group])),
        }
        for name, group in sorted(groups.items())
    }


def _describe(s: dict) -> str:
    return (
        f"{s['n']} views, {s['called_normal']:.3f} called normal "
        f"(mean P(normal) {s['mean_p_normal']:.3f})"
    )


main = HeldOutCheck(
    "training.lesionfree", __doc__, LESIONFREE_FILE, measure, summarize, _describe
).main


if __name__ == "__main__":
    sys.exit(main())
