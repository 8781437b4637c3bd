"""Result records and the table / JSON lines / CSV writers of ``edge-classify``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import cv2

from edge_runtime.classifier import Result
from edge_runtime.decode import display_path
from edge_runtime.heatmap import overlay


class OutputFormat(str, Enum):
    TABLE = "table"
    JSONL = "jsonl"
    CSV = "csv"


def result_record(result: Result) -> dict[str, Any]:
    """The JSON-lines shape of one result (``frame`` only for multi-frame inputs)."""
    record: dict[str, Any] = {
        "path": display_path(result.source),  # names that are not UTF-8 shown escaped
        "label": result.label,
        "probabilities": {k: round(v, 6) for k, v in result.probabilities.items()},
        "confidence": None if result.confidence is None else round(result.confidence, 6),
        "abstained": result.abstained,
        "rechecked": result.rechecked,
        "error": result.error,
        "elapsed_ms": round(result.timing.total_ms, 3),
    }
    if result.frame is not None:
        record["frame"] = result.frame
    return record


class ResultWriter:
    """Streams results to ``stream`` in one format, flushing each record (safe to tail)."""

    def __init__(self, stream: TextIO, fmt: OutputFormat, class_names: Sequence[str]) -> None:
        self._stream, self._format, self._classes = stream, fmt, list(class_names)
        self._csv: csv.writer | None = None
        if fmt is OutputFormat.CSV:
            self._csv = csv.writer(stream)
            self._csv.writerow(
                [
                    "path",
                    "frame",
                    "label",
                    *self._classes,
                    "confidence",
                    "abstained",
                    "error",
                    "elapsed_ms",
                ]
            )
        elif fmt is OutputFormat.TABLE:
            stream.write(f"{'label':<10} {'conf':>6}  {'':1} path\n")

    def write(self, result: Result) -> None:
        record = result_record(result)
        if self._format is OutputFormat.JSONL:
            self._stream.write(json.dumps(record) + "\n")
        elif self._csv is not None:
            probs = [record["probabilities"].get(c, "") for c in self._classes]
            self._csv.writerow(
                [
                    record["path"],
                    record.get("frame", ""),
                    record["label"] or "",
                    *probs,
                    record["confidence"] if result.ok else "",
                    record["abstained"],
                    record["error"] or "",
                    record["elapsed_ms"],
                ]
            )
        else:
            self._stream.write(_table_row(result) + "\n")
        self._stream.flush()


def _table_row(result: Result) -> str:
    name = display_path(result.source)
    source = name if result.frame is None else f"{name} [frame {result.frame}]"
    if not result.ok:
        return f"{'ERROR':<10} {'':>6}  {'':1} {source}: {result.error}"
    flag = "?" if result.abstained else ""
    return f"{result.label:<10} {result.confidence:>6.3f}  {flag:1} {source}"


def heatmap_stems(sources: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """File-name stems for heatmaps, unique within one set of inputs.

    A stem is the input's own file stem. Inputs whose stems clash (``a/x.png`` and ``b/x.png``,
    compared without case) all get ``_<8 hex digits of the SHA-1 of the absolute path>`` added, so
    a name depends only on the path and the set of inputs, never on their order.
    """
    names = [str(source) for source in dict.fromkeys(map(str, sources))]
    owners: dict[str, int] = {}
    for name in names:
        key = Path(name).stem.lower()
        owners[key] = owners.get(key, 0) + 1
    stems = {}
    for name in names:
        stem = Path(name).stem
        if owners[stem.lower()] > 1:
            stem += "_" + hashlib.sha1(os.fsencode(os.path.abspath(name))).hexdigest()[:8]
        stems[name] = stem
    return stems


def write_heatmaps(
    results: Iterable[Result],
    directory: Path,
    *,
    stems: Mapping[str, str] | None = None,
) -> list[Path]:
    """``<stem>_heatmap.png`` (gray, original size) and ``<stem>_overlay.png`` per result.

    Args:
        results: results classified with ``heatmaps=True``; others are skipped.
        directory: created if missing.
        stems: source -> stem from :func:`heatmap_stems` over every input of the run (pass it
            when writing results one at a time); default: computed from ``results`` alone.
            Multi-frame DICOM adds ``_f<frame>``.

    Returns:
        The files written.
    """
    results = list(results)
    if stems is None:
        stems = heatmap_stems(r.source for r in results)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        if result.heatmap is None or result.image is None:
            continue
        stem = stems.get(result.source) or Path(result.source).stem
        if result.frame is not None:
            stem += f"_f{result.frame}"
        heat_path, overlay_path = (
            directory / f"{stem}_heatmap.png",
            directory / f"{stem}_overlay.png",
        )
        _write_png(heat_path, result.heatmap)
        _write_png(overlay_path, overlay(result.image, result.heatmap))
        written += [heat_path, overlay_path]
    return written


def _write_png(path: Path, image) -> None:
    """Encode in memory and write with Python, which keeps any file name the system allows
    (``cv2.imwrite`` cannot take a name that is not UTF-8)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{display_path(path)}: OpenCV could not encode the image as PNG")
    path.write_bytes(data.tobytes())
