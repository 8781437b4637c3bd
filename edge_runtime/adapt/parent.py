"""The parent model adaptation starts from (:class:`~edge_runtime.adapt.options.Parent`), and its
FP32 recheck partner.

An adapted model is never a parent: adapting it again starts again from the model it was adapted
from, so that its card, its baseline ("parent" column) and its gate all speak of that one model.
That model's file is looked for, by the SHA-256 the adapted model records, where it was adapted
from, among the bundled models and beside the adapted file; found, it is loaded as any parent
is, and the adapted file only names it. Not found, the parent is rebuilt from the adapted file
(its graph) and the last layer, temperature, operating point and normal rule it records: exact
for a single model, whose calls that layer computes; an ensemble's own calls (the mean of its
members' probabilities) cannot be rebuilt so, and its parent file is then required.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.adapt.fit import Head
from edge_runtime.adapt.options import Parent
from edge_runtime.classifier import MODELS_DIR
from edge_runtime.model.card import model_sha256
from edge_runtime.model.contract import ModelSpec, NormalRule, Precision

log = logging.getLogger(__name__)


def load_parent(path: Path) -> Parent:
    """The parent of an adaptation given ``path`` (module docstring).

    Raises:
        FileNotFoundError: ``path``, or an external-data file it names, is missing.
        ContractError: it is not an edge-classify model with the expected last layer.
        ValueError: it is an adapted model whose record of its parent is unreadable, or an
            adapted ensemble whose parent file is not found.
    """
    import onnx

    from edge_runtime.adapt.graph import find_head, read_head

    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    sha = model_sha256(path)  # names a missing external-data file, which onnx.load would not
    proto = onnx.load(str(path))  # its external data read in
    meta = {p.key: p.value for p in proto.metadata_props}
    spec = ModelSpec.from_metadata(meta, source=str(path))
    if not spec.adaptation:
        head = read_head(proto, find_head(proto, source=str(path)))
        return Parent(path, proto, spec, head, path.name, sha, None, str(path.resolve()))
    record = spec.adaptation.get("parent")
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}: is an adapted model that records no parent; adapt the original model instead."
        )
    original = _find_original(path, record)
    log.warning(
        "%s: is itself adapted (to %s); starting again from its parent %s (SHA-256 %s...)%s",
        path,
        spec.adaptation.get("site"),
        record.get("file"),
        str(record.get("sha256"))[:12],
        f", found at {original}" if original else ", whose last layer it carries",
    )
    if original is not None:
        return replace(load_parent(original), unwrapped_from=str(path))
    if spec.adaptation.get("ensemble"):
        raise ValueError(
            f"{path}: is an adapted ensemble, and its parent {record.get('file')} (SHA-256 "
            f"{record.get('sha256')}) was not found ({', '.join(map(str, _places(path, record)))}"
            "): the ensemble's own calls, the baseline an adaptation is judged against, cannot "
            "be rebuilt from the adapted file. Pass that model as --model, or copy it beside "
            f"{path.name}."
        )
    return _rebuilt(path, proto, spec, record)


def load_partner(main: Parent) -> Parent | None:
    """The FP32 recheck partner ``main`` names (adapted alike), or None for an FP32 model or
    one that names none.

    Raises:
        FileNotFoundError: the partner it names is not beside it.
    """
    if main.spec.precision is Precision.FP32 or not main.spec.recheck_model:
        return None
    path = main.path.parent / main.spec.recheck_model
    if not path.is_file():
        raise FileNotFoundError(
            f"{main.path}: its FP32 recheck model {path} is missing; it is adapted alike, so "
            "copy it beside the model."
        )
    return load_parent(path)


def _places(adapted: Path, record: dict[str, Any]) -> list[Path]:
    """Where an adapted model's parent file may be: where it was adapted from, among the
    bundled models, beside the adapted file."""
    name = Path(str(record.get("file", ""))).name
    places = [Path(record["path"])] if record.get("path") else []
    places += [MODELS_DIR / name, adapted.parent / name]
    unique: list[Path] = []
    for place in places:
        if place not in unique:
            unique.append(place)
    return unique


def _find_original(adapted: Path, record: dict[str, Any]) -> Path | None:
    """The first of :func:`_places` that holds the file whose SHA-256 the record gives."""
    if not record.get("file") or not record.get("sha256"):
        return None
    for place in _places(adapted, record):
        try:
            if place.is_file() and model_sha256(place) == record["sha256"]:
                return place
        except (OSError, ValueError):  # unreadable, or an ONNX file with a missing piece
            continue
    return None


def _rebuilt(path: Path, proto: Any, spec: ModelSpec, record: dict[str, Any]) -> Parent:
    """The parent rebuilt from an adapted model's graph and its record (module docstring).

    Raises:
        ValueError: the record is unreadable.
    """
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
        name, sha = record["file"], record["sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: is an adapted model whose record of its parent is unreadable ({exc}); "
            "adapt the original model instead."
        ) from exc
    head = Head(kernel.copy(), bias.copy())
    origin = record.get("path") if isinstance(record.get("path"), str) else None
    return Parent(path, proto, own, head, name, sha, str(path), origin)
