"""PNG figures of a training run: history, confusion matrix, ROC curves, reliability diagram,
and held-out scans with their true and predicted lesion outlines.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing touches
pyplot's global state or needs a display. Imports no TensorFlow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.evaluation.metrics import expected_calibration_error, reliability_curve

__all__ = [
    "plot_confusion_matrix",
    "plot_history",
    "plot_lesion_grid",
    "plot_reliability",
    "plot_roc",
]

log = logging.getLogger(__name__)

DPI = 110


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    log.debug("wrote %s", path)
    return path


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.array([v if v is not None else np.nan for v in values], dtype=np.float64)


def plot_history(
    columns: Mapping[str, Sequence[float]],
    path: str | Path,
    stage_boundary: int | None = None,
) -> Path:
    """Loss and accuracy per epoch, train against validation.

    Args:
        columns: per-epoch series such as ``loss``, ``val_loss``, ``accuracy``, ``val_accuracy``;
            missing keys are skipped, NaN entries leave gaps.
        path: the PNG to write.
        stage_boundary: number of epochs of the frozen stage; a dashed line marks where
            fine-tuning starts. None for no line.

    Returns:
        The path written.
    """
    panels = [("loss", "Loss"), ("accuracy", "Accuracy")]
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, panels, strict=True):
        drawn = False
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            if name not in columns or len(columns[name]) == 0:
                continue
            values = _finite(columns[name])
            epochs = np.arange(1, len(values) + 1)
            label = "validation" if name.startswith("val_") else "train"
            ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
            drawn = True
        if stage_boundary:
            ax.axvline(stage_boundary + 0.5, color="grey", linestyle=":", linewidth=1.5)
            ax.annotate(
                "fine-tuning starts",
                xy=(stage_boundary + 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(4, -12),
                textcoords="offset points",
                fontsize=8,
                color="dimgrey",
            )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(
                0.5, 0.5, f"no '{key}' recorded", ha="center", va="center", transform=ax.transAxes
            )
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Confusion matrix coloured by row-normalised share, annotated with count and percentage.

    Args:
        matrix: counts, rows = true class, columns = predicted class.
        class_names: names of the classes in index order.
        path: the PNG to write.

    Returns:
        The path written.
    """
    cm = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(
            f"The 'matrix' parameter of plot_confusion_matrix must be {k}x{k} for {k} class "
            f"names. Got shape {cm.shape} instead."
        )
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = max(4.0, 1.3 * k + 2)
    fig = _figure(size, size - 0.5)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{100 * share[i, j]:.1f}%",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    ax.set_xticks(range(k), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (n = {int(cm.sum())})")
    return _save(fig, path)


def plot_roc(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """One-vs-rest ROC curve per class, AUC in the legend.

    Classes absent from ``y_true`` (or making up all of it) have no curve and are skipped.

    Args:
        y_true: class indices, shape [N].
        probs: probabilities, shape [N, K].
        class_names: names of the classes in index order.
        path: the PNG to write.

    Returns:
        The path written.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for i, name in enumerate(class_names):
        positive = y == i
        if positive.all() or not positive.any():
            log.debug("ROC: class %s skipped, only one class present", name)
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        auc = roc_auc_score(positive, probs[:, i])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc:.3f}, n={int(positive.sum())})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one-vs-rest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(probs: np.ndarray, y_true: np.ndarray, path: str | Path) -> Path:
    """Reliability diagram of the top-1 confidence with its ECE, over a histogram of confidences.

    Args:
        probs: probabilities, shape [N, K].
        y_true: class indices, shape [N].
        path: the PNG to write.

    Returns:
        The path written.
    """
    curve = reliability_curve(probs, y_true)
    ece = expected_calibration_error(probs, y_true)
    edges, count = curve["edges"], curve["count"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    used = count > 0
    fig = _figure(5.5, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    top.bar(
        centres[used],
        curve["accuracy"][used],
        width=width * 0.95,
        alpha=0.7,
        edgecolor="black",
        label="accuracy",
    )
    top.plot(
        curve["confidence"][used],
        curve["accuracy"][used],
        "o",
        color="darkred",
        markersize=4,
        label="mean confidence",
    )
    ece_text = "n/a" if ece is None or math.isnan(ece) else f"{100 * ece:.2f}%"
    top.set_title(f"Reliability (ECE {ece_text}, {len(edges) - 1} bins)")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.01)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count, width=width * 0.95, color="grey", edgecolor="black")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    return _save(fig, path)


def plot_lesion_grid(
    images: np.ndarray,
    true_masks: np.ndarray,
    predicted: np.ndarray,
    labels: Sequence[str],
    dice: Sequence[float | None],
    path: str | Path,
    count: int = 24,
    seed: int = 0,
) -> Path:
    """A grid of held-out scans with the true lesion outline (green) and the predicted one (red,
    by the model's lesion rule as the runtime applies it), titled by class and Dice; up to
    ``count`` scans drawn at random (fixed seed), lesion scans and normal scans alike.

    Args:
        images: uint8 ``[N, S, S, 1]`` model inputs.
        true_masks: uint8 ``[N, S, S, 1]`` (> 127 is lesion).
        predicted: bool ``[N, S, S]`` predicted outlines
        (training.evaluation.lesion_metrics.rule_masks). labels: each scan's true class.
        dice: each scan's Dice (None where it has no lesion mask).
        path: the PNG to write.
    """
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(images), size=min(count, len(images)), replace=False))
    cols = 6
    rows = max(1, math.ceil(len(picks) / cols))
    fig = _figure(2.0 * cols, 2.15 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, picks, strict=False):
        ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0, vmax=255)
        truth = true_masks[i, :, :, 0] > 127
        guess = predicted[i]
        for mask, color in ((truth, "lime"), (guess, "red")):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.0)
        score = "" if dice[i] is None else f" Dice {dice[i]:.2f}"
        ax.set_title(f"{labels[i]}{score}", fontsize=8)
    fig.suptitle("held-out scans: true outline green, predicted red", fontsize=9)
    return _save(fig, path)
