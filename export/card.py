"""The model card: what the model is, what it was trained and tested on, and how well it does."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.model.card import CARD_SUFFIX, file_record, weights_summary
from export.parity import ParityReport
from training.evaluation.protocol import markdown_table
from training.runfolder import RunInfo

PUBLIC_DATASETS = {"busi": "BUSI", "busbra": "BUS-BRA"}  # training.data.datasets' source names
SHORTCUT_PROBES = {
    "marks": "burned-in calipers and text",
    "attention": "activation on the lesion",
    "identity": "which dataset the features reveal",
    "lesionfree": "lesion-free tissue called normal, per source",  # a model with a normal class
}


def intended_use(class_names: Sequence[str]) -> str:
    """The card's intended use, naming the model's own classes."""
    return (
        "Research and engineering evaluation of breast-ultrasound image classification "
        f"({' / '.join(class_names)}) on a device host. Not a medical device: not cleared or "
        "approved for diagnosis; every output needs review by a qualified clinician."
    )


def limitations(info: RunInfo) -> list[str]:
    """The card's limitations, true of the run: its training data as ``run.json`` records the
    sources, and BUS-BRA's missing normal class only where BUS-BRA was trained on with normals."""
    public = [PUBLIC_DATASETS[s] for s in info.sources if s in PUBLIC_DATASETS]
    own = [s for s in info.sources if s not in PUBLIC_DATASETS]
    data = [f"data from {_words(own)}"] if own else []
    if public:
        data.append(f"the public dataset{'s' if len(public) > 1 else ''} {_words(public)}")
    first = (
        f"Trained on {_words(data) if data else 'data whose sources the run did not record'}; "
        "performance on other scanners, presets, populations and image pipelines is unknown "
        "until measured there. Burned-in text, calipers and Doppler colour can act as shortcuts."
    )
    if "busbra" in info.sources and "normal" in info.class_names:
        first += (
            " BUS-BRA has no normal class, so the model may call a scan abnormal for looking "
            "like BUS-BRA rather than for its lesion."
        )
    probes = [
        f"`python -m training.probes.{name}` ({what})"
        for name, what in SHORTCUT_PROBES.items()
        if name != "lesionfree" or "normal" in info.class_names
    ]
    return [
        first,
        f"Shortcut checks on held-out scans: {_words(probes)}. Run them on your own scans "
        "before relying on the model.",
    ]


