"""Synthetic ultrasound-like images for tests, smoke training and the README's quick start.

Speckle texture with no lesion (normal), a smooth dark oval (benign) or a dark irregular,
taller-than-wide mass (malignant). Clearly synthetic; never a substitute for real scans.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("normal", "benign", "malignant")


def synthetic_scan(
    label: str, rng: np.random.Generator, size: tuple[int, int] = (160, 200)
) -> np.ndarray:
    """One 2-D uint8 image of the given class (``normal``, ``benign`` or ``malignant``)."""
    return synthetic_scan_and_mask(label, rng, size)[0]


def synthetic_scan_and_mask(
    label: str, rng: np.random.Generator, size: tuple[int, int] = (160, 200)
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`synthetic_scan` and its lesion mask (uint8, 255 on the lesion; all 0 if normal)."""
    h, w = size
    tissue = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 3)
    tissue = 0.35 + 0.5 * (tissue - tissue.min()) / (np.ptp(tissue) + 1e-6)
    depth = np.linspace(1.0, 0.6, h, dtype=np.float32)[:, None]  # attenuation with depth
    image = tissue * depth
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.3, 0.7) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if label == "benign":
        ry, rx = rng.uniform(0.08, 0.13) * h, rng.uniform(0.16, 0.24) * w  # wider than tall
        lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    elif label == "malignant":
        angle = np.arctan2(yy - cy, xx - cx)
        radius = np.hypot((yy - cy) / 1.6, xx - cx)  # taller than wide
        spikes = 1.0 + 0.35 * np.sin(7 * angle + rng.uniform(0, 6.28)) + 0.2 * np.sin(13 * angle)
        lesion = radius < rng.uniform(0.08, 0.12) * w * spikes
    elif label == "normal":
        lesion = np.zeros((h, w), bool)
    else:
        raise ValueError(f"label must be one of {CLASSES}. Got {label!r} instead.")
    image[lesion] *= 0.25
    speckle = rng.rayleigh(0.5, (h, w)).astype(np.float32)
    image = image * speckle
    return np.clip(image * 255, 0, 255).astype(np.uint8), lesion.astype(np.uint8) * 255


def write_synthetic_dataset(
    root: str | Path,
    per_class: int = 30,
    *,
    seed: int = 0,
    size: tuple[int, int] = (160, 200),
    masks: bool = False,
) -> Path:
    """Write ``root/<class>/synthetic-<class>-<i>.png`` for the three classes; returns ``root``.

    With ``masks``, write BUSI's release layout instead: ``root/<class>/<class> (<i>).png`` with
    its lesion mask beside it as ``<class> (<i>)_mask.png``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in CLASSES:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image, lesion = synthetic_scan_and_mask(label, rng, size)
            if not masks:
                cv2.imwrite(str(folder / f"synthetic-{label}-{i:03d}.png"), image)
                continue
            cv2.imwrite(str(folder / f"{label} ({i + 1}).png"), image)
            cv2.imwrite(str(folder / f"{label} ({i + 1})_mask.png"), lesion)
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m training.synthetic OUT [--per-class N]``: write clearly synthetic examples."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Write SYNTHETIC ultrasound-like images (not real scans) as OUT/<class>/*.png.",
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_synthetic_dataset(args.output, args.per_class, seed=args.seed)
    print(f"wrote {3 * args.per_class} synthetic images under {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
