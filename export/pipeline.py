"""``edge-export``'s work: convert, quantize, describe, verify, and only then write."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_runtime.model.card import CARD_SUFFIX, model_file_name
from edge_runtime.model.contract import LESION, ModelSpec, NormalRule, Precision, ResizePolicy
from edge_runtime.model.cpu import int8_saturates
from edge_runtime.model.external_data import external_data_files
from edge_runtime.model.session import Provider, batch_probabilities, open_model
from edge_runtime.model.verify import verify_model_file
from edge_runtime.postprocess.lesion import lesion_peak
from edge_runtime.postprocess.recheck import call_margins, near_a_call, recheck_margin
from export.call_rules import choose_operating_point, choose_unfamiliar, runtime_calls
from export.card import build_card, file_record, parity_record, write_card
from export.convert import keras_to_onnx, write_metadata
from export.diagnose import count_convs, rank_quantization_error
from export.fp16 import store_conv_weights_as_float16, to_fp16
from export.input_fold import fold_input_scaling
from export.parity import (
    MAX_ACCURACY_DROP,
    MIN_TOP1_AGREEMENT,
    ParityReport,
    fp16_gate,
    fp32_gate,
    half_weights_gate,
    int8_gate,
    int8_recheck_gate,
    lesion_gate,
)
from export.quantize import (
    QuantConfig,
    calibration_candidates,
    calibration_name,
    every_conv_float,
    quantize_int8,
)
from training.augmentation.augment import jitter_gray_levels
from training.ensemble import member_backbones
from training.model.backbones import Backbone, pixel_scaling
from training.runfolder import MODEL_FILE, SPLIT_FILE, RunInfo, read_reports

log = logging.getLogger(__name__)
# INT8 gates judge the model as exact integer kernels (VNNI, ARM) compute it. On an x86 CPU
# without VNNI onnxruntime's U8S8 kernels saturate (docs/experiments.md, "INT8 on x86 CPUs
# without VNNI"), and the runtime serves FP32 there, so the gates run the QDQ graph in float.
SATURATING_CPU = int8_saturates()
GATE_ARITHMETIC = (
    "QDQ run in float (this export host's INT8 kernels saturate)"
    if SATURATING_CPU
    else "onnxruntime's integer kernels"
)


FLOAT_CONVS_HINT = 11  # the --float-convs value the advice names first


def int8_advice(
    float_convs: int, all_float: bool, tried_auto: bool, *, requantize: bool = False
) -> str:
    """What to try after an INT8 refusal, less what the refused export already did: no
    ``--float-convs`` once every convolution ran in float (``all_float``), a larger N than
    ``float_convs`` otherwise, and no ``--calibration auto`` after ``tried_auto``. With
    ``requantize``, only what ``python -m export.requantize`` can be asked (``--float-convs``);
    the INT8 file it would have replaced stays."""
    tries = []
    if not all_float:
        example = (
            f"e.g. {FLOAT_CONVS_HINT}" if float_convs < FLOAT_CONVS_HINT else f"above {float_convs}"
        )
        tries.append(
            f"--float-convs N ({example}: the first convolutions in float, a little slower; "
            'docs/experiments.md, "Quantization settings")'
        )
    if requantize:
        kept = "; or keep the INT8 file as it is: requantize changed no file"
        return f"To try: {tries[0]}{kept}." if tries else f"Nothing to try{kept}."
    if not tried_auto:
        tries.append("--calibration auto")
    tries.append(
        "longer training (a model trained for a few epochs has many near-ties that INT8 flips)"
    )
    return (
        f"To try: {'; '.join(tries)}; or --precision fp32 to write the verified FP32 model alone."
    )


class ParityError(RuntimeError):
    """An exported model disagrees with its source; nothing was written."""

    def __init__(self, reports: list[ParityReport], report_path: Path, advice: str) -> None:
        self.reports, self.report_path = reports, report_path
        failed = [r.summary() for r in reports if not r.passed]
        reduced = any("int8" in r.name or "fp16" in r.name for r in reports if not r.passed)
        super().__init__(
            "parity gate failed:\n  "
            + "\n  ".join(failed)
            + f"\nFull report: {report_path}. No model was written."
            + (f"\n{advice}" if reduced else "")
        )


@dataclass(frozen=True)
class ExportOptions:
    run_dir: Path
    output_dir: Path
    name: str = "model"
    quantization: QuantConfig = field(default_factory=QuantConfig)
    max_parity_images: int = 512
    fp16: bool = False
    min_agreement: float = MIN_TOP1_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    choose_calibration: bool = False  # pick among calibration_candidates on the val split
    # INT8 answers it is unsure of are rerun in FP32 (edge_runtime.postprocess.recheck)
    recheck: bool = True
    precision: Precision = Precision.INT8  # FP32: the verified FP32 model alone, no INT8
    # True: the FP32 file stores its convolution weights as float16 (half the size; float32
    # arithmetic), gated against the float32 weights; INT8 is quantized from and gated against it
    fp32_half_weights: bool = False


@dataclass(frozen=True)
class ExportResult:
    files: tuple[Path, ...]
    card: Path
    reports: tuple[ParityReport, ...]


@dataclass(frozen=True)
class _Images:
    """What an export measures on, preprocessed as the runtime does.

    Attributes:
        calibration: training images for INT8 calibration.
        held_out: the gates' images (the test split, else validation), with their ``labels``
            and ``sources`` (each image's dataset, ``split.csv``'s ``source``).
        val: the validation split when it is apart from ``held_out`` (else None), with
            ``val_labels``: the operating point, the recheck margin and auto calibration.
    """

    calibration: np.ndarray
    held_out: np.ndarray
    labels: np.ndarray
    sources: list[str]
    val: np.ndarray | None
    val_labels: np.ndarray | None


@dataclass(frozen=True)
class _Staged:
    """One export in its staging folder: what every step reads."""

    options: ExportOptions
    info: RunInfo
    images: _Images
    tmp: Path

    def path(self, precision: Precision) -> Path:
        return self.tmp / model_file_name(self.options.name, precision.value)


@dataclass(frozen=True)
class _Fp32:
    path: Path
    decision: dict
    probabilities: np.ndarray  # [N, K] on the held-out images
    lesion: np.ndarray | None  # [N, h, w, 1], for a model with a lesion output
    float32_weights: Path  # the conversion with float32 weights (``path`` unless stored half)


@dataclass(frozen=True)
class _Int8:
    path: Path
    prepared: Path  # the pre-processed FP32 model it was quantized from (for diagnosis)
    settings: dict  # the card's quantization record
    margin: float  # the FP32 recheck margin; 0: no recheck
    alone: ParityReport  # INT8 without its recheck, for information


def export_run(options: ExportOptions) -> ExportResult:
    """Export a run folder to ``<name>-fp32.onnx``, ``<name>-int8.onnx`` (and optionally
    ``<name>-fp16.onnx``) and a model card.

    Raises:
        FileNotFoundError / ValueError: missing or foreign run folder, bad split manifest.
        PermissionError: the output folder cannot be written.
        ParityError: a parity gate failed; a report is written, no model is.
    """
    info = RunInfo.read(options.run_dir)
    output = Path(options.output_dir)
    staging_parent = _writable_dir(output.parent)
    images = _Images(*_images_for(options, info), *_validation_images(options, info))
    from training.model.classifier import load_classifier

    keras_model = load_classifier(options.run_dir / MODEL_FILE)
    with tempfile.TemporaryDirectory(dir=staging_parent, prefix=f".{output.name}.export-") as tmp:
        staged = _Staged(options, info, images, Path(tmp))
        reports: dict[str, ParityReport] = {}  # by role: fp32, fp32 lesion, int8, ...
        fp32 = _export_fp32(staged, keras_model, reports)
        int8 = None
        candidates = [fp32.path]
        if options.precision is not Precision.FP32:
            int8 = _export_int8(staged, fp32, reports)
            candidates.append(int8.path)
        if options.fp16:
            candidates.append(_export_fp16(staged, fp32, reports))
        for report in reports.values():
            log.info("%s", report.summary())
        if not all(r.passed for r in reports.values()):
            _refuse(staged, fp32, int8, reports, output)
        point = fp32.decision.get("malignant_operating_point") or {}
        calls = runtime_calls(
            info,
            fp32.probabilities,
            images.labels,
            point.get("threshold", 0.0),
            fp32.lesion,
            sources=images.sources,
        )
        card = build_card(
            options.name,
            info,
            candidates,
            list(reports.values()),
            int8.settings if int8 else {"int8": "not written (--precision fp32)"},
            read_reports(options.run_dir),
            decision=fp32.decision,
            runtime_calls=calls,
        )
        card_json, card_md = write_card(card, staged.tmp)
        _verify_written(staged, candidates, fp32.probabilities, output, int8)
        _publish([card_json, card_md, *candidates], _writable_dir(output), options.name)
    files = tuple(output / path.name for path in candidates)
    return ExportResult(files, output / card_json.name, tuple(reports.values()))


def requantize_export(
    model_dir: Path,
    name: str,
    split_dir: Path,
    data_root: Path,
    quantization: QuantConfig,
    *,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> ExportResult:
    """Quantize an exported model's INT8 file again from its FP32 file, with ``quantization``,
    for when its run folder is gone but its export is not (the bundled default model).

    The FP32 file, its decision thresholds and every measurement of the card stay as they are.
    The INT8 model is gated against the FP32 one as :func:`export_run` gates it (FP32 recheck
    margin on validation, top-1 agreement and lesion Dice on the held-out split), and the card's
    ``quantization``, INT8 ``parity`` entries and ``files`` record are replaced. The calibration,
    validation and held-out scans come from ``split_dir``'s ``split.csv``, which must be the
    model's own split: its test rows must be ``<name>.heldout.csv``'s (paths under
    ``data_root``) where that file exists. ``min_agreement`` and ``max_accuracy_drop`` bound
    the INT8 gate as export's options of those names do.

    Raises:
        FileNotFoundError: a model file or the card is missing.
        ValueError: the split is not the model's, or cannot be read.
        ParityError: an INT8 gate failed; a report is written, no file is changed.
    """
    model_dir = Path(model_dir)
    fp32_path = model_dir / model_file_name(name, Precision.FP32.value)
    card_path = model_dir / f"{name}{CARD_SUFFIX}"
    for path in (fp32_path, card_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
    card = json.loads(card_path.read_text())
    spec = open_model(fp32_path, provider=Provider.CPU).spec
    info = _info_from_spec(spec, card)
    options = ExportOptions(
        split_dir,
        model_dir,
        name,
        quantization,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )
    _check_heldout(model_dir / f"{name}.heldout.csv", _manifest_rows(options), data_root)
    images = _Images(*_images_for(options, info), *_validation_images(options, info))
    point = {"threshold": spec.malignant_threshold} if spec.malignant_threshold else None
    decision = {"malignant_operating_point": point, "unfamiliar": dict(spec.unfamiliar)}
    lesion = _onnx_output(fp32_path, images.held_out, "lesion") if spec.has_lesion else None
    probabilities = _onnx_probabilities(fp32_path, images.held_out)
    fp32 = _Fp32(fp32_path, decision, probabilities, lesion, fp32_path)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=f".{name}.requantize-") as tmp:
        staged = _Staged(options, info, images, Path(tmp))
        reports: dict[str, ParityReport] = {}
        int8 = _export_int8(staged, fp32, reports)
        for report in reports.values():
            log.info("%s", report.summary())
        if not all(r.passed for r in reports.values()):
            _refuse(staged, fp32, int8, reports, model_dir, requantize=True)
        kept = [p for p in card["parity"] if not p["check"].startswith("onnx-int8")]
        card["quantization"] = int8.settings
        card["parity"] = kept + [parity_record(r) for r in reports.values()]
        card["files"][int8.path.name] = file_record(int8.path)
        card_json, card_md = write_card(card, staged.tmp)
        for path in (fp32_path, *external_data_files(fp32_path)):  # its recheck partner, beside it
            shutil.copy2(path, staged.tmp / path.name)
        _verify_written(staged, [int8.path], fp32.probabilities, model_dir, int8, requantize=True)
        _publish([card_json, card_md, int8.path], model_dir, name)
    return ExportResult((model_dir / int8.path.name,), card_path, tuple(reports.values()))


def _info_from_spec(spec: ModelSpec, card: dict) -> RunInfo:
    """The run description an export needs, from an exported model's metadata and card."""
    return RunInfo(
        class_names=spec.class_names,
        input_size=spec.input_size,
        resize_policy=spec.resize_policy.value,
        backbone=spec.backbone,
        seed=card["training"]["seed"],
        data_fingerprint=spec.training_data_fingerprint,
        temperature=spec.temperature,
        abstain_threshold=spec.abstain_threshold,
        model_version=spec.model_version,
        sources=tuple(card["training"]["sources"]),
        lesion_stride=spec.lesion_stride,
        lesion_threshold=spec.lesion_threshold,
        lesion_min_area=spec.lesion_min_area,
        normal_rule=spec.normal_rule.value,
        normal_gate=spec.normal_gate,
        test_metrics=dict(spec.metrics),
    )


