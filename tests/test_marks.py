"""Burned-in marks: finding them, painting them out, and the with/without comparison."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from edge_runtime.model.contract import ResizePolicy
from training.augmentation.marks import find_marks, remove_marks
from training.data.datasets import Sample
from training.probes.marks import MARKED_MIN_PIXELS, MarkCheck, measure, summarize
from training.synthetic import synthetic_scan

CLASSES = ("normal", "benign", "malignant")
CLUTTER_160_SHA256 = "b797f08567cc461a"  # clutter_bank(8, 160, seed=0) before the small-size guard


def _scan(seed: int = 0) -> np.ndarray:
    """A synthetic scan with its speckle smoothed to the grain of real scans (the generator's
    is pixel by pixel, far rougher than any probe's)."""
    scan = synthetic_scan("benign", np.random.default_rng(seed), size=(300, 400))
    return cv2.GaussianBlur(scan, (0, 0), 2)


def _marked(scan: np.ndarray) -> np.ndarray:
    """``scan`` with what a sonographer leaves: two calipers, a dotted line and a label."""
    out = scan.copy()
    for x, y in ((120, 100), (260, 110)):
        cv2.drawMarker(out, (x, y), 255, cv2.MARKER_CROSS, 11, 1)
    for x in range(126, 255, 4):
        out[104, x] = 255
    cv2.putText(out, "RT UOQ", (30, 260), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1, cv2.LINE_AA)
    return out


def test_marks_are_found_on_a_marked_scan_and_not_on_its_clean_original():
    scan = _scan()
    assert find_marks(scan).sum() < MARKED_MIN_PIXELS
    assert find_marks(_marked(scan)).sum() >= MARKED_MIN_PIXELS


def test_removal_paints_the_marks_out_and_leaves_the_rest_alone():
    scan = _scan(1)
    marked = _marked(scan)
    drawn = marked != scan
    cleaned = remove_marks(marked, find_marks(marked))
    error_before = np.abs(marked.astype(int) - scan)[drawn].mean()
    error_after = np.abs(cleaned.astype(int) - scan)[drawn].mean()
    assert error_after < 0.3 * error_before
    far = cv2.dilate(drawn.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    np.testing.assert_array_equal(cleaned[far], scan[far])


class _MarkReader:
    """Stands in for the Keras classifier: calls a scan malignant when it holds pure white."""

    def predict(self, batch, verbose=0):
        white = (batch.reshape(len(batch), -1) >= 250).any(axis=1)
        probs = np.where(white[:, None], [[0.1, 0.2, 0.7]], [[0.1, 0.7, 0.2]])
        return {"probabilities": probs.astype(np.float32)}


def _white_block_bank(count, size, seed):
    values = np.zeros((count, size, size, 1), np.uint8)
    alpha = np.zeros_like(values)
    values[:, :20, :20], alpha[:, :20, :20] = 255, 1
    return values, alpha


def test_measure_compares_each_scan_with_and_without_its_marks(tmp_path, monkeypatch):
    monkeypatch.setattr("training.probes.marks.clutter_bank", _white_block_bank)
    plain, background = np.minimum(_scan(2), 240), np.minimum(_scan(3), 240)
    cv2.imwrite(str(tmp_path / "plain.png"), plain)
    cv2.imwrite(str(tmp_path / "marked.png"), _marked(background))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    samples = [
        Sample(tmp_path / f"{name}.png", "benign", "s") for name in ("plain", "marked", "broken")
    ]
    rows = measure(_MarkReader(), samples, CLASSES, 400, ResizePolicy.LETTERBOX)  # no resampling
    assert [r.path for r in rows] == [str(samples[0].path), str(samples[1].path)]
    plain_row, marked_row = rows
    assert not plain_row.marked and plain_row.predicted == plain_row.predicted_unmarked == "benign"
    assert marked_row.marked
    assert (marked_row.predicted, marked_row.predicted_unmarked) == ("malignant", "benign")
    # a pure white overlay: the white-reader calls both cluttered scans malignant
    assert [r.predicted_cluttered for r in rows] == ["malignant", "malignant"]


def test_add_clutter_paints_only_the_overlay_and_keeps_the_size():
    from training.augmentation.clutter import clutter_bank
    from training.probes.marks import add_clutter

    values, alpha = clutter_bank(4, 64, seed=1)
    gray = np.full((90, 120), 40, np.uint8)
    out = add_clutter(gray, values[0, ..., 0], alpha[0, ..., 0])
    assert out.shape == gray.shape and out.dtype == np.uint8
    changed = out != gray
    assert 0 < changed.mean() < 0.3
    np.testing.assert_array_equal(out[~changed], 40)


def test_summary_splits_marked_from_unmarked_per_source():
    many = MARKED_MIN_PIXELS
    rows = [
        MarkCheck("a", "x", "benign", 0, False, "benign", "benign", "malignant"),
        MarkCheck("b", "x", "benign", many, True, "malignant", "benign", "malignant"),
        MarkCheck("c", "y", "malignant", many, True, "malignant", "malignant", "malignant"),
    ]
    summary = summarize(rows)
    assert summary["x"] == {
        "n_unmarked": 1,
        "n_marked": 1,
        "accuracy_unmarked": 1.0,
        "accuracy_marked": 0.0,
        "accuracy_marked_removed": 1.0,
        "changed_by_removal": 1,
        "accuracy_cluttered": 0.0,
        "changed_by_clutter": 1,
    }
    assert summary["y"]["accuracy_unmarked"] is None
    assert summary["all"]["n_marked"] == 2
    assert summary["all"]["accuracy_marked"] == pytest.approx(0.5)


@pytest.mark.slow
def test_cli_pools_run_folders_and_reports_a_missing_one(tmp_path, capsys):
    import csv
    import json

    from tests.run_folders import make_run_folder
    from training.probes.marks import main

    run = make_run_folder(tmp_path / "run", size=64, per_class=12, epochs=2)
    with open(run / "split.csv", newline="") as handle:
        n_test = sum(row["split"] == "test" for row in csv.DictReader(handle))
    assert main([str(run), str(run), "--json", str(tmp_path / "pooled.json")]) == 0
    report = json.loads((tmp_path / "pooled.json").read_text())
    assert (
        report["summary"]["all"]["n_marked"] + report["summary"]["all"]["n_unmarked"] == 2 * n_test
    )
    assert "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "marks: error" in capsys.readouterr().err


@pytest.mark.parametrize("size", [16, 32, 48])
def test_screen_clutter_paints_small_inputs_too(size):
    """edge-train paints clutter by default; a smoke run at a small image size must not fail."""
    from training.augmentation.clutter import clutter_bank

    values, alpha = clutter_bank(20, size, seed=0)

    assert values.shape == alpha.shape == (20, size, size, 1)
    assert alpha.any()


def test_screen_clutter_at_the_recipe_size_draws_what_it_drew_before():
    """The guard for small inputs leaves the draws at the trained size unchanged (the bundled
    model's recipe): a fingerprint of the bank at 160 px, taken before the guard was added."""
    from training.augmentation.clutter import clutter_bank

    values, alpha = clutter_bank(8, 160, seed=0)

    digest = hashlib.sha256(values.tobytes() + alpha.tobytes()).hexdigest()
    assert digest.startswith(CLUTTER_160_SHA256)
