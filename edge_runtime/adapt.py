"""Site adaptation: refit a model's last layer on a clinic's own labelled scans.

``adapt(options)`` runs the backbone once over the site's scans (the runtime's own decoding and
preprocessing, on the model with a ``features`` output added), estimates by grouped
cross-validation what refitting the last layer buys (:mod:`edge_runtime.adapt_eval`), refuses
when a class has too few scans or the refitted layer is not better, and otherwise writes the
adapted model of the parent's precision, with its FP32 recheck partner adapted alike, and a card.
The parent is never modified; an adapted model carries its parent's last layer, so adapting it
again starts from the parent. Needs the ``adapt`` extra (onnx, scikit-learn, scipy).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.adapt_fit import (
    SENSITIVITY_TARGET,
    Head,
    choose_threshold,
    decide,
    fit_temperature,
    fit_with_strength,
    softmax,
)
from edge_runtime.adapt_site import SiteScan, read_site
from edge_runtime.card import CARD_SUFFIX, card_path_for, file_sha256
from edge_runtime.classifier import MODELS_DIR, Classifier, ClassifierOptions, resolve_model_path
from edge_runtime.contract import (
    FEATURES,
    INPUT_NAME,
    LESION,
    PROBABILITIES,
    ModelSpec,
    NormalRule,
    Precision,
)
from edge_runtime.decision import decide as decide_call
from edge_runtime.decision import lesion_verdict
from edge_runtime.lesion import find_lesion
from edge_runtime.recheck import recheck_margin, with_recheck
from edge_runtime.session import Provider, open_model

log = logging.getLogger(__name__)

MIN_SCANS_PER_CLASS = 5
# re-choosing the operating point needs this many malignant scans: the binomial standard error
# of a 0.9 sensitivity is then <= 0.055 (with 10 it is 0.095, and on the BUSI stand-in a point
# re-chosen on 10, 20 or 40 lost accuracy; docs/experiments.md, decision 14)
MIN_MALIGNANT_FOR_THRESHOLD = 30
MAX_RECHECK_FRACTION = 0.2  # export/parity.py's INT8 gate (the runtime cannot import it)
RECORD_VERSION = 1
_EXTRA_HINT = "edge-classify adapt needs the adapt extra: pip install 'edge-classify[adapt]'"


class AdaptRefused(RuntimeError):
    """The site's scans do not justify an adapted model; nothing was written."""


@dataclass(frozen=True)
class AdaptOptions:
    """What to adapt, to which scans, and where the result goes."""

    site: Path
    output: Path
    model: str | os.PathLike[str] | None = None  # None: the bundled INT8 model
    site_name: str | None = None  # default: the site folder's (or manifest's) name
    provider: Provider = Provider.AUTO
    threads: int | None = None
    batch_size: int = 8
    max_sensitivity_drop: float = 0.0  # refuse when malignant sensitivity falls by more
    seed: int = 0


@dataclass(frozen=True)
class AdaptReport:
    """What ``adapt`` measured and wrote."""

    written: tuple[Path, ...]
    record: dict[str, Any]  # the adaptation metadata of the adapted model


@dataclass(frozen=True)
class _Parent:
    """A model file as adaptation starts from it (unwrapped when it is itself adapted)."""

    path: Path
    proto: Any  # onnx.ModelProto
    spec: ModelSpec  # the parent's own spec (before any adaptation)
    head: Head  # the parent's own last layer
    name: str  # the parent's file name
    sha256: str
    unwrapped_from: str | None  # the adapted file it was recovered from, if any


