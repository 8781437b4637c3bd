"""Share of the activation map on the lesion: the shortcut check of training.probes.attention."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.model.contract import ResizePolicy
from training.data.datasets import Sample
from training.data.masks import load_lesion_mask
from training.probes.attention import LesionAttention, mass_in_mask, measure, summarize

CLASSES = ("normal", "benign", "malignant")


def test_mass_in_mask_counts_the_share_on_mask_pixels():
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert mass_in_mask(heat, mask) == pytest.approx(0.75)
    assert mass_in_mask(np.zeros((4, 4)), mask) == 0.0


def test_lesion_masks_are_united_and_brought_to_the_scan_size(tmp_path):
    first, second = np.zeros((10, 20), np.uint8), np.zeros((5, 10), np.uint8)
    first[0, 0] = 255
    second[4, 9] = 255  # half size: lands on the bottom-right 2x2 corner
    cv2.imwrite(str(tmp_path / "a_mask.png"), first)
    cv2.imwrite(str(tmp_path / "a_mask_1.png"), second)
    mask = load_lesion_mask([tmp_path / "a_mask.png", tmp_path / "a_mask_1.png"], (10, 20))
    assert mask.shape == (10, 20) and mask[0, 0] and mask[9, 19]
    assert mask.sum() == 1 + 4


class _CornerModel:
    """Stands in for the Keras classifier: predicts 'malignant' with all evidence top-left."""

    def predict(self, batch, verbose=0):
        cam = np.zeros((len(batch), 4, 4, 3), np.float32)
        cam[:, 0, 0, 2] = 1.0
        probs = np.tile(np.array([[0.1, 0.2, 0.7]], np.float32), (len(batch), 1))
        return {"probabilities": probs, "cam": cam}


def test_measure_maps_the_predicted_class_map_onto_the_scan_and_skips_bad_files(tmp_path):
    scan = np.full((64, 64), 100, np.uint8)
    top_left, bottom_right = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    top_left[:16, :16] = 255
    bottom_right[48:, 48:] = 255
    for name, mask in (("near", top_left), ("far", bottom_right)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), scan)
        cv2.imwrite(str(tmp_path / f"{name}_mask.png"), mask)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    samples = [
        Sample(tmp_path / f"{n}.png", "malignant", "s", masks=(tmp_path / f"{n}_mask.png",))
        for n in ("near", "far")
    ]
    samples.append(Sample(tmp_path / "broken.png", "benign", "s", masks=samples[0].masks))
    rows = measure(_CornerModel(), samples, CLASSES, 64, ResizePolicy.LETTERBOX)
    assert [r.path for r in rows] == [str(samples[0].path), str(samples[1].path)]
    near, far = rows
    assert near.predicted == "malignant"
    assert near.in_lesion > 0.5 and far.in_lesion == 0.0
    assert near.lesion_area == pytest.approx(1 / 16)


def test_summary_per_source_and_overall():
    rows = [
        LesionAttention("a", "x", "benign", "benign", 0.5, 0.1),
        LesionAttention("b", "x", "benign", "benign", 0.05, 0.1),
        LesionAttention("c", "y", "malignant", "benign", 0.3, 0.2),
    ]
    summary = summarize(rows)
    assert summary["all"]["n"] == 3
    assert summary["x"]["mean_in_lesion"] == pytest.approx(0.275)
    assert summary["x"]["share_above_even"] == pytest.approx(0.5)
    assert summary["y"]["mean_lesion_area"] == pytest.approx(0.2)


@pytest.mark.slow
def test_cli_writes_the_report_and_names_a_missing_run(tmp_path, capsys):
    import json

    from tests.run_folders import make_run_folder
    from training.probes.attention import main

    run = make_run_folder(tmp_path / "run", size=64, per_class=12, epochs=2)
    assert main([str(run)]) == 0
    report = json.loads((run / "attention.json").read_text())
    assert report["runs"] == [str(run)] and report["split"] == "test"
    assert "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "attention: error" in capsys.readouterr().err