def _check_heldout(heldout: Path, rows: dict[str, list[dict]], data_root: Path) -> None:
    """Refuse a split whose test rows are not the model's held-out scans."""
    if not heldout.is_file():
        return
    with open(heldout, newline="") as handle:
        expected = sorted(row["path"] for row in csv.DictReader(handle))
    root = Path(data_root).resolve()
    got = []
    for row in rows.get("test", []):
        path = Path(row["path"]).resolve()
        got.append(path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path))
    if sorted(got) != expected:
        raise ValueError(
            f"{heldout}: the split's {len(got)} test scans are not this model's {len(expected)} "
            "held-out scans; pass the split.csv of the run the model was trained in."
        )


def _export_fp32(staged: _Staged, keras_model, reports: dict[str, ParityReport]) -> _Fp32:
    """Convert and gate ONNX FP32 against Keras (its probabilities, and its lesion output where
    the model has one); store its convolution weights as float16 if asked, gated again; then
    choose the decision thresholds on validation with the file as written."""
    info, images = staged.info, staged.images
    path = _step(
        "convert to ONNX FP32",
        keras_to_onnx,
        keras_model,
        info.input_size,
        staged.path(Precision.FP32),
    )
    write_metadata(path, _spec(info, Precision.FP32, {}))
    keras_outputs = keras_model.predict(images.held_out, batch_size=32, verbose=0)
    probabilities = _onnx_probabilities(path, images.held_out)
    reports["fp32"] = fp32_gate(keras_outputs["probabilities"], probabilities, images.labels)
    lesion = None
    if info.lesion_stride:
        lesion = _onnx_output(path, images.held_out, "lesion")
        reports["fp32 lesion"] = lesion_gate(
            keras_outputs["lesion"],
            lesion,
            info.lesion_threshold,
            min_area=info.lesion_min_area,
            name="onnx-fp32 lesion vs keras",
            min_dice=0.99,
        )
    float32_weights = path
    if staged.options.fp32_half_weights:
        float32_weights = staged.tmp / "float32-weights-fp32.onnx"
        os.replace(path, float32_weights)
        probabilities, lesion = _store_half_weights(
            staged, float32_weights, path, probabilities, lesion, reports
        )
    decision = _decision(info, path, staged.options, images.val, images.val_labels)
    write_metadata(path, _spec(info, Precision.FP32, {}, decision=decision))
    return _Fp32(path, decision, probabilities, lesion, float32_weights)


