"""The scanner-held-out protocol: leave one scanner out, train on the rest, test on it.

Grouped cross-validation puts every source in every fold, and only BUSI has normal scans, so it
cannot tell "no lesion" from "looks like BUSI". Leaving a whole scanner out can: with BUSI's
LOGIQ E9 left out the model sees no real normal scan, exactly like a clinic's new scanner, and
BUSI's normals say whether "normal" carries over. ``edge-train ... --leave-scanner-out`` runs it
(every scanner, or those named) and writes ``protocol.json`` and ``protocol.md``.

A scanner is ``<source>:<device>``: BUS-BRA names its device per scan (``Device`` in
``bus_data.csv``), BUSI was recorded on one GE LOGIQ E9; other sources count as one scanner each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from training.data.datasets import Sample
from training.evaluation.lesion_metrics import read_scores
from training.evaluation.lesion_metrics import summarize as summarize_lesions
from training.evaluation.metrics import binary_auc
from training.runfolder import (
    LESION_FILE,
    PREDICTIONS_FILE,
    PROTOCOL_FILE,
    PROTOCOL_TABLE,
    HeldOutPredictions,
)

BUSI_SCANNER = "busi:GE LOGIQ E9"


def scanner_name(source: str, device: str = "") -> str:
    """``<source>:<device>`` (:data:`BUSI_SCANNER` for BUSI; the source alone without a device)."""
    if source == "busi":
        return BUSI_SCANNER
    return f"{source}:{device}" if device else source


def scanner_of(sample: Sample) -> str:
    """The scanner of a scan (:func:`scanner_name` of its source and device)."""
    return scanner_name(sample.source, sample.attributes.get("device", ""))


def fold_scanner(predictions: HeldOutPredictions, where: Path) -> str:
    """The scanner a protocol fold left out: the one scanner of its test scans.

    Raises:
        ValueError: ``where`` (the fold's predictions file) names no scanner, or several.
    """
    names = sorted(
        {scanner_name(s, d) for s, d in zip(predictions.sources, predictions.devices, strict=True)}
    )
    if len(names) != 1:
        raise ValueError(
            f"{where}: a protocol fold's test scans come from one scanner. Got {len(names)} "
            f"instead: {names}. Pass the run folder of edge-train --leave-scanner-out."
        )
    return names[0]


def choose_scanners(samples: Sequence[Sample], asked: Sequence[str] | None) -> list[str]:
    """The scanners to leave out: ``asked`` (each must exist), else every scanner.

    Raises:
        ValueError: the data has one scanner, or an asked scanner is not in it (the message lists
            those that are).
    """
    present = sorted({scanner_of(s) for s in samples})
    if len(present) < 2:
        raise ValueError(
            f"--leave-scanner-out trains on the other scanners, and the data has one: {present}. "
            "A scan's scanner is its source (the dataset folder or the manifest's source column) "
            "and, where given, its device column."
        )
    if not asked:
        return present
    unknown = [name for name in asked if name not in present]
    if unknown:
        raise ValueError(
            f"--leave-scanner-out names {unknown}, which the data does not have. "
            f"Scanners in the data: {present}."
        )
    return list(asked)


def scanner_metrics(predictions: HeldOutPredictions, lesions_file: Path | None) -> dict:
    """What one left-out scanner's scans say: accuracy, malignant sensitivity, benign-vs-
    malignant AUC of P(malignant | lesion), normal recall where it has normals, and, with the
    lesion head, the same calls with "normal" decided by the mask head instead (a scan is normal
    when no lesion pixel is found; otherwise the classifier's larger of benign and malignant)."""
    names = list(predictions.class_names)
    probs = predictions.probabilities
    y = np.array([names.index(label) for label in predictions.labels])
    report: dict = {"scans": len(y), **_calls(y, probs.argmax(axis=1), names)}
    if {"benign", "malignant"} <= set(names):
        benign, malignant = names.index("benign"), names.index("malignant")
        lesion = np.isin(y, (benign, malignant))
        score = probs[:, malignant] / np.clip(probs[:, benign] + probs[:, malignant], 1e-12, None)
        report["malignant_auc"] = binary_auc(y[lesion] == malignant, score[lesion])
    if lesions_file is not None and lesions_file.is_file() and "normal" in names:
        scores = read_scores([lesions_file])
        found = np.array([s.predicted_area > 0 for s in scores])
        lesion_call = np.where(
            probs[:, names.index("malignant")] >= probs[:, names.index("benign")],
            names.index("malignant"),
            names.index("benign"),
        )
        by_mask = np.where(found, lesion_call, names.index("normal"))
        report["normal_by_mask_head"] = _calls(y, by_mask, names)
        report["lesion"] = summarize_lesions(scores)["all"]
    return report


def _calls(y: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict:
    out: dict = {"accuracy": float(np.mean(predicted == y)) if len(y) else None}
    for name, key in (("malignant", "malignant_sensitivity"), ("normal", "normal_recall")):
        if name in names and np.any(y == names.index(name)):
            k = names.index(name)
            out[key] = float(np.mean(predicted[y == k] == k))
            out[f"{name}_scans"] = int(np.sum(y == k))
    if "normal" in names:
        lesion = y != names.index("normal")
        missed = int(np.sum(predicted[lesion] == names.index("normal")))
        out["lesion_scans_called_normal"] = missed
        out["lesion_scans_called_normal_rate"] = (
            missed / int(lesion.sum()) if lesion.any() else None
        )
    return out


def write_report(output: Path, folds: Mapping[str, Path]) -> dict:
    """Gather every left-out scanner's fold folder into ``protocol.json`` and ``protocol.md``.

    Args:
        output: the run folder.
        folds: ``{scanner: fold folder}``, each holding ``predictions.csv`` (and ``lesion.csv``).
    """
    report = {
        scanner: {
            **scanner_metrics(
                HeldOutPredictions.read([folder / PREDICTIONS_FILE]), folder / LESION_FILE
            ),
            "unfamiliar": unfamiliar_report(folder),
        }
        for scanner, folder in folds.items()
    }
    (output / PROTOCOL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (output / PROTOCOL_TABLE).write_text(markdown_table(report))
    return report


def markdown_table(report: Mapping[str, Mapping]) -> str:
    """One row per left-out scanner."""

    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| left-out scanner | scans | accuracy | malignant sensitivity | malignant AUC (95% CI) "
        "| normal recall | normal recall, mask head decides "
        "| lesion scans called normal, mask head decides | lesion Dice "
        "| flagged unfamiliar | accuracy flagged / unflagged |",
        "|---|---:|---|---|---|---|---|---|---|---|---|",
    ]
    for scanner, r in report.items():
        auc = r.get("malignant_auc") or {}
        auc_cell = "-"
        if auc.get("auc") is not None:
            ci = auc.get("ci95") or [None, None]
            auc_cell = f"{auc['auc']:.3f} ({num(ci[0])}-{num(ci[1])})"
        mask = r.get("normal_by_mask_head") or {}
        dice = (r.get("lesion") or {}).get("dice") or {}
        unfamiliar = r.get("unfamiliar") or {}
        lines.append(
            f"| {scanner} | {r['scans']} | {num(r.get('accuracy'))} | "
            f"{num(r.get('malignant_sensitivity'))} | {auc_cell} | {num(r.get('normal_recall'))} "
            f"| {num(mask.get('normal_recall'))} "
            f"| {num(mask.get('lesion_scans_called_normal_rate'))} | {num(dice.get('mean'))} "
            f"| {num(unfamiliar.get('flagged_share'))} "
            f"| {num(unfamiliar.get('accuracy_flagged'))} / "
            f"{num(unfamiliar.get('accuracy_unflagged'))} |"
        )
    return "\n".join(lines) + "\n"


def unfamiliar_report(fold: Path, max_reference: int = 512) -> dict:
    """How often the fold's held-out scans are flagged unfamiliar, by the rule ``edge-export``
    writes into a model (export.call_rules: class means and spread of up to ``max_reference``
    training scans' pooled features, threshold at the 99th percentile of the validation scans'
    scores), and the accuracy of the flagged and unflagged ones; computed from the fold's
    ``model.keras`` and ``split.csv``."""
    import csv

    from edge_runtime.model.contract import FEATURES
    from edge_runtime.postprocess.decision import unfamiliar_scores, unfamiliar_stats
    from training.data.pipeline import load_images
    from training.model.classifier import load_classifier
    from training.runfolder import MODEL_FILE, SPLIT_FILE, RunInfo

    info = RunInfo.read(fold)
    model = load_classifier(fold / MODEL_FILE)
    with open(fold / SPLIT_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    train = by_split["train"][:: max(1, len(by_split["train"]) // max_reference)]

    def outputs(part: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, _ = load_images([r["path"] for r in part], info.input_size)
        out = model.predict(images, batch_size=64, verbose=0)
        labels = np.array([info.class_names.index(r["label"]) for r in part])
        return out[FEATURES], out["probabilities"], labels

    f_train, _, y_train = outputs(train)
    stats = unfamiliar_stats(f_train, y_train, len(info.class_names))
    f_val, _, _ = outputs(by_split["val"])
    threshold = float(np.quantile(unfamiliar_scores(f_val, stats), 0.99))
    f_test, p_test, y_test = outputs(by_split["test"])
    flagged = unfamiliar_scores(f_test, stats) > threshold
    right = p_test.argmax(axis=1) == y_test
    return {
        "threshold": threshold,
        "flagged_share": float(flagged.mean()),
        "flagged": int(flagged.sum()),
        "accuracy_flagged": float(right[flagged].mean()) if flagged.any() else None,
        "accuracy_unflagged": float(right[~flagged].mean()) if (~flagged).any() else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.evaluation.protocol RUN_DIR``: (re)write the protocol report of a run
    made with ``edge-train --leave-scanner-out`` from its ``scanners/*`` fold folders."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(
        prog="python -m training.evaluation.protocol", description=main.__doc__
    )
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from training.runfolder import RunInfo

    folds = {}
    for folder in sorted((args.run / "scanners").glob("*")):
        RunInfo.read(folder)  # a fold folder, or a clear error
        predictions = folder / PREDICTIONS_FILE
        try:
            folds[fold_scanner(HeldOutPredictions.read([predictions]), predictions)] = folder
        except ValueError as exc:
            parser.error(str(exc))
    if not folds:
        parser.error(f"{args.run}: no scanners/* fold folders (run edge-train --leave-scanner-out)")
    print(markdown_table(write_report(args.run, folds)), end="")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
