"""The run folder: what ``edge-train`` writes and ``edge-export`` reads. Defined once, here."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
SOURCE_METRICS_FILE = "source_metrics.json"
CV_METRICS_FILE = "cv_metrics.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
LESION_FILE = "lesion.csv"
PROTOCOL_FILE = "protocol.json"  # the scanner-held-out protocol (training.evaluation.protocol)
PROTOCOL_TABLE = "protocol.md"
PLOTS_DIR = "plots"
LOG_FILE = "train.log"  # everything edge-train logged, TensorFlow's messages included
# a protocol or cross-validation fold's record of what trained it, written once it has finished:
# a rerun with the same options, data and split keeps the fold (training.run)
FOLD_RECORD = "fold.json"


def training_options(config: Any) -> dict[str, object]:
    """What decides a run's models, flattened (``fit.augment.clutter``), as JSON values: its
    training config (a :class:`training.run.TrainConfig`) without the output folder, with the
    data paths resolved."""
    resolved = dataclasses.replace(config, data=tuple(Path(d).resolve() for d in config.data))
    options = json.loads(json.dumps(dataclasses.asdict(resolved), default=str))
    del options["output"]

    def flat(values: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value
        return out

    return flat(options)


@dataclass(frozen=True)
class RunInfo:
    """What a trained model is: its classes, input, backbone, data and calibration."""

    class_names: tuple[str, ...]
    input_size: int
    resize_policy: str
    backbone: str
    seed: int
    data_fingerprint: str
    temperature: float = 1.0
    abstain_threshold: float = 0.0
    model_version: str = "0.1.0"
    sources: tuple[str, ...] = ()
    # kernels snapped to export's INT8 weight grid (training.model.int8_grid)
    int8_grid: bool = False
    lesion_free_normals: bool = False  # trained on mirrored lesion-scan views too
    lesion_stride: int = 0  # input pixels per pixel of the lesion output; 0: no lesion head
    lesion_threshold: float = 0.5
    # share of the square input (training.evaluation.lesion_metrics.LesionRule)
    lesion_min_area: float = 0.0
    # edge_runtime.model.contract.NormalRule's value; "" in runs from before it was recorded, whose
    # lesion models with a normal class all used lesion_head
    normal_rule: str = ""
    normal_gate: float = 0.0  # training.evaluation.lesion_metrics.LesionRule.normal_gate
    seg_weight: float = 0.0
    # training.augmentation.augment.AugmentConfig
    augment: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime_normal_rule(self) -> str:
        """``normal_rule``, or for a run from before it was recorded the rule all of those
        used: ``lesion_head`` for a lesion model with a normal class, else ``classifier``."""
        if self.normal_rule:
            return self.normal_rule
        return (
            "lesion_head" if self.lesion_stride and "normal" in self.class_names else "classifier"
        )

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / RUN_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        """Read ``run.json``.

        Raises:
            FileNotFoundError / ValueError: not a run folder, or a damaged one.
        """
        run_dir = Path(run_dir)
        path = run_dir / RUN_FILE
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: run folder not found")
        evaluated_only = [n for n in (CV_METRICS_FILE, PROTOCOL_FILE) if (run_dir / n).is_file()]
        if not (run_dir / MODEL_FILE).is_file() and evaluated_only:
            raise ValueError(
                f"{run_dir}: an evaluation run ({evaluated_only[0]}, --cv-only): it trained a "
                "model per fold to measure, and no final model to export. Train again without "
                "--cv-only (or export one fold's model, e.g. its cv/fold0 or scanners/ folder)."
            )
        if not path.is_file() or not (run_dir / MODEL_FILE).is_file():
            raise ValueError(
                f"{run_dir}: not an edge-train run folder (it needs {RUN_FILE} and {MODEL_FILE}). "
                "Pass the --output folder of an `edge-train` run."
            )
        try:
            data = json.loads(path.read_text())
            data["class_names"] = tuple(data["class_names"])
            data["sources"] = tuple(data.get("sources", ()))
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: unreadable run description: {exc}") from exc


def read_reports(run_dir: Path) -> dict[str, Any]:
    """The run's optional reports: ``by_source``, ``cross_validation`` and ``protocol`` (the
    scanner-held-out folds) where written."""
    reports = {}
    for key, name in (
        ("by_source", SOURCE_METRICS_FILE),
        ("cross_validation", CV_METRICS_FILE),
        ("protocol", PROTOCOL_FILE),
    ):
        path = Path(run_dir) / name
        if path.is_file():
            reports[key] = json.loads(path.read_text())
    return reports


@dataclass(frozen=True)
class HeldOutPredictions:
    """A run's calibrated probabilities on its test scans (``predictions.csv``)."""

    paths: list[str]
    sources: list[str]
    devices: list[str]  # the scanner where the dataset names it, else ""
    labels: list[str]
    probabilities: np.ndarray  # [N, K], temperature-scaled
    class_names: tuple[str, ...]

    def write(self, path: Path) -> Path:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "source", "device", "label", *self.class_names])
            for row in zip(
                self.paths, self.sources, self.devices, self.labels, self.probabilities, strict=True
            ):
                writer.writerow([*row[:4], *(f"{p:.6f}" for p in row[4])])
        return path

    @classmethod
    def read(cls, paths: Sequence[Path]) -> HeldOutPredictions:
        """Read one or several ``predictions.csv`` (e.g. the folds of a cross-validation) as one.

        Raises:
            ValueError: the files name different classes.
        """
        rows: list[dict] = []
        class_names: tuple[str, ...] = ()
        for k, path in enumerate(paths):
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                names = tuple((reader.fieldnames or [])[4:])
                if k and names != class_names:
                    raise ValueError(f"{path}: classes {names}, expected {class_names}")
                class_names = names
                rows += list(reader)
        probabilities = [[float(r[c]) for c in class_names] for r in rows]
        return cls(
            paths=[r["path"] for r in rows],
            sources=[r["source"] for r in rows],
            devices=[r["device"] for r in rows],
            labels=[r["label"] for r in rows],
            probabilities=np.array(probabilities, dtype=np.float64).reshape(
                len(rows), len(class_names)
            ),
            class_names=class_names,
        )
