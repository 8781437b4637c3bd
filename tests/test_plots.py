"""training.evaluation.plots: each figure is written as a readable PNG of a sensible size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.evaluation.plots import (
    plot_confusion_matrix,
    plot_history,
    plot_reliability,
    plot_roc,
)

NAMES = ["normal", "benign", "malignant"]
REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 5_000 < len(data) < 2_000_000
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 5  # something was drawn
    return image


def _case(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * 2
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    return y, probs


def test_plot_history_writes_loss_and_accuracy_panels_with_the_stage_boundary(tmp_path):
    epochs = 8
    columns = {
        "loss": list(np.linspace(1.2, 0.3, epochs)),
        "val_loss": list(np.linspace(1.3, 0.5, epochs)),
        "accuracy": list(np.linspace(0.4, 0.9, epochs)),
        "val_accuracy": [*np.linspace(0.4, 0.8, epochs - 1), float("nan")],
        "lr": [1e-3] * 3 + [1e-4] * 5,
        "time_s": [10.0] * epochs,
    }
    path = plot_history(columns, tmp_path / "plots" / "history.png", stage_boundary=3)
    image = _check_png(path)
    assert image.shape[1] > image.shape[0]  # two panels side by side


def test_plot_history_tolerates_missing_keys_and_no_boundary(tmp_path):
    path = plot_history({"loss": [1.0, 0.5]}, tmp_path / "h.png", stage_boundary=None)
    _check_png(path)
    _check_png(plot_history({}, tmp_path / "empty.png", stage_boundary=None))


def test_plot_confusion_matrix_writes_a_png(tmp_path):
    path = plot_confusion_matrix([[2, 1, 0], [0, 2, 1], [1, 0, 0]], NAMES, tmp_path / "cm.png")
    _check_png(path)


def test_plot_confusion_matrix_rejects_a_matrix_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="must be 3x3"):
        plot_confusion_matrix([[1, 0], [0, 1]], NAMES, tmp_path / "cm.png")


def test_plot_roc_writes_a_png_and_skips_absent_classes(tmp_path):
    y, probs = _case()
    _check_png(plot_roc(y, probs, NAMES, tmp_path / "roc.png"))
    y_two = np.where(y == 2, 1, y)  # no malignant in the test set
    _check_png(plot_roc(y_two, probs, NAMES, tmp_path / "roc2.png"))


def test_plot_reliability_writes_a_png(tmp_path):
    y, probs = _case()
    _check_png(plot_reliability(probs, y, tmp_path / "rel.png"))


def test_metrics_and_plots_import_neither_tensorflow_nor_pyplot(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from training.evaluation.plots import plot_reliability\n"
        "from training.evaluation.metrics import evaluate\n"
        f"plot_reliability(np.eye(3), np.arange(3), {str(tmp_path / 'r.png')!r})\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras') or m == 'matplotlib.pyplot')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
