"""How well a model finds the lesion: Dice and IoU of its outline, empty outlines on normal
scans, and the pointing game of its class activation map.

Everything is measured in the model's square input (the letterboxed scan at the model's input
side), where the true mask is fitted exactly like the scan; the lesion output is upsampled to it
bilinearly, thresholded at the model's decision threshold, and cut to its largest connected
component, as the runtime does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from edge_runtime.lesion import find_lesion

POINTING_DILATION = 0.05  # of the square's side: the true mask is dilated by this for pointing
LESION_THRESHOLDS = tuple(round(0.30 + 0.05 * k, 2) for k in range(9))  # 0.30, 0.35, ..., 0.70
MAX_NORMAL_WITH_LESION = 0.15  # share of validation normal scans a lesion may be drawn on


@dataclass(frozen=True)
class LesionScore:
    """One held-out scan. ``dice``/``iou`` are None where the scan has no known lesion mask."""

    label: str
    source: str
    device: str
    dice: float | None
    iou: float | None
    predicted_area: float  # share of the square called lesion (largest component)
    max_probability: float  # the lesion map's largest value
    cam_hit: bool | None  # the CAM's hottest point lies in the dilated true mask (lesion scans)
    lesion_map_hit: bool | None  # the lesion map's hottest point does


def predicted_mask(lesion_map: np.ndarray, size: int, threshold: float) -> np.ndarray:
    """A lesion map ``[h, w]`` -> the bool ``[size, size]`` outline in the model's square input,
    by the runtime's own post-processing (:func:`edge_runtime.lesion.find_lesion`: bilinear
    upsampling, threshold, largest 8-connected component; all False when nothing passes)."""
    _, mask = find_lesion(
        lesion_map.astype(np.float32), (size, size), input_size=size, threshold=threshold
    )
    return mask > 0


def dice(truth: np.ndarray, guess: np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|) of two bool masks of one shape; the caller makes
    sure ``truth`` is not empty."""
    return float(2 * np.logical_and(truth, guess).sum() / (truth.sum() + guess.sum()))


@dataclass(frozen=True)
class ThresholdTrial:
    """One candidate lesion threshold on the validation split. ``dice``: mean over its lesion
    scans (a missed lesion counts 0); ``normal_with_lesion``: share of its normal scans given
    any lesion pixel; None where the split has no such scans."""

    threshold: float
    dice: float | None
    normal_with_lesion: float | None


def choose_lesion_threshold(
    true_masks: np.ndarray,
    known: np.ndarray,
    lesion_maps: np.ndarray,
    normal: np.ndarray,
    default: float,
    candidates: Sequence[float] = LESION_THRESHOLDS,
    max_normal_with_lesion: float = MAX_NORMAL_WITH_LESION,
) -> tuple[float, list[ThresholdTrial]]:
    """The lesion decision threshold, chosen on validation scans.

    Of ``candidates``, the one with the highest mean Dice over the lesion scans among those that
    draw a lesion on at most ``max_normal_with_lesion`` of the normal scans; when none does, the
    one that draws on the fewest (ties: the higher Dice). Without validation lesion scans,
    ``default``. A lesion model decides "normal" by whether a
    lesion is found, so the threshold sets that rule too.

    Args:
        true_masks: uint8 ``[N, S, S, 1]`` (> 127 is lesion), fitted like the scans.
        known: bool ``[N]``: whether the true mask is known.
        lesion_maps: the model's ``lesion`` output ``[N, h, w, 1]``.
        normal: bool ``[N]``: the normal scans.
        default: the threshold when no validation scan has a known lesion.
        candidates: thresholds to try, each in (0, 1).
        max_normal_with_lesion: the share of normal scans a lesion may be drawn on.

    Returns:
        ``(threshold, trials)``: the choice and every candidate's validation numbers.
    """
    size = true_masks.shape[1]
    lesion = np.flatnonzero(known & ~normal & (true_masks.reshape(len(known), -1) > 127).any(1))
    normals = np.flatnonzero(normal)
    if lesion.size == 0:
        return default, []
    trials = []
    for threshold in candidates:
        overlaps = [
            dice(
                true_masks[i, :, :, 0] > 127,
                predicted_mask(lesion_maps[i, :, :, 0], size, threshold),
            )
            for i in lesion
        ]
        drawn = [predicted_mask(lesion_maps[i, :, :, 0], size, threshold).any() for i in normals]
        trials.append(
            ThresholdTrial(
                threshold=float(threshold),
                dice=float(np.mean(overlaps)),
                normal_with_lesion=float(np.mean(drawn)) if drawn else None,
            )
        )
    share = [0.0 if t.normal_with_lesion is None else t.normal_with_lesion for t in trials]
    allowed = [t for t, s in zip(trials, share, strict=True) if s <= max_normal_with_lesion]
    if allowed:
        best = max(allowed, key=lambda t: t.dice)
    else:
        best = min(zip(trials, share, strict=True), key=lambda ts: (ts[1], -ts[0].dice))[0]
    return best.threshold, trials


