"""Burned-in marks (calipers, measurement lines, text) and whether the model leans on them.

Sonographers leave calipers around lesions they measure and type labels such as "RT UOQ" onto the
scan; a model can learn that a measured scan is a lesion scan. For every held-out scan this finds
the marks (thin strokes much brighter than their surroundings), paints them out with OpenCV's
inpainting, and compares the predictions: on scans without marks, on marked scans as they are,
and on the same scans with their marks removed. The other way round, it paints synthetic screen
clutter (``training.augmentation.clutter``: calipers, text, body markers, rulers, logos; a bank
drawn with
another seed than training's) on every scan and counts the answers that change: a model that
ignores clutter changes few either way (issue target: at most 2%).

Several run folders are pooled: the folds of a cross-validation hold every scan out once.

examples:
  python -m training.probes.marks runs/lite0
  python -m training.probes.marks runs/lite0 --split val --json marks-val.json
  python -m training.probes.marks runs/cv/cv/fold*          # every scan, each by the fold that
  held it out
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge_runtime.io.decode import InputError
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import PROBABILITIES, ResizePolicy
from training.augmentation.clutter import clutter_bank
from training.augmentation.marks import find_marks, remove_marks
from training.data.datasets import Sample, read_scan
from training.probes.checks import HeldOutCheck

log = logging.getLogger(__name__)
MARKS_FILE = "marks.json"
# Scans with at least this many stroke pixels count as marked. Chosen on 38 BUSI scans labelled
# by eye (18 with calipers or text): it misplaced two of them.
MARKED_MIN_PIXELS = 130
CLUTTER_PROBE_SEED = 20261202  # not the training seed: the probe's overlays are new to the model
CLUTTER_PROBE_SIZE = 512
CLUTTER_PROBE_OVERLAYS = 64


@dataclass(frozen=True)
class MarkCheck:
    """One scan: its marks and the model's answer with and without them."""

    path: str
    source: str
    label: str
    mark_pixels: int
    marked: bool  # mark_pixels >= MARKED_MIN_PIXELS
    predicted: str  # on the scan as it is
    predicted_unmarked: str  # after the marks were painted out
    predicted_cluttered: str  # with synthetic screen clutter painted on


def add_clutter(gray: np.ndarray, values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``gray`` ``[H, W]`` with one clutter overlay (``[S, S]`` values and coverage from
    :func:`training.augmentation.clutter.clutter_bank`) stretched to its size and painted on."""
    h, w = gray.shape
    values = cv2.resize(values, (w, h), interpolation=cv2.INTER_NEAREST)
    alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.where(alpha > 0, values, gray).astype(gray.dtype)


def measure(
    model,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    input_size: int,
    policy: ResizePolicy,
) -> list[MarkCheck]:
    """Predict every sample as it is, with its marks painted out and with synthetic clutter
    painted on (overlay ``i`` of a fixed bank for the ``i``-th sample); unreadable files are
    skipped with a warning naming the file. ``model.predict`` returns ``probabilities``."""
    values, alpha = clutter_bank(CLUTTER_PROBE_OVERLAYS, CLUTTER_PROBE_SIZE, CLUTTER_PROBE_SEED)
    rows = []
    for i, sample in enumerate(samples):
        try:
            gray = read_scan(sample.path)
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)
            continue
        marks = find_marks(gray)
        k = i % CLUTTER_PROBE_OVERLAYS
        cluttered = add_clutter(gray, values[k, ..., 0], alpha[k, ..., 0])
        batch = make_batch([gray, remove_marks(gray, marks), cluttered], input_size, policy)
        as_is, unmarked, with_clutter = np.argmax(
            model.predict(batch, verbose=0)[PROBABILITIES], axis=1
        )
        rows.append(
            MarkCheck(
                path=str(sample.path),
                source=sample.source,
                label=sample.label,
                mark_pixels=int(marks.sum()),
                marked=bool(marks.sum() >= MARKED_MIN_PIXELS),
                predicted=class_names[int(as_is)],
                predicted_unmarked=class_names[int(unmarked)],
                predicted_cluttered=class_names[int(with_clutter)],
            )
        )
    return rows


def summarize(rows: Sequence[MarkCheck]) -> dict[str, dict[str, float | int | None]]:
    """Overall, per source and per source and class (``"busi/normal"``): accuracy on unmarked
    scans, on marked scans as they are and with their marks removed, how many marked scans
    changed their answer, and how many of all scans changed it when clutter was painted on."""
    groups: dict[str, list[MarkCheck]] = {}
    for row in rows:
        groups.setdefault(row.source, []).append(row)
        groups.setdefault(f"{row.source}/{row.label}", []).append(row)
    groups = {"all": list(rows)} | dict(sorted(groups.items()))

    def accuracy(group: list[MarkCheck], field: str) -> float | None:
        if not group:
            return None
        return float(np.mean([getattr(r, field) == r.label for r in group]))

    summary = {}
    for name, group in groups.items():
        marked = [r for r in group if r.marked]
        unmarked = [r for r in group if not r.marked]
        summary[name] = {
            "n_unmarked": len(unmarked),
            "n_marked": len(marked),
            "accuracy_unmarked": accuracy(unmarked, "predicted"),
            "accuracy_marked": accuracy(marked, "predicted"),
            "accuracy_marked_removed": accuracy(marked, "predicted_unmarked"),
            "changed_by_removal": sum(r.predicted != r.predicted_unmarked for r in marked),
            "accuracy_cluttered": accuracy(group, "predicted_cluttered"),
            "changed_by_clutter": sum(r.predicted != r.predicted_cluttered for r in group),
        }
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _describe(s: dict) -> str:
    return (
        f"unmarked {s['n_unmarked']} scans, accuracy {_fmt(s['accuracy_unmarked'])}; marked "
        f"{s['n_marked']} scans, accuracy {_fmt(s['accuracy_marked'])} as they are, "
        f"{_fmt(s['accuracy_marked_removed'])} with the marks removed "
        f"({s['changed_by_removal']} answers changed); clutter painted on changed "
        f"{s['changed_by_clutter']} of {s['n_marked'] + s['n_unmarked']} answers"
    )


main = HeldOutCheck(
    "training.probes.marks", __doc__, MARKS_FILE, measure, summarize, _describe
).main


if __name__ == "__main__":
    sys.exit(main())
