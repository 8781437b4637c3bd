"""Does the model look at the lesion? Class-activation mass inside the lesion masks of test scans.

Shortcuts such as calipers, burned-in text or one scanner's frame sit outside the lesion: a model
that leans on them puts its activation there. For every held-out benign or malignant scan with a
lesion mask this measures the share of the predicted class's activation map (mapped back onto the
scan, as the runtime's heatmaps are) that falls on the lesion, against the share of the scan the
lesion covers (what an activation spread evenly would score).

examples:
  python -m training.probes.attention runs/lite0
  python -m training.probes.attention runs/lite0 --split val --json attention-val.json
  python -m training.probes.attention runs/cv/cv/fold*    # every scan, by the fold that held it out
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.io.decode import InputError
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import CAM, PROBABILITIES, ResizePolicy
from edge_runtime.postprocess.heatmap import cam_to_heatmap
from training.data.datasets import Sample, read_scan
from training.data.masks import load_lesion_mask
from training.probes.checks import HeldOutCheck

log = logging.getLogger(__name__)
ATTENTION_FILE = "attention.json"


@dataclass(frozen=True)
class LesionAttention:
    """One scan: where the model's evidence lies compared with the lesion."""

    path: str
    source: str
    label: str
    predicted: str
    in_lesion: float  # share of the activation map's mass on lesion pixels
    lesion_area: float  # share of the scan the lesion covers (an even map's score)


def mass_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of ``heatmap``'s mass on the pixels where ``mask`` is set (0 for an empty map)."""
    total = float(heatmap.sum(dtype=np.float64))
    if total <= 0.0:
        return 0.0
    return float(heatmap[mask].sum(dtype=np.float64)) / total


def measure(
    model,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    input_size: int,
    policy: ResizePolicy,
) -> list[LesionAttention]:
    """Measure every sample that has a non-empty lesion mask; unreadable files are skipped
    with a warning naming the file.

    ``model`` is the Keras classifier (its ``predict`` returns ``probabilities`` and ``cam``).
    """
    rows = []
    for sample in samples:
        try:
            gray = read_scan(sample.path)
            lesion = load_lesion_mask(sample.masks, gray.shape)
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)
            continue
        if not lesion.any():
            continue
        outputs = model.predict(make_batch([gray], input_size, policy), verbose=0)
        predicted = int(np.argmax(outputs[PROBABILITIES][0]))
        heat = cam_to_heatmap(outputs[CAM][0, ..., predicted], gray.shape, input_size, policy)
        rows.append(
            LesionAttention(
                path=str(sample.path),
                source=sample.source,
                label=sample.label,
                predicted=class_names[predicted],
                in_lesion=mass_in_mask(heat, lesion),
                lesion_area=float(lesion.mean()),
            )
        )
    return rows


def summarize(rows: Sequence[LesionAttention]) -> dict[str, dict[str, float]]:
    """Per source and overall: scans, mean share of activation on the lesion, mean lesion area,
    and the share of scans whose activation favours the lesion over an even spread."""
    groups: dict[str, list[LesionAttention]] = {"all": list(rows)}
    for row in rows:
        groups.setdefault(row.source, []).append(row)
    return {
        name: {
            "n": len(group),
            "mean_in_lesion": float(np.mean([r.in_lesion for r in group])),
            "mean_lesion_area": float(np.mean([r.lesion_area for r in group])),
            "share_above_even": float(np.mean([r.in_lesion > r.lesion_area for r in group])),
        }
        for name, group in groups.items()
        if group
    }


def _describe(s: dict) -> str:
    return (
        f"{s['n']} scans, {s['mean_in_lesion']:.3f} of the activation on the lesion (lesion "
        f"covers {s['mean_lesion_area']:.3f} of the scan); above an even spread on "
        f"{s['share_above_even']:.3f} of scans"
    )


main = HeldOutCheck(
    "training.probes.attention", __doc__, ATTENTION_FILE, measure, summarize, _describe
).main


if __name__ == "__main__":
    sys.exit(main())
