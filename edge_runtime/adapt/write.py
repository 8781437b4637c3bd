"""Writing the adapted model files: the new last layer in the parent's graph (and its FP32
partner's), INT8 activation ranges measured on the FP32 partner where they help, the recheck
margin, and the gate every file passes, reloaded as the runtime runs it, before anything is moved
into place."""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.adapt.card import markdown_path, write_card
from edge_runtime.adapt.fit import Head, softmax
from edge_runtime.adapt.options import RECORD_VERSION, AdaptOptions, AdaptRefused, Parent
from edge_runtime.model.contract import (
    FEATURES,
    INPUT_NAME,
    PROBABILITIES,
    ModelSpec,
    NormalRule,
    Precision,
)
from edge_runtime.model.session import Provider, open_model
from edge_runtime.model.verify import int8_agreement, verify_model_file
from edge_runtime.postprocess.recheck import call_margins, recheck_margin

log = logging.getLogger(__name__)


def head_record(parent: Parent) -> dict[str, Any]:
    """What an adapted model records of its parent: the file, its SHA-256 and where it lies,
    its spec and its last layer (how :mod:`edge_runtime.adapt.parent` finds or rebuilds it)."""
    kernel = np.ascontiguousarray(parent.head.kernel, dtype="<f4")
    spec = parent.spec
    return {
        "file": parent.name,
        "sha256": parent.sha256,
        "path": parent.origin,  # where adapting again looks for it first (by its SHA-256)
        "spec": {
            "model_version": spec.model_version,
            "temperature": spec.temperature,
            "malignant_threshold": spec.malignant_threshold,
            "metrics": dict(spec.metrics),
            "recheck_margin": spec.recheck_margin,
            "precision": spec.precision.value,
            "normal_rule": spec.normal_rule.value,
            "normal_gate": spec.normal_gate,
        },
        "head": {
            "shape": list(kernel.shape),
            "kernel": base64.b64encode(kernel.tobytes()).decode("ascii"),
            "bias": base64.b64encode(np.asarray(parent.head.bias, "<f4").tobytes()).decode(),
        },
    }


def write_models(
    main: Parent,
    partner: Parent | None,
    head: Head,
    result: dict[str, Any],
    fit: dict[str, Any],
    outputs: dict[str, Path],
    squares: list[np.ndarray],
    options: AdaptOptions,
) -> tuple[Path, ...]:
    """Write the adapted model (and partner) into a staging folder under their final names,
    reload each as the runtime runs it and gate it (:mod:`edge_runtime.model.verify`), then move
    them into place and write the card. A file that fails leaves nothing behind."""
    import shutil

    import onnx

    from edge_runtime.adapt.graph import find_head, with_head

    digest = hashlib.sha256(head.kernel.tobytes() + head.bias.tobytes()).hexdigest()[:8]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        **result,
        "version": RECORD_VERSION,
        "created": created,
        "parent_metrics_apply": False,
        "note": "The parent's published metrics do not apply to this model: its last layer was "
        "refitted on this site's scans. The site cross-validation above is its only evidence.",
    }
    metrics = {
        "accuracy": result["cross_validation"]["after"]["accuracy"]["value"],
        "balanced_accuracy": result["cross_validation"]["after"]["balanced_accuracy"]["value"],
        "n": int(sum(result["scans_per_class"].values())),
        "evaluated_on": "site grouped cross-validation (edge-classify adapt)",
    }
    out_dir = outputs["main"].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".edge-adapt-"))
    staged = {role: stage / path.name for role, path in outputs.items()}
    protos: dict[str, Any] = {}
    specs: dict[str, ModelSpec] = {}
    try:
        # the FP32 partner first: the INT8 model's ranges are measured on it
        for role, parent in (("partner", partner), ("main", main)):
            if parent is None:
                continue
            record = {**common, "parent": head_record(parent)}
            spec = replace(
                parent.spec,
                model_version=f"{parent.spec.model_version}+adapted.{digest}",
                temperature=fit["temperature"],
                malignant_threshold=fit["threshold"],
                normal_rule=NormalRule.CLASSIFIER,
                normal_gate=0.0,
                metrics=metrics,
                adaptation=record,
            )
            if role == "main" and partner is not None:
                spec = replace(spec, recheck_model=outputs["partner"].name)
                record["partner"] = outputs["partner"].name
            meta = {p.key: p.value for p in parent.proto.metadata_props}
            meta.update(spec.to_metadata())
            where = find_head(parent.proto, source=str(parent.path))
            protos[role] = with_head(parent.proto, where, head, meta, source=str(parent.path))
            if parent.spec.precision is Precision.INT8 and "partner" in protos:
                protos[role], widened = _widen(
                    protos[role], protos["partner"], squares, options.batch_size
                )
                record["int8_ranges_widened"] = widened
            specs[role] = spec
            onnx.save(protos[role], str(staged[role]))
        if partner is not None:
            specs["main"] = _set_recheck_margin(protos["main"], staged, squares, specs["main"])
            result["int8"] = specs["main"].adaptation["int8"]
        _check_written(staged, squares, head)
        _gate_written(staged, squares, partner, options)
        for role, path in staged.items():
            os.replace(path, outputs[role])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    card = write_card(outputs, specs, main, partner)
    return (*outputs.values(), card, markdown_path(card))