def adapt(options: AdaptOptions) -> AdaptReport:
    """Adapt ``options.model`` to ``options.site`` (module docstring).

    Raises:
        AdaptRefused: a class has fewer than 5 scans, or the adapted layer is not better by the
            site's cross-validation; the message carries the numbers. Nothing is written.
        FileNotFoundError: the model, its recheck partner or the site is missing.
        ContractError: the model is not an edge-classify model with the expected last layer.
        ValueError: bad site contents or an output path that would overwrite a parent.
        ImportError: the ``adapt`` extra is not installed.
    """
    try:
        import onnx  # noqa: F401
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_EXTRA_HINT} ({exc})") from exc
    model_path = resolve_model_path(options.model, options.provider)
    main = _load_parent(model_path)
    partner = _load_partner(main)
    outputs = _output_paths(options.output, main, partner)
    scans = read_site(options.site, main.spec.class_names)
    site = options.site_name or options.site.stem or options.site.name
    classes = main.spec.class_names
    with tempfile.TemporaryDirectory(prefix=".edge-adapt-") as tmp:
        site_data = _site_features(main, partner, scans, Path(tmp), options)
    features, kept, squares, lesion_found = site_data
    labels = np.array([s.label for s in kept])
    groups = np.array([s.group for s in kept])
    counts = {name: int((labels == c).sum()) for c, name in enumerate(classes)}
    few = {name: n for name, n in counts.items() if n < MIN_SCANS_PER_CLASS}
    if few:
        per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise AdaptRefused(
            f"{options.site}: too few readable scans to adapt ({per_class}): at least "
            f"{MIN_SCANS_PER_CLASS} of each class are needed, 10 are recommended, and "
            f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer. Nothing was written."
        )
    reference = partner or main  # fit and judge on the FP32 model's features when there is one
    x = features[reference.path]
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(1):  # tiny problems: BLAS threads only contend (10x slower seen)
        fit = _fit_and_judge(x, labels, groups, reference, options, lesion_found)
    result = fit["record"]
    result.update(site=site, scans_per_class=counts, groups=len(set(groups)))
    if fit["refusal"]:
        raise AdaptRefused(
            f"{options.site}: the adapted last layer is not better than the parent's on this "
            f"site's scans ({fit['refusal']}); nothing was written.\n" + format_numbers(result)
        )
    head = fit["head"]
    written = _write_models(main, partner, head, result, fit, outputs, squares, options)
    return AdaptReport(written=written, record=result)


def _load_parent(path: Path) -> _Parent:
    import onnx

    from edge_runtime.adapt_graph import find_head, read_head

    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec = ModelSpec.from_metadata(meta, source=str(path))
    head = read_head(proto, find_head(proto, source=str(path)))
    sha = file_sha256(path)
    if not spec.adaptation:
        return _Parent(path, proto, spec, head, path.name, sha, None)
    record = spec.adaptation.get("parent")
    try:
        parent = record["spec"]
        shape = tuple(record["head"]["shape"])
        kernel = np.frombuffer(base64.b64decode(record["head"]["kernel"]), "<f4").reshape(shape)
        bias = np.frombuffer(base64.b64decode(record["head"]["bias"]), "<f4")
        own = replace(
            spec,
            model_version=parent["model_version"],
            temperature=float(parent["temperature"]),
            malignant_threshold=float(parent["malignant_threshold"]),
            metrics=parent["metrics"],
            recheck_margin=float(parent["recheck_margin"]),
            normal_rule=NormalRule(parent.get("normal_rule", spec.normal_rule.value)),
            normal_gate=float(parent.get("normal_gate", 0.0)),
            adaptation={},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: is an adapted model whose record of its parent is unreadable ({exc}); "
            "adapt the original model instead."
        ) from exc
    log.warning(
        "%s: is itself adapted (to %s); starting again from its parent %s (SHA-256 %s...), "
        "whose last layer it carries",
        path,
        spec.adaptation.get("site"),
        record.get("file"),
        str(record.get("sha256"))[:12],
    )
    head = Head(kernel.copy(), bias.copy())
    return _Parent(path, proto, own, head, record["file"], record["sha256"], str(path))


