"""Small, really trained ``edge-train``-style run folders for tests, built in seconds.

The model trains briefly on synthetic scans (``training.synthetic``), so its held-out
predictions are confident and parity checks on them mean something. Build one per test module
or session (a ``scope="module"`` fixture) and share it: training is the slow part.

Example:
    >>> run = make_run_folder(tmp_path / "run", size=64)  # doctest: +SKIP
    >>> export_main([str(run), "--output", str(tmp_path / "out")])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from training.runfolder import MODEL_FILE, SPLIT_FILE, RunInfo
from training.synthetic import CLASSES, write_synthetic_dataset

SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}


def make_run_folder(
    path: str | Path,
    *,
    backbone: str = "small-cnn",
    size: int = 64,
    per_class: int = 40,
    epochs: int = 15,
    seed: int = 0,
) -> Path:
    """Train a small classifier on synthetic scans and write a run folder at ``path``.

    Writes ``path/data/<class>/*.png`` (the scans), ``model.keras``, ``split.csv`` (columns
    ``path,label,split,group``, one group per scan; 50% train, 20% val, 30% test per class)
    and ``run.json`` with the test accuracy, as ``edge-train`` would (kernels on the INT8 grid).

    Args:
        path: the run folder to create.
        backbone: a ``training.model.backbones.Backbone`` value, trained from scratch (no weights).
        size: input side in pixels; keep it small (64-96) in tests.
        per_class: synthetic scans per class.
        epochs: training epochs (one stage, from scratch).
        seed: seed for the scans, the split and training.

    Returns:
        ``path``.
    """
    from training.data.pipeline import load_images
    from training.fit import FitConfig, TrainingArrays, fit
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier
    from training.model.int8_grid import snap_to_int8_grid

    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_dataset(run / "data", per_class, seed=seed)
    paths = sorted(data.glob("*/*.png"))
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    splits = _stratified_split(labels, seed)
    images, failures = load_images(paths, size)
    if failures:
        raise RuntimeError(f"synthetic scans could not be read: {failures[:3]}")

    model = build_classifier(
        len(CLASSES), backbone=Backbone(backbone), input_size=size, weights=None, dropout=0.1
    )
    train, val, test = (splits == s for s in ("train", "val", "test"))
    config = FitConfig(
        epochs_frozen=0,
        epochs_finetune=epochs,
        batch_size=16,
        learning_rate=3e-3,
        patience=epochs,
        seed=seed,
        augment=None,
        label_smoothing=0.0,
        min_steps_per_epoch=0,  # its schedule is set in epochs of this size
    )
    fit(
        model,
        TrainingArrays(images[train], labels[train]),
        TrainingArrays(images[val], labels[val]),
        config,
        pretrained=False,
    )
    snap_to_int8_grid(model)
    model.save(run / MODEL_FILE)

    probs = model.predict(images[test], batch_size=64, verbose=0)["probabilities"]
    accuracy = float(np.mean(probs.argmax(1) == labels[test]))
    with open(run / SPLIT_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "group"])
        writer.writerows(
            [str(p), CLASSES[k], s, Path(p).stem]
            for p, k, s in zip(paths, labels, splits, strict=True)
        )
    RunInfo(
        class_names=CLASSES,
        input_size=size,
        resize_policy="letterbox",
        backbone=backbone,
        seed=seed,
        data_fingerprint=f"synthetic-{per_class}-{seed}",
        temperature=1.0,
        abstain_threshold=0.5,
        sources=("synthetic",),
        int8_grid=True,
        test_metrics={"n": int(test.sum()), "accuracy": accuracy},
    ).write(run)
    return run


def _stratified_split(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n_train = round(SPLIT_FRACTIONS["train"] * len(members))
        n_val = round(SPLIT_FRACTIONS["val"] * len(members))
        splits[members[:n_train]] = "train"
        splits[members[n_train : n_train + n_val]] = "val"
        splits[members[n_train + n_val :]] = "test"
    return splits
