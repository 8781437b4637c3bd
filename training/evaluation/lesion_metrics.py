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

from edge_runtime.postprocess.decision import lesion_verdict
from edge_runtime.postprocess.lesion import find_lesion

POINTING_DILATION = 0.05  # of the square's side: the true mask is dilated by this for pointing
LESION_THRESHOLDS = tuple(round(0.30 + 0.05 * k, 2) for k in range(14))  # 0.30, 0.35, ..., 0.95
LESION_MIN_AREAS = (0.0, 0.0025, 0.005, 0.01)  # shares of the square input
# with the classifier gate: 0 (its call alone), then calibrated P(normal) levels that also gate
NORMAL_GATES = (0.0, 0.25, 0.15, 0.10)
DICE_BUDGET = 0.03  # validation Dice a rule may give up, against the best, to spare normal scans
# the most of the validation lesion scans a rule may call normal (no lesion found): missed
# lesions are the costliest error after missed cancers (issue 33)
MAX_LESION_CALLED_NORMAL = 0.05


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


@dataclass(frozen=True)
class LesionRule:
    """How a lesion model decides where a lesion is, as the runtime applies it: pixels at or
    above ``threshold``, the largest 8-connected region, none when that region covers less than
    ``min_area`` of the square input and, with ``classifier_gate``, none where the classifier
    calls the scan normal or (``normal_gate`` > 0) gives normal at least that calibrated
    probability (the ``lesion_head_or_classifier`` normal rule; else ``lesion_head``).
    """

    threshold: float = 0.5
    min_area: float = 0.0
    classifier_gate: bool = False
    normal_gate: float = 0.0

    @property
    def normal_rule(self) -> str:
        """The model's ``edge_classify.normal_rule`` (``NormalRule``'s value)."""
        return "lesion_head_or_classifier" if self.classifier_gate else "lesion_head"


def predicted_mask(
    lesion_map: np.ndarray, size: int, threshold: float, min_area: float = 0.0
) -> np.ndarray:
    """A lesion map ``[h, w]`` -> the bool ``[size, size]`` outline in the model's square input,
    by the runtime's own post-processing (:func:`edge_runtime.postprocess.lesion.find_lesion`:
    bilinear
    upsampling, threshold, largest 8-connected component, at least ``min_area`` of the square;
    all False when nothing passes)."""
    _, mask = find_lesion(
        lesion_map.astype(np.float32),
        (size, size),
        input_size=size,
        threshold=threshold,
        min_area=min_area,
    )
    return mask > 0