def _load_partner(main: _Parent) -> _Parent | None:
    if main.spec.precision is Precision.FP32 or not main.spec.recheck_model:
        return None
    path = main.path.parent / main.spec.recheck_model
    if not path.is_file():
        raise FileNotFoundError(
            f"{main.path}: its FP32 recheck model {path} is missing; it is adapted alike, so "
            "copy it beside the model."
        )
    return _load_parent(path)


def _output_paths(output: Path, main: _Parent, partner: _Parent | None) -> dict[str, Path]:
    """``{"main": OUT, "partner": OUT-fp32}`` after checking none is a parent or bundled."""
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"--output must name an .onnx file. Got {output} instead.")
    paths = {"main": output}
    if partner is not None:
        stem = output.stem[: -len("-int8")] if output.stem.endswith("-int8") else output.stem
        paths["partner"] = output.with_name(f"{stem}-fp32.onnx")
    protected = {main.path.resolve()} | ({partner.path.resolve()} if partner else set())
    for path in paths.values():
        target = path.resolve()
        if target in protected or target.parent == MODELS_DIR.resolve():
            raise ValueError(
                f"{path}: would overwrite the model being adapted or a bundled model; the "
                "parent is never modified. Choose another --output."
            )
    return paths


def _site_features(
    main: _Parent,
    partner: _Parent | None,
    scans: list[SiteScan],
    tmp: Path,
    options: AdaptOptions,
) -> tuple[dict[Path, np.ndarray], list[SiteScan], list[np.ndarray], np.ndarray | None]:
    """Pooled features per model and per readable scan (frames of a file averaged), the scans
    kept, every frame's square (for checking the written models) and, when the reference model
    (the FP32 partner, else the model) calls "normal" by its lesion head, whether that head finds
    a lesion in each scan (in any of its frames), else None."""
    import onnx

    from edge_runtime.adapt_graph import find_head, with_features

    sessions = {}
    for parent in (main, partner):
        if parent is None:
            continue
        featured = with_features(parent.proto, find_head(parent.proto, source=str(parent.path)))
        path = tmp / f"featured-{len(sessions)}.onnx"
        onnx.save(featured, str(path))
        sessions[parent.path] = open_model(path, provider=options.provider, threads=options.threads)
    first = sessions[main.path]
    decoder = Classifier(first, ClassifierOptions(batch_size=options.batch_size, recheck=False))
    by_source: dict[str, list[int]] = {}
    squares: list[np.ndarray] = []
    failed = []
    try:
        for source, _frame, square, error in decoder.iter_squares([s.path for s in scans]):
            if error is not None:
                failed.append(f"{source}: {error}")
                continue
            by_source.setdefault(source, []).append(len(squares))
            squares.append(square)
    finally:
        decoder.close()
    for problem in failed:
        log.warning("%s (left out)", problem)
    d = main.head.kernel.shape[0]
    features = {
        path: _run(loaded, FEATURES, squares, options.batch_size) if squares else np.zeros((0, d))
        for path, loaded in sessions.items()
    }
    kept = [s for s in scans if str(s.path) in by_source]
    reference = partner or main
    lesion_found = None
    spec = reference.spec
    if spec.normal_rule is not NormalRule.CLASSIFIER and squares:
        maps = _run(sessions[reference.path], LESION, squares, options.batch_size)
        # the runtime's rule (lesion.find_lesion), on the model's square
        side = spec.input_size
        frame_found = np.array(
            [
                find_lesion(
                    m[:, :, 0],
                    (side, side),
                    input_size=side,
                    threshold=spec.lesion_threshold,
                    min_area=spec.lesion_min_area,
                    with_mask=False,
                )[0]
                is not None
                for m in maps
            ]
        )
        lesion_found = np.array([bool(frame_found[by_source[str(s.path)]].any()) for s in kept])
    per_file = {
        path: np.stack([frames[by_source[str(s.path)]].mean(axis=0) for s in kept])
        if kept
        else np.zeros((0, frames.shape[1]))
        for path, frames in features.items()
    }
    return per_file, kept, squares, lesion_found


