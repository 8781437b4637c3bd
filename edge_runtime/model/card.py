"""Model cards beside model files: where they live, and checking a model against its card."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.model.contract import ContractError

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


def file_record(path: Path) -> dict[str, Any]:
    """One model file's entry in a card's ``files``: its SHA-256, its size in bytes and
    ``weights``, the share of its initializers' bytes stored in each ONNX data type (e.g.
    ``{"float16": 0.98, "float32": 0.02}`` for an FP32 file whose convolution kernels are stored
    as float16), so that a reader sees how the file is stored, not only how it computes.

    Raises:
        onnx.checker.ValidationError / google.protobuf.message.DecodeError: not an ONNX file.
    """
    import onnx  # export and adapt have it; the runtime only reads cards

    stored: dict[str, int] = {}
    for tensor in onnx.load(path, load_external_data=False).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        stored[dtype.name] = stored.get(dtype.name, 0) + int(np.prod(tensor.dims)) * dtype.itemsize
    total = sum(stored.values()) or 1
    weights = {k: round(v / total, 4) for k, v in sorted(stored.items(), key=lambda kv: -kv[1])}
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size, "weights": weights}


def weights_summary(record: Mapping[str, Any]) -> str:
    """A file record's ``weights`` in words, e.g. ``float16 98%, float32 2%`` (``-`` if absent)."""
    shares = record.get("weights") or {}
    return ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) or "-"


def listed_sha256(model_path: Path) -> str | None:
    """The SHA-256 the model card beside ``model_path`` lists for it; None when there is no card
    or the card does not list this file.

    Raises:
        ContractError: the card cannot be read.
    """
    card_path = card_path_for(model_path)
    if not card_path.is_file():
        return None
    try:
        files = json.loads(card_path.read_text()).get("files", {})
    except (OSError, ValueError) as exc:
        raise ContractError(f"{card_path}: model card is unreadable: {exc}") from exc
    return files.get(model_path.name, {}).get("sha256")


def require_listed_sha256(model_path: Path, actual: str, listed: str) -> None:
    """Raise :class:`ContractError` unless the file's SHA-256 ``actual`` is the one its card
    lists (``listed``)."""
    if actual != listed:
        raise ContractError(
            f"{model_path}: SHA-256 {actual[:16]}... does not match {listed[:16]}... in "
            f"{card_path_for(model_path).name}: the file was changed or damaged after export. "
            "Re-export or re-copy it."
        )


def verify_against_card(model_path: Path, sha256: str | None = None) -> bool:
    """Check the model's SHA-256 (``sha256`` when the caller has it) against its card, when a
    card lists it.

    Returns:
        True if verified, False if there is no card or the card does not list this file.

    Raises:
        ContractError: the card lists the file with another checksum, or cannot be read.
    """
    listed = listed_sha256(model_path)
    if listed is None:
        return False
    require_listed_sha256(model_path, sha256 or file_sha256(model_path), listed)
    return True
