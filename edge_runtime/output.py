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
from edge_runtime.lesion import Lesion


class OutputFormat(str, Enum):
    TABLE = "table"
    JSONL = "jsonl"
    CSV = "csv"


LESION_FIELDS = ("lesion_bbox", "lesion_area_px", "lesion_area_mm2", "lesion_diameter_mm")


def result_record(result: Result) -> dict[str, Any]:
    """The JSON-lines shape of one result (``frame`` only for multi-frame inputs).

    The ``lesion_*`` fields are None where no lesion was found (or the model has no lesion
    output); the mm ones also where the scan's pixel spacing is unknown.
    """
    record: dict[str, Any] = {
        "path": display_path(result.source),  # names that are not UTF-8 shown escaped
        "label": result.label,
        "probabilities": {k: round(v, 6) for k, v in result.probabilities.items()},
        "confidence": None if result.confidence is None else round(result.confidence, 6),
        "abstained": result.abstained,
        "unfamiliar": result.unfamiliar,
        "rechecked": result.rechecked,
        **_lesion_fields(result.lesion),
        "error": result.error,
        "elapsed_ms": round(result.timing.total_ms, 3),
    }
    if result.frame is not None:
        record["frame"] = result.frame
    if result.region is not None:
        record["region"] = result.region
    return record


def _lesion_fields(lesion: Lesion | None) -> dict[str, Any]:
    if lesion is None:
        return dict.fromkeys(LESION_FIELDS)
    return {
        "lesion_bbox": list(lesion.bbox),
        "lesion_area_px": lesion.area_px,
        "lesion_area_mm2": None if lesion.area_mm2 is None else round(lesion.area_mm2, 3),
        "lesion_diameter_mm": None if lesion.diameter_mm is None else round(lesion.diameter_mm, 3),
    }


class ResultWriter:
    """Streams results to ``stream`` in one format, flushing each record (safe to tail).

    ``lesion`` adds a lesion column to the table (the other formats always carry the fields).
    """

    def __init__(
        self,
        stream: TextIO,
        fmt: OutputFormat,
        class_names: Sequence[str],
        *,
        lesion: bool = False,
    ) -> None:
        self._stream, self._format, self._classes = stream, fmt, list(class_names)
        self._lesion = lesion
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
                    "unfamiliar",
                    "rechecked",
                    *LESION_FIELDS,
                    "error",
                    "elapsed_ms",
                ]
            )
        elif fmt is OutputFormat.TABLE:
            column = f"{'lesion':<{LESION_WIDTH}} " if lesion else ""
            stream.write(f"{'label':<10} {'conf':>6}  {'':1} {column}path\n")

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
                    record["unfamiliar"],
                    record["rechecked"],
                    *(_csv_cell(record[name]) for name in LESION_FIELDS),
                    record["error"] or "",
                    record["elapsed_ms"],
                ]
            )
        else:
            self._stream.write(_table_row(result, self._lesion) + "\n")
        self._stream.flush()


LESION_WIDTH = 13  # "123.4 mm", "1234x1234 px", "none"


def _csv_cell(value: Any) -> Any:
    """None -> empty; the box as ``[x, y, w, h]`` (JSON, like the JSON lines)."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list) else value


def _table_row(result: Result, lesion_column: bool) -> str:
    name = display_path(result.source)
    source = name if result.frame is None else f"{name} [frame {result.frame}]"
    if not result.ok:
        blank = " " * (LESION_WIDTH + 1) if lesion_column else ""
        return f"{'ERROR':<10} {'':>6}  {'':1} {blank}{source}: {result.error}"
    flag = "?" if result.abstained else ""
    column = f"{_lesion_cell(result.lesion):<{LESION_WIDTH}} " if lesion_column else ""
    return f"{result.label:<10} {result.confidence:>6.3f}  {flag:1} {column}{source}"


def _lesion_cell(lesion: Lesion | None) -> str:
    """Largest diameter where the spacing is known, else the box's size in pixels."""
    if lesion is None:
        return "none"
    if lesion.diameter_mm is not None:
        return f"{lesion.diameter_mm:.1f} mm"
    return f"{lesion.bbox[2]}x{lesion.bbox[3]} px"


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
        stem = _stem(result, stems)
        heat_path, overlay_path = (
            directory / f"{stem}_heatmap.png",
            directory / f"{stem}_overlay.png",
        )
        _write_png(heat_path, result.heatmap)
        _write_png(
            overlay_path, overlay(result.image, result.heatmap, lesion_mask=result.lesion_mask)
        )
        written += [heat_path, overlay_path]
    return written


def write_masks(
    results: Iterable[Result],
    directory: Path,
    *,
    stems: Mapping[str, str] | None = None,
) -> list[Path]:
    """``<stem>_mask.png`` per result: 8-bit gray at the scan's own size, 255 on the lesion the
    model found, 0 elsewhere (all 0 when it found none).

    Args:
        results: results classified with ``masks=True``; failed ones (no mask) are skipped.
        directory: created if missing.
        stems: as for :func:`write_heatmaps` (multi-frame DICOM adds ``_f<frame>``).

    Returns:
        The files written.

    Raises:
        OSError: a mask could not be written.
    """
    results = list(results)
    if stems is None:
        stems = heatmap_stems(r.source for r in results)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        if result.lesion_mask is None:
            continue
        path = directory / f"{_stem(result, stems)}_mask.png"
        try:
            _write_png(path, result.lesion_mask)
        except OSError as exc:
            raise OSError(
                f"{display_path(path)}: could not write the lesion mask ({exc}). Check that "
                f"{display_path(directory)} is writable and has space."
            ) from exc
        written.append(path)
    return written


def _stem(result: Result, stems: Mapping[str, str]) -> str:
    stem = stems.get(result.source) or Path(result.source).stem
    stem = stem if result.frame is None else f"{stem}_f{result.frame}"
    return stem if result.region is None else f"{stem}_r{result.region}"


def _write_png(path: Path, image) -> None:
    """Encode in memory and write with Python, which keeps any file name the system allows
    (``cv2.imwrite`` cannot take a name that is not UTF-8)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{display_path(path)}: OpenCV could not encode the image as PNG")
    path.write_bytes(data.tobytes())