def parent_calls(
    spec: ModelSpec, head: Head, features: np.ndarray, lesion_found: np.ndarray | None
) -> np.ndarray:
    """The parent's calls as it runs (int ``[N]``): its temperature, operating point and, for a
    lesion model, its normal rule over ``lesion_found`` (bool ``[N]``, from
    :func:`_site_features`)."""
    probabilities = softmax(head.logits(features), spec.temperature)
    verdict = lesion_verdict(
        spec.normal_rule.value,
        lesion_found,
        probabilities,
        spec.class_names,
        spec.malignant_threshold,
        spec.normal_gate,
    )
    return decide_call(probabilities, spec.class_names, spec.malignant_threshold, verdict)


def _run(loaded, output: str, squares: list[np.ndarray], batch_size: int) -> np.ndarray:
    """One output of a session over ``[S, S]`` squares, in batches."""
    rows = [
        loaded.session.run(
            [output], {INPUT_NAME: np.stack(squares[i : i + batch_size])[..., None]}
        )[0]
        for i in range(0, len(squares), batch_size)
    ]
    return np.concatenate(rows)


def _fit_and_judge(
    x: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    parent: _Parent,
    options: AdaptOptions,
    lesion_found: np.ndarray | None = None,
) -> dict[str, Any]:
    """Choose what to refit (:func:`_way`), estimate it by the site's cross-validation against
    the parent as it runs, and fit it on all the site's scans."""
    from edge_runtime.adapt_eval import SiteFeatures, choose_strength

    spec, classes = parent.spec, parent.spec.class_names
    malignant = classes.index("malignant") if "malignant" in classes else None
    site = SiteFeatures(x, labels, groups)
    before = parent_calls(spec, parent.head, x, lesion_found)
    free, why = _way(labels, before, classes)
    best = _estimate(site, parent, free, before, options)
    numbers = best["numbers"]
    refusal = _refusal(numbers, malignant, classes, options.max_sensitivity_drop)
    strength = choose_strength(site, parent.head, seed=options.seed, free_columns=free)
    head = fit_with_strength(x, labels, parent.head, strength, free_columns=free)
    record = {
        "refitted": {
            "value": "the whole last layer"
            if free is None
            else "the normal column of the last layer (the other classes keep the parent's)",
            "why": why,
        },
        "cross_validation": {
            "folds": best["folds"],
            "grouped_by": "manifest group" if _has_groups(groups) else "file",
            "strengths_chosen_in_folds": best["strengths"],
            "features_of": f"the {spec.precision.value} model",
            **numbers,
        },
        "strength": strength,
        "temperature": {
            "value": round(best["temperature"], 6),
            "parent": spec.temperature,
            "fitted_on": "the parent's (its lesion classes are unchanged)"
            if free
            else "out-of-fold logits of the site's cross-validation",
        },
        "malignant_threshold": {"value": best["threshold"], "note": best["threshold_note"]},
        "normal_rule": {
            "value": NormalRule.CLASSIFIER.value,
            "parent": spec.normal_rule.value,
            "note": "the refitted last layer calls normal (it was fitted to); the lesion output "
            "still outlines lesions"
            if spec.normal_rule is not NormalRule.CLASSIFIER
            else "as the parent's",
        },
    }
    return {
        "head": head,
        "record": record,
        "refusal": refusal,
        "temperature": best["temperature"],
        "threshold": best["threshold"],
    }


MIN_PARENT_RECALL = 0.5  # a lesion class the parent gets right less often than this has failed


