"""Lesion-free strips beside the lesion: the source-shortcut check of training.probes.lesionfree."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.model.contract import ResizePolicy
from training.augmentation.lesion_free import (
    LESION_FREE,
    LESION_SIDE,
    free_side,
    lesion_free_views_wanted,
    lesion_scan_views,
    mirrored,
    scan_aspect,
    training_views,
)
from training.data.datasets import Sample
from training.probes.lesionfree import LesionFreeView, measure, summarize

CLASSES = ("normal", "benign", "malignant")


def _mask(width: int, first: int, last: int) -> np.ndarray:
    mask = np.zeros((50, width), bool)
    mask[20:30, first : last + 1] = True
    return mask


def test_the_free_side_is_the_wider_side_beside_the_widened_lesion_box():
    assert free_side(_mask(100, 10, 29)) == slice(35, 100)  # box widened by 5: columns 5..34
    assert free_side(_mask(100, 60, 79)) == slice(0, 55)
    assert free_side(_mask(100, 30, 69)) is None  # 25 free columns a side: too narrow


def test_the_free_side_is_mirrored_onto_the_lesions_half_at_the_scans_width():
    gray = np.tile(np.arange(10, dtype=np.uint8), (3, 1))
    np.testing.assert_array_equal(mirrored(gray, slice(6, 10))[0], [9, 8, 7, 6, 6, 7, 8, 9])
    np.testing.assert_array_equal(mirrored(gray, slice(0, 7))[0], [0, 1, 2, 3, 4, 5, 6, 6, 5, 4])


def test_a_view_narrower_than_its_scan_loses_its_deepest_rows_to_keep_the_scans_aspect():
    view = np.arange(40 * 8, dtype=np.uint8).reshape(40, 8)
    np.testing.assert_array_equal(scan_aspect(view, 10), view[:32])
    assert scan_aspect(view, 8) is view


def test_both_views_of_a_lesion_scan_have_the_scans_aspect_so_letterboxing_cannot_tell_them_apart(
    tmp_path,
):
    scan, mask = np.full((60, 100), 80, np.uint8), np.zeros((60, 100), np.uint8)
    mask[20:30, 40:50] = 255  # box widened by 5: columns 35..54; free side 55..99, 45 wide
    cv2.imwrite(str(tmp_path / "scan.png"), scan)
    cv2.imwrite(str(tmp_path / "scan_mask.png"), mask)
    sample = Sample(tmp_path / "scan.png", "benign", "s", masks=(tmp_path / "scan_mask.png",))
    free_width, views = lesion_scan_views(sample)
    assert free_width == pytest.approx(0.45)
    assert views[LESION_FREE].shape == (54, 90)  # mirrored to 90 columns: 60 * 90 / 100 rows
    assert views[LESION_SIDE].shape == (60, 100)


class _LesionReader:
    """Stands in for the Keras classifier: 'malignant' where a bright lesion shows, else normal."""

    def predict(self, batch, batch_size=None, verbose=0):
        bright = batch.reshape(len(batch), -1).max(axis=1) > 200
        probs = np.where(bright[:, None], [[0.1, 0.2, 0.7]], [[0.8, 0.1, 0.1]])
        return {"probabilities": probs.astype(np.float32)}


def _scans(tmp_path) -> list[Sample]:
    """A scan with a bright lesion at its left edge, masked narrowly and too widely; a plain
    normal scan; an unreadable file."""
    scan = np.full((64, 128), 80, np.uint8)
    scan[20:40, 8:24] = 255
    narrow, wide = np.zeros((64, 128), np.uint8), np.zeros((64, 128), np.uint8)
    narrow[20:40, 8:24] = 255
    wide[20:40, 20:110] = 255
    cv2.imwrite(str(tmp_path / "scan.png"), scan)
    cv2.imwrite(str(tmp_path / "plain.png"), np.full((64, 128), 80, np.uint8))
    for name, mask in (("narrow", narrow), ("wide", wide)):
        cv2.imwrite(str(tmp_path / f"{name}_mask.png"), mask)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return [
        Sample(tmp_path / "scan.png", "malignant", "s", masks=(tmp_path / "narrow_mask.png",)),
        Sample(tmp_path / "scan.png", "benign", "s", masks=(tmp_path / "wide_mask.png",)),
        Sample(tmp_path / "plain.png", "normal", "s"),
        Sample(tmp_path / "broken.png", "benign", "s", masks=(tmp_path / "narrow_mask.png",)),
    ]


def test_measure_views_both_sides_of_lesion_scans_and_normals_skipping_unreadable_and_too_wide(
    tmp_path, caplog
):
    rows = measure(_LesionReader(), _scans(tmp_path), CLASSES, 32, ResizePolicy.LETTERBOX)
    assert [(r.label, r.view, r.predicted) for r in rows] == [
        ("malignant", LESION_FREE, "normal"),
        ("malignant", LESION_SIDE, "malignant"),  # the seam control still shows the lesion
        ("normal", LESION_FREE, "normal"),
    ]
    assert rows[0].free_width == rows[1].free_width == pytest.approx((128 - 30) / 128)
    assert rows[2].free_width == pytest.approx(0.5)
    assert "broken.png: skipped" in caplog.text


def test_training_views_label_the_free_side_normal_and_the_lesion_side_by_its_class(tmp_path):
    views = training_views(_scans(tmp_path), 32, ResizePolicy.LETTERBOX)
    assert [(index, label) for index, _, label, _ in views] == [(0, "normal"), (0, "malignant")]
    free, lesion = (image for _, image, _, _ in views)
    assert free.shape == lesion.shape == (32, 32, 1) and free.dtype == np.uint8
    assert free.max() < 200 < lesion.max()  # the lesion is on its own side only
    free_mask, lesion_mask = (mask for *_, mask in views)
    assert free_mask.max() == 0  # lesion-free tissue: an empty mask
    assert lesion_mask.max() > 127  # the mirrored lesion side keeps its (mirrored) lesion
    np.testing.assert_array_equal(lesion_mask > 127, lesion > 200)  # where the bright lesion is


def test_a_model_without_a_normal_class_cannot_be_checked():
    with pytest.raises(ValueError, match="no 'normal' class"):
        measure(_LesionReader(), [], ("benign", "malignant"), 32, ResizePolicy.LETTERBOX)


def test_summary_per_source_with_normal_controls_apart():
    rows = [
        LesionFreeView("a", "x", "benign", 0.5, LESION_FREE, "normal", 0.8),
        LesionFreeView("a", "x", "benign", 0.5, LESION_SIDE, "benign", 0.2),
        LesionFreeView("b", "x", "malignant", 0.4, LESION_FREE, "benign", 0.3),
        LesionFreeView("c", "x", "normal", 0.5, LESION_FREE, "normal", 0.9),
        LesionFreeView("d", "y", "benign", 0.6, LESION_FREE, "benign", 0.1),
    ]
    summary = summarize(rows)
    assert list(summary) == [
        "x lesion scans",
        "x lesion side (seam control)",
        "x normal scans (control)",
        "y lesion scans",
    ]
    assert summary["x lesion side (seam control)"] == {
        "n": 1,
        "called_normal": 0.0,
        "mean_p_normal": pytest.approx(0.2),
    }
    assert summary["x lesion scans"]["n"] == 2
    assert summary["x lesion scans"]["called_normal"] == pytest.approx(0.5)
    assert summary["x lesion scans"]["mean_p_normal"] == pytest.approx(0.55)
    assert summary["y lesion scans"]["called_normal"] == 0.0


def test_lesion_free_views_are_wanted_by_default_only_when_one_source_lacks_normal_scans():
    def scans(*pairs):
        return [Sample(f"{source}-{label}.png", label, source) for source, label in pairs]

    mixed = scans(("busi", "normal"), ("busi", "benign"), ("busbra", "malignant"))
    one_source = scans(("busi", "normal"), ("busi", "benign"))
    no_normals = scans(("busbra", "benign"), ("busbra", "malignant"))
    assert lesion_free_views_wanted(None, mixed)
    assert not lesion_free_views_wanted(None, one_source)
    assert not lesion_free_views_wanted(None, no_normals)
    assert not lesion_free_views_wanted(False, mixed)
    assert lesion_free_views_wanted(True, one_source)
    with pytest.raises(ValueError, match=r"no normal class \(classes: \['benign', 'malignant'\]\)"):
        lesion_free_views_wanted(True, no_normals)
