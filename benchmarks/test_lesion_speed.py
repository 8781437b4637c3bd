"""Lesion post-processing speed, and its ratio gate: <= 10% of end-to-end time per scan.

Post-processing is what :func:`edge_runtime.postprocess.lesion.find_lesion` does with one image's
``lesion``
output: map it back onto the full-size frame (letterbox undone), threshold, keep the largest
region, measure it (contour, convex hull, diameter in mm) and fill the full-size mask. It is timed
on realistic maps: the lesion output's shape for the model's input at stride 4, made from the
masks of synthetic full-size 606 x 856 scans (a lesion in two of three, blurred like a network's
probabilities, with low noise elsewhere), against classifying those very scans end to end with
the INT8 model. The bundled model has no lesion output yet, so its end-to-end time does not
include the post-processing: the share is measured against the smaller total, which errs on the
strict side. (INT8 with against without the lesion output is gated once a model has one.)
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from benchmarks.timing import interleaved
from edge_runtime.classifier import Classifier
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.contract import ModelSpec, Precision
from edge_runtime.postprocess.lesion import find_lesion

MAX_LESION_SHARE = 0.10
FRAME = (606, 856)  # rows, columns: a full-size BUSI-like scan
N_SCANS = 24
STRIDE = 4
BATCH = 4  # as the other end-to-end gates (test_speed.py)
SPACING_MM = (0.1, 0.1)  # so the diameter in mm is part of the timed work


@pytest.fixture(scope="module")
def full_size_scans(tmp_path_factory) -> list:
    """``N_SCANS`` synthetic 606 x 856 PNG scans and their lesion masks."""
    from training.synthetic import synthetic_scan_and_mask

    folder = tmp_path_factory.mktemp("full_size")
    rng = np.random.default_rng(0)
    scans = []
    for i in range(N_SCANS):
        label = ("benign", "malignant", "normal")[i % 3]
        image, mask = synthetic_scan_and_mask(label, rng, size=FRAME)
        path = folder / f"scan-{i:02d}.png"
        cv2.imwrite(str(path), image)
        scans.append((path, mask))
    return scans


def _lesion_maps(masks: list[np.ndarray], spec: ModelSpec) -> list[np.ndarray]:
    """What a lesion output at stride 4 looks like for these masks: [S/4, S/4] probabilities."""
    rng = np.random.default_rng(1)
    side = spec.input_size // STRIDE
    maps = []
    for mask in masks:
        square = fit_to_square(mask, spec.input_size, spec.resize_policy)
        cells = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA) / 255.0
        blurred = cv2.GaussianBlur(cells.astype(np.float32), (0, 0), 1.0)
        noise = rng.uniform(0.0, 0.15, blurred.shape).astype(np.float32)
        maps.append(np.clip(blurred + noise, 0.0, 1.0))
    return maps


def _postprocess(maps: list[np.ndarray], spec: ModelSpec):
    def run() -> list:
        return [
            find_lesion(
                lesion_map,
                FRAME,
                input_size=spec.input_size,
                policy=spec.resize_policy,
                threshold=spec.lesion_threshold,
                pixel_spacing_mm=SPACING_MM,
                with_mask=True,
            )
            for lesion_map in maps
        ]

    return run


def test_lesion_postprocess(benchmark, models, full_size_scans):
    """find_lesion on the lesion maps of the full-size scans, mask included."""
    spec = models[Precision.INT8].spec
    maps = _lesion_maps([mask for _, mask in full_size_scans], spec)
    benchmark.extra_info["images_per_call"] = len(maps)
    found = benchmark(_postprocess(maps, spec))
    lesions = [lesion for lesion, _ in found]
    assert sum(lesion is not None for lesion in lesions) == 2 * N_SCANS // 3  # benign, malignant


def test_gate_lesion_postprocessing_share(model_files, models, full_size_scans, ratio_log):
    """find_lesion over every scan's lesion map against classifying the same scans end to end
    (decode in the runtime's thread pool, INT8, batches of 4, one inference thread)."""
    spec = models[Precision.INT8].spec
    paths = [path for path, _ in full_size_scans]
    post = _postprocess(_lesion_maps([mask for _, mask in full_size_scans], spec), spec)
    with Classifier.from_path(model_files[Precision.INT8], threads=1, batch_size=BATCH) as clf:
        t = interleaved({"end_to_end": lambda: clf.classify(paths), "lesion": post}, rounds=12)
    share = t["lesion"].median / t["end_to_end"].median
    ratio_log["lesion_postprocessing_share_of_end_to_end"] = {
        "value": round(share, 3),
        "gate": MAX_LESION_SHARE,
        "bound": "<=",
        **{f"{name}_median_ms": round(x.median * 1e3, 3) for name, x in t.items()},
    }
    assert share <= MAX_LESION_SHARE, (
        f"lesion post-processing takes {share:.1%} of end-to-end time ({len(paths)} scans of "
        f"{FRAME[1]}x{FRAME[0]}: {t['lesion'].median * 1e3:.1f} ms against "
        f"{t['end_to_end'].median * 1e3:.1f} ms end to end); the gate is <= {MAX_LESION_SHARE:.0%}"
    )