def score_scans(
    true_masks: np.ndarray,
    known: np.ndarray,
    lesion_maps: np.ndarray,
    cams: np.ndarray,
    labels: Sequence[str],
    sources: Sequence[str],
    devices: Sequence[str],
    threshold: float,
) -> list[LesionScore]:
    """Score every held-out scan.

    Args:
        true_masks: uint8 ``[N, S, S, 1]`` (> 127 is lesion), fitted like the scans.
        known: bool ``[N]``: whether the true mask is known (normal scans: empty).
        lesion_maps: the model's ``lesion`` output ``[N, h, w, 1]``.
        cams: the class activation map of each scan's predicted class ``[N, h', w']``.
        labels, sources, devices: per scan.
        threshold: the lesion decision threshold.
    """
    size = true_masks.shape[1]
    radius = max(1, round(POINTING_DILATION * size))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    scores = []
    for i, label in enumerate(labels):
        truth = true_masks[i, :, :, 0] > 127
        guess = predicted_mask(lesion_maps[i, :, :, 0], size, threshold)
        lesion = bool(known[i]) and truth.any()
        overlap = iou = cam_hit = map_hit = None
        if lesion:
            overlap = dice(truth, guess)
            iou = float(np.logical_and(truth, guess).sum()) / float(
                np.logical_or(truth, guess).sum()
            )
            target = cv2.dilate(truth.astype(np.uint8), kernel) > 0
            cam_hit = _hottest_in(cams[i], target)
            map_hit = _hottest_in(lesion_maps[i, :, :, 0], target)
        scores.append(
            LesionScore(
                label=label,
                source=sources[i],
                device=devices[i],
                dice=overlap,
                iou=iou,
                predicted_area=float(guess.mean()),
                max_probability=float(lesion_maps[i].max()),
                cam_hit=cam_hit,
                lesion_map_hit=map_hit,
            )
        )
    return scores


def _hottest_in(heat: np.ndarray, target: np.ndarray) -> bool:
    size = target.shape[0]
    up = cv2.resize(heat.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    return bool(target[y, x])


def mean_with_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% percentile-bootstrap interval of ``values`` (``n`` scans)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(v.size)}


def summarize(scores: Sequence[LesionScore]) -> dict:
    """``metrics.json``'s ``lesion`` entry: overall, per source and per ``source:device``:
    Dice and IoU on lesion scans (mean, bootstrap interval), the pointing game of the CAM and of
    the lesion map (share of lesion scans hit), and on normal scans the share with any lesion
    pixel."""

    def block(rows: Sequence[LesionScore]) -> dict:
        lesion = [r for r in rows if r.dice is not None]
        normal = [r for r in rows if r.label == "normal"]
        return {
            "dice": mean_with_interval([r.dice for r in lesion]),
            "iou": mean_with_interval([r.iou for r in lesion]),
            "pointing_cam": mean_with_interval([float(r.cam_hit) for r in lesion]),
            "pointing_lesion_map": mean_with_interval([float(r.lesion_map_hit) for r in lesion]),
            "normal_with_lesion": mean_with_interval([float(r.predicted_area > 0) for r in normal]),
        }

    report = {"all": block(scores)}
    report["by_source"] = {
        s: block([r for r in scores if r.source == s]) for s in sorted({r.source for r in scores})
    }
    report["by_device"] = {
        f"{s}:{d}": block([r for r in scores if (r.source, r.device) == (s, d)])
        for s, d in sorted({(r.source, r.device) for r in scores})
        if d
    }
    return report


def to_rows(scores: Sequence[LesionScore], paths: Sequence[str]) -> list[Mapping]:
    """Rows for ``lesion.csv``: the path and every field of each score."""
    return [{"path": p, **asdict(s)} for p, s in zip(paths, scores, strict=True)]


def read_scores(paths: Sequence) -> list[LesionScore]:
    """Read ``lesion.csv`` files (e.g. every fold's) back into scores."""
    import csv

    def opt(value: str, kind):
        return None if value in ("", "None") else kind(value)

    scores = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                scores.append(
                    LesionScore(
                        label=row["label"],
                        source=row["source"],
                        device=row["device"],
                        dice=opt(row["dice"], float),
                        iou=opt(row["iou"], float),
                        predicted_area=float(row["predicted_area"]),
                        max_probability=float(row["max_probability"]),
                        cam_hit=opt(row["cam_hit"], lambda v: v == "True"),
                        lesion_map_hit=opt(row["lesion_map_hit"], lambda v: v == "True"),
                    )
                )
    return scores
