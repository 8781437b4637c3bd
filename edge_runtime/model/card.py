"""Model cards beside model files: where they live, and checking a model against its card."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

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


def verify_against_card(model_path: Path, sha256: str | None = None) -> bool:
    """Check the model's SHA-256 (``sha256`` when the caller has it) against its card, when a
    card lists it.

    Returns:
        True if verified, False if there is no card or the card does not list this file.

    Raises:
        ContractError: the card lists the file with another checksum, or cannot be read.
    """
    card_path = card_path_for(model_path)
    if not card_path.is_file():
        return False
    try:
        files = json.loads(card_path.read_text()).get("files", {})
    except (OSError, ValueError) as exc:
        raise ContractError(f"{card_path}: model card is unreadable: {exc}") from exc
    expected = files.get(model_path.name, {}).get("sha256")
    if expected is None:
        return False
    actual = sha256 or file_sha256(model_path)
    if actual != expected:
        raise ContractError(
            f"{model_path}: SHA-256 {actual[:16]}... does not match {expected[:16]}... in "
            f"{card_path.name}: the file was changed or damaged after export. "
            "Re-export or re-copy it."
        )
    return True
