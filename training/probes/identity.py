"""Can a scan's dataset be read from the model's features? A linear probe on held-out scans.

Only BUSI has normal scans, so a model trained on BUSI and BUS-BRA together can profit from
knowing which dataset a scan came from. For every held-out scan of a class that every source has
(benign and malignant), this takes the model's pooled features (the input of its classification
head, averaged over space) and fits a logistic regression that predicts the scan's source; each
scan is scored by a probe that never saw it (5-fold, stratified by source). For scale, the same
probe runs on the scan's pixels (the model's input, shrunk to 16 x 16): the source is visible in
the image itself, through its scanner, frame and crop. Balanced accuracy 0.5 means the features
say nothing of the source. Each run's probe is fitted on that run's own features; several run
folders (the folds of a cross-validation) pool their out-of-fold answers.

examples:
  python -m training.probes.identity runs/lite0
  python -m training.probes.identity runs/cv/cv/fold*    # every scan, by the fold that held it out
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
from training.data.datasets import Sample, read_scan
from training.probes.checks import HeldOutCheck

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.json"
PROBE_FOLDS = 5
PIXEL_SIDE = 16


@dataclass(frozen=True)
class SourceGuess:
    """One held-out scan: its source, and what the probes made of it."""

    path: str
    source: str
    label: str
    predicted: str
    from_features: str  # the features probe's guess at the source
    from_pixels: str  # the pixels probe's guess


def probe_guesses(features: np.ndarray, sources: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold source guesses of a standardized logistic regression on ``features``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(PROBE_FOLDS, int(np.unique(sources, return_counts=True)[1].min()))
    if len(np.unique(sources)) < 2 or folds < 2:
        raise ValueError(
            "The probe needs at least two sources with two or more scans each. "
            f"Got {dict(zip(*np.unique(sources, return_counts=True), strict=True))} instead."
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(probe, features, sources, cv=split)


def measure(
    model,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    input_size: int,
    policy: ResizePolicy,
) -> list[SourceGuess]:
    """Probe one run's model on its held-out scans of the classes every source has; unreadable
    files are skipped with a warning naming the file."""
    import keras

    shared = set.intersection(
        *(
            {s.label for s in samples if s.source == source}
            for source in {s.source for s in samples}
        )
    )
    kept, images = [], []
    for sample in samples:
        if sample.label not in shared:
            continue
        try:
            images.append(make_batch([read_scan(sample.path)], input_size, policy)[0])
        except InputError as exc:
            log.warning("%s: skipped: %s", exc.path, exc.reason)
            continue
        kept.append(sample)
    batch = np.stack(images)
    both = keras.Model(
        model.input, [model.get_layer("head").input, model.get_layer(PROBABILITIES).output]
    )
    feature_maps, probabilities = both.predict(batch, batch_size=32, verbose=0)
    features, predicted = feature_maps.mean(axis=(1, 2)), probabilities.argmax(1)
    pixels = np.stack(
        [
            cv2.resize(image, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA)
            for image in batch
        ]
    ).reshape(len(batch), -1)
    sources = np.array([s.source for s in kept])
    from_features = probe_guesses(features, sources)
    from_pixels = probe_guesses(pixels.astype(np.float32), sources)
    return [
        SourceGuess(
            path=str(s.path),
            source=s.source,
            label=s.label,
            predicted=class_names[k],
            from_features=str(f),
            from_pixels=str(p),
        )
        for s, k, f, p in zip(kept, predicted, from_features, from_pixels, strict=True)
    ]


def summarize(rows: Sequence[SourceGuess]) -> dict[str, dict[str, float]]:
    """Overall and per class: scans, and the balanced accuracy (mean recall over sources) of
    the features probe and of the pixels probe."""
    groups: dict[str, list[SourceGuess]] = {"all": list(rows)}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    return {
        name: {
            "n": len(group),
            "features_balanced_accuracy": _balanced_accuracy(group, "from_features"),
            "pixels_balanced_accuracy": _balanced_accuracy(group, "from_pixels"),
        }
        for name, group in groups.items()
    }


def _balanced_accuracy(rows: Sequence[SourceGuess], field: str) -> float:
    sources = sorted({r.source for r in rows})
    recalls = [
        np.mean([getattr(r, field) == source for r in rows if r.source == source])
        for source in sources
    ]
    return float(np.mean(recalls))


def _describe(s: dict) -> str:
    return (
        f"{s['n']} scans; source told apart with balanced accuracy "
        f"{s['features_balanced_accuracy']:.3f} from the model's features, "
        f"{s['pixels_balanced_accuracy']:.3f} from 16x16 pixels (0.5: not at all)"
    )


main = HeldOutCheck(
    "training.probes.identity", __doc__, IDENTITY_FILE, measure, summarize, _describe
).main


if __name__ == "__main__":
    sys.exit(main())
