"""Per-source label sets: the renormalized loss, the masks, and a two-source training run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.label_sets import (  # noqa: E402
    LabelSetCrossEntropy,
    accuracy,
    allowed_classes,
    source_label_sets,
    targets,
)
from training.synthetic import write_synthetic_dataset  # noqa: E402

PROBS = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.05, 0.05, 0.9]], np.float32)
LABELS = np.array([1, 2, 2])


def test_with_every_class_allowed_it_is_keras_crossentropy_with_label_smoothing():
    y = targets(LABELS, np.ones((3, 3), np.float32))
    ours = LabelSetCrossEntropy(label_smoothing=0.1)(y, PROBS)
    theirs = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y[:, :3], PROBS)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_a_lesion_only_source_is_not_scored_on_its_normal_probability():
    """Two predictions with the same benign:malignant odds cost the same whatever P(normal)."""
    allowed = np.array([[0, 1, 1]] * 2, np.float32)
    probs = np.array([[0.7, 0.1, 0.2], [0.1, 0.3, 0.6]], np.float32)
    loss = LabelSetCrossEntropy(label_smoothing=0.05)
    per_scan = [float(loss(targets(np.array([2]), allowed[:1]), probs[k : k + 1])) for k in (0, 1)]
    assert per_scan[0] == pytest.approx(per_scan[1], rel=1e-5)
    assert per_scan[0] == pytest.approx(-(0.975 * np.log(2 / 3) + 0.025 * np.log(1 / 3)), rel=1e-4)
    # the plain loss would have punished the first scan's P(normal) = 0.7
    plain = keras.losses.CategoricalCrossentropy(label_smoothing=0.05)
    assert float(plain(np.eye(3)[[2]], probs[:1])) > per_scan[0] + 1.0


def test_label_sets_come_from_each_sources_training_labels():
    sources = np.array(["busi", "busi", "busi", "busbra", "busbra"])
    sets = source_label_sets(sources, np.array([0, 1, 2, 1, 2]), 3)
    assert sets["busi"].tolist() == [True, True, True]
    assert sets["busbra"].tolist() == [False, True, True]
    masks = allowed_classes(["busbra", "busi", "elsewhere"], sets, 3)
    np.testing.assert_array_equal(masks, [[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    assert allowed_classes([], sets, 3).shape == (0, 3)


def test_accuracy_reads_the_label_part_of_the_targets():
    y = targets(LABELS, np.array([[1, 1, 1], [0, 1, 1], [0, 1, 1]], np.float32))
    np.testing.assert_array_equal(np.asarray(accuracy(y, PROBS)), [1.0, 0.0, 1.0])


@pytest.mark.slow
def test_training_on_two_sources_records_each_sources_label_set(tmp_path):
    from training.cli import main as train_main

    full = write_synthetic_dataset(tmp_path / "full", per_class=16, seed=3)
    lesions = write_synthetic_dataset(tmp_path / "lesions", per_class=16, seed=4)
    shutil.rmtree(lesions / "normal")
    run = tmp_path / "run"
    args = [str(full), str(lesions), "--output", str(run), "--source-label-sets"]
    args += ["--backbone", "small-cnn", "--weights", "none", "--image-size", "32"]
    args += ["--frozen-epochs", "0", "--epochs", "1", "--batch-size", "16"]
    args += ["--learning-rate", "0.003"]
    assert train_main(args) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["label_sets"] == {
        full.name: ["normal", "benign", "malignant"],
        lesions.name: ["benign", "malignant"],
    }
    history = (run / "history.csv").read_text().splitlines()[0]
    assert "val_accuracy" in history and "val_loss" in history