def _way(
    labels: np.ndarray, before: np.ndarray, classes: tuple[str, ...]
) -> tuple[list[int] | None, str]:
    """What to refit (the free columns, None: the whole layer), and why.

    Ten scans a class cannot support re-learning the lesion classes, and on the BUSI stand-in
    refitting them lost accuracy, so a parent with a normal class gets its normal column alone
    refitted, unless the parent, as it runs, gets a lesion class right on fewer than
    :data:`MIN_PARENT_RECALL` of the site's scans of that class: then that class has failed on
    this scanner and the whole layer is refitted (docs/experiments.md, decisions 14 and 15)."""
    if "normal" not in classes:
        return None, "the model has no normal class"
    failed = []
    for c, name in enumerate(classes):
        if name != "normal" and np.any(labels == c):
            recall = float(np.mean(before[labels == c] == c))
            if recall < MIN_PARENT_RECALL:
                failed.append(f"{name} {recall:.2f}")
    if failed:
        return None, (
            f"the parent's recall of {', '.join(failed)} on the site's scans is below "
            f"{MIN_PARENT_RECALL:.2f}: its lesion classes fail on this scanner"
        )
    return [classes.index("normal")], (
        f"the parent gets each lesion class right on at least {MIN_PARENT_RECALL:.2f} of the "
        "site's scans; its normal class is what a new scanner breaks"
    )


def _estimate(
    site, parent: _Parent, free: list[int] | None, before: np.ndarray, options: AdaptOptions
) -> dict[str, Any]:
    """One way of refitting (``free``: the columns refitted, None: all), estimated by the site's
    grouped cross-validation against the parent's calls ``before``."""
    from edge_runtime.adapt_eval import compare, cross_validate

    spec, classes = parent.spec, parent.spec.class_names
    malignant = classes.index("malignant") if "malignant" in classes else None
    labels = site.labels
    cv = cross_validate(site, parent.head, seed=options.seed, free_columns=free)
    temperature = spec.temperature if free else fit_temperature(cv.logits, labels)
    oof = softmax(cv.logits, temperature)
    n_malignant = int((labels == malignant).sum()) if malignant is not None else 0
    threshold, note = spec.malignant_threshold, "the parent has no malignant threshold"
    if spec.malignant_threshold > 0:
        if n_malignant >= MIN_MALIGNANT_FOR_THRESHOLD:
            threshold = choose_threshold(oof[:, malignant], labels == malignant)
            note = (
                f"re-chosen on the site's {n_malignant} malignant scans (out-of-fold) for "
                f"sensitivity >= {SENSITIVITY_TARGET:.2f}; the after-estimate of malignant "
                "sensitivity is optimistic since it is measured on the same scans"
            )
        else:
            note = (
                f"kept the parent's {spec.malignant_threshold:.4f}: only {n_malignant} malignant "
                f"scans (re-choosing needs >= {MIN_MALIGNANT_FOR_THRESHOLD}); its sensitivity "
                "on this site is only what the cross-validation shows"
            )
    after = decide(oof, malignant, threshold)
    return {
        "free": free,
        "numbers": compare(labels, before, after, site.groups, classes, seed=options.seed),
        "temperature": temperature,
        "threshold": threshold,
        "threshold_note": note,
        "folds": cv.folds,
        "strengths": list(cv.strengths),
    }


def _has_groups(groups: np.ndarray) -> bool:
    return len(set(groups)) < len(groups)