def _widen(
    proto: Any, fp32: Any, squares: list[np.ndarray], batch_size: int
) -> tuple[Any, dict[str, Any]]:
    """The INT8 graph with its activation ranges widened to the site's scans, measured on its
    FP32 partner ``fp32`` (:mod:`edge_runtime.adapt.quant`), if that brings it closer to the
    partner on the site's scans than the parent's ranges do; and the record of both."""
    from edge_runtime.adapt.quant import widen_ranges

    batches = (
        np.stack(squares[i : i + batch_size])[..., None] for i in range(0, len(squares), batch_size)
    )
    widened, changes = widen_ranges(proto, fp32, batches, input_name=INPUT_NAME)
    summary: dict[str, Any] = {
        "count": len(changes),
        "why": "the site's scans went past ranges calibrated for the parent's scans, as the "
        "FP32 partner measures them; clipped activations can make the INT8 model disagree "
        "with its FP32 partner",
        "tensors": {c.tensor: {"before": list(c.before), "after": list(c.after)} for c in changes},
        "kept": False,
    }
    if not changes:
        return proto, summary
    reference = _probabilities(fp32, squares, batch_size)
    scores = {}
    for name, candidate in (("parent ranges", proto), ("widened", widened)):
        int8 = _probabilities(candidate, squares, batch_size)
        margin = recheck_margin(reference, int8)
        _, rechecked, failures = int8_agreement(reference, int8, margin)
        scores[name] = (len(failures), rechecked, margin)
    summary["measured"] = {
        name: {"gate_failures": f, "rechecked_fraction": round(r, 4), "site_margin": round(m, 6)}
        for name, (f, r, m) in scores.items()
    }
    summary["kept"] = scores["widened"] < scores["parent ranges"]
    log.info(
        "%s %d INT8 activation ranges that the site's scans went past (%s): site recheck "
        "margin %.3f widened, %.3f with the parent's ranges",
        "widened" if summary["kept"] else "did not widen",
        len(changes),
        ", ".join(f"{c.tensor} {c.before[1]:.3g}->{c.after[1]:.3g}" for c in changes[:3]),
        scores["widened"][2],
        scores["parent ranges"][2],
    )
    return (widened if summary["kept"] else proto), summary


def run_batches(
    session: Any, output: str, squares: list[np.ndarray], batch_size: int
) -> np.ndarray:
    """One output of an onnxruntime session over ``[S, S]`` uint8 squares, in batches."""
    rows = []
    for i in range(0, len(squares), batch_size):
        batch = np.stack(squares[i : i + batch_size])[..., None]
        rows.append(session.run([output], {INPUT_NAME: batch})[0])
    return np.concatenate(rows)


def run_outputs(
    session: Any, outputs: tuple[str, ...], squares: list[np.ndarray], batch_size: int
) -> list[np.ndarray]:
    """Several outputs of an onnxruntime session over ``[S, S]`` uint8 squares, in batches (one
    run per batch), each concatenated over the batches. ``squares`` must not be empty."""
    rows: list[list[np.ndarray]] = [[] for _ in outputs]
    for i in range(0, len(squares), batch_size):
        batch = np.stack(squares[i : i + batch_size])[..., None]
        for row, value in zip(rows, session.run(list(outputs), {INPUT_NAME: batch}), strict=True):
            row.append(value)
    return [np.concatenate(row) for row in rows]


