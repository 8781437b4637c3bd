"""One training run: discover -> group duplicates -> split -> load -> fit -> evaluate -> report."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from edge_runtime.contract import ResizePolicy
from training.augment import jitter_gray_levels
from training.backbones import Backbone
from training.data import load_images
from training.datasets import discover_all, fingerprint
from training.dedup import group_duplicates
from training.diagnostics import check_run, log_warnings
from training.fit import FitConfig, fit
from training.int8_grid import snap_to_int8_grid
from training.lesionfree import lesion_free_views_wanted, training_views
from training.marks import paint_out_marks
from training.metrics import (
    apply_temperature,
    binary_auc,
    evaluate,
    evaluate_subsets,
    fit_temperature,
    summarize_folds,
)
from training.model import build_classifier
from training.plots import plot_confusion_matrix, plot_history, plot_reliability, plot_roc
from training.runfolder import (
    CV_METRICS_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    SOURCE_METRICS_FILE,
    SPLIT_FILE,
    HeldOutPredictions,
    RunInfo,
)
from training.splits import stratified_group_kfold, stratified_group_split, write_manifest

log = logging.getLogger(__name__)
DEFAULT_CLASS_ORDER = ("normal", "benign", "malignant")
JITTER_GRAY_LEVELS = 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``edge-train`` run needs."""

    data: tuple[Path, ...]
    output: Path
    backbone: Backbone = Backbone.EFFICIENTNET_LITE0
    weights: str | None = "imagenet"
    input_size: int = 224
    resize_policy: ResizePolicy = ResizePolicy.LETTERBOX
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    folds: int = 0
    final_model: bool = True
    seed: int = 0
    int8_grid: bool = True
    lesion_free_normals: bool | None = None  # None: lesion_free_views_wanted decides
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class _Prepared:
    class_names: tuple[str, ...]
    paths: list[Path]
    labels: np.ndarray
    groups: list[str]
    excluded: np.ndarray
    images: np.ndarray
    samples: Sequence
    unmarked: np.ndarray | None  # the images with their marks painted out, when training asks
    views: list[tuple[int, np.ndarray, str]]  # extra training views (training.lesionfree)
    fingerprint: str
    sources: tuple[str, ...]


def train(config: TrainConfig) -> RunInfo | None:
    """Run the whole pipeline and write the run folder; returns what was written to run.json
    (None when only cross-validation was asked for: ``final_model=False``)."""
    start = time.perf_counter()
    config.output.mkdir(parents=True, exist_ok=True)
    data = _prepare(config)
    if config.folds > 1:
        _cross_validate(config, data)
    if not config.final_model:
        log.info("cross-validation finished in %.1f min", (time.perf_counter() - start) / 60)
        return None
    splits = _holdout_split(config, data)
    _write_split(config.output / SPLIT_FILE, data, splits)
    info = _train_and_report(config, data, splits, config.output)
    log.info("run finished in %.1f min: %s", (time.perf_counter() - start) / 60, config.output)
    return info


def _prepare(config: TrainConfig) -> _Prepared:

    discovery = discover_all(config.data)
    log.info("data:\n%s", discovery.summary())
    found = {s.label for s in discovery.samples}
    order = [c for c in DEFAULT_CLASS_ORDER if c in found] + sorted(
        found - set(DEFAULT_CLASS_ORDER)
    )
    class_names = tuple(order)
    samples = list(discovery.samples)
    images, failures = load_images(
        [s.path for s in samples], config.input_size, config.resize_policy
    )
    if failures:
        bad = {path for path, _ in failures}
        keep = [i for i, s in enumerate(samples) if str(s.path) not in bad]
        samples, images = [samples[i] for i in keep], images[keep]
    unmarked = None
    if config.fit.augment is not None and config.fit.augment.unmark > 0:
        start = time.perf_counter()
        unmarked, _ = load_images(
            [s.path for s in samples],
            config.input_size,
            config.resize_policy,
            transform=paint_out_marks,
        )
        log.info("painted out burned-in marks in %.1f s", time.perf_counter() - start)
    views = []
    if lesion_free_views_wanted(config.lesion_free_normals, samples):
        views = training_views(samples, config.input_size, config.resize_policy)
        if not views:
            log.warning(
                "no lesion scan has a mask that leaves room beside its lesion, so no lesion-free "
                "views: a source without normal scans may still come to mean 'not normal'"
            )
        else:
            log.info(
                "%d mirrored views of lesion scans for training (training.lesionfree; "
                "--no-lesion-free-normals leaves them out)",
                len(views),
            )
    report = group_duplicates(samples)
    (config.output / "duplicates.csv").write_text(report.to_csv())
    conflicted = set(report.conflicts)
    groups = list(report.groups)
    excluded = np.array([g in conflicted for g in groups])
    log.info(
        "%d duplicate groups over %d images; %d conflicted groups (%d images) kept out",
        len(set(groups)),
        len(samples),
        len(conflicted),
        int(excluded.sum()),
    )
    return _Prepared(
        class_names=class_names,
        paths=[s.path for s in samples],
        labels=np.array([class_names.index(s.label) for s in samples]),
        groups=groups,
        excluded=excluded,
        images=images,
        samples=samples,
        unmarked=unmarked,
        views=views,
        fingerprint=fingerprint(samples),
        sources=tuple(sorted({s.source for s in samples})),
    )


