"""Duplicate grouping: shifted, cropped and rescaled copies, unrelated images, real BUSI."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data.datasets import Sample, discover_all
from training.data.dedup import DedupOptions, group_duplicates


def _scan(seed: int, size: int = 360) -> np.ndarray:
    """A speckled, ultrasound-like image with bright and dark blobs and layered tissue lines."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 70.0)
    for _ in range(12):
        y = int(rng.integers(0, size))
        image[max(0, y - 3) : y + 3, :] += rng.uniform(20, 50)
    for _ in range(40):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(5, 40)), int(rng.integers(5, 25)))
        value = float(rng.uniform(-60, 90))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, value, -1)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)
    image *= rng.gamma(4.0, 0.25, image.shape)  # multiplicative speckle
    return np.clip(image, 0, 255).astype(np.uint8)


def _samples(tmp_path: Path, images: dict[str, np.ndarray]) -> list[Sample]:
    samples = []
    for name, image in images.items():
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), image)
        samples.append(Sample(path=path, label="benign", source="test"))
    return samples


def test_shifted_cropped_and_rescaled_copies_are_grouped_and_others_are_not(
    tmp_path: Path,
) -> None:
    base = _scan(0)
    images = {
        "original": base,
        "shifted": np.pad(base, ((25, 0), (40, 0)))[:360, :360],
        "cropped": base[30:300, 50:340],
        "rescaled": cv2.resize(base[20:, :], None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA),
        **{f"other{i}": _scan(i) for i in range(1, 6)},
    }
    report = group_duplicates(_samples(tmp_path, images))
    groups = dict(zip(images, report.groups, strict=True))
    assert groups["shifted"] == groups["cropped"] == groups["rescaled"] == groups["original"]
    assert len({groups[f"other{i}"] for i in range(1, 6)} | {groups["original"]}) == 6
    assert not report.conflicts


def test_mirrored_copies_are_grouped_unless_mirror_matching_is_off(tmp_path: Path) -> None:
    base = _scan(11)
    images = {
        "original": base,
        "mirrored": base[:, ::-1],
        "mirrored-cropped": base[20:330, ::-1][:, 15:300],
        **{f"other{i}": _scan(i) for i in range(12, 16)},
    }
    samples = _samples(tmp_path, images)
    report = group_duplicates(samples)
    groups = dict(zip(images, report.groups, strict=True))
    assert groups["original"] == groups["mirrored"] == groups["mirrored-cropped"]
    assert len(set(report.groups)) == 5
    assert {p.method for p in report.pairs} <= {"orb", "orb-mirrored", "phash", "phash-mirrored"}
    assert any(p.method.endswith("-mirrored") for p in report.pairs)
    plain = group_duplicates(samples, DedupOptions(mirrored=False))
    assert len(set(plain.groups)) == 6  # the two mirrored copies match each other only


def test_conflicting_labels_and_shared_patients_are_reported_in_csv(tmp_path: Path) -> None:
    base = _scan(7)
    samples = _samples(tmp_path, {"a": base, "b": base.copy(), "c": _scan(8), "d": _scan(9)})
    samples[1] = Sample(samples[1].path, "malignant", "test")
    samples[2] = Sample(samples[2].path, "benign", "test", patient="test:p")
    samples[3] = Sample(samples[3].path, "benign", "test", patient="test:p")
    report = group_duplicates(samples)
    assert report.groups[0] == report.groups[1] and report.groups[2] == report.groups[3]
    assert report.groups[0] != report.groups[2]
    assert set(report.conflicts) == {report.groups[0]}
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert sorted(r["conflicted"] for r in rows) == ["0", "0", "1", "1"]
    assert set(rows[0]) == {"group", "path", "label", "source", "patient", "conflicted"}


def test_unreadable_image_stays_alone(tmp_path: Path) -> None:
    samples = _samples(tmp_path, {"a": _scan(1)})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = group_duplicates([*samples, Sample(broken, "benign", "test")])
    assert len(set(report.groups)) == 2


@pytest.mark.realdata
def test_real_busi_known_label_conflicts_are_found(busi_root: Path) -> None:
    samples = discover_all([busi_root]).samples
    report = group_duplicates(samples)
    group_of = {s.path.name: g for s, g in zip(samples, report.groups, strict=True)}
    for benign, malignant in ((131, 51), (164, 52)):  # (433, 145) is not in the shared subset
        group = group_of[f"benign ({benign}).png"]
        assert group == group_of[f"malignant ({malignant}).png"]
        assert group in report.conflicts
    assert max(report.group_sizes().values()) <= 10
    assert len(set(report.groups)) > 0.6 * len(samples)