def _refusal(numbers: dict, malignant: int | None, classes, max_drop: float) -> str:
    """Why the adapted layer is not better, or "" when it is: by the site cross-validation's
    point estimates it must raise balanced accuracy, not lower accuracy, and not lower malignant
    sensitivity by more than ``max_drop`` (0: miss no malignant scan the parent caught).

    The 95% intervals are reported, not required above 0: with 30 scans a paired interval spans
    about +-0.15, so that rule refused 3 of 5 stand-in draws, among them adaptations that lifted
    normal recall by 0.4 on the other scans. A false "better" costs a clinic one more check of
    a model it is told to check anyway; what must not slip through unseen is a lost cancer,
    hence the hard bound on malignant sensitivity (docs/experiments.md, "Site adaptation")."""
    b, a = numbers["before"], numbers["after"]
    gain = numbers["difference"]["balanced_accuracy"]
    reasons = []
    if not gain["value"] > 1e-9:
        low, high = (float("nan") if v is None else v for v in gain["ci95"])
        reasons.append(
            f"balanced accuracy {b['balanced_accuracy']['value']:.3f} -> "
            f"{a['balanced_accuracy']['value']:.3f}, gain {gain['value']:+.3f} (95% interval "
            f"[{low:+.3f}, {high:+.3f}]) not above 0"
        )
    if a["accuracy"]["value"] < b["accuracy"]["value"] - 1e-9:
        reasons.append(f"accuracy {b['accuracy']['value']:.3f} -> {a['accuracy']['value']:.3f}")
    if malignant is not None:
        key = f"recall_{classes[malignant]}"
        if a[key]["value"] < b[key]["value"] - max_drop - 1e-9:
            reasons.append(
                f"malignant sensitivity {b[key]['value']:.3f} -> {a[key]['value']:.3f} (a drop "
                f"beyond --max-sensitivity-drop {max_drop:g})"
            )
    return "; ".join(reasons)


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


