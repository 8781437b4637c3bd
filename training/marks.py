"""Burned-in marks (calipers, measurement lines, text) and whether the model leans on them.

Sonographers leave calipers around lesions they measure and type labels such as "RT UOQ" onto the
scan; a model can learn that a measured scan is a lesion scan. For every held-out scan this finds
the marks (thin strokes much brighter than their surroundings), paints them out with OpenCV's
inpainting, and compares the predictions: on scans without marks, on marked scans as they are,
and on the same scans with their marks removed.

Several run folders are pooled: the folds of a cross-validation hold every scan out once.

examples:
  python -m training.marks runs/lite0
  python -m training.marks runs/lite0 --split val --json marks-val.json
  python -m training.marks runs/cv/cv/fold*          # every scan, each by the fold that held it out
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.contract import PROBABILITIES, ResizePolicy
from edge_runtime.decode import InputError, load_gray
from edge_runtime.preprocess import make_batch
from training.attention import split_samples
from training.datasets import Sample
from training.runfolder import MODEL_FILE, RunInfo

log = logging.getLogger(__name__)
MARKS_FILE = "marks.json"
STROKE_WIDTH = 5  # marks are thinner than this (pixels): a white top-hat of this size keeps them
STROKE_CONTRAST = 100  # gray levels above the top-hat's opening
STROKE_MIN_GRAY = 200
RIM_CONTRAST = 40  # fainter stroke pixels joined to a mark are painted out with it
# Scans with at least this many stroke pixels count as marked. Chosen on 40 BUSI scans labelled
# by eye (16 with calipers or text): it misplaced two of them.
MARKED_MIN_PIXELS = 130


@dataclass(frozen=True)
class MarkCheck:
    """One scan: its marks and the model's answer with and without them."""

    path: str
    source: str
    label: str
    mark_pixels: int
    predicted: str  # on the scan as it is
    predicted_unmarked: str  # after the marks were painted out

    @property
    def marked(self) -> bool:
        return self.mark_pixels >= MARKED_MIN_PIXELS


def find_marks(gray: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` mask of thin bright strokes: the pixels of calipers, dotted
    measurement lines and burned-in text (and, rarely, a fleck of bright speckle)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_WIDTH, STROKE_WIDTH))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    return (tophat > STROKE_CONTRAST) & (gray >= STROKE_MIN_GRAY)


def remove_marks(gray: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """``gray`` with its ``marks`` filled in from their surroundings (Telea inpainting).

    What is painted out is every faint stroke (top-hat above ``RIM_CONTRAST``) connected to a
    mark pixel, grown by one pixel: the parts of a caliper that cross bright tissue and the
    anti-aliased rims of text.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_WIDTH, STROKE_WIDTH))
    faint = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel) > RIM_CONTRAST
    _, labels = cv2.connectedComponents((faint | marks).astype(np.uint8), connectivity=8)
    touched = np.unique(labels[marks])
    paint = np.isin(labels, touched[touched > 0]).astype(np.uint8)
    grown = cv2.dilate(paint, np.ones((3, 3), np.uint8))
    return cv2.inpaint(gray, grown, 3, cv2.INPAINT_TELEA)


def measure(
    model,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    input_size: int,
    policy: ResizePolicy,
) -> list[MarkCheck]:
    """Predict every sample as it is and with its marks painted out; unreadable files are
    skipped with a warning naming the file. ``model.predict`` returns ``probabilities``."""
    rows = []
    for sample in samples:
        try:
            gray = load_gray(sample.path)
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)
            continue
        marks = find_marks(gray)
        batch = make_batch([gray, remove_marks(gray, marks)], input_size, policy)
        as_is, unmarked = np.argmax(model.predict(batch, verbose=0)[PROBABILITIES], axis=1)
        rows.append(
            MarkCheck(
                path=str(sample.path),
                source=sample.source,
                label=sample.label,
                mark_pixels=int(marks.sum()),
                predicted=class_names[int(as_is)],
                predicted_unmarked=class_names[int(unmarked)],
            )
        )
    return rows


def summarize(rows: Sequence[MarkCheck]) -> dict[str, dict[str, float | int | None]]:
    """Overall, per source and per source and class (``"busi/normal"``): accuracy on unmarked
    scans, on marked scans as they are and with their marks removed, and how many marked scans
    changed their answer."""
    groups: dict[str, list[MarkCheck]] = {"all": list(rows)}
    for row in rows:
        groups.setdefault(row.source, []).append(row)
    for row in rows:
        groups.setdefault(f"{row.source}/{row.label}", []).append(row)

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
        }
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.marks",
        description="Accuracy with and without burned-in marks, on a run's held-out scans.",
        epilog="examples:" + __doc__.split("examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="edge-train run folders"
    )
    parser.add_argument("--split", default="test", help="which split to measure (default test)")
    parser.add_argument(
        "--json",
        type=Path,
        help=f"where to write (default RUN_DIR/{MARKS_FILE}; for several, in their parent)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = [(RunInfo.read(d), split_samples(d, args.split)) for d in args.run_dirs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"marks: error: {exc}", file=sys.stderr)
        return 2
    from training.model import load_classifier

    rows = []
    for run_dir, (info, samples) in zip(args.run_dirs, runs, strict=True):
        model = load_classifier(run_dir / MODEL_FILE)
        policy = ResizePolicy(info.resize_policy)
        rows += measure(model, samples, info.class_names, info.input_size, policy)
    summary = summarize(rows)
    home = args.run_dirs[0] if len(args.run_dirs) == 1 else Path(os.path.commonpath(args.run_dirs))
    target = args.json or home / MARKS_FILE
    report = {
        "split": args.split,
        "runs": [str(d) for d in args.run_dirs],
        "marked_min_pixels": MARKED_MIN_PIXELS,
        "summary": summary,
        "scans": [asdict(r) | {"marked": r.marked} for r in rows],
    }
    target.write_text(json.dumps(report, indent=2) + "\n")
    for name, s in summary.items():
        print(
            f"{name}: unmarked {s['n_unmarked']} scans, accuracy {_fmt(s['accuracy_unmarked'])}; "
            f"marked {s['n_marked']} scans, accuracy {_fmt(s['accuracy_marked'])} as they are, "
            f"{_fmt(s['accuracy_marked_removed'])} with the marks removed "
            f"({s['changed_by_removal']} answers changed)"
        )
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