def _holdout_split(config: TrainConfig, data: _Prepared) -> np.ndarray:

    splits = np.array(
        stratified_group_split(
            data.labels,
            data.groups,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    )
    splits[data.excluded] = "excluded"
    return splits


def _train_and_report(
    config: TrainConfig, data: _Prepared, splits: np.ndarray, run_dir: Path
) -> RunInfo:

    part = {name: splits == name for name in ("train", "val", "test")}
    keras.utils.set_random_seed(config.seed)  # the head starts the same whatever ran before
    model = build_classifier(
        len(data.class_names),
        backbone=config.backbone,
        input_size=config.input_size,
        weights=config.weights,
    )
    train_images, train_labels, train_unmarked = _training_arrays(data, part["train"])
    rows = fit(
        model,
        (train_images, train_labels),
        (data.images[part["val"]], data.labels[part["val"]]),
        config.fit,
        pretrained=config.weights is not None,
        train_unmarked=train_unmarked,
    )
    if config.int8_grid:
        log.info("snapped %d kernels to the INT8 weight grid", snap_to_int8_grid(model))
    model.save(run_dir / MODEL_FILE)
    _write_history(run_dir / HISTORY_FILE, rows)

    def predict(mask: np.ndarray) -> np.ndarray:
        return model.predict(data.images[mask], batch_size=64, verbose=0)["probabilities"]

    temperature = fit_temperature(predict(part["val"]), data.labels[part["val"]])
    test_probs = apply_temperature(predict(part["test"]), temperature)
    y_test = data.labels[part["test"]]
    metrics = evaluate(y_test, test_probs, data.class_names)
    metrics["temperature"] = temperature
    metrics["jitter_stability"] = _jitter_stability(model, data.images[part["test"]], config.seed)
    log_warnings(check_run(rows, metrics, data.labels, splits, data.class_names), str(run_dir))
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    test_samples = [s for s, keep in zip(data.samples, part["test"], strict=True) if keep]
    by_source = _per_source_metrics(y_test, test_probs, data.class_names, test_samples)
    (run_dir / SOURCE_METRICS_FILE).write_text(json.dumps(by_source, indent=2) + "\n")
    HeldOutPredictions(
        paths=[str(s.path) for s in test_samples],
        sources=[s.source for s in test_samples],
        devices=[s.attributes.get("device", "") for s in test_samples],
        labels=[data.class_names[k] for k in y_test],
        probabilities=test_probs,
        class_names=data.class_names,
    ).write(run_dir / PREDICTIONS_FILE)
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    frozen = sum(1 for r in rows if r["stage"] == "frozen")
    plot_history(_columns(rows), plots / "history.png", stage_boundary=frozen or None)
    plot_confusion_matrix(metrics["confusion_matrix"], data.class_names, plots / "confusion.png")
    plot_roc(y_test, test_probs, data.class_names, plots / "roc.png")
    plot_reliability(test_probs, y_test, plots / "reliability.png")
    log.info(
        "test: accuracy %.4f, macro-F1 %.4f, temperature %.3f",
        metrics["accuracy"],
        metrics["macro_f1"],
        temperature,
    )
    info = RunInfo(
        class_names=data.class_names,
        input_size=config.input_size,
        resize_policy=config.resize_policy.value,
        backbone=config.backbone.value,
        seed=config.seed,
        data_fingerprint=data.fingerprint,
        temperature=temperature,
        sources=data.sources,
        int8_grid=config.int8_grid,
        lesion_free_normals=bool(data.views),
        test_metrics=metrics,
    )
    info.write(run_dir)
    return info


def _training_arrays(
    data: _Prepared, train: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The training split's images, labels and unmarked copies (None unless asked for), followed
    by the extra views made from its scans, never from validation or test scans (a view stands
    in for its own unmarked copy)."""
    images, labels = data.images[train], data.labels[train]
    unmarked = None if data.unmarked is None else data.unmarked[train]
    extra = [(image, label) for index, image, label in data.views if train[index]]
    if not extra:
        return images, labels, unmarked
    log.info("training on %d scans and %d mirrored views", int(train.sum()), len(extra))
    views = np.stack([image for image, _ in extra])
    labels = np.concatenate([labels, [data.class_names.index(label) for _, label in extra]])
    if unmarked is not None:
        unmarked = np.concatenate([unmarked, views])
    return np.concatenate([images, views]), labels, unmarked


def _jitter_stability(model, images: np.ndarray, seed: int) -> float:
    """Share of test predictions unchanged when every pixel moves by up to +-2 gray levels.

    No reader can see such a change; a model that flips on it will also flip under INT8
    rounding, and its export fails the parity gate.
    """
    if len(images) == 0:
        return float("nan")
    clean = model.predict(images, batch_size=64, verbose=0)["probabilities"].argmax(1)
    jittered = jitter_gray_levels(images, JITTER_GRAY_LEVELS, seed)
    noisy = model.predict(jittered, batch_size=64, verbose=0)["probabilities"].argmax(1)
    return float(np.mean(clean == noisy))


def _per_source_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], samples: Sequence
) -> dict:
    """Metrics on each source's test images, and benign-vs-malignant AUC per scanner.

    A model trained on several sources can look good overall while failing on one of them
    (or scoring by recognizing the source); this shows each one separately.
    """

    sources = np.array([s.source for s in samples])
    report: dict = {
        "by_source": evaluate_subsets(
            y_true, probs, class_names, {name: sources == name for name in sorted(set(sources))}
        )
    }
    if {"benign", "malignant"} <= set(class_names):
        devices = np.array([s.attributes.get("device", "") for s in samples])
        report["benign_vs_malignant_auc_by_device"] = device_auc(
            y_true, probs, class_names, sources, devices
        )
    return report


def device_auc(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    sources: np.ndarray,
    devices: np.ndarray,
) -> dict[str, dict]:
    """Benign-vs-malignant ROC AUC (bootstrap interval) on the lesion scans of each
    ``source:device`` that names a device; the score is P(malignant | benign or malignant)."""
    benign, malignant = class_names.index("benign"), class_names.index("malignant")
    lesion = np.isin(y_true, (benign, malignant))
    score = probs[:, malignant] / np.clip(probs[:, benign] + probs[:, malignant], 1e-12, None)
    return {
        f"{source}:{device}": binary_auc(y_true[mask] == malignant, score[mask])
        for source, device in sorted(set(zip(sources, devices, strict=True)))
        if device
        for mask in [lesion & (sources == source) & (devices == device)]
    }


def _cross_validate(config: TrainConfig, data: _Prepared) -> None:

    folds = np.array(
        stratified_group_kfold(data.labels, data.groups, n_splits=config.folds, seed=config.seed)
    )
    results, by_source = [], []
    for k in range(config.folds):
        fold_dir = config.output / "cv" / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        rest = np.flatnonzero(folds != k)
        inner = np.array(
            stratified_group_split(
                data.labels[rest],
                [data.groups[i] for i in rest],
                val_fraction=0.15,
                test_fraction=0.0,
                seed=config.seed,
            )
        )
        splits = np.full(len(data.labels), "test", dtype=object)
        splits[rest] = inner
        splits[data.excluded] = "excluded"
        _write_split(fold_dir / SPLIT_FILE, data, splits)
        log.info("cross-validation fold %d/%d", k + 1, config.folds)
        results.append(_train_and_report(config, data, splits, fold_dir).test_metrics)
        by_source.append(json.loads((fold_dir / SOURCE_METRICS_FILE).read_text()))
    report = cross_validation_report(
        results,
        by_source,
        data.sources,
        HeldOutPredictions.read(
            [config.output / "cv" / f"fold{k}" / PREDICTIONS_FILE for k in range(config.folds)]
        ),
    )
    (config.output / CV_METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")


def cross_validation_report(
    results: Sequence[dict],
    by_source: Sequence[dict],
    sources: Sequence[str],
    predictions: HeldOutPredictions | None = None,
) -> dict:
    """``cv_metrics.json``: the folds' test metrics summarized overall, per source and, for
    benign vs malignant, per scanner (mean AUC with its t-interval, and the lesion scans
    behind it over all folds); with ``predictions``, also the per-scanner AUC of all the folds'
    held-out predictions pooled, with a bootstrap interval (a t-interval over 3 folds is wide).

    Args:
        results: each fold's ``metrics.json``.
        by_source: each fold's ``source_metrics.json``.
        sources: the data sources.
        predictions: the folds' ``predictions.csv`` read as one.
    """
    devices = [fold.get("benign_vs_malignant_auc_by_device", {}) for fold in by_source]
    fold_auc = summarize_folds([{d: e["auc"] for d, e in fold.items()} for fold in devices])
    report = {
        "folds": len(results),
        "summary": summarize_folds(results),
        "by_source": {
            source: summarize_folds([fold["by_source"].get(source, {}) for fold in by_source])
            for source in sources
        },
        "benign_vs_malignant_auc_by_device": {
            device: {**stats, "scans": sum(fold[device]["n"] for fold in devices if device in fold)}
            for device, stats in fold_auc["metrics"].items()
        },
        "per_fold": list(results),
    }
    if predictions is not None and {"benign", "malignant"} <= set(predictions.class_names):
        names = predictions.class_names
        report["benign_vs_malignant_auc_by_device_pooled"] = device_auc(
            np.array([names.index(label) for label in predictions.labels]),
            predictions.probabilities,
            names,
            np.array(predictions.sources),
            np.array(predictions.devices),
        )
    return report


def _write_split(path: Path, data: _Prepared, splits: np.ndarray) -> None:

    write_manifest(path, data.samples, list(splits), data.groups)


def _write_history(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _columns(rows: list[dict]) -> dict[str, list[float]]:
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("epoch", "stage")]
    return {k: [row.get(k, float("nan")) for row in rows] for k in keys}
