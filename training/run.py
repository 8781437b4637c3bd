"""One training run: discover -> group duplicates -> split -> load -> fit -> evaluate -> report."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from edge_runtime.model.card import CARD_SUFFIX
from edge_runtime.model.contract import ResizePolicy
from training import distributed
from training.augmentation.augment import jitter_gray_levels
from training.augmentation.lesion_free import lesion_free_views_wanted, training_views
from training.augmentation.marks import paint_out_marks
from training.data.datasets import DatasetError, discover_all, fingerprint
from training.data.dedup import group_duplicates
from training.data.pipeline import load_images
from training.data.splits import (
    check_every_split,
    groups_to_reach,
    scans_for_folds,
    stratified_group_kfold,
    stratified_group_split,
    write_manifest,
)
from training.evaluation.diagnostics import Evaluation, check_run, log_warnings
from training.evaluation.lesion_metrics import (
    DICE_BUDGET,
    MAX_LESION_CALLED_NORMAL,
    LesionRule,
    choose_lesion_rule,
    read_scores,
    rule_masks,
    score_scans,
    summarize,
    to_rows,
)
from training.evaluation.metrics import (
    apply_temperature,
    binary_auc,
    evaluate,
    evaluate_subsets,
    fit_temperature,
    summarize_folds,
)
from training.evaluation.plots import (
    plot_confusion_matrix,
    plot_history,
    plot_lesion_grid,
    plot_reliability,
    plot_roc,
)
from training.evaluation.protocol import choose_scanners, markdown_table, scanner_of, write_report
from training.fit import FitConfig, TrainingArrays, fit
from training.model.backbones import Backbone, check_lesion_input_size
from training.model.classifier import build_classifier
from training.model.int8_grid import snap_to_int8_grid
from training.model.segmentation import LESION_STRIDE, LESION_THRESHOLD, load_masks
from training.runfolder import (
    CV_METRICS_FILE,
    FOLD_RECORD,
    HISTORY_FILE,
    LESION_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    PROTOCOL_FILE,
    PROTOCOL_TABLE,
    RUN_FILE,
    SOURCE_METRICS_FILE,
    SPLIT_FILE,
    HeldOutPredictions,
    RunInfo,
    training_options,
)

log = logging.getLogger(__name__)
DEFAULT_CLASS_ORDER = ("normal", "benign", "malignant")
JITTER_GRAY_LEVELS = 2
CV_VAL_FRACTION = 0.15  # of the other folds' scans, in each cross-validation fold


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
    segmentation: bool | None = None  # the lesion head; None: on when any lesion scan has a mask
    # leave each of these scanners out in turn (training.evaluation.protocol); () = none, ("all",)
    # = every one
    leave_scanner_out: tuple[str, ...] = ()
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
    views: list[tuple[int, np.ndarray, str, np.ndarray]]  # extra views (training.probes.lesionfree)
    lesion_free_normals: bool  # the model was (or is) trained on those views
    masks: np.ndarray | None  # lesion masks fitted like the images; None without the lesion head
    mask_known: np.ndarray | None
    fingerprint: str
    sources: tuple[str, ...]


def report_saved(config: TrainConfig) -> list[RunInfo]:
    """Report again on the models a run already trained and saved (its final model and its
    ``scanners/*`` protocol folds, each with ``model.keras``, ``split.csv`` and, unless it is an
    ensemble's graph, ``history.csv``), without training: for a run whose reporting failed or
    changed."""
    from training.model.classifier import load_classifier

    data = _prepare(config, training=False)
    # split.csv holds resolved paths; the data folders may have been named relatively
    index = {str(Path(path).resolve()): i for i, path in enumerate(data.paths)}
    folders = [config.output] if (config.output / MODEL_FILE).is_file() else []
    folders += sorted(
        p for p in (config.output / "scanners").glob("*") if (p / MODEL_FILE).is_file()
    )
    if not folders:
        raise FileNotFoundError(f"{config.output}: no saved model to report on ({MODEL_FILE})")
    infos, protocol = [], {}
    for folder in folders:
        splits = np.full(len(data.paths), "excluded", dtype=object)
        with open(folder / SPLIT_FILE, newline="") as handle:
            assigned = [
                (str(Path(r["path"]).resolve()), r["split"]) for r in csv.DictReader(handle)
            ]
        absent = [path for path, _ in assigned if path not in index]
        if absent:
            raise ValueError(
                f"{folder / SPLIT_FILE}: {len(absent)} of its {len(assigned)} scans are not in "
                f"DATA (the first: {absent[0]}); report with the DATA the run was trained on"
            )
        for path, split in assigned:
            splits[index[path]] = split
        rows = []  # an ensemble's graph was not trained: it has no history
        if (folder / HISTORY_FILE).is_file():
            with open(folder / HISTORY_FILE, newline="") as handle:
                rows = [
                    {k: (v if k == "stage" else float(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(handle)
                ]
        log.info("reporting on the saved model in %s", folder)
        model = load_classifier(folder / MODEL_FILE)
        trained = _as_recorded(data, folder)
        infos.append(_report(config, trained, splits, folder, model, rows))
        if folder.parent.name == "scanners":  # a fold's test rows are one scanner's scans
            protocol[scanner_of(data.samples[int(np.flatnonzero(splits == "test")[0])])] = folder
    if protocol:
        log.info(
            "scanner-held-out protocol:\n%s", markdown_table(write_report(config.output, protocol))
        )
    return infos


def _as_recorded(data: _Prepared, folder: Path) -> _Prepared:
    """``data`` as ``folder``'s model was trained on it, where its ``run.json`` records that
    (report-only builds no lesion-free views, so it cannot count them)."""
    try:
        recorded = RunInfo.read(folder).lesion_free_normals
    except (OSError, ValueError):
        return data
    return replace(data, lesion_free_normals=recorded)


def train(config: TrainConfig) -> RunInfo | None:
    """Run the whole pipeline and write the run folder; returns what was written to run.json
    (None when only cross-validation was asked for: ``final_model=False``). An earlier run's
    results in the folder are removed first, except the folds it finished with the same options,
    data and split: those are kept (:func:`_train_fold`)."""
    start = time.perf_counter()
    config.output.mkdir(parents=True, exist_ok=True)
    _clear_previous_results(config.output, training_options(config))
    data = _prepare(config)
    # every split the run trains on, each checked before the first model trains
    folds = _fold_splits(config, data) if config.folds > 1 else []
    scanners = _scanner_splits(config, data) if config.leave_scanner_out else {}
    splits = _holdout_split(config, data) if config.final_model else None
    if splits is not None:
        _check_split(
            data,
            splits,
            np.ones(len(splits), bool),
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            what="DATA",
        )
    _remove_unplanned_folds(
        config.output,
        [config.output / "cv" / f"fold{k}" for k in range(len(folds))]
        + [config.output / "scanners" / _folder_name(s) for s in scanners],
    )
    if folds:
        _cross_validate(config, data, folds)
    if scanners:
        _leave_scanners_out(config, data, scanners)
    if splits is None:
        log.info("evaluation finished in %.1f min", (time.perf_counter() - start) / 60)
        return None
    _write_split(config.output / SPLIT_FILE, data, splits)
    info = _train_and_report(config, data, splits, config.output)
    log.info("run finished in %.1f min: %s", (time.perf_counter() - start) / 60, config.output)
    return info


# what one run writes into its folder besides train.log; a new run starts without the last's
PREVIOUS_RESULTS = (
    RUN_FILE,  # first: without it the folder is no run (edge-export refuses it) until this ends
    MODEL_FILE,
    SPLIT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    SOURCE_METRICS_FILE,
    PREDICTIONS_FILE,
    LESION_FILE,
    CV_METRICS_FILE,
    PROTOCOL_FILE,
    PROTOCOL_TABLE,
    "duplicates.csv",
    PLOTS_DIR,
    "cv",
    "scanners",
)
FOLD_PARENTS = ("cv", "scanners")  # the folders that hold a run's folds, one sub-folder each


def _clear_previous_results(folder: Path, options: dict[str, object] | None = None) -> None:
    """Remove what an earlier run left in ``folder`` (:data:`PREVIOUS_RESULTS`), so that this
    run's results are never mixed with another's: a stopped or failed run leaves no run behind
    for ``edge-export`` to publish, and a run without ``--folds`` no cross-validation of
    another's in its card. The one exception: a fold (``cv/*``, ``scanners/*``) that a run with
    these ``options`` (:func:`~training.runfolder.training_options`) finished is left for
    :func:`_train_fold` to keep, if its data and split are this run's too."""
    removed = []
    for name in PREVIOUS_RESULTS:
        path = folder / name
        if name in FOLD_PARENTS and options is not None and path.is_dir():
            stale = [f for f in path.iterdir() if _fold_record(f).get("options") != options]
            if len(stale) < len(list(path.iterdir())):
                for fold in stale:
                    _remove(fold)
                removed += [f"{name}/{fold.name}" for fold in stale]
                continue
        if not _remove(path):
            continue
        removed.append(name)
    if removed:
        log.info("%s: removed the previous run's %s", folder, ", ".join(removed))
    for export in sorted({card.parent for card in folder.glob(f"*/*{CARD_SUFFIX}")}):
        log.warning(
            "%s: holds an export of an earlier model of this folder, left as it is: it is not "
            "the model this run trains. Export this run again (edge-export %s --output %s)",
            export,
            folder,
            export,
        )


def _remove(path: Path) -> bool:
    """Remove a file, link or folder tree; False when there was nothing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True


def _remove_unplanned_folds(folder: Path, planned: Sequence[Path]) -> None:
    """Remove the folds an earlier run with the same options kept that this run does not train
    (its data gave another set of scanners or folds), so that no report reads them."""
    for parent in FOLD_PARENTS:
        if (folder / parent).is_dir():
            for fold in sorted((folder / parent).iterdir()):
                if fold not in planned and _remove(fold):
                    log.info("%s: removed, not a fold of this run", fold)


def _fold_record(fold_dir: Path) -> dict:
    """``fold_dir``'s :data:`~training.runfolder.FOLD_RECORD`, or {} without a readable one."""
    try:
        record = json.loads((fold_dir / FOLD_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _train_fold(
    config: TrainConfig, data: _Prepared, splits: np.ndarray, fold_dir: Path
) -> RunInfo:
    """Train and report on one protocol or cross-validation fold in ``fold_dir``; or keep the
    fold an earlier run finished there with the same options, data and split, so that a stopped
    run loses at most the fold in progress. Every fold's model is the same whatever ran before
    it (:func:`_train_and_report` seeds each), so a kept fold is the one this run would train."""
    record = {
        "options": training_options(config),
        "data_fingerprint": data.fingerprint,
        "split_sha256": _split_sha256(data, splits),
    }
    finished = all((fold_dir / name).is_file() for name in (MODEL_FILE, RUN_FILE, SPLIT_FILE))
    if finished and _fold_record(fold_dir) == record:
        log.info("%s: kept, finished by an earlier run with these options and data", fold_dir)
        return RunInfo.read(fold_dir)
    _remove(fold_dir)
    fold_dir.mkdir(parents=True)
    _write_split(fold_dir / SPLIT_FILE, data, splits)
    info = _train_and_report(config, data, splits, fold_dir)
    (fold_dir / FOLD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return info


def _split_sha256(data: _Prepared, splits: np.ndarray) -> str:
    """A SHA-256 over each scan's path and its part (train, val, test, excluded); the data
    fingerprint covers their contents."""
    rows = "\n".join(f"{s.path}\t{part}" for s, part in zip(data.samples, splits, strict=True))
    return hashlib.sha256(rows.encode()).hexdigest()


def _prepare(config: TrainConfig, *, training: bool = True) -> _Prepared:
    """The run's scans, labels, groups and split; ``training=False`` when only reporting (no
    mark-free copies or lesion-free views, which only training uses)."""
    discovery = discover_all(config.data)
    log.info("data:\n%s", discovery.summary())
    found = {s.label for s in discovery.samples}
    order = [c for c in DEFAULT_CLASS_ORDER if c in found] + sorted(
        found - set(DEFAULT_CLASS_ORDER)
    )
    class_names = tuple(order)
    if len(class_names) < 2:
        raise ValueError(
            f"DATA has one class ({', '.join(class_names) or 'none'}): a classifier needs scans "
            "of at least two classes"
        )
    samples = list(discovery.samples)
    if segmentation_wanted(config.segmentation, samples):  # refused before minutes of decoding
        check_lesion_input_size(config.backbone, config.input_size)
    images, failures = load_images(
        [s.path for s in samples], config.input_size, config.resize_policy
    )
    if failures:
        bad = {path for path, _ in failures}
        keep = [i for i, s in enumerate(samples) if str(s.path) not in bad]
        samples, images = [samples[i] for i in keep], images[keep]
    unmarked = None
    if training and config.fit.augment is not None and config.fit.augment.unmark > 0:
        start = time.perf_counter()
        unmarked, _ = load_images(
            [s.path for s in samples],
            config.input_size,
            config.resize_policy,
            transform=paint_out_marks,
        )
        log.info("painted out burned-in marks in %.1f s", time.perf_counter() - start)
    views = []
    if training and lesion_free_views_wanted(config.lesion_free_normals, samples):
        views = training_views(samples, config.input_size, config.resize_policy)
        if not views:
            log.warning(
                "no lesion scan has a mask that leaves room beside its lesion, so no lesion-free "
                "views: a source without normal scans may still come to mean 'not normal'"
            )
        else:
            log.info(
                "%d mirrored views of lesion scans for training (training.probes.lesionfree; "
                "--no-lesion-free-normals leaves them out)",
                len(views),
            )
    masks = mask_known = None
    if segmentation_wanted(config.segmentation, samples):
        masks, mask_known = load_masks(samples, config.input_size, config.resize_policy)
        log.info(
            "%s: %d of %d scans have a known mask (normal scans: empty)",
            "lesion head on (--no-seg turns it off)" if training else "lesion outlines scored",
            int(mask_known.sum()),
            len(samples),
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
        lesion_free_normals=(
            bool(views)
            if training
            else lesion_free_views_wanted(config.lesion_free_normals, samples)
        ),
        masks=masks,
        mask_known=mask_known,
        fingerprint=fingerprint(samples),
        sources=tuple(sorted({s.source for s in samples})),
    )


def segmentation_wanted(asked: bool | None, samples: Sequence) -> bool:
    """Whether to train the lesion head: as ``asked``, or, when ``asked`` is None, whenever a
    lesion scan has a mask.

    Raises:
        ValueError: asked for, but no lesion scan has a mask.
    """
    masked = any(s.masks for s in samples if s.label != "normal")
    if asked and not masked:
        raise ValueError(
            "--seg trains the lesion head on lesion masks, but no benign or malignant scan has "
            "a mask file (BUSI's <name>_mask.png, BUS-BRA's Masks/, or a manifest's mask column)"
        )
    return masked if asked is None else asked


def _holdout_split(config: TrainConfig, data: _Prepared) -> np.ndarray:
    splits = np.array(
        stratified_group_split(
            data.labels,
            data.groups,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        ),
        dtype=object,  # as a str array, "excluded" would be cut to "exclu"
    )
    splits[data.excluded] = "excluded"
    return splits


def _check_split(
    data: _Prepared,
    splits: np.ndarray,
    pool: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    what: str,
    advice: str | None = None,
) -> None:
    """Refuse a split of the scans ``pool`` selects that leaves train, val or, where it makes
    one, test without a scan (:func:`~training.data.splits.check_every_split`): Keras cannot
    validate or predict on nothing.

    Raises:
        DatasetError: a split without a scan.
    """
    check_every_split(
        [data.class_names[k] for k in data.labels[pool]],
        [group for group, taken in zip(data.groups, pool, strict=True) if taken],
        list(splits[pool]),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        what=what,
        advice=advice,
    )


def _check_test(splits: np.ndarray, what: str) -> None:
    """Refuse a fold whose test scans are all kept out (in conflicted duplicate groups).

    Raises:
        DatasetError: no test scan.
    """
    if not np.any(splits == "test"):
        raise DatasetError(
            f"{what}: no scan to test on: every one is in a duplicate group whose copies carry "
            "different labels (duplicates.csv), kept out; fix those labels"
        )


def _train_and_report(
    config: TrainConfig, data: _Prepared, splits: np.ndarray, run_dir: Path
) -> RunInfo:
    """Train on ``splits``' train rows (validation for early stopping), save the model and its
    history, then :func:`_report` on it."""
    part = {name: splits == name for name in ("train", "val", "test")}
    keras.utils.set_random_seed(config.seed)  # the head starts the same whatever ran before
    segment = data.masks is not None
    model = distributed.in_scope(build_classifier)(  # edge-train --distributed
        len(data.class_names),
        backbone=config.backbone,
        input_size=config.input_size,
        weights=config.weights,
        lesion=segment,
    )
    rows = distributed.in_scope(fit)(
        model,
        _training_arrays(data, part["train"]),
        _split_arrays(data, part["val"]),
        config.fit,
        pretrained=config.weights is not None,
    )
    model = distributed.local_copy(model)  # evaluate on this worker alone
    if config.int8_grid:
        log.info("snapped %d kernels to the INT8 weight grid", snap_to_int8_grid(model))
    model.save(run_dir / MODEL_FILE)
    _write_history(run_dir / HISTORY_FILE, rows)
    return _report(config, data, splits, run_dir, model, rows)


def _report(
    config: TrainConfig,
    data: _Prepared,
    splits: np.ndarray,
    run_dir: Path,
    model: keras.Model,
    rows: list[dict],
) -> RunInfo:
    """Calibrate on the validation rows, evaluate on the test rows, and write the run folder's
    reports, plots and ``run.json``."""
    part = {name: splits == name for name in ("train", "val", "test")}
    segment = data.masks is not None

    def predict(mask: np.ndarray) -> dict[str, np.ndarray]:
        return model.predict(data.images[mask], batch_size=64, verbose=0)

    val_outputs = predict(part["val"])
    temperature = fit_temperature(val_outputs["probabilities"], data.labels[part["val"]])
    test_outputs = predict(part["test"])
    test_probs = apply_temperature(test_outputs["probabilities"], temperature)
    y_test = data.labels[part["test"]]
    metrics = evaluate(y_test, test_probs, data.class_names)
    metrics["temperature"] = temperature
    metrics["jitter_stability"] = _jitter_stability(model, data.images[part["test"]], config.seed)
    warnings = check_run(
        rows,
        metrics,
        data.labels,
        splits,
        data.class_names,
        evaluation=_evaluation_of(config, run_dir),
    )
    log_warnings(warnings, str(run_dir))
    test_samples = [s for s, keep in zip(data.samples, part["test"], strict=True) if keep]
    rule = LesionRule(LESION_THRESHOLD)
    if segment:
        normal = data.class_names.index("normal") if "normal" in data.class_names else -1
        rule, trials = choose_lesion_rule(
            data.masks[part["val"]],
            data.mask_known[part["val"]],
            val_outputs["lesion"],
            data.labels[part["val"]] == normal,
            apply_temperature(val_outputs["probabilities"], temperature),
            data.class_names,
            default=rule,
        )
        log.info("lesion rule %s, chosen on the validation split", rule)
        metrics["lesion"] = _lesion_report(
            data, part["test"], test_outputs, test_probs, test_samples, run_dir, rule
        )
        metrics["lesion"]["threshold"] = {
            "value": rule.threshold,
            "min_area": rule.min_area,
            "classifier_gate": rule.classifier_gate,
            "normal_gate": rule.normal_gate,
            "rule": (
                "of every threshold, minimum area and classifier gate (and its P(normal) level) "
                "tried that calls at most "
                f"{MAX_LESION_CALLED_NORMAL:.0%} of the validation lesion scans normal, the one "
                "drawing a lesion on the fewest validation normal scans among those within "
                f"{DICE_BUDGET} of their best mean validation Dice"
            ),
            "validation": [asdict(t) for t in trials],
        }
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
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
    if rows:
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
        lesion_free_normals=data.lesion_free_normals,
        lesion_stride=LESION_STRIDE if segment else 0,
        lesion_threshold=rule.threshold,
        lesion_min_area=rule.min_area if segment else 0.0,
        normal_rule=rule.normal_rule if segment and "normal" in data.class_names else "classifier",
        normal_gate=rule.normal_gate if segment else 0.0,
        seg_weight=config.fit.seg_weight if segment else 0.0,
        augment={} if config.fit.augment is None else asdict(config.fit.augment),
        test_metrics=metrics,
    )
    info.write(run_dir)
    return info


def _evaluation_of(config: TrainConfig, run_dir: Path) -> Evaluation:
    """What the model in ``run_dir`` was tested on: a cross-validation fold (``cv/fold<k>``), a
    scanner-held-out fold (``scanners/<scanner>``) or the final model's held-out split."""
    if run_dir.parent == config.output / "cv":
        return Evaluation.CROSS_VALIDATION
    if run_dir.parent == config.output / "scanners":
        return Evaluation.SCANNER_HELD_OUT
    return Evaluation.HOLDOUT


def _split_arrays(data: _Prepared, part: np.ndarray) -> TrainingArrays:
    """One split's scans, labels and, with the lesion head, masks."""
    return TrainingArrays(
        images=data.images[part],
        labels=data.labels[part],
        masks=None if data.masks is None else data.masks[part],
        mask_known=None if data.mask_known is None else data.mask_known[part],
    )


def _training_arrays(data: _Prepared, train: np.ndarray) -> TrainingArrays:
    """The training split's arrays (:func:`_split_arrays`) and unmarked copies (None unless
    asked for), followed by the extra views made from its scans, never from validation or test
    scans (a view stands in for its own unmarked copy; its mask is known)."""
    arrays = _split_arrays(data, train)
    unmarked = None if data.unmarked is None else data.unmarked[train]
    extra = [view for view in data.views if train[view[0]]]
    if not extra:
        return TrainingArrays(**{**arrays.__dict__, "unmarked": unmarked})
    log.info("training on %d scans and %d mirrored views", int(train.sum()), len(extra))
    views = np.stack([image for _, image, _, _ in extra])
    labels = [data.class_names.index(label) for _, _, label, _ in extra]
    masks = mask_known = None
    if arrays.masks is not None:
        masks = np.concatenate([arrays.masks, np.stack([m for *_, m in extra])])
        mask_known = np.concatenate([arrays.mask_known, np.ones(len(extra), bool)])
    return TrainingArrays(
        images=np.concatenate([arrays.images, views]),
        labels=np.concatenate([arrays.labels, labels]),
        masks=masks,
        mask_known=mask_known,
        unmarked=None if unmarked is None else np.concatenate([unmarked, views]),
    )


def _lesion_report(
    data: _Prepared,
    test: np.ndarray,
    outputs: dict[str, np.ndarray],
    probs: np.ndarray,
    samples: Sequence,
    run_dir: Path,
    rule: LesionRule,
) -> dict:
    """Score the lesion head on the test scans by the lesion ``rule``: ``lesion.csv`` per
    scan, a plot of outlines, and the summary that goes into ``metrics.json``
    (training.evaluation.lesion_metrics)."""
    predicted = probs.argmax(axis=1)
    cams = outputs["cam"][np.arange(len(predicted)), :, :, predicted]
    scores = score_scans(
        data.masks[test],
        data.mask_known[test],
        outputs["lesion"],
        cams,
        [s.label for s in samples],
        [s.source for s in samples],
        [s.attributes.get("device", "") for s in samples],
        rule,
        probs,
        data.class_names,
    )
    rows = to_rows(scores, [str(s.path) for s in samples])
    with open(run_dir / LESION_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / PLOTS_DIR).mkdir(exist_ok=True)
    plot_lesion_grid(
        data.images[test],
        data.masks[test],
        rule_masks(outputs["lesion"], data.images.shape[1], rule, probs, data.class_names),
        [s.label for s in samples],
        [d.dice for d in scores],
        run_dir / PLOTS_DIR / "lesions.png",
    )
    report = summarize(scores)
    log.info(
        "test lesions: Dice %s, pointing (CAM) %s, normal scans with a lesion %s",
        *(
            "-" if (mean := report["all"][key]["mean"]) is None else f"{mean:.3f}"
            for key in ("dice", "pointing_cam", "normal_with_lesion")
        ),
    )
    return report


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


def _fold_splits(config: TrainConfig, data: _Prepared) -> list[np.ndarray]:
    """Each cross-validation fold's split, checked: the fold is its test split, and the other
    folds' scans are split into train and val.

    Raises:
        ValueError: more folds than groups of scans, or than scans in the largest class.
        DatasetError: a fold's split without a scan (:func:`_check_split`).
    """
    groups = len(set(data.groups))
    if config.folds > groups:
        raise ValueError(
            f"--folds {config.folds}: the data hold {groups} groups of scans (a patient's scans "
            f"and near-copies are one group, never split), fewer than the folds: use --folds "
            f"{groups} or fewer"
        )
    largest = int(np.bincount(data.labels).max())
    if config.folds > largest:  # scikit-learn's StratifiedGroupKFold refuses it
        raise ValueError(
            f"--folds {config.folds}: the largest class has {largest} scans, fewer than the "
            f"folds, so no fold would get a scan of every class: use --folds {largest} or fewer, "
            "or add scans"
        )
    folds = np.array(
        stratified_group_kfold(data.labels, data.groups, n_splits=config.folds, seed=config.seed)
    )
    needed = scans_for_folds(
        config.folds, val_fraction=CV_VAL_FRACTION, classes=len(data.class_names)
    )
    plans = []
    for k in range(config.folds):
        rest = np.flatnonzero(folds != k)
        inner = np.array(
            stratified_group_split(
                data.labels[rest],
                [data.groups[i] for i in rest],
                val_fraction=CV_VAL_FRACTION,
                test_fraction=0.0,
                seed=config.seed,
            )
        )
        splits = np.full(len(data.labels), "test", dtype=object)
        splits[rest] = inner
        splits[data.excluded] = "excluded"
        what = f"--folds {config.folds}, cv/fold{k}"
        _check_split(
            data,
            splits,
            folds != k,
            val_fraction=CV_VAL_FRACTION,
            test_fraction=0.0,
            what=f"{what} (trained on the other folds' scans)",
            advice=f"With --folds {config.folds}, every fold keeps validation scans from "
            f"{needed} one-scan groups of each class on (more folds leave more to each fold's "
            "training and validation): add scans.",
        )
        _check_test(splits, what)
        plans.append(splits)
    return plans


def _cross_validate(config: TrainConfig, data: _Prepared, plans: Sequence[np.ndarray]) -> None:
    """Train and report on each fold of :func:`_fold_splits`, then sum the folds up in
    ``cv_metrics.json``."""
    results, by_source = [], []
    for k, splits in enumerate(plans):
        fold_dir = config.output / "cv" / f"fold{k}"
        log.info(
            "cross-validation %s (%d of %d)",
            fold_dir.relative_to(config.output),
            k + 1,
            config.folds,
        )
        results.append(_train_fold(config, data, splits, fold_dir).test_metrics)
        by_source.append(json.loads((fold_dir / SOURCE_METRICS_FILE).read_text()))
    report = cross_validation_report(
        results,
        by_source,
        data.sources,
        HeldOutPredictions.read(
            [config.output / "cv" / f"fold{k}" / PREDICTIONS_FILE for k in range(config.folds)]
        ),
    )
    lesion_files = [config.output / "cv" / f"fold{k}" / LESION_FILE for k in range(config.folds)]
    if all(path.is_file() for path in lesion_files):
        report["lesion"] = summarize(read_scores(lesion_files))
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


def _scanner_splits(config: TrainConfig, data: _Prepared) -> dict[str, np.ndarray]:
    """Each scanner-held-out fold's split, checked (training.evaluation.protocol): all of the
    scanner's scans are its test split, and the other scanners' scans are split into train and
    val; a duplicate group that spans the left-out scanner and another is kept out of training.

    Raises:
        ValueError: a scanner not in the data, or one whose leaving out leaves one class.
        DatasetError: a fold's split without a scan (:func:`_check_split`).
    """
    asked = None if config.leave_scanner_out == ("all",) else config.leave_scanner_out
    scanners = choose_scanners(data.samples, asked)
    of = np.array([scanner_of(s) for s in data.samples])
    needed = groups_to_reach(val_fraction=config.val_fraction, test_fraction=0.0)["val"]
    plans = {}
    for scanner in scanners:
        held = of == scanner
        leaked = {g for g, h in zip(data.groups, held, strict=True) if h}
        train_val = ~held & ~np.isin(data.groups, list(leaked))
        rest = np.flatnonzero(train_val)
        if len(set(data.labels[rest].tolist())) < 2:
            raise ValueError(
                f"leaving {scanner} out leaves {len(rest)} scans of other scanners to train on, "
                "not two classes: too few to train a fold"
            )
        inner = np.array(
            stratified_group_split(
                data.labels[rest],
                [data.groups[i] for i in rest],
                val_fraction=config.val_fraction,
                test_fraction=0.0,
                seed=config.seed,
            )
        )
        splits = np.full(len(data.labels), "excluded", dtype=object)
        splits[rest] = inner
        splits[held] = "test"
        splits[data.excluded] = "excluded"
        what = f"--leave-scanner-out {scanner}"
        _check_split(
            data,
            splits,
            train_val,
            val_fraction=config.val_fraction,
            test_fraction=0.0,
            what=f"{what} (trained on the other scanners' scans)",
            advice=f"Add scans of the other scanners: {needed} or more of each class.",
        )
        _check_test(splits, what)
        plans[scanner] = splits
    return plans


def _leave_scanners_out(config: TrainConfig, data: _Prepared, plans: dict[str, np.ndarray]) -> None:
    """The scanner-held-out protocol (training.evaluation.protocol): for each scanner's split of
    :func:`_scanner_splits`, train on the others (a grouped validation split of them for early
    stopping and temperature) and test on all of its scans. Writes ``scanners/<scanner>/`` fold
    folders, ``protocol.json`` and ``protocol.md``.
    """
    folds = {}
    for scanner, splits in plans.items():
        fold_dir = config.output / "scanners" / _folder_name(scanner)
        log.info(
            "leave %s out: %d test scans, %d train/val scans",
            scanner,
            np.sum(splits == "test"),
            np.sum(np.isin(splits, ("train", "val"))),
        )
        _train_fold(config, data, splits, fold_dir)
        folds[scanner] = fold_dir
    report = write_report(config.output, folds)
    log.info("scanner-held-out protocol:\n%s", markdown_table(report))


def _folder_name(scanner: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in scanner)


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