def _words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def build_card(
    name: str,
    info: RunInfo,
    files: Sequence[Path],
    reports: Sequence[ParityReport],
    quantization: Mapping[str, Any],
    run_reports: Mapping[str, Any] | None = None,
    *,
    decision: Mapping[str, Any] | None = None,
    runtime_calls: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card as a JSON-serializable dict (files listed with SHA-256 and size).

    ``run_reports`` holds the run's optional ``by_source``, ``cross_validation`` and
    ``protocol`` results (:func:`training.runfolder.read_reports`); they are copied in as they
    are.
    """
    return {
        "name": name,
        "model_version": info.model_version,
        "not_a_medical_device": True,
        "intended_use": intended_use(info.class_names),
        "limitations": limitations(info),
        "classes": list(info.class_names),
        "input": {
            "name": "image",
            "dtype": "uint8",
            "shape": ["N", info.input_size, info.input_size, 1],
            "resize_policy": info.resize_policy,
        },
        "backbone": info.backbone,
        "training": {
            "sources": list(info.sources),
            "data_fingerprint": info.data_fingerprint,
            "seed": info.seed,
            "int8_grid": info.int8_grid,
            "lesion_free_normals": info.lesion_free_normals,
        },
        "calibration": {
            "temperature": info.temperature,
            "abstain_threshold": info.abstain_threshold,
        },
        "evaluation": info.test_metrics,
        "decision": _decision_summary(decision or {}),
        "runtime_calls": dict(runtime_calls or {}),
        **dict(run_reports or {}),
        "quantization": dict(quantization),
        "parity": [parity_record(r) for r in reports],
        "files": {f.name: file_record(f) for f in files},
    }


def parity_record(report: ParityReport) -> dict[str, Any]:
    """One parity gate's entry in the card's ``parity`` list."""
    return {
        "check": report.name,
        "images": report.n,
        "max_abs_diff": report.max_abs_diff,
        "top1_agreement": report.top1_agreement,
        "reference_accuracy": report.reference_accuracy,
        "candidate_accuracy": report.candidate_accuracy,
        "passed": report.passed,
        "summary": report.summary(),
    }


def write_card(card: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write ``<name>.card.json`` and a Markdown rendering ``<name>.card.md``."""
    json_path = directory / f"{card['name']}{CARD_SUFFIX}"
    json_path.write_text(json.dumps(card, indent=2) + "\n")
    md_path = directory / f"{card['name']}.card.md"
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def render_markdown(card: Mapping[str, Any]) -> str:
    """A human-readable model card: every metric with its interval, confusion matrix, sources."""
    metrics = card.get("evaluation") or {}
    lines = [
        f"# Model card: {card['name']} ({card['model_version']})",
        "",
        "**Not a medical device.** " + card["intended_use"],
        "",
        f"- Classes: {', '.join(card['classes'])}",
        f"- Input: uint8 grayscale {card['input']['shape'][1]} x {card['input']['shape'][2]}, "
        f"{card['input']['resize_policy']} resize",
        f"- Backbone: {card['backbone']}",
        f"- Training data: {', '.join(card['training']['sources']) or 'unspecified'} "
        f"(fingerprint {card['training']['data_fingerprint'][:16]}, "
        f"seed {card['training']['seed']})"
        + (
            "; plus mirrored lesion-free views of lesion scans as normal (--lesion-free-normals)"
            if card["training"].get("lesion_free_normals")
            else ""
        ),
        f"- Calibration temperature {card['calibration']['temperature']:.3f}, abstain below "
        f"{card['calibration']['abstain_threshold']:.2f}",
        "",
        f"## Evaluation (held-out test split, {metrics.get('n', '?')} images)",
        "",
        *_metric_lines(metrics),
        *_per_class_table(metrics),
        *_confusion_table(metrics, card["classes"]),
        *_source_lines(card.get("by_source")),
        *_cv_lines(card.get("cross_validation")),
        *_protocol_lines(card.get("protocol")),
        *_decision_lines(card.get("decision") or {}),
        *_runtime_call_lines(
            card.get("runtime_calls") or {},
            card["classes"],
            has_operating_point="malignant_operating_point" in (card.get("decision") or {}),
        ),
        *_lesion_lines(metrics.get("lesion"), "held-out test split"),
        *_lesion_lines((card.get("cross_validation") or {}).get("lesion"), "cross-validation"),
        "## Parity gates",
        "",
    ]
    lines += [f"- {p['summary']}" for p in card["parity"]]
    lines += [
        "",
        *_quantization_lines(card),
        "## Limitations",
        "",
        *[f"- {item}" for item in card["limitations"]],
        "",
        "## Files",
        "",
        "| file | bytes | weights stored as (share of bytes) | sha256 |",
        "|---|---|---|---|",
    ]
    for name, f in card["files"].items():
        lines.append(f"| {name} | {f['bytes']} | {weights_summary(f)} | `{f['sha256']}` |")
        lines += [  # the weights of a model stored in ONNX external-data files
            f"| {piece} (weights of {name}) | {p['bytes']} | - | `{p['sha256']}` |"
            for piece, p in f.get("external_data", {}).items()
        ]
    return "\n".join(lines) + "\n"


def _protocol_lines(protocol: Mapping[str, Any] | None) -> list[str]:
    """The scanner-held-out protocol's table, and in plain words what it means for normals."""
    if not protocol:
        return []
    lines = [
        "## On a scanner it never saw (leave one scanner out, train on the rest, test on it)",
        "",
        markdown_table(protocol),
    ]
    for scanner, row in protocol.items():
        recall, sensitivity = row.get("normal_recall"), row.get("malignant_sensitivity")
        if recall is None or sensitivity is None:
            continue
        mask_recall = (row.get("normal_by_mask_head") or {}).get("normal_recall")
        by_mask = (
            f"; with the lesion head deciding normal, as the runtime does, {mask_recall:.0%} of "
            "its normal scans"
            if mask_recall is not None
            else ""
        )
        lines.append(
            f"With {scanner} left out of training, the same recipe called {recall:.0%} of that "
            f"scanner's normal scans normal and {sensitivity:.0%} of its cancers malignant (top-1 "
            f"answers){by_mask}. Expect a new scanner's normal scans to be called lesions often: "
            "label a few of your own scans and run `edge-classify adapt`."
        )
    return [*lines, ""]


def _quantization_lines(card: Mapping[str, Any]) -> list[str]:
    q = card.get("quantization") or {}
    if not q:
        return []
    if "int8" in q:  # --precision fp32: no INT8 file to describe
        return ["## INT8 quantization", "", f"- INT8 model {q['int8']}", ""]
    calibration = q.get("calibration", "?")
    if "percentile" in q:
        calibration += f" {q['percentile']}"
    grid = card["training"].get("int8_grid")
    return [
        "## INT8 quantization",
        "",
        f"- {q.get('format', 'QDQ')}, activations {q.get('activations')}, weights "
        f"{q.get('weights')}{' per channel' if q.get('per_channel') else ''}, "
        f"{calibration} calibration on {q.get('max_calibration_images')} training images, "
        f"first {q.get('float_convs', 0)} convolutions in float, "
        f"onnxruntime {q.get('onnxruntime')}",
        "- Kernels rounded to the INT8 weight grid in training: "
        + (
            "yes (FP32 and INT8 share their weights, but for the few channels whose step "
            "onnxruntime widens so that their bias fits in int32)"
            if grid
            else "no"
        ),
        *(
            [f"- INT8 gates computed with {q['gate_arithmetic']}"]
            if q.get("gate_arithmetic")
            else []
        ),
        *_recheck_lines(q.get("fp32_recheck")),
        "",
    ]


def _recheck_lines(recheck: Mapping[str, Any] | None) -> list[str]:
    if not recheck:
        return ["- FP32 recheck: none; the INT8 model's answers stand alone"]
    near = ""
    if recheck.get("malignant_margin") or recheck.get("lesion_margin"):
        near = (
            f", or whose calibrated P(malignant) lies within {recheck['malignant_margin']:.3f} of "
            f"the operating point, or whose lesion map peaks within {recheck['lesion_margin']:.3f} "
            "of the lesion threshold (as far from each as INT8 stood on a validation scan where it "
            "crossed it)"
        )
    return [
        f"- FP32 recheck: the runtime reruns in FP32 every scan whose INT8 top-1 lead is below "
        f"{recheck['margin']:.3f}, twice the largest INT8-FP32 probability change{near}, measured "
        f"on {recheck['margin_from_validation_images']} validation scans: "
        f"{recheck['held_out_rechecked']} of {recheck['held_out_images']} held-out scans. "
        f"INT8 alone agrees with FP32 on {recheck['int8_alone_top1_agreement']:.4f} of them "
        f"(accuracy {_num(recheck['int8_alone_accuracy'])}); "
        "`edge-classify --no-recheck` runs it alone"
    ]


UNDEFINED_NOTE = (
    "n/a: undefined on this test split (no precision for a class the model never predicted, no "
    "sensitivity for a class with no test images); a model that never predicts a class has "
    "not learned it."
)

_SCALARS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("balanced_accuracy", "balanced accuracy"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("malignant_auc", "malignant ROC AUC (one vs rest)"),
    ("positive_auc", "ROC AUC"),
    ("ece", "expected calibration error"),
    ("nll", "negative log-likelihood"),
    ("brier", "Brier score"),
    ("jitter_stability", "top-1 unchanged under +-2 gray levels of pixel noise"),
)


def _metric_lines(metrics: Mapping[str, Any]) -> list[str]:
    intervals = metrics.get("ci95") or {}
    values = dict(metrics)
    malignant = (metrics.get("per_class") or {}).get("malignant")
    if malignant:
        values["malignant_sensitivity"] = malignant["sensitivity"]
    lines = []
    for key, label in _SCALARS:
        if key not in values:
            continue
        if values[key] is None:
            lines.append(f"- {label}: n/a (undefined on this test split)")
            continue
        ci = intervals.get(key)
        suffix = f" (95% bootstrap CI {_interval(ci)})" if ci else ""
        lines.append(f"- {label}: {values[key]:.3f}{suffix}")
    return [*lines, ""]


def _per_class_table(metrics: Mapping[str, Any]) -> list[str]:
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return []
    lines = [
        "| class | sensitivity | specificity | precision | F1 | images |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in per_class.items():
        lines.append(
            f"| {name} | {_num(m.get('sensitivity'))} | {_num(m.get('specificity'))} | "
            f"{_num(m.get('precision'))} | {_num(m.get('f1'))} | {m.get('support')} |"
        )
    if any(v is None for m in per_class.values() for v in m.values()):
        lines += ["", UNDEFINED_NOTE]
    return [*lines, ""]


def _confusion_table(metrics: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    matrix = metrics.get("confusion_matrix")
    if not matrix:
        return []
    lines = [
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    lines += [
        f"| {c} | " + " | ".join(map(str, row)) + " |"
        for c, row in zip(classes, matrix, strict=True)
    ]
    return [*lines, ""]


def _source_lines(by_source: Mapping[str, Any] | None) -> list[str]:
    if not by_source:
        return []
    lines = [
        "## By source (test split)",
        "",
        "| source | images | accuracy | macro-F1 |",
        "|---|---|---|---|",
    ]
    for name, m in (by_source.get("by_source") or {}).items():
        lines.append(
            f"| {name} | {m.get('n')} | {_num(m.get('accuracy'))} | {_num(m.get('macro_f1'))} |"
        )
    heading = "Benign-vs-malignant ROC AUC by scanner (95% bootstrap CI):"
    lines += _device_auc_lines(by_source.get("benign_vs_malignant_auc_by_device"), heading)
    return [*lines, ""]


def _device_auc_lines(devices: Mapping[str, Any] | None, heading: str) -> list[str]:
    if not devices:
        return []
    return [
        "",
        heading,
        "",
        *(
            f"- {device}: {_num(e.get('auc'))} ({_interval(e.get('ci95'))}; {e.get('n')} scans, "
            f"{e.get('n_positive')} malignant)"
            for device, e in devices.items()
        ),
    ]


def _cv_lines(cv: Mapping[str, Any] | None) -> list[str]:
    if not cv:
        return []
    summary = cv.get("summary") or {}
    stats = summary.get("metrics") or {}
    lines = [
        f"## Grouped cross-validation ({cv.get('folds')} folds, {summary.get('n')} images)",
        "",
    ]
    for key, label in _SCALARS:
        s = stats.get(key)
        if s and s.get("mean") is not None:
            lines.append(f"- {label}: {s['mean']:.3f} (95% CI {_interval(s.get('ci95'))})")
    malignant = (summary.get("per_class") or {}).get("malignant", {}).get("sensitivity")
    if malignant and malignant.get("mean") is not None:
        lines.append(
            f"- malignant sensitivity: {malignant['mean']:.3f} "
            f"(95% CI {_interval(malignant.get('ci95'))})"
        )
    sources = cv.get("by_source") or {}
    if sources:
        lines += ["", "| source | images | accuracy | macro-F1 |", "|---|---|---|---|"]
        for name, s in sources.items():
            m = s.get("metrics") or {}
            lines.append(
                f"| {name} | {s.get('n')} | {_mean_ci(m.get('accuracy'))} | "
                f"{_mean_ci(m.get('macro_f1'))} |"
            )
    pooled = cv.get("benign_vs_malignant_auc_by_device_pooled")
    devices = cv.get("benign_vs_malignant_auc_by_device") or {}
    if pooled:
        heading = (
            "Benign-vs-malignant ROC AUC by scanner, all folds' held-out predictions pooled "
            "(95% bootstrap CI):"
        )
        lines += _device_auc_lines(pooled, heading)
    elif devices:
        lines += ["", "Benign-vs-malignant ROC AUC by scanner, mean over folds (95% CI):", ""]
        lines += [
            f"- {device}: {_mean_ci(s)}; {s.get('scans')} scans" for device, s in devices.items()
        ]
    return [*lines, ""]


def _mean_ci(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f} ({_interval(stats.get('ci95'))})"


def _interval(ci: Sequence[float | None] | None) -> str:
    low, high = ci or (None, None)
    return f"{_num(low)}-{_num(high)}"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _lesion_lines(report: Mapping[str, Any] | None, where: str) -> list[str]:
    """The lesion head's measures (training.evaluation.lesion_metrics.summarize), overall and per
    source."""
    if not report:
        return []

    def cell(entry: Mapping[str, Any]) -> str:
        if entry.get("mean") is None:
            return "-"
        low, high = entry["ci95"]
        return f"{entry['mean']:.3f} ({low:.3f}-{high:.3f}; n {entry['n']})"

    lines = [
        f"## Lesion outlines ({where})",
        "",
        "Dice and IoU of the predicted outline (threshold, largest component) against the "
        "radiologist's mask on lesion scans; the pointing game (the hottest point of the class "
        "activation map, or of the lesion map, inside the mask dilated by 5% of the side); the "
        "share of normal scans with any lesion pixel, and of lesion scans with none (called "
        "normal: a missed lesion). Means with 95% bootstrap intervals.",
        *_threshold_lines(report.get("threshold")),
        "",
        "| scans | Dice | IoU | pointing (CAM) | pointing (lesion map) | normals with a lesion "
        "| lesion scans called normal |",
        "|---|---|---|---|---|---|---|",
    ]
    blocks = {"all": report["all"], **report.get("by_source", {}), **report.get("by_device", {})}
    for name, b in blocks.items():
        lines.append(
            f"| {name} | {cell(b['dice'])} | {cell(b['iou'])} | {cell(b['pointing_cam'])} | "
            f"{cell(b['pointing_lesion_map'])} | {cell(b['normal_with_lesion'])} | "
            f"{cell(b.get('lesion_called_normal', {}))} |"
        )
    return [*lines, ""]


def _threshold_lines(chosen: Mapping[str, Any] | None) -> list[str]:
    """How the lesion rule was chosen (training.evaluation.lesion_metrics.choose_lesion_rule); runs
    from before the rule had a minimum area and a gate record the threshold alone."""
    if not chosen:
        return []
    area, gate = chosen.get("min_area", 0.0), chosen.get("classifier_gate", False)
    level = chosen.get("normal_gate", 0.0)
    picked = next(
        (
            t
            for t in chosen["validation"]
            if t["threshold"] == chosen["value"]
            and t.get("min_area", 0.0) == area
            and t.get("classifier_gate", False) == gate
            and t.get("normal_gate", 0.0) == level
        ),
        None,
    )
    seen = (
        ""
        if picked is None
        else (
            f" (validation: Dice {_num(picked['dice'])}, normals with a lesion "
            f"{_num(picked['normal_with_lesion'])}"
            + (
                ""
                if picked.get("lesion_called_normal") is None
                else f", lesion scans called normal {_num(picked['lesion_called_normal'])}"
            )
            + ")"
        )
    )
    parts = f"Lesion threshold {chosen['value']:.2f}"
    if area:
        parts += f", minimum lesion area {area:.2%} of the input"
    if gate:
        parts += ", no lesion where the classifier calls normal"
    if gate and level:
        parts += f" or gives it a probability of at least {level:.2f}"
    return ["", f"{parts}, chosen on validation scans: {chosen['rule']}{seen}."]


def _decision_summary(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The card's view of export.call_rules's rules: the operating point whole, the unfamiliar
    score without its reference vectors (they live in the model's metadata)."""
    summary: dict[str, Any] = {}
    if "malignant_operating_point" in decision:
        summary["malignant_operating_point"] = dict(decision["malignant_operating_point"])
    if "unfamiliar" in decision:
        summary["unfamiliar"] = {
            k: v for k, v in decision["unfamiliar"].items() if k not in ("means", "scale")
        }
    return summary


def _runtime_call_lines(
    calls: Mapping[str, Any], classes: Sequence[str], *, has_operating_point: bool
) -> list[str]:
    """The held-out scans as the runtime calls them (export.call_rules.runtime_calls)."""
    if not calls:
        return []
    rule = {
        "lesion_head": "normal exactly where the lesion head finds no lesion",
        "lesion_head_or_classifier": "normal where the lesion head finds no lesion or the "
        "classifier calls normal",
    }.get(calls["normal_rule"], "normal by the classifier")
    if calls.get("normal_gate"):
        rule += f" or gives normal a probability of at least {calls['normal_gate']:.2f}"
    recall = ", ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}"
        for name, value in calls["recall"].items()
    )
    by_source = "".join(
        f" {name}: accuracy {entry['accuracy']:.3f} ({entry['scans']} scans)."
        for name, entry in (calls.get("by_source") or {}).items()
    )
    lesions = [c for c in classes if c != "normal"]
    if has_operating_point:
        cancer = "the malignant operating point above"
    elif "malignant" in lesions and len(lesions) > 1:
        cancer = f"top-1 between {_words(lesions)} (no operating point was chosen)"
    else:
        cancer = "top-1"
    return [
        f"## As the runtime calls them (held-out test split, {calls['scans']} scans)",
        "",
        "The metrics above are the classifier's top-1. On the device a scan's `label` follows "
        f"the model's rules: {cancer}{f', and {rule}' if 'normal' in classes else ''}. "
        "So called, "
        f"accuracy {calls['accuracy']:.3f}; recall {recall}.{by_source}",
        "",
        *_confusion_table({"confusion_matrix": calls["confusion_matrix"]}, classes),
    ]


def _decision_lines(decision: Mapping[str, Any]) -> list[str]:
    lines = []
    point = decision.get("malignant_operating_point")
    if point:
        lines += [
            "## Operating point for cancer",
            "",
            f"A scan is called malignant when P(malignant) >= {point['threshold']:.4f} (after "
            "calibration), chosen on the validation split for malignant sensitivity >= "
            f"{point['min_sensitivity']:.2f}: there ({point['scans']} scans, "
            f"{point['malignant_scans']} malignant) sensitivity {point['sensitivity']:.3f} and "
            f"specificity {point['specificity']:.3f}, against {point['top1_sensitivity']:.3f} "
            f"and {point['top1_specificity']:.3f} for plain top-1. "
            "`--malignant-threshold P` overrides it (0: top-1).",
            "",
        ]
    unfamiliar = decision.get("unfamiliar")
    if unfamiliar == {}:  # export.call_rules.choose_unfamiliar: features that never vary
        lines += [
            "## Unfamiliar scans",
            "",
            "No unfamiliar-scan rule: the model's pooled features do not vary over the training "
            "scans, so no scan is flagged `unfamiliar`.",
            "",
        ]
    elif unfamiliar:
        lines += [
            "## Unfamiliar scans",
            "",
            "A scan whose pooled features lie far from every training class's mean (root-mean-"
            "square distance in units of the training spread) is flagged `unfamiliar` and "
            f"abstains: threshold {unfamiliar['threshold']:.3f}, the "
            f"{100 * unfamiliar['quantile']:.0f}th percentile of {unfamiliar['validation_scans']} "
            "validation scans (so about 1% of scans like the training data are flagged).",
            "",
        ]
    return lines