def _probabilities(proto: Any, squares: list[np.ndarray], batch_size: int) -> np.ndarray:
    """``probabilities`` of an in-memory model over ``[S, S]`` squares, on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return run_batches(session, PROBABILITIES, squares, batch_size)


def _set_recheck_margin(
    proto: Any, staged: dict[str, Path], squares: list[np.ndarray], spec: ModelSpec
) -> ModelSpec:
    """The adapted INT8 model's recheck margin (the parent's, or more where the new layer moves
    INT8 further from FP32 on the site's scans), and its agreement there, written into the
    staged INT8 file's metadata. The gate itself is :func:`_gate_written`, on the final file."""
    import onnx

    probabilities = {}
    for role, path in staged.items():
        loaded = open_model(path, provider=Provider.CPU, threads=1)
        probabilities[role] = run_batches(loaded.session, PROBABILITIES, squares, 16)
    fp32, int8 = probabilities["partner"], probabilities["main"]
    margin = max(spec.recheck_margin, recheck_margin(fp32, int8))
    # the adapted model calls by its operating point alone (normal rule: classifier)
    malignant, _ = call_margins(fp32, int8, spec)
    malignant = max(spec.recheck_malignant_margin, malignant)
    agreement, rechecked, failures = int8_agreement(fp32, int8, margin)
    parity = {
        "frames": len(squares),
        "int8_alone_top1_agreement": round(float(np.mean(int8.argmax(1) == fp32.argmax(1))), 4),
        "top1_agreement_with_recheck": round(agreement, 4),
        "recheck_margin": round(margin, 6),
        "recheck_malignant_margin": round(malignant, 6),
        "parent_recheck_margin": spec.recheck_margin,
        "rechecked_fraction": round(rechecked, 4),
        "max_abs_probability_diff": round(float(np.abs(int8 - fp32).max()), 6),
        "passed": not failures,
    }
    record = {**spec.adaptation, "int8": parity}
    spec = replace(
        spec,
        recheck_margin=margin,
        recheck_malignant_margin=malignant,
        recheck_lesion_margin=0.0,
        adaptation=record,
    )
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(spec.to_metadata())
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(staged["main"]))
    return spec


def _gate_written(
    staged: dict[str, Path], squares: list[np.ndarray], partner: Parent | None, options
) -> None:
    """Reload each staged file as the runtime runs it and gate it on the site's scans.

    Raises:
        AdaptRefused: a file fails; the message says what to try next.
    """
    images = np.stack(squares)
    for role in ("partner", "main"):
        if role not in staged:
            continue
        check = verify_model_file(staged[role], images)
        log.info("%s", check.summary())
        if check.passed:
            continue
        advice = (
            "Its FP32 partner passed the same gate: write that adapted FP32 model alone with "
            "--precision fp32"
            if role == "main" and partner is not None
            else "Check that the parent is an edge-classify model, and report this"
        )
        raise AdaptRefused(
            f"the adapted {check.precision.upper()} model fails the file gate on the site's "
            f"scans: {'; '.join(check.failures)}. {advice}. Nothing was written."
        )


def _check_written(staged: dict[str, Path], squares: list[np.ndarray], head: Head) -> None:
    """The written graphs load under the contract, carry their record and compute the fitted
    layer: their probabilities on the site's first scans match the layer applied to the
    features they output."""
    for path in staged.values():
        loaded = open_model(path, provider=Provider.CPU)
        if loaded.spec.adaptation.get("version") != RECORD_VERSION:
            raise RuntimeError(f"{path}: the adaptation metadata did not round-trip")
        batch = np.stack(squares[:8])[..., None]
        feats, probabilities = loaded.session.run([FEATURES, PROBABILITIES], {INPUT_NAME: batch})
        expected = softmax(head.logits(feats))
        tolerance = 1e-4 if loaded.spec.precision is Precision.FP32 else 4e-3  # INT8: uint8 output
        if np.abs(expected - probabilities).max() > tolerance:
            raise RuntimeError(f"{path}: the written graph does not compute the fitted layer")