def _store_half_weights(
    staged: _Staged,
    float32_weights: Path,
    path: Path,
    probabilities: np.ndarray,
    lesion: np.ndarray | None,
    reports: dict[str, ParityReport],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Write the FP32 file ``float32_weights`` to ``path`` with float16-stored convolution
    weights (:func:`store_conv_weights_as_float16`) and gate it against the float32-weight file's
    ``probabilities`` and ``lesion`` maps; returns the rewritten file's."""
    options, info, images = staged.options, staged.info, staged.images
    _step(
        "store convolution weights as float16", store_conv_weights_as_float16, float32_weights, path
    )
    half = _onnx_probabilities(path, images.held_out)
    reports["fp32 half weights"] = half_weights_gate(
        probabilities,
        half,
        images.labels,
        min_agreement=options.min_agreement,
        max_accuracy_drop=options.max_accuracy_drop,
    )
    if lesion is None:
        return half, None
    half_lesion = _onnx_output(path, images.held_out, LESION)
    reports["fp32 half weights lesion"] = lesion_gate(
        lesion,
        half_lesion,
        info.lesion_threshold,
        min_area=info.lesion_min_area,
        name="onnx-fp32 lesion (convolution weights stored as float16) vs float32 weights",
        min_dice=0.99,
    )
    return half, half_lesion


def _export_int8(staged: _Staged, fp32: _Fp32, reports: dict[str, ParityReport]) -> _Int8:
    """Quantize (with the calibration chosen on validation, if asked), fold the input scaling,
    choose the FP32 recheck margin on validation, and gate INT8 (lesion too) against FP32."""
    options, info, images = staged.options, staged.info, staged.images
    val_fp32_probs = None if images.val is None else _onnx_probabilities(fp32.path, images.val)
    config, settings = options.quantization, options.quantization.describe()
    if options.choose_calibration:
        if images.val is None:
            raise ValueError(
                f"{options.run_dir / SPLIT_FILE}: --calibration auto needs 'val' rows apart "
                "from the 'test' rows the gate is measured on."
            )
        config, flips = _choose_calibration(
            info, fp32.path, images.calibration, images.val, val_fp32_probs, config, staged.tmp
        )
        settings = {**config.describe(), "validation_flips_by_calibration": flips}
    prepared = staged.tmp / "prepared-fp32.onnx"
    path = _step(
        "quantize to INT8",
        quantize_int8,
        fp32.path,
        staged.path(Precision.INT8),
        images.calibration,
        config,
        prepared_path=prepared,
    )
    settings = {
        **settings,
        "input_scaling_folded": _fold_input(path, info),
        "gate_arithmetic": GATE_ARITHMETIC,
    }
    write_metadata(path, _spec(info, Precision.INT8, settings, decision=fp32.decision))
    probabilities = _onnx_probabilities(path, images.held_out)
    thresholds = {
        "min_agreement": options.min_agreement,
        "max_accuracy_drop": options.max_accuracy_drop,
    }
    alone = int8_gate(fp32.probabilities, probabilities, images.labels, **thresholds)
    margin = 0.0
    spec = _spec(info, Precision.INT8, settings, decision=fp32.decision)
    lesion = None if fp32.lesion is None else _onnx_output(path, images.held_out, LESION)
    if options.recheck and images.val is not None:
        val_int8 = _onnx_probabilities(path, images.val)
        margin = recheck_margin(val_fp32_probs, val_int8)
        malignant, lesion_margin = call_margins(
            val_fp32_probs,
            val_int8,
            spec,
            *(
                (_lesion_peaks(fp32.path, images.val), _lesion_peaks(path, images.val))
                if fp32.lesion is not None
                else ()
            ),
        )
        spec = replace(
            _spec(info, Precision.INT8, settings, margin, fp32.path.name, decision=fp32.decision),
            recheck_malignant_margin=malignant,
            recheck_lesion_margin=lesion_margin,
        )
        redo = _rechecked(spec, probabilities, lesion)
        record = _recheck_record(spec, len(images.val), redo, alone)
        settings = {**settings, "fp32_recheck": record}
        spec = replace(spec, quantization=settings)
        write_metadata(path, spec)
        log.info("%s", _alone_line(alone))
        reports["int8"] = int8_recheck_gate(
            fp32.probabilities, probabilities, margin, images.labels, rerun=redo, **thresholds
        )
    else:
        if options.recheck:
            log.warning("no validation split apart from the gate's: no FP32 recheck")
        reports["int8"] = alone
    if lesion is not None:
        redo = _rechecked(spec, probabilities, lesion)  # the runtime's answers: FP32's where rerun
        lesion[redo] = fp32.lesion[redo]
        reports["int8 lesion"] = lesion_gate(
            fp32.lesion, lesion, info.lesion_threshold, min_area=info.lesion_min_area
        )
    return _Int8(path, prepared, settings, margin, alone)


def _export_fp16(staged: _Staged, fp32: _Fp32, reports: dict[str, ParityReport]) -> Path:
    """Convert to FP16 (from the float32 weights) and gate it against FP32."""
    options = staged.options
    path = _step("convert to FP16", to_fp16, fp32.float32_weights, staged.path(Precision.FP16))
    write_metadata(path, _spec(staged.info, Precision.FP16, {}, decision=fp32.decision))
    reports["fp16"] = fp16_gate(
        fp32.probabilities,
        _onnx_probabilities(path, staged.images.held_out),
        staged.images.labels,
        min_agreement=options.min_agreement,
        max_accuracy_drop=options.max_accuracy_drop,
    )
    return path


def _refuse(
    staged: _Staged,
    fp32: _Fp32,
    int8: _Int8 | None,
    reports: dict[str, ParityReport],
    output: Path,
    *,
    requantize: bool = False,
) -> None:
    """Write the failure report (with a diagnosis when INT8 failed) and raise.

    Raises:
        ParityError: always.
    """
    options, held_out = staged.options, staged.images.held_out
    report_path = _writable_dir(output) / _failure_report_name(options.name)
    lines = [r.summary() for r in reports.values()]
    if int8 is not None and int8.margin > 0:
        lines.append(_alone_line(int8.alone))
    advice = _advice(options, int8, requantize)
    if int8 is not None and not reports["int8"].passed:
        lines += _diagnose(int8.prepared, int8.path, held_out)
        lines.append(_jitter_line(fp32.path, held_out, fp32.probabilities, options.min_agreement))
        lines.append(advice)
    report_path.write_text("\n".join(lines) + "\n")
    raise ParityError(list(reports.values()), report_path, advice)


def _verify_written(
    staged: _Staged,
    files: list[Path],
    fp32_probabilities: np.ndarray,
    output: Path,
    int8: _Int8 | None,
    *,
    requantize: bool = False,
) -> None:
    """Reload each staged model file as the runtime runs it (contract, card, FP32 recheck) and
    gate its answers on the held-out scans (:func:`edge_runtime.model.verify.verify_model_file`).

    Raises:
        ParityError: a file fails; a report is written, no model is.
    """
    reports = []
    for path in files:
        precision = open_model(path, provider=Provider.CPU).spec.precision
        if precision is Precision.INT8 and SATURATING_CPU:
            log.warning(
                "%s: not rerun with this host's INT8 kernels, which saturate (the gates ran its "
                "QDQ graph in float); it loaded under the contract",
                path.name,
            )
            continue
        check = verify_model_file(
            path,
            staged.images.held_out,
            reference=fp32_probabilities,
            min_agreement=staged.options.min_agreement,
        )
        log.info("%s", check.summary())
        called = (
            ""
            if check.as_called_agreement is None
            else f"; calls as made agree on {check.as_called_agreement:.4f}, "
            f"{check.rechecked_fraction:.1%} rechecked"
        )
        reports.append(
            ParityReport(
                f"onnx-{check.precision} reloaded as the runtime runs it ({path.name}{called})",
                check.frames,
                check.max_abs_probability_diff,
                check.top1_agreement,
                None,
                None,
                check.failures,
            )
        )
    if all(r.passed for r in reports):
        return
    report_path = _writable_dir(output) / _failure_report_name(staged.options.name)
    advice = _advice(staged.options, int8, requantize)
    report_path.write_text("\n".join([*(r.summary() for r in reports), advice]) + "\n")
    raise ParityError(reports, report_path, advice)


def _advice(options: ExportOptions, int8: _Int8 | None, requantize: bool) -> str:
    """:func:`int8_advice` for this export (or requantization)."""
    convs = options.quantization.float_convs
    all_float = int8 is not None and every_conv_float(int8.prepared, convs)
    return int8_advice(convs, all_float, options.choose_calibration, requantize=requantize)


def _failure_report_name(name: str) -> str:
    return f"{name}.parity-failed.txt"


def _publish(staged: list[Path], output: Path, name: str) -> None:
    """Move the finished files from the staging folder into ``output``, the INT8 model last,
    once every one of them has been written: a failure before this leaves no model there.

    Staging sits beside ``output`` (same file system), so each move is a rename. A report of an
    earlier failed export of ``name`` is removed, since it no longer describes these files.
    """
    int8 = model_file_name(name, Precision.INT8.value)
    for path in sorted(staged, key=lambda p: p.name == int8):
        target = output / path.name
        os.replace(path, target)
        log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    (output / _failure_report_name(name)).unlink(missing_ok=True)


def _fold_input(int8: Path, info: RunInfo) -> bool:
    """Fold the input scaling into the first INT8 convolutions, of every member of an ensemble
    where they all scale alike (:func:`fold_input_scaling`)."""
    backbones = member_backbones(info.backbone)
    if not all(b in {k.value for k in Backbone} for b in backbones):
        return False
    scalings = {pixel_scaling(Backbone(b)) for b in backbones}
    if len(scalings) != 1:
        return False  # members scaled differently: no one fold is exact for all of them
    mean, std, channels = scalings.pop()
    return bool(channels == 1 and fold_input_scaling(int8, mean, std))


def _recheck_record(
    spec: ModelSpec, n_validation: int, held_out_rechecked: np.ndarray, alone: ParityReport
) -> dict[str, object]:
    """What the model card says about the FP32 recheck: its margins and its cost and effect on
    the gate's images."""
    return {
        "margin": round(spec.recheck_margin, 6),
        "malignant_margin": round(spec.recheck_malignant_margin, 6),
        "lesion_margin": round(spec.recheck_lesion_margin, 6),
        "margin_from_validation_images": n_validation,
        "held_out_rechecked": int(held_out_rechecked.sum()),
        "held_out_images": len(held_out_rechecked),
        "int8_alone_top1_agreement": alone.top1_agreement,
        "int8_alone_accuracy": alone.candidate_accuracy,
    }


def _rechecked(
    spec: ModelSpec, int8_probabilities: np.ndarray, int8_lesion: np.ndarray | None
) -> np.ndarray:
    """The squares the runtime reruns in FP32 (:func:`near_a_call`), each taken as its frame."""
    peaks = None if int8_lesion is None else _peaks(int8_lesion, spec.input_size)
    return near_a_call(spec, int8_probabilities, spec.malignant_threshold, peaks)


def _lesion_peaks(path: Path, images: np.ndarray) -> np.ndarray:
    return _peaks(_onnx_output(path, images, LESION), images.shape[1])


def _peaks(lesion: np.ndarray, size: int) -> np.ndarray:
    """Each square's :func:`lesion_peak` (the whole square is the frame)."""
    return np.array([lesion_peak(m[:, :, 0], (size, size), size) for m in lesion])


def _alone_line(alone: ParityReport) -> str:
    """The INT8 model without its recheck, for information: no verdict, the gate is elsewhere."""
    return (
        f"onnx-int8 alone, without the FP32 recheck (information): {alone.n} images, top-1 "
        f"agreement {alone.top1_agreement:.4f}, accuracy {alone.reference_accuracy:.4f} -> "
        f"{alone.candidate_accuracy:.4f}"
    )


def _validation_images(
    options: ExportOptions, info: RunInfo
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The validation split's images and labels when it is apart from the held-out images the
    gate uses (a run with a test split), else ``(None, None)``."""
    rows = _manifest_rows(options)
    if not (rows.get("test") and rows.get("val")):
        return None, None
    images, labels, _ = _split_images(options, info, "val")
    return images, labels


def _decision(
    info: RunInfo,
    fp32: Path,
    options: ExportOptions,
    val: np.ndarray | None,
    val_labels: np.ndarray | None,
) -> dict:
    """The malignant operating point and, where the model has a ``features`` output, the
    unfamiliar-scan threshold, both from the validation split (export.call_rules); empty
    without a validation split apart from the gate's."""
    if val is None:
        log.warning("no validation split apart from the gate's: no operating point")
        return {}
    decision: dict = {}
    point = choose_operating_point(info, _onnx_probabilities(fp32, val), val_labels)
    if point is not None:
        decision["malignant_operating_point"] = point
    if "features" in {
        o.name for o in open_model(fp32, provider=Provider.CPU).session.get_outputs()
    }:
        rows = _manifest_rows(options)["train"][: options.max_parity_images]
        train, failures = _load(rows, info)
        keep = [i for i, r in enumerate(rows) if r["path"] not in {p for p, _ in failures}]
        decision["unfamiliar"] = choose_unfamiliar(
            lambda images: _onnx_output(fp32, images, "features"),
            train[keep],
            np.array([info.class_names.index(rows[i]["label"]) for i in keep]),
            val,
            len(info.class_names),
        )
    return decision


def _choose_calibration(
    info: RunInfo,
    fp32: Path,
    calibration: np.ndarray,
    val: np.ndarray,
    val_fp32_probs: np.ndarray,
    base: QuantConfig,
    tmp: Path,
) -> tuple[QuantConfig, dict[str, int]]:
    """The calibration whose INT8 model changes fewest top-1 answers of FP32 on the validation
    split (never on the test split, which the gate is measured on); ties go to the earlier of
    :func:`export.quantize.calibration_candidates`. Returns it and the flips of each."""
    reference = val_fp32_probs.argmax(1)
    candidates = {calibration_name(c): c for c in calibration_candidates(base)}
    flips: dict[str, int] = {}
    for k, (name, candidate) in enumerate(candidates.items()):
        path = quantize_int8(fp32, tmp / f"calibration-{k}.onnx", calibration, candidate)
        _fold_input(path, info)
        write_metadata(path, _spec(info, Precision.INT8, {}))
        flips[name] = int(np.sum(_onnx_probabilities(path, val).argmax(1) != reference))
        path.unlink()
        log.info(
            "calibration %s: %d of %d validation answers differ from FP32",
            name,
            flips[name],
            len(val),
        )
    best = min(flips, key=flips.get)  # the first of the fewest
    log.info("chose calibration %s on the validation split", best)
    return candidates[best], flips


def _diagnose(prepared: Path, int8: Path, images: np.ndarray, n_images: int = 8) -> list[str]:
    """Report lines naming the activations and weights that lose the most to quantization."""
    try:
        activations, weights = rank_quantization_error(prepared, int8, images[:n_images])
        convs = count_convs(int8)
    except Exception as exc:  # diagnosis is best effort; the gate has already failed
        log.warning("could not rank quantization error: %s", exc)
        return [f"(could not rank layers by quantization error: {exc})"]
    return [
        "",
        f"Worst activations: where the float-vs-INT8 SQNR falls most ({n_images} images):",
        *(f"  {e.summary()}" for e in activations),
        "Worst weights by SQNR:",
        *(f"  {name}: {sqnr:.1f} dB" for name, sqnr in weights),
        f"Convolutions run as integer kernels: {convs.int8} of {convs.total} ({convs.op_types}).",
    ]


def _jitter_line(fp32: Path, images: np.ndarray, fp32_probs: np.ndarray, gate: float) -> str:
    """How often the FP32 model itself changes its answer under +-1 gray level of noise.

    A rough guide, not a bound: on the EfficientNet-Lite0 models measured for the README, INT8
    flipped between half and twice as many answers as this noise did, and a model trained to be
    stable under it (stability training) still flipped. Keeping the first convolutions in float
    halved the INT8 error there, at part of INT8's speed (:func:`int8_advice`).
    """
    jittered = jitter_gray_levels(images, 1, seed=0)
    same = float(np.mean(_onnx_probabilities(fp32, jittered).argmax(1) == fp32_probs.argmax(1)))
    line = f"FP32 model under +-1 gray level of pixel noise: top-1 unchanged on {same:.4f}"
    if same < gate:
        line += " (the FP32 model itself is about as fragile as the gate is strict)"
    return line


def _spec(
    info: RunInfo,
    precision: Precision,
    quantization: dict,
    recheck_margin: float = 0.0,
    recheck_model: str = "",
    *,
    decision: dict | None = None,
) -> ModelSpec:
    return ModelSpec(
        class_names=info.class_names,
        input_size=info.input_size,
        resize_policy=ResizePolicy(info.resize_policy),
        precision=precision,
        backbone=info.backbone,
        model_version=info.model_version,
        temperature=info.temperature,
        abstain_threshold=info.abstain_threshold,
        training_data_fingerprint=info.data_fingerprint,
        metrics={
            k: info.test_metrics[k]
            for k in ("n", "accuracy", "macro_f1", "positive_auc")
            if k in info.test_metrics
        },
        quantization=quantization,
        recheck_margin=recheck_margin,
        recheck_model=recheck_model,
        lesion_stride=info.lesion_stride,
        lesion_threshold=info.lesion_threshold,
        lesion_min_area=info.lesion_min_area,
        malignant_threshold=((decision or {}).get("malignant_operating_point") or {}).get(
            "threshold", 0.0
        ),
        unfamiliar=(decision or {}).get("unfamiliar", {}),
        normal_rule=NormalRule(info.runtime_normal_rule),
        normal_gate=info.normal_gate,
    )


def _open(path: Path):
    """The runtime's own loader (which also validates the written contract); an INT8 model runs
    as written, in float, where this CPU's INT8 kernels saturate (:data:`GATE_ARITHMETIC`)."""
    return open_model(path, provider=Provider.CPU, exact_int8=SATURATING_CPU)


def _onnx_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    return batch_probabilities(_open(path).session, images)


def _onnx_output(path: Path, images: np.ndarray, name: str) -> np.ndarray:
    """One output of the model over ``images``, in batches of 32."""
    model = _open(path)
    outputs = [
        model.session.run([name], {"image": images[i : i + 32]})[0]
        for i in range(0, len(images), 32)
    ]
    return np.concatenate(outputs)


def _images_for(
    options: ExportOptions, info: RunInfo
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Calibration images (train split) and held-out images with labels and sources (test,
    else val)."""
    rows = _manifest_rows(options)
    if not rows.get("train") or not (rows.get("test") or rows.get("val")):
        raise ValueError(
            f"{options.run_dir / SPLIT_FILE}: needs 'train' rows and 'test' or 'val' rows."
        )
    held_split = "test" if rows.get("test") else "val"
    train = rows["train"]
    spread = train[:: max(1, len(train) // options.quantization.max_calibration_images)]
    calibration, _ = _load(spread, info)
    images, labels, sources = _split_images(options, info, held_split)
    return calibration, images, labels, sources


def _split_images(
    options: ExportOptions, info: RunInfo, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split's images (at most ``max_parity_images``), preprocessed, with their labels and
    sources (``split.csv``'s ``source``; "" where the manifest has none).

    Raises:
        ValueError: the split has no rows, or some of its images cannot be read.
    """
    rows = _manifest_rows(options).get(split, [])[: options.max_parity_images]
    if not rows:
        raise ValueError(f"{options.run_dir / SPLIT_FILE}: no {split!r} rows")
    images, failures = _load(rows, info)
    if failures:
        raise ValueError(
            f"{options.run_dir / SPLIT_FILE}: {len(failures)} {split} images could not be read, "
            f"e.g. {failures[0][0]}: {failures[0][1]}"
        )
    labels = np.array([info.class_names.index(r["label"]) for r in rows])
    return images, labels, [r.get("source", "") for r in rows]


def _manifest_rows(options: ExportOptions) -> dict[str, list[dict]]:
    manifest = options.run_dir / SPLIT_FILE
    if not manifest.is_file():
        raise ValueError(
            f"{options.run_dir}: no {SPLIT_FILE}; it is needed to pick calibration "
            "(train) and parity (held-out) images."
        )
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row.get("split", ""), []).append(row)
    return by_split


def _load(rows: list[dict], info: RunInfo) -> tuple[np.ndarray, list[tuple[str, str]]]:
    from training.data.pipeline import load_images

    return load_images([r["path"] for r in rows], info.input_size, ResizePolicy(info.resize_policy))


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".edge-export-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"{path}: output folder is not writable: {exc.strerror or exc}"
        ) from exc
    return path


def _step(title: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    size = result.stat().st_size / 1e6 if isinstance(result, Path) else 0.0
    log.info(
        "%s: %s (%.1f MB) in %.1fs",
        title,
        getattr(result, "name", result),
        size,
        time.perf_counter() - start,
    )
    return result