def _head_record(parent: _Parent) -> dict[str, Any]:
    kernel = np.ascontiguousarray(parent.head.kernel, dtype="<f4")
    spec = parent.spec
    return {
        "file": parent.name,
        "sha256": parent.sha256,
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


def _write_models(
    main: _Parent,
    partner: _Parent | None,
    head: Head,
    result: dict[str, Any],
    fit: dict[str, Any],
    outputs: dict[str, Path],
    squares: list[np.ndarray],
    options: AdaptOptions,
) -> tuple[Path, ...]:
    """Write the adapted model (and partner), check them on the site's scans, then the card."""
    import onnx

    from edge_runtime.adapt_graph import find_head, with_head

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
    staged: dict[str, Path] = {}
    protos: dict[str, Any] = {}
    specs: dict[str, ModelSpec] = {}
    try:
        for role, parent in (("main", main), ("partner", partner)):
            if parent is None:
                continue
            record = {**common, "parent": _head_record(parent)}
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
            if parent.spec.precision is Precision.INT8:
                protos[role], widened = _widen(protos[role], squares, options.batch_size)
                record["int8_ranges_widened"] = widened
            specs[role] = spec
            staged[role] = out_dir / f".{outputs[role].name}.partial"
            onnx.save(protos[role], str(staged[role]))
        if partner is not None:
            margin, parity = _int8_parity(staged, squares, specs["main"], options, partner.path)
            record = dict(specs["main"].adaptation)
            record["int8"] = parity
            result["int8"] = parity
            spec = replace(specs["main"], recheck_margin=margin, adaptation=record)
            meta = {p.key: p.value for p in protos["main"].metadata_props}
            meta.update(spec.to_metadata())
            del protos["main"].metadata_props[:]
            for key, value in meta.items():
                protos["main"].metadata_props.add(key=key, value=value)
            onnx.save(protos["main"], str(staged["main"]))
            specs["main"] = spec
        _check_written(staged, squares, head)
        for role, path in staged.items():
            os.replace(path, outputs[role])
    finally:
        for path in staged.values():
            if path.exists():
                path.unlink()
    card = _write_card(outputs, specs, main, partner)
    return (*outputs.values(), card, _markdown_path(card))


def _widen(proto: Any, squares: list[np.ndarray], batch_size: int) -> tuple[Any, dict[str, Any]]:
    """The INT8 graph with its activation ranges widened to the site's scans
    (:mod:`edge_runtime.adapt_quant`), and what changed, for the record."""
    from edge_runtime.adapt_quant import widen_ranges

    batches = (
        np.stack(squares[i : i + batch_size])[..., None] for i in range(0, len(squares), batch_size)
    )
    widened, changes = widen_ranges(proto, batches, input_name=INPUT_NAME)
    if changes:
        log.info(
            "widened %d INT8 activation ranges that the site's scans went past (%s)",
            len(changes),
            ", ".join(f"{c.tensor} {c.before[1]:.3g}->{c.after[1]:.3g}" for c in changes[:3]),
        )
    summary = {
        "count": len(changes),
        "why": "the site's scans went past ranges calibrated for the parent's scans; clipped "
        "activations would make the INT8 model disagree with its FP32 partner",
        "tensors": {c.tensor: {"before": list(c.before), "after": list(c.after)} for c in changes},
    }
    return widened, summary


def _int8_parity(
    staged: dict[str, Path],
    squares: list[np.ndarray],
    spec: ModelSpec,
    options: AdaptOptions,
    fp32_parent: Path,
) -> tuple[float, dict[str, Any]]:
    """The adapted INT8 model against its adapted FP32 partner on the site's scans: the recheck
    margin (the parent's, or more if the new layer moves INT8 further from FP32) and agreement."""
    probabilities = {}
    for role, path in staged.items():
        loaded = open_model(path, provider=options.provider, threads=options.threads)
        probabilities[role] = _run(loaded, PROBABILITIES, squares, options.batch_size)
    fp32, int8 = probabilities["partner"], probabilities["main"]
    margin = max(spec.recheck_margin, recheck_margin(fp32, int8))
    answers, redo = with_recheck(int8, fp32, margin)
    top1 = fp32.argmax(1)
    parity = {
        "frames": len(squares),
        "int8_alone_top1_agreement": round(float(np.mean(int8.argmax(1) == top1)), 4),
        "top1_agreement_with_recheck": round(float(np.mean(answers.argmax(1) == top1)), 4),
        "recheck_margin": round(margin, 6),
        "parent_recheck_margin": spec.recheck_margin,
        "rechecked_fraction": round(float(redo.mean()), 4),
        "max_abs_probability_diff": round(float(np.abs(int8 - fp32).max()), 6),
    }
    if redo.mean() > MAX_RECHECK_FRACTION:
        raise AdaptRefused(
            f"the adapted INT8 model fails the INT8 gate on the site's scans: it is unsure of "
            f"{redo.mean():.0%} of them (lead below the recheck margin {margin:.3f}) and would "
            f"rerun them in FP32; edge-export allows at most {MAX_RECHECK_FRACTION:.0%}. Adapt "
            f"the FP32 model instead (--model {fp32_parent}); nothing was written."
        )
    return margin, parity


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


def _write_card(
    outputs: dict[str, Path], specs: dict[str, ModelSpec], main: _Parent, partner: _Parent | None
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
        "files": {
            path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
            for path in outputs.values()
        },
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    _markdown_path(card_path).write_text(_card_markdown(card))
    return card_path


def _markdown_path(card_path: Path) -> Path:
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
    lines += ["", "## Site cross-validation", "", "```", format_numbers(record), "```", ""]
    temperature = record["temperature"]
    lines.append(
        f"Temperature {temperature['value']:.4f} (parent {temperature['parent']:.4f}), "
        f"{temperature['fitted_on']}."
    )
    threshold = record["malignant_threshold"]
    lines.append(f"Malignant threshold {threshold['value']:.4f}: {threshold['note']}.")
    if "int8" in record:
        p = record["int8"]
        lines.append(
            f"INT8 vs its adapted FP32 partner on the site's {p['frames']} frames: top-1 "
            f"agreement {p['int8_alone_top1_agreement']:.4f} alone, "
            f"{p['top1_agreement_with_recheck']:.4f} with the FP32 recheck (margin "
            f"{p['recheck_margin']:.3f}, {p['rechecked_fraction']:.1%} rechecked)."
        )
    lines += ["", "## Files", ""]
    for name, info in card["files"].items():
        lines.append(f"- `{name}`: {info['bytes']:,} bytes, SHA-256 `{info['sha256']}`")
    return "\n".join(lines) + "\n"
