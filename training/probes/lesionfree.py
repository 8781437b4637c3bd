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
  python -m training.probes.lesionfree runs/lite0
  python -m training.probes.lesionfree runs/cv/cv/fold*    # every scan, by the fold that held it
  out
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.io.decode import InputError
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import PROBABILITIES, ResizePolicy
from training.augmentation.lesion_free import LESION_FREE, lesion_scan_views, mirrored
from training.data.datasets import Sample, read_scan
from training.probes.checks import HeldOutCheck

log = logging.getLogger(__name__)
LESIONFREE_FILE = "lesionfree.json"


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


def _readable_views(
    indexed: Iterable[tuple[int, Sample]],
) -> Iterator[tuple[int, Sample, float, dict[str, np.ndarray]]]:
    """``(index, sample, free width, views)`` per readable sample: a normal scan's right half
    mirrored (the control), both sides of a lesion scan (:func:`lesion_scan_views`). Unreadable
    files are skipped with a warning naming the file."""
    for index, sample in indexed:
        try:
            if sample.label == "normal":
                gray = read_scan(sample.path)
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
    "training.probes.lesionfree", __doc__, LESIONFREE_FILE, measure, summarize, _describe
).main


if __name__ == "__main__":
    sys.exit(main())