def gated(rule: LesionRule, probabilities: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Bool ``[N]``: the scans ``rule``'s classifier gate calls normal, from the classifier's
    calibrated ``probabilities`` ``[N, K]``: the runtime's own gate
    (``edge_runtime.postprocess.decision.lesion_verdict``) before an operating point exists. The
    exported
    model's malignant operating point then exempts the scans it calls malignant, so the runtime
    can draw on a few more scans than training measured (the card's "as the runtime calls them"
    counts the runtime's calls)."""
    none = np.zeros(len(probabilities), bool)
    if not rule.classifier_gate:
        return none
    kept = lesion_verdict(
        rule.normal_rule, ~none, probabilities, class_names, 0.0, rule.normal_gate
    )
    return none if kept is None else ~kept


def rule_masks(
    lesion_maps: np.ndarray,
    size: int,
    rule: LesionRule,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> np.ndarray:
    """Bool ``[N, size, size]``: each scan's outline by ``rule``, emptied where its gate calls
    the scan normal (:func:`gated`; ``probabilities``: calibrated ``[N, K]``)."""
    masks = np.stack(
        [predicted_mask(m[:, :, 0], size, rule.threshold, rule.min_area) for m in lesion_maps]
    )
    masks[gated(rule, probabilities, class_names)] = False
    return masks


def dice(truth: np.ndarray, guess: np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|) of two bool masks of one shape; the caller makes
    sure ``truth`` is not empty."""
    return float(2 * np.logical_and(truth, guess).sum() / (truth.sum() + guess.sum()))


@dataclass(frozen=True)
class RuleTrial:
    """One candidate lesion rule on the validation split. ``dice``: mean over its lesion scans
    (a missed lesion counts 0); ``normal_with_lesion``: share of its normal scans given any
    lesion pixel; ``lesion_called_normal``: share of its benign and malignant scans (masked or
    not) given none, so called normal; None where the split has no such scans."""

    threshold: float
    min_area: float
    classifier_gate: bool
    normal_gate: float
    dice: float | None
    normal_with_lesion: float | None
    lesion_called_normal: float | None = None


def choose_lesion_rule(
    true_masks: np.ndarray,
    known: np.ndarray,
    lesion_maps: np.ndarray,
    normal: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    default: LesionRule,
    *,
    thresholds: Sequence[float] = LESION_THRESHOLDS,
    min_areas: Sequence[float] = LESION_MIN_AREAS,
    normal_gates: Sequence[float] = NORMAL_GATES,
    dice_budget: float = DICE_BUDGET,
    max_lesion_called_normal: float = MAX_LESION_CALLED_NORMAL,
) -> tuple[LesionRule, list[RuleTrial]]:
    """The lesion rule, chosen on validation scans (docs/prereg/2026-12-02h-*.md).

    Every combination of ``thresholds``, ``min_areas`` and the classifier gate (off, or on at
    each of ``normal_gates``) is tried. A lesion model decides "normal" by whether a lesion is
    found, so the rule sets that too, and the choice goes in three steps:

    1. only rules that call at most ``max_lesion_called_normal`` of the benign and malignant
       scans normal (when none does, those that call the fewest);
    2. of those, the ones whose mean Dice over the masked lesion scans is at least their best
       one's minus ``dice_budget``;
    3. of those, the one that draws a lesion on the fewest normal scans (ties: the higher Dice,
       then the earlier in the grid: lower threshold, smaller area, gate off, then the gate's
       levels in order).

    Without validation lesion scans, ``default``.

    Args:
        true_masks: uint8 ``[N, S, S, 1]`` (> 127 is lesion), fitted like the scans.
        known: bool ``[N]``: whether the true mask is known.
        lesion_maps: the model's ``lesion`` output ``[N, h, w, 1]``.
        normal: bool ``[N]``: the normal scans.
        probabilities: the classifier's calibrated ``[N, K]``.
        class_names: its classes.
        default: the rule when no validation scan has a known lesion.
        thresholds: thresholds to try, each in (0, 1).
        min_areas: minimum lesion areas to try, shares of the square in [0, 1).
        normal_gates: the gate's P(normal) levels to try (0: the classifier's call alone).
        dice_budget: the Dice a rule may give up against the best.
        max_lesion_called_normal: the share of lesion scans a rule may call normal.

    Returns:
        ``(rule, trials)``: the choice and every candidate's validation numbers.
    """
    size = true_masks.shape[1]
    truth = (true_masks[:, :, :, 0] > 127) & known[:, None, None]
    lesion = np.flatnonzero(~normal & truth.reshape(len(known), -1).any(1))
    normals = np.flatnonzero(normal)
    lesion_scans = np.flatnonzero(~normal)  # with or without a known mask
    if lesion.size == 0:
        return default, []
    trials = []
    gates = [LesionRule(classifier_gate=False)] + [
        LesionRule(classifier_gate=True, normal_gate=float(q)) for q in normal_gates
    ]
    for threshold in thresholds:
        base = rule_masks(lesion_maps, size, LesionRule(threshold), probabilities, class_names)
        areas = base.reshape(len(base), -1).mean(axis=1)
        for min_area in min_areas:
            for gate in gates:
                kept = (areas >= min_area) & ~gated(gate, probabilities, class_names)
                overlaps = [dice(truth[i], base[i] & kept[i]) for i in lesion]
                drawn = (areas > 0) & kept
                trials.append(
                    RuleTrial(
                        threshold=float(threshold),
                        min_area=float(min_area),
                        classifier_gate=gate.classifier_gate,
                        normal_gate=gate.normal_gate,
                        dice=float(np.mean(overlaps)),
                        normal_with_lesion=float(np.mean(drawn[normals])) if normals.size else None,
                        lesion_called_normal=float(np.mean(~drawn[lesion_scans])),
                    )
                )
    fewest_missed = min(t.lesion_called_normal for t in trials)
    missed_cap = max(max_lesion_called_normal, fewest_missed)
    sparing = [t for t in trials if t.lesion_called_normal <= missed_cap + 1e-12]
    floor = max(t.dice for t in sparing) - dice_budget
    allowed = [t for t in sparing if t.dice >= floor - 1e-12]
    best = min(
        allowed,
        key=lambda t: (t.normal_with_lesion or 0.0, -t.dice),
    )
    rule = LesionRule(best.threshold, best.min_area, best.classifier_gate, best.normal_gate)
    return rule, trials


def score_scans(
    true_masks: np.ndarray,
    known: np.ndarray,
    lesion_maps: np.ndarray,
    cams: np.ndarray,
    labels: Sequence[str],
    sources: Sequence[str],
    devices: Sequence[str],
    rule: LesionRule,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> list[LesionScore]:
    """Score every held-out scan.

    Args:
        true_masks: uint8 ``[N, S, S, 1]`` (> 127 is lesion), fitted like the scans.
        known: bool ``[N]``: whether the true mask is known (normal scans: empty).
        lesion_maps: the model's ``lesion`` output ``[N, h, w, 1]``.
        cams: the class activation map of each scan's predicted class ``[N, h', w']``.
        labels, sources, devices: per scan.
        rule: the lesion rule (:class:`LesionRule`).
        probabilities: the classifier's calibrated ``[N, K]``.
        class_names: its classes.
    """
    size = true_masks.shape[1]
    radius = max(1, round(POINTING_DILATION * size))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    guesses = rule_masks(lesion_maps, size, rule, probabilities, class_names)
    scores = []
    for i, label in enumerate(labels):
        truth = true_masks[i, :, :, 0] > 127
        guess = guesses[i]
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
    the lesion map (share of lesion scans hit), on normal scans the share with any lesion
    pixel, and on benign and malignant scans (masked or not) the share with none: lesion scans
    called normal."""

    def block(rows: Sequence[LesionScore]) -> dict:
        lesion = [r for r in rows if r.dice is not None]
        normal = [r for r in rows if r.label == "normal"]
        return {
            "dice": mean_with_interval([r.dice for r in lesion]),
            "iou": mean_with_interval([r.iou for r in lesion]),
            "pointing_cam": mean_with_interval([float(r.cam_hit) for r in lesion]),
            "pointing_lesion_map": mean_with_interval([float(r.lesion_map_hit) for r in lesion]),
            "normal_with_lesion": mean_with_interval([float(r.predicted_area > 0) for r in normal]),
            "lesion_called_normal": mean_with_interval(
                [float(r.predicted_area == 0) for r in rows if r.label != "normal"]
            ),
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
