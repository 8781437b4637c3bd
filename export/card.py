"""The model card: what the model is, what it was trained and tested on, and how well it does."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.card import CARD_SUFFIX, file_sha256
from export.parity import ParityReport
from training.runfolder import RunInfo

INTENDED_USE = (
    "Research and engineering evaluation of breast-ultrasound image classification "
    "(normal / benign / malignant) on a device host. Not a medical device: not cleared or approved "
    "for diagnosis; every output needs review by a qualified clinician."
)
LIMITATIONS = (
    "Trained on public datasets from a few scanners and sites; performance on other scanners, "
    "presets, populations and image pipelines is unknown until measured there. Burned-in text, "
    "calipers and Doppler colour can act as shortcuts. BUS-BRA has no normal class.",
)


def build_card(
    name: str,
    info: RunInfo,
    files: Sequence[Path],
    reports: Sequence[ParityReport],
    quantization: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the card as a JSON-serializable dict (files listed with SHA-256 and size)."""
    return {
        "name": name,
        "model_version": info.model_version,
        "not_a_medical_device": True,
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
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
        },
        "calibration": {
            "temperature": info.temperature,
            "abstain_threshold": info.abstain_threshold,
        },
        "evaluation": info.test_metrics,
        "quantization": dict(quantization),
        "parity": [
            {
                "check": r.name,
                "images": r.n,
                "max_abs_diff": r.max_abs_diff,
                "top1_agreement": r.top1_agreement,
                "reference_accuracy": r.reference_accuracy,
                "candidate_accuracy": r.candidate_accuracy,
                "passed": r.passed,
            }
            for r in reports
        ],
        "files": {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size} for f in files},
    }


def write_card(card: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write ``<name>.card.json`` and a Markdown rendering ``<name>.card.md``."""
    json_path = directory / f"{card['name']}{CARD_SUFFIX}"
    json_path.write_text(json.dumps(card, indent=2) + "\n")
    md_path = directory / f"{card['name']}.card.md"
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def render_markdown(card: Mapping[str, Any]) -> str:
    """A human-readable model card."""
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
        f"(fingerprint {card['training']['data_fingerprint'][:16]})",
        f"- Calibration temperature {card['calibration']['temperature']:.3f}, abstain below "
        f"{card['calibration']['abstain_threshold']:.2f}",
        "",
        "## Evaluation (held-out test split)",
        "",
    ]
    for key in ("n", "accuracy", "macro_f1", "positive_auc", "ece"):
        if metrics.get(key) is not None:
            value = metrics[key]
            lines.append(
                f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}"
            )
    lines += ["", "## Parity gates", ""]
    lines += [
        f"- {p['check']}: {p['images']} images, max |dp| {p['max_abs_diff']:.2e}, top-1 "
        f"agreement {p['top1_agreement']:.4f}: {'pass' if p['passed'] else 'FAIL'}"
        for p in card["parity"]
    ]
    lines += [
        "",
        "## Limitations",
        "",
        *[f"- {item}" for item in card["limitations"]],
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {f['bytes']} | `{f['sha256']}` |" for name, f in card["files"].items()]
    return "\n".join(lines) + "\n"
