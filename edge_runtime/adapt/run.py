"""Site adaptation: refit a model's last layer on a clinic's own labelled scans.

``adapt(options)`` runs the backbone once over the site's scans (the runtime's own decoding,
input check and preprocessing, :mod:`edge_runtime.adapt.scans`, on the model with a ``features``
output added), estimates by grouped cross-validation what refitting the last layer buys
(:mod:`edge_runtime.adapt.evaluate`), refuses when a class has too few scans or the refitted
layer is not better or loses the parent's cancers, naming the condition that failed, and
otherwise writes the adapted model of the parent's precision, with its FP32 recheck partner
adapted alike, and a card (:mod:`edge_runtime.adapt.place` says where it may). The parent is
never modified; adapting an adapted model starts again from its parent
(:mod:`edge_runtime.adapt.parent`). Needs the ``adapt`` extra (onnx, scikit-learn, scipy).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.adapt.card import format_numbers
from edge_runtime.adapt.fit import Head, MalignantGuard, fit_with_strength, softmax
from edge_runtime.adapt.options import (
    AdaptOptions,
    AdaptRefused,
    AdaptReport,
    Parent,
)
from edge_runtime.adapt.parent import load_parent, load_partner
from edge_runtime.adapt.place import output_paths
from edge_runtime.adapt.scans import read_squares
from edge_runtime.adapt.site import SiteScan, read_site
from edge_runtime.adapt.write import run_batches, run_outputs, write_models
from edge_runtime.classifier import resolve_model_path, usable_cores
from edge_runtime.extras import install_hint
from edge_runtime.model.contract import (
    FEATURES,
    LESION,
    PROBABILITIES,
    ModelSpec,
    NormalRule,
    Precision,
)
from edge_runtime.model.session import open_model
from edge_runtime.postprocess.calibration import apply_temperature, fit_temperature
from edge_runtime.postprocess.decision import (
    SENSITIVITY_TARGET,
    decide,
    lesion_verdict,
    malignant_operating_point,
)
from edge_runtime.postprocess.lesion import find_lesion

log = logging.getLogger(__name__)

MIN_SCANS_PER_CLASS = 5
# re-choosing the operating point needs this many malignant scans: the binomial standard error
# of a 0.9 sensitivity is then <= 0.055 (docs/experiments.md, "Site adaptation")
MIN_MALIGNANT_FOR_THRESHOLD = 30
_EXTRA_HINT = f"edge-classify adapt needs the adapt extra: {install_hint('adapt')}"


def adapt(options: AdaptOptions) -> AdaptReport:
    """Adapt ``options.model`` to ``options.site`` (module docstring).

    Raises:
        AdaptRefused: a class has fewer than 5 scans kept, or the adapted layer fails a condition
            of the site's cross-validation (:func:`_refusal_reasons`); the message names it and
            carries the numbers. Nothing is written.
        FileNotFoundError: the model, its recheck partner or the site is missing.
        ContractError: the model is not an edge-classify model with the expected last layer.
        ValueError: bad site contents (a malformed manifest, a file listed twice, none of its
            files found) or an output place adapt may not write (a parent, a bundled model or
            another model's files: :mod:`edge_runtime.adapt.place`).
        ImportError: the ``adapt`` extra is not installed.
    """
    try:
        import onnx  # noqa: F401
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_EXTRA_HINT} ({exc})") from exc
    model_path = resolve_model_path(options.model, options.provider)
    main = load_parent(model_path)
    partner = load_partner(main)
    if options.precision is Precision.FP32 and main.spec.precision is not Precision.FP32:
        if partner is None:
            raise ValueError(
                f"{model_path}: --precision fp32 needs the FP32 model, and this "
                f"{main.spec.precision.value} model names no FP32 partner. Pass --model with "
                "an FP32 model."
            )
        main, partner = partner, None
    elif options.precision not in (None, main.spec.precision):
        raise ValueError(
            f"--precision {options.precision.value}: adapt writes the parent's precision "
            f"({main.spec.precision.value}) or fp32. Got {options.precision.value} instead."
        )
    outputs = output_paths(options.output, main, partner)
    scans = read_site(options.site, main.spec.class_names)
    site = options.site_name or options.site.stem or options.site.name
    classes = main.spec.class_names
    with tempfile.TemporaryDirectory(prefix=".edge-adapt-") as tmp:
        site_data = _site_outputs(main, partner, scans, Path(tmp), options)
    features, kept, squares = site_data.features, site_data.kept, site_data.squares
    lesion_found = site_data.lesion_found
    labels = np.array([s.label for s in kept])
    groups = np.array([s.group for s in kept])
    counts = _check_counts(options.site, labels, classes)
    grouped = any(s.grouped for s in kept)
    if not grouped:
        log.warning(
            "%s: no patient groups, so each file is its own group and a patient's scans may sit "
            "on both sides of a fold (optimistic numbers): give a CSV with a patient column",
            options.site,
        )
    reference = partner or main  # fit and judge on the FP32 model's features when there is one
    x = features[reference.path]
    ensemble = _ensemble_record(reference, x, site_data.probabilities)
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(1):  # tiny problems: BLAS threads only contend (10x slower seen)
        names = [s.path.name for s in kept]
        own = site_data.probabilities if ensemble else None
        fit = _fit_and_judge(
            x, labels, groups, reference, options, lesion_found, names, own, grouped=grouped
        )
    result = fit["record"]
    if ensemble:
        result["ensemble"] = ensemble
    result.update(site=site, scans_per_class=counts, groups=len(set(groups)))
    result["left_out"] = site_data.left_out  # labelled, but not used: the card names them
    if fit["refusal"]:
        raise AdaptRefused(_refusal_message(options.site, fit["refusal"], result))
    head = fit["head"]
    written = write_models(main, partner, head, result, fit, outputs, squares, options)
    return AdaptReport(written=written, record=result)


def _check_counts(site: Path, labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """The scans per class read, after checking each class has enough.

    Raises:
        AdaptRefused: a class has fewer than :data:`MIN_SCANS_PER_CLASS`.
    """
    counts = {name: int((labels == c).sum()) for c, name in enumerate(classes)}
    few = {name: n for name, n in counts.items() if n < MIN_SCANS_PER_CLASS}
    if few:
        per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise AdaptRefused(
            f"{site}: too few readable scans to adapt ({per_class}): at least "
            f"{MIN_SCANS_PER_CLASS} of each class are needed, 10 are recommended, and "
            f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer. Nothing was written."
        )
    return counts


def _refusal_message(site: Path, reasons: list[Reason], result: dict[str, Any]) -> str:
    """The refusal naming each condition that failed, with its numbers and what to try."""
    failed = " and ".join(dict.fromkeys(reason.condition for reason in reasons))
    details = "; ".join(reason.detail for reason in reasons)
    return (
        f"{site}: the adapted last layer {failed} on this site's scans ({details}); nothing was "
        "written. What to try: check the labels, label more scans (10 per class or more, from "
        "as many patients as you can, with the patient as the group), or keep using the "
        "parent.\n" + format_numbers(result)
    )


@dataclass(frozen=True)
class SiteOutputs:
    """What the parent models output on the site's readable scans (:func:`_site_outputs`)."""

    features: dict[Path, np.ndarray]  # per model file: pooled features [N, D], frames averaged
    kept: list[SiteScan]  # the N scans kept (edge_runtime.adapt.scans)
    squares: list[np.ndarray]  # every frame's [S, S] uint8 square (for checking written models)
    lesion_found: np.ndarray | None  # bool [N], where the reference calls normal by its lesions
    probabilities: np.ndarray  # the reference model's own probabilities [N, K], frames averaged
    left_out: list[dict[str, str]]  # {"path", "error"} of each labelled file left out, and why


def _site_features(
    main: Parent,
    partner: Parent | None,
    scans: list[SiteScan],
    tmp: Path,
    options: AdaptOptions,
) -> tuple[dict[Path, np.ndarray], list[SiteScan], list[np.ndarray], np.ndarray | None]:
    """:func:`_site_outputs` as the tuple ``(features, kept, squares, lesion_found)``."""
    out = _site_outputs(main, partner, scans, tmp, options)
    return out.features, out.kept, out.squares, out.lesion_found


def _site_outputs(
    main: Parent,
    partner: Parent | None,
    scans: list[SiteScan],
    tmp: Path,
    options: AdaptOptions,
) -> SiteOutputs:
    """Pooled features per model and per scan kept (:func:`read_squares`: frames of a cine
    averaged), the scans kept, every frame's square (for checking the written models), when the
    reference model (the FP32 partner, else the model) calls "normal" by its lesion head,
    whether that head finds a lesion in each scan (in any of its frames), else None, the
    reference's probabilities, and the files left out with their reasons."""
    import onnx

    from edge_runtime.adapt.graph import find_head, with_features

    sessions = {}
    for parent in (main, partner):
        if parent is None:
            continue
        featured = with_features(parent.proto, find_head(parent.proto, source=str(parent.path)))
        path = tmp / f"featured-{len(sessions)}.onnx"
        onnx.save(featured, str(path))
        sessions[parent.path] = open_model(path, provider=options.provider, threads=options.threads)
    spec = main.spec
    paths = [s.path for s in scans]
    read = read_squares(
        paths,
        spec.input_size,
        spec.resize_policy,
        batch_size=options.batch_size,
        workers=min(8, usable_cores()),
    )
    by_source, squares = read.by_source, read.squares
    d, k = main.head.kernel.shape
    runs = {
        path: run_outputs(loaded.session, (FEATURES, PROBABILITIES), squares, options.batch_size)
        if squares
        else [np.zeros((0, d)), np.zeros((0, k))]
        for path, loaded in sessions.items()
    }
    features = {path: outputs[0] for path, outputs in runs.items()}
    kept = [s for s in scans if str(s.path) in by_source]
    reference = partner or main
    lesion_found = None
    spec = reference.spec
    if spec.normal_rule is not NormalRule.CLASSIFIER and squares:
        maps = run_batches(sessions[reference.path].session, LESION, squares, options.batch_size)
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
    per_file = {path: _per_file(frames, kept, by_source) for path, frames in features.items()}
    probabilities = _per_file(runs[reference.path][1], kept, by_source)
    left_out = [
        {"path": str(s.path), "error": read.left_out[str(s.path)]}
        for s in scans
        if str(s.path) in read.left_out
    ]
    return SiteOutputs(per_file, kept, squares, lesion_found, probabilities, left_out)


def _per_file(frames: np.ndarray, kept: list[SiteScan], by_source: dict[str, list[int]]):
    """``[frames, C]`` rows -> ``[len(kept), C]``: the mean over each kept file's frames."""
    if not kept:
        return np.zeros((0, frames.shape[1]))
    return np.stack([frames[by_source[str(s.path)]].mean(axis=0) for s in kept])


def _ensemble_record(parent: Parent, x: np.ndarray, own: np.ndarray) -> dict[str, Any]:
    """For an ensemble parent (:mod:`edge_runtime.adapt.graph`), what its logit-average layer
    (the fit's prior, ``[sum D_m, K]``) is and how often it calls the site's ``[N, D]`` scans
    ``x`` as the ensemble's own averaged probabilities ``own`` ``[N, K]`` do; else ``{}``. An
    adapted ensemble, adapted again, starts from its parent ensemble's own file
    (:mod:`edge_runtime.adapt.parent`), so this record is the same as the first time."""
    from edge_runtime.adapt.graph import EnsembleHeadGraph, find_head

    where = find_head(parent.proto, source=str(parent.path))
    if not isinstance(where, EnsembleHeadGraph):
        return {}
    logit_average = softmax(parent.head.logits(x))
    agree = float(np.mean(logit_average.argmax(1) == own.argmax(1))) if len(x) else 1.0
    return {
        "members": len(where.members),
        "feature_widths": list(where.widths),
        "parent_layer": "the members' logit average: their kernels stacked in features order "
        "and divided by the member count, and their mean bias; applied to the view-averaged "
        "features it equals the mean of the members' logits over members and views, close to "
        "but not the mean of their probabilities that the parent outputs",
        "adapted_layer": "one softmax layer over the features output replaces the averaging of "
        "the members' probabilities; cam is still the parent's",
        "before": "the parent's calls are its own averaged probabilities",
        "logit_average_top1_agreement": round(agree, 4),
        "logit_average_max_abs_probability_diff": round(
            float(np.abs(logit_average - own).max()) if len(x) else 0.0, 6
        ),
    }


def parent_calls(
    spec: ModelSpec,
    head: Head,
    features: np.ndarray,
    lesion_found: np.ndarray | None,
    own: np.ndarray | None = None,
) -> np.ndarray:
    """The parent's calls as it runs (int ``[N]``): its temperature, operating point and, for a
    lesion model, its normal rule over ``lesion_found`` (bool ``[N]``, from
    :func:`_site_features`). ``own``: the parent's own probabilities ``[N, K]`` (an ensemble's,
    which its layer ``head`` only approximates), used instead of ``head`` on ``features``."""
    if own is None:
        probabilities = softmax(head.logits(features), spec.temperature)
    else:
        probabilities = apply_temperature(own, spec.temperature)
    verdict = lesion_verdict(
        spec.normal_rule.value,
        lesion_found,
        probabilities,
        spec.class_names,
        spec.malignant_threshold,
        spec.normal_gate,
    )
    return decide(probabilities, spec.class_names, spec.malignant_threshold, verdict)


def _fit_and_judge(
    x: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    parent: Parent,
    options: AdaptOptions,
    lesion_found: np.ndarray | None = None,
    names: Sequence[str] = (),
    own: np.ndarray | None = None,
    *,
    grouped: bool = False,
) -> dict[str, Any]:
    """Choose what to refit (:func:`_way`), estimate it by the site's cross-validation against
    the parent as it runs (``own``: an ensemble's own probabilities ``[N, K]``, see
    :func:`parent_calls`), and fit it on all the site's scans. ``grouped``: the site gave the
    scans' patients (else each file is its own group). Its ``refusal``: the
    :class:`Reason` list of :func:`_refusal_reasons`."""
    from edge_runtime.adapt.evaluate import SiteFeatures, choose_strength

    spec, classes = parent.spec, parent.spec.class_names
    malignant = classes.index("malignant") if "malignant" in classes else None
    before = parent_calls(spec, parent.head, x, lesion_found, own)
    free, why = _way(labels, before, classes)
    guard = _guard(spec, free)
    kept = (labels == malignant) & (before == malignant) if guard else None
    site = SiteFeatures(x, labels, groups, kept)
    best = _estimate(site, parent, free, before, options, guard)
    numbers = best["numbers"]
    refusal = _refusal_reasons(
        numbers,
        malignant,
        classes,
        options.max_sensitivity_drop,
        [names[i] for i in best["lost"]],
        options.max_malignant_lost,
    )
    strength = choose_strength(site, parent.head, seed=options.seed, free_columns=free)
    head = site.guarded(
        fit_with_strength(x, labels, parent.head, strength, free_columns=free), guard
    )
    record = {
        "refitted": {
            "value": "the whole last layer"
            if free is None
            else "the normal column of the last layer (the other classes keep the parent's)",
            "why": why,
        },
        "cross_validation": {
            "folds": best["folds"],
            "grouped_by": "manifest group" if grouped else "file",
            "strengths_chosen_in_folds": best["strengths"],
            "features_of": f"the {spec.precision.value} model",
            **numbers,
        },
        "strength": strength,
        "malignant_guard": {
            "value": guard is not None,
            "kept_scans": int(kept.sum()) if kept is not None else 0,
            "rule": GUARD_RULE if guard else "none: the whole layer is refitted",
            "lost_out_of_fold": [names[i] for i in best["lost"]],
        },
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
GUARD_RULE = (
    "the refitted normal column's bias is lowered until every malignant site scan the parent "
    "calls malignant is still called malignant (in each cross-validation fold too)"
)


def _guard(spec: ModelSpec, free: list[int] | None) -> MalignantGuard | None:
    """The guard that keeps the parent's malignant calls, where only the normal column is
    refitted (the temperature and the operating point are then the parent's)."""
    names = spec.class_names
    if free is None or "normal" not in names or "malignant" not in names:
        return None
    return MalignantGuard(
        normal=names.index("normal"),
        malignant=names.index("malignant"),
        threshold=spec.malignant_threshold,
        temperature=spec.temperature,
    )


def _way(
    labels: np.ndarray, before: np.ndarray, classes: tuple[str, ...]
) -> tuple[list[int] | None, str]:
    """What to refit (the free columns, None: the whole layer), and why.

    Ten scans a class cannot support re-learning the lesion classes, so a parent with a normal
    class gets its normal column alone refitted, unless the parent, as it runs, gets a lesion
    class right on fewer than :data:`MIN_PARENT_RECALL` of the site's scans of that class: then
    that class has failed on this scanner and the whole layer is refitted (docs/experiments.md,
    "Site adaptation: what to refit")."""
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
    site,
    parent: Parent,
    free: list[int] | None,
    before: np.ndarray,
    options: AdaptOptions,
    guard: MalignantGuard | None = None,
) -> dict[str, Any]:
    """One way of refitting (``free``: the columns refitted, None: all), estimated by the site's
    grouped cross-validation against the parent's calls ``before``."""
    from edge_runtime.adapt.evaluate import compare, cross_validate

    spec, classes = parent.spec, parent.spec.class_names
    malignant = classes.index("malignant") if "malignant" in classes else None
    labels = site.labels
    cv = cross_validate(site, parent.head, seed=options.seed, free_columns=free, guard=guard)
    temperature = spec.temperature if free else fit_temperature(softmax(cv.logits), labels)
    oof = softmax(cv.logits, temperature)
    n_malignant = int((labels == malignant).sum()) if malignant is not None else 0
    threshold, note = spec.malignant_threshold, "the parent has no malignant threshold"
    if spec.malignant_threshold > 0:
        if n_malignant >= MIN_MALIGNANT_FOR_THRESHOLD:
            point = malignant_operating_point(oof[:, malignant], labels == malignant)
            threshold = point["threshold"]
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
    after = decide(oof, classes, threshold)  # the runtime's rule, as the adapted model runs
    caught = (labels == malignant) & (before == malignant) if malignant is not None else None
    lost = np.flatnonzero(caught & (after != malignant)) if caught is not None else []
    return {
        "lost": [int(i) for i in lost],
        "free": free,
        "numbers": compare(labels, before, after, site.groups, classes, seed=options.seed),
        "temperature": temperature,
        "threshold": threshold,
        "threshold_note": note,
        "folds": cv.folds,
        "strengths": list(cv.strengths),
    }


NOT_BETTER = "is not better than the parent's"
LOSES_CANCERS = "loses more of the cancers the parent caught than --max-malignant-lost allows"
LOWERS_SENSITIVITY = "lowers malignant sensitivity by more than --max-sensitivity-drop allows"


@dataclass(frozen=True)
class Reason:
    """A condition the adapted layer failed (:data:`NOT_BETTER`, :data:`LOSES_CANCERS`,
    :data:`LOWERS_SENSITIVITY`) and its numbers."""

    condition: str
    detail: str


def _refusal_reasons(
    numbers: dict,
    malignant: int | None,
    classes,
    max_drop: float | None,
    lost: Sequence[str] = (),
    max_lost: int = 1,
) -> list[Reason]:
    """Why the adapted layer may not be written, or [] when it may: by the site
    cross-validation's point estimates it must raise balanced accuracy and not lower accuracy
    (else :data:`NOT_BETTER`); it may call at most ``max_lost`` of the malignant scans the
    parent caught something else (``lost``: their names; else :data:`LOSES_CANCERS`), and, where
    ``max_drop`` is given, not lower malignant sensitivity by more (else
    :data:`LOWERS_SENSITIVITY`).

    Why a count of scans and not a share: with 10 malignant scans one scan is 0.10 of
    sensitivity, so a bound on the share either refuses almost every site or guards nothing.
    The fit keeps every malignant scan the parent caught (:class:`MalignantGuard`); what the
    cross-validation can show is how often that fails on a patient the fit did not see, one
    scan at a time. The 95% intervals are reported, not required above 0: with 30 scans a
    paired interval spans about +-0.15 (docs/experiments.md, "Site adaptation")."""
    b, a = numbers["before"], numbers["after"]
    gain = numbers["difference"]["balanced_accuracy"]
    reasons = []
    if not gain["value"] > 1e-9:
        low, high = (float("nan") if v is None else v for v in gain["ci95"])
        detail = (
            f"balanced accuracy {b['balanced_accuracy']['value']:.3f} -> "
            f"{a['balanced_accuracy']['value']:.3f}, gain {gain['value']:+.3f} (95% interval "
            f"[{low:+.3f}, {high:+.3f}]) not above 0"
        )
        reasons.append(Reason(NOT_BETTER, detail))
    if a["accuracy"]["value"] < b["accuracy"]["value"] - 1e-9:
        detail = f"accuracy {b['accuracy']['value']:.3f} -> {a['accuracy']['value']:.3f}"
        reasons.append(Reason(NOT_BETTER, detail))
    if len(lost) > max_lost:
        detail = (
            f"{len(lost)} malignant scans the parent caught are called otherwise out-of-fold "
            f"({', '.join(lost)}); at most {max_lost} allowed (--max-malignant-lost)"
        )
        reasons.append(Reason(LOSES_CANCERS, detail))
    if malignant is not None and max_drop is not None:
        key = f"recall_{classes[malignant]}"
        if a[key]["value"] < b[key]["value"] - max_drop - 1e-9:
            detail = (
                f"malignant sensitivity {b[key]['value']:.3f} -> {a[key]['value']:.3f} (a drop "
                f"beyond --max-sensitivity-drop {max_drop:g})"
            )
            reasons.append(Reason(LOWERS_SENSITIVITY, detail))
    return reasons
