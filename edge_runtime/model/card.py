"""Model cards beside model files: where they live, and checking a model against its card."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.model.contract import ContractError
from edge_runtime.model.external_data import require_external_data

CARD_SUFFIX = ".card.json"
_PRECISION_SUFFIX = re.compile(r"-(fp32|fp16|int8)$")


def model_file_name(name: str, precision: str) -> str:
    """``<name>-<precision>.onnx``: how export names its files."""
    return f"{name}-{precision}.onnx"


def card_path_for(model_path: Path) -> Path:
    """``dir/<name>-int8.onnx`` -> ``dir/<name>.card.json``."""
    return model_path.with_name(_PRECISION_SUFFIX.sub("", model_path.stem) + CARD_SUFFIX)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hashes(model_path: Path, pieces: Sequence[Path]) -> dict[str, str]:
    """Hex SHA-256 of a model file and of each of its external-data files ``pieces`` (from
    :func:`~edge_runtime.model.external_data.require_external_data`), by file name, the model
    file's first."""
    return {path.name: file_sha256(path) for path in (model_path, *pieces)}


def model_digest(hashes: Mapping[str, str]) -> str:
    """One hex SHA-256 for a model's content from its :func:`model_hashes`: the model file's own
    for a model in one file; for one with external-data files, the SHA-256 of the lines
    ``NAME SHA256`` of all its files, sorted by name, so that it changes with any of them."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_sha256(model_path: Path) -> str:
    """:func:`model_digest` of a model file and its external-data files (:func:`file_sha256`
    for a model in one file).

    Raises:
        FileNotFoundError: an external-data file is missing (named).
        OSError, MetadataError, ContractError: as
            :func:`~edge_runtime.model.external_data.external_data_files`.
    """
    return model_digest(model_hashes(model_path, require_external_data(model_path)))


def file_record(path: Path) -> dict[str, Any]:
    """One model file's entry in a card's ``files``: its SHA-256, its size in bytes and
    ``weights``, the share of its initializers' bytes stored in each ONNX data type (e.g.
    ``{"float16": 0.98, "float32": 0.02}`` for an FP32 file whose convolution kernels are stored
    as float16), so that a reader sees how the file is stored, not only how it computes. A model
    whose weights lie in external-data files has ``external_data`` too: each file's SHA-256 and
    bytes, by name.

    Raises:
        onnx.checker.ValidationError / google.protobuf.message.DecodeError: not an ONNX file.
        FileNotFoundError: an external-data file is missing (named).
    """
    import onnx  # export and adapt have it; the runtime only reads cards

    stored: dict[str, int] = {}
    for tensor in onnx.load(path, load_external_data=False).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        stored[dtype.name] = stored.get(dtype.name, 0) + int(np.prod(tensor.dims)) * dtype.itemsize
    total = sum(stored.values()) or 1
    weights = {k: round(v / total, 4) for k, v in sorted(stored.items(), key=lambda kv: -kv[1])}
    record = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "weights": weights}
    pieces = require_external_data(path)
    if pieces:
        record["external_data"] = {
            p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in pieces
        }
    return record


def weights_summary(record: Mapping[str, Any]) -> str:
    """A file record's ``weights`` in words, e.g. ``float16 98%, float32 2%`` (``-`` if absent)."""
    shares = record.get("weights") or {}
    return ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) or "-"


def listed_hashes(model_path: Path) -> dict[str, str] | None:
    """The SHA-256 the model card beside ``model_path`` lists for it and for each of its
    external-data files, by file name (as :func:`model_hashes`); None when there is no card or
    the card does not list this file.

    Raises:
        ContractError: the card cannot be read.
    """
    card_path = card_path_for(model_path)
    if not card_path.is_file():
        return None
    try:
        record = json.loads(card_path.read_text()).get("files", {}).get(model_path.name, {})
    except (OSError, ValueError) as exc:
        raise ContractError(f"{card_path}: model card is unreadable: {exc}") from exc
    if not record.get("sha256"):
        return None
    pieces = record.get("external_data") or {}
    return {model_path.name: record["sha256"], **{k: v.get("sha256") for k, v in pieces.items()}}


def require_listed_hashes(
    model_path: Path, actual: Mapping[str, str], listed: Mapping[str, str]
) -> None:
    """Raise :class:`ContractError` unless each of the model's files has the SHA-256 its card
    lists: ``actual`` from :func:`model_hashes`, ``listed`` from :func:`listed_hashes`. The
    error names the first file that differs, the model file first."""
    card = card_path_for(model_path).name
    for name, digest in actual.items():
        path = model_path.with_name(name)
        piece = "" if name == model_path.name else f" (an external-data file of {model_path.name})"
        expected = listed.get(name)
        if expected is None:
            raise ContractError(
                f"{path}: not listed in {card}{piece}: the model was changed after export. "
                "Re-export or re-copy it."
            )
        if digest != expected:
            raise ContractError(
                f"{path}: SHA-256 {digest[:16]}... does not match {expected[:16]}... in "
                f"{card}{piece}: the file was changed or damaged after export. Re-export or "
                "re-copy it."
            )


def verify_against_card(model_path: Path) -> bool:
    """Check the SHA-256 of the model file, and of its external-data files, against its card,
    when a card lists it.

    Returns:
        True if verified, False if there is no card or the card does not list this file.

    Raises:
        ContractError: the card lists a file with another checksum, or cannot be read.
        FileNotFoundError: an external-data file is missing (named).
    """
    listed = listed_hashes(model_path)
    if listed is None:
        return False
    actual = model_hashes(model_path, require_external_data(model_path))
    require_listed_hashes(model_path, actual, listed)
    return True
