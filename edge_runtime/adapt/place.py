"""Where ``edge-classify adapt`` writes: ``--output NAME.onnx``, its FP32 partner
``NAME-fp32.onnx`` and the card ``NAME.card.json`` beside it, and the places it refuses.

adapt writes over nothing but an earlier adaptation of the same parent: never the parent, a
bundled model, nor a model another tool wrote (``edge-export``'s card has no adaptation record),
nor a model whose card names files this run would not replace (it would leave that model with
another's card and partner). A file in the way with no card to say whose it is is refused too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edge_runtime.adapt.options import Parent
from edge_runtime.classifier import MODELS_DIR
from edge_runtime.model.card import card_path_for
from edge_runtime.model.contract import Precision

log = logging.getLogger(__name__)

_FIX = "Choose another --output (or move those files away first)."


def output_paths(output: Path, main: Parent, partner: Parent | None) -> dict[str, Path]:
    """``{"main": OUT, "partner": OUT-fp32}`` after checking the place (module docstring).

    Raises:
        ValueError: ``output`` is not an ``.onnx`` path, or a file there is the parent, a
            bundled model, or a model this run may not replace.
    """
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"--output must name an .onnx file. Got {output} instead.")
    if main.spec.precision is Precision.FP32 and output.stem.endswith("-int8"):
        renamed = output.with_name(f"{output.stem[: -len('-int8')]}-fp32.onnx")
        log.warning("%s: writes the FP32 adapted model, so as %s", output, renamed.name)
        output = renamed
    paths = {"main": output}
    if partner is not None:
        stem = output.stem[: -len("-int8")] if output.stem.endswith("-int8") else output.stem
        paths["partner"] = output.with_name(f"{stem}-fp32.onnx")
    _refuse_a_parent(paths, main, partner)
    _refuse_another_models_place(paths, main, partner)
    return paths


def _refuse_a_parent(paths: dict[str, Path], main: Parent, partner: Parent | None) -> None:
    """Raises ValueError: an output is the model given, its parent or a bundled model."""
    protected = set()
    for parent in (main, partner):
        if parent is not None:
            protected.add(parent.path.resolve())
            if parent.unwrapped_from is not None:
                protected.add(Path(parent.unwrapped_from).resolve())
    for path in paths.values():
        target = path.resolve()
        if target in protected or target.parent == MODELS_DIR.resolve():
            raise ValueError(
                f"{path}: would overwrite the model being adapted or a bundled model; the "
                "parent is never modified. Choose another --output."
            )


def _refuse_another_models_place(
    paths: dict[str, Path], main: Parent, partner: Parent | None
) -> None:
    """Refuse a place that holds a model this run may not replace (module docstring).

    Raises:
        ValueError: the card beside the outputs is unreadable, was not written by adapt, is an
            adaptation of another parent, or lists a file this run does not write; or an output
            file exists with no card beside it.
    """
    card_path = card_path_for(paths["main"])
    names = {path.name for path in paths.values()}
    if not card_path.is_file():
        _refuse_files_without_a_card(paths, card_path)
        return
    card = _read_card(card_path)
    listed = sorted(card.get("files") or {})
    record = card.get("adaptation")
    if not isinstance(record, dict) or not record:
        raise ValueError(
            f"{card_path}: the card of {', '.join(listed) or 'a model'}, which edge-classify "
            "adapt did not write (it has no adaptation record: a model from edge-export or "
            f"another tool); writing {', '.join(sorted(names))} here would replace it. {_FIX}"
        )
    others = sorted(set(listed) - names)
    if others:
        raise ValueError(
            f"{card_path}: the card of {', '.join(others)}, which this run would not replace; "
            f"writing {', '.join(sorted(names))} here would give that model another's card and "
            f"FP32 partner. {_FIX}"
        )
    ours = {parent.sha256 for parent in (main, partner) if parent is not None}
    theirs = {
        str(p.get("file")): str(p.get("sha256"))
        for p in (card.get("parents") or {}).values()
        if isinstance(p, dict)
    }
    foreign = sorted(
        f"{file} (SHA-256 {sha[:12]}...)" for file, sha in theirs.items() if sha not in ours
    )
    if foreign or not theirs:
        raise ValueError(
            f"{card_path}: the card of an adaptation of {', '.join(foreign) or 'no named parent'}, "
            f"not of this run's parent {main.name}; adapt replaces only an earlier adaptation "
            f"of the same parent. {_FIX}"
        )


def _refuse_files_without_a_card(paths: dict[str, Path], card_path: Path) -> None:
    """Raises ValueError: an output file exists, and no card says adapt wrote it."""
    existing = [path for path in paths.values() if path.exists()]
    if existing:
        raise ValueError(
            f"{existing[0]}: already there, and no card ({card_path.name}) beside it says "
            f"edge-classify adapt wrote it; adapt replaces only its own earlier output. {_FIX}"
        )


def _read_card(card_path: Path) -> dict[str, Any]:
    """Raises ValueError: the card is not a JSON object."""
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{card_path}: an unreadable model card is in the way ({exc}). {_FIX}"
        ) from None
    if not isinstance(card, dict):
        raise ValueError(f"{card_path}: an unreadable model card is in the way (not a JSON object)")
    return card
