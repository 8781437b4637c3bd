"""The adapted model's card (JSON and Markdown) and the before/after table of its site
cross-validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_runtime.adapt.options import Parent
from edge_runtime.model.card import CARD_SUFFIX, card_path_for, file_record, weights_summary
from edge_runtime.model.contract import ModelSpec


def format_numbers(record: dict[str, Any]) -> str:
    """The before/after table of a record, one metric a line, with 95% intervals."""
    cv = record["cross_validation"]
    lines = [
        f"site {record.get('site')!r}: {record.get('scans_per_class')} scans, "
        f"{record.get('groups')} groups, {cv['folds']}-fold grouped cross-validation "
        "(95% group-bootstrap intervals)",
        f"  {'':26} {'parent':>20} {'adapted':>20} {'difference':>22}",
    ]
    for key in cv["before"]:
        cells = []
        for part in ("before", "after", "difference"):
            entry = cv[part][key]
            cells.append(_value_ci(entry, signed=part == "difference"))
        lines.append(f"  {key:26} {cells[0]:>20} {cells[1]:>20} {cells[2]:>22}")
    return "\n".join(lines)


def _value_ci(entry: dict, *, signed: bool) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if value is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if low is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def write_card(
    outputs: dict[str, Path], specs: dict[str, ModelSpec], main: Parent, partner: Parent | None
) -> Path:
    card_path = card_path_for(outputs["main"])
    spec = specs["main"]
    record = dict(spec.adaptation)
    record.pop("parent", None)
    parents = {
        outputs[role].name: {"file": p.name, "sha256": p.sha256}
        for role, p in (("main", main), ("partner", partner))
        if p is not None
    }
    card = {
        "name": card_path.name[: -len(CARD_SUFFIX)],
        "model_version": spec.model_version,
        "not_a_medical_device": True,
        "intended_use": "Research and engineering evaluation on the site it was adapted to. Not "
        "a medical device: every output needs review by a qualified clinician.",
        "adapted_by": "edge-classify adapt (last layer refitted; backbone unchanged)",
        "parents": parents,
        "parent_metrics_apply": False,
        "classes": list(spec.class_names),
        "adaptation": record,
        "files": {path.name: file_record(path) for path in outputs.values()},
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    markdown_path(card_path).write_text(_card_markdown(card))
    return card_path


def markdown_path(card_path: Path) -> Path:
    return card_path.with_name(card_path.name[: -len(".json")] + ".md")


def _card_markdown(card: dict[str, Any]) -> str:
    record = card["adaptation"]
    lines = [
        f"# {card['name']}: adapted to site {record.get('site')!r}",
        "",
        "**Not a medical device.** Every output needs review by a qualified clinician.",
        "",
        f"Made by `edge-classify adapt` on {record.get('created')}: the last layer of the parent "
        "model was refitted on this site's labelled scans; the backbone is unchanged.",
        "**The parent's published metrics do not apply to this model.** Its only evidence is "
        "the site cross-validation below.",
        "",
        "## Parents",
        "",
    ]
    for name, parent in card["parents"].items():
        lines.append(f"- `{name}` from `{parent['file']}` (SHA-256 `{parent['sha256']}`)")
    if "refitted" in record:
        lines += [
            "",
            f"Refitted: {record['refitted']['value']}, because {record['refitted']['why']}.",
        ]
    ensemble = record.get("ensemble")
    if ensemble:
        lines += [
            "",
            f"Ensemble parent ({ensemble['members']} members, features "
            f"{' + '.join(str(w) for w in ensemble['feature_widths'])}): "
            f"{ensemble['adapted_layer']}. The fit starts from {ensemble['parent_layer']} (on "
            f"this site's scans it calls {ensemble['logit_average_top1_agreement']:.1%} of them "
            f"as the parent does); {ensemble['before']}.",
        ]
    rule = record.get("normal_rule", {})
    if rule and rule.get("value") != rule.get("parent"):
        lines += [
            "",
            f"Normal rule: `{rule['value']}` (the parent's: `{rule['parent']}`): {rule['note']}. "
            "A scan can now be called a lesion class without an outline, or normal with one.",
        ]
    lines += ["", "## Site cross-validation", "", "```", format_numbers(record), "```", ""]
    left_out = record.get("left_out") or []
    if left_out:
        lines.append(
            f"Left out, labelled but unreadable or not one ultrasound scan ({len(left_out)}): "
            + "; ".join(f"`{item['path']}` ({item['error']})" for item in left_out)
            + "."
        )
    temperature = record["temperature"]
    lines.append(
        f"Temperature {temperature['value']:.4f} (parent {temperature['parent']:.4f}), "
        f"{temperature['fitted_on']}."
    )
    threshold = record["malignant_threshold"]
    lines.append(f"Malignant threshold {threshold['value']:.4f}: {threshold['note']}.")
    guard = record.get("malignant_guard", {})
    if guard.get("value"):
        lost = guard.get("lost_out_of_fold") or []
        lines.append(
            f"Malignant guard: {guard['rule']} ({guard['kept_scans']} scans). Out-of-fold, "
            + (f"{len(lost)} such scan(s) were lost: {', '.join(lost)}." if lost else "none lost.")
        )
    if "int8" in record:
        p = record["int8"]
        lines.append(
            f"INT8 vs its adapted FP32 partner on the site's {p['frames']} frames: top-1 "
            f"agreement {p['int8_alone_top1_agreement']:.4f} alone, "
            f"{p['top1_agreement_with_recheck']:.4f} with the FP32 recheck (top-1 margin "
            f"{p['recheck_margin']:.3f}, {p['rechecked_fraction']:.1%} rechecked by it; also "
            f"rerun: P(malignant) within {p.get('recheck_malignant_margin', 0.0):.3f} of the "
            "operating point)."
        )
    lines += ["", "## Files", ""]
    for name, info in card["files"].items():
        lines.append(
            f"- `{name}`: {info['bytes']:,} bytes, weights stored as {weights_summary(info)}, "
            f"SHA-256 `{info['sha256']}`"
        )
    return "\n".join(lines) + "\n"
