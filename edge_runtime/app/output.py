"""Result records and the table / JSON lines / CSV writers of ``edge-classify``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from edge_runtime.classifier import Classification, Failure, Result
from edge_runtime.io import own_images
from edge_runtime.io.decode import display_path
from edge_runtime.postprocess.heatmap import overlay
from edge_runtime.postprocess.lesion import Lesion
from edge_runtime.postprocess.summary import FileSummary


class OutputFormat(str, Enum):
    TABLE = "table"
    JSONL = "jsonl"
    CSV = "csv"

    @classmethod
    def for_path(cls, path: os.PathLike[str] | str) -> OutputFormat | None:
        """The format a file's suffix names (``.csv``; ``.jsonl`` or ``.ndjson``, any case);
        None for any other suffix."""
        return _SUFFIX_FORMATS.get(Path(path).suffix.lower())


_SUFFIX_FORMATS = {
    ".csv": OutputFormat.CSV,
    ".jsonl": OutputFormat.JSONL,
    ".ndjson": OutputFormat.JSONL,
}


LESION_FIELDS = ("lesion_bbox", "lesion_area_px", "lesion_area_mm2", "lesion_diameter_mm")
SUMMARY_FIELDS = ("frames", "failed_frames")  # only a multi-frame file's summary has them


def result_record(result: Result | FileSummary) -> dict[str, Any]:
    """The JSON-lines shape of one result (``frame`` only for multi-frame inputs, ``region`` only
    for the tissue regions of a dual view).

    The ``lesion_*`` fields are None where no lesion was found (or the model has no lesion
    output); the mm ones also where the scan's pixel spacing is unknown. A failure has no label,
    probabilities or confidence, and its flags are false; ``abstain_reason`` is None unless the
    result abstained. A :class:`FileSummary` gives its chosen frame's fields (``frame`` is that
    frame's index, None when no frame was classified), its own ``error`` and summed
    ``elapsed_ms``, and ``frames``/``failed_frames``, which only summaries have.
    """
    answer = result.most_suspicious if isinstance(result, FileSummary) else result
    record: dict[str, Any] = {
        "path": display_path(result.source),  # names that are not UTF-8 shown escaped
        **_answer_fields(answer),
        "error": result.error,
        "elapsed_ms": round(result.timing.total_ms, 3),
        "model_version": result.model_version,
        "model_sha256": result.model_sha256,
    }
    if isinstance(result, FileSummary):
        record["frame"] = None if answer is None else answer.frame
        record["frames"] = result.frames
        record["failed_frames"] = result.failed_frames
    elif result.frame is not None:
        record["frame"] = result.frame
    if answer is not None and answer.region is not None:
        record["region"] = answer.region
    return record


def _answer_fields(result: Classification | Failure | None) -> dict[str, Any]:
    """label ... lesion_*: a classification's, or a failure's (none, and false flags)."""
    if not isinstance(result, Classification):
        return {
            "label": None,
            "probabilities": {},
            "confidence": None,
            "abstained": False,
            "abstain_reason": None,
            "unfamiliar": False,
            "rechecked": False,
            **_lesion_fields(None),
        }
    return {
        "label": result.label,
        "probabilities": {k: round(v, 6) for k, v in result.probabilities.items()},
        "confidence": round(result.confidence, 6),
        "abstained": result.abstained,
        "abstain_reason": result.abstain_reason,
        "unfamiliar": result.unfamiliar,
        "rechecked": result.rechecked,
        **_lesion_fields(result.lesion),
    }


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
            header = [
                "path",
                "frame",
                "label",
                *self._classes,
                "confidence",
                "abstained",
                "abstain_reason",
                "unfamiliar",
                "rechecked",
                *LESION_FIELDS,
                "error",
                "elapsed_ms",
                *SUMMARY_FIELDS,
                "region",
                "model_version",
                "model_sha256",
            ]
            self._csv.writerow(map(_csv_cell, header))  # class names come from the model
        elif fmt is OutputFormat.TABLE:
            column = f"{'lesion':<{LESION_WIDTH}} " if lesion else ""
            stream.write(f"{'label':<10} {'conf':>6}  {'':1} {column}path\n")

    def write(self, result: Result | FileSummary) -> None:
        """Write one record: a result, or a multi-frame file's summary."""
        record = result_record(result)
        if self._format is OutputFormat.JSONL:
            self._stream.write(json.dumps(record) + "\n")
        elif self._csv is not None:
            probs = [record["probabilities"].get(c, "") for c in self._classes]
            row = [
                record["path"],
                record.get("frame"),
                record["label"],
                *probs,
                record["confidence"],
                record["abstained"],
                record["abstain_reason"],
                record["unfamiliar"],
                record["rechecked"],
                *(record[name] for name in LESION_FIELDS),
                record["error"],
                record["elapsed_ms"],
                *(record.get(name) for name in SUMMARY_FIELDS),
                record.get("region"),
                record["model_version"],
                record["model_sha256"],
            ]
            self._csv.writerow(map(_csv_cell, row))
        else:
            self._stream.write(_table_row(result, self._lesion) + "\n")
        self._stream.flush()


LESION_WIDTH = 13  # "123.4 mm", "1234x1234 px", "none"


# a spreadsheet takes a cell that starts with one of these for a formula (OWASP, CSV injection)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """None -> empty; the box as ``[x, y, w, h]`` (JSON, like the JSON lines); text that a
    spreadsheet would take for a formula (a file named ``=1+2.png``) gets a leading ``'``, which
    makes it text (OWASP's mitigation of CSV injection). Numbers stay numbers, negative too."""
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def table_text(text: str) -> str:
    """``text`` on one table row: control characters and line separators escaped the way JSON
    and Python write them (a newline in a file name becomes ``\\n``), so no name or message
    splits a row."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _table_row(result: Result | FileSummary, lesion_column: bool) -> str:
    name = table_text(display_path(result.source))
    answer: Result | None = result
    if isinstance(result, FileSummary):
        answer = result.most_suspicious
        where = "" if answer is None else f"frame {answer.frame} of "
        source = f"{name} [file: {where}{result.frames} frames, {result.failed_frames} failed]"
    else:
        source = name if result.frame is None else f"{name} [frame {result.frame}]"
        if result.region is not None:
            source += f" [region {result.region}]"
    if not isinstance(answer, Classification):
        blank = " " * (LESION_WIDTH + 1) if lesion_column else ""
        return f"{'ERROR':<10} {'':>6}  {'':1} {blank}{source}: {table_text(result.error)}"
    flag = "?" if answer.abstained else ""
    column = f"{_lesion_cell(answer.lesion):<{LESION_WIDTH}} " if lesion_column else ""
    row = f"{answer.label:<10} {answer.confidence:>6.3f}  {flag:1} {column}{source}"
    if answer.abstain_reason:
        row += f": {table_text(answer.abstain_reason)}"
    return row


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
        results: results classified with ``heatmaps=True``; others (failures too) are skipped.
        directory: created if missing.
        stems: source -> stem from :func:`heatmap_stems` over every input of the run (pass it
            when writing results one at a time); default: computed from ``results`` alone.
            Multi-frame DICOM adds ``_f<frame>``.

    Returns:
        The files written.

    Raises:
        OSError: a file could not be written.
    """

    def images(result: Classification) -> Iterator[tuple[str, np.ndarray]]:
        if result.heatmap is not None and result.image is not None:
            yield "heatmap", result.heatmap
            mask, origin = result.lesion_mask, result.origin  # the mask is the whole frame's
            yield "overlay", overlay(result.image, result.heatmap, lesion_mask=mask, origin=origin)

    return _write_images(results, directory, stems, images, "heatmap")


def write_masks(
    results: Iterable[Result],
    directory: Path,
    *,
    stems: Mapping[str, str] | None = None,
) -> list[Path]:
    """``<stem>_mask.png`` per result: 8-bit gray at the scan's own size (a DICOM frame's whole
    size, also for a tissue region's result), 255 on the lesion the model found, 0 elsewhere
    (all 0 when it found none).

    Args:
        results: results classified with ``masks=True``; failed ones (no mask) are skipped.
        directory: created if missing.
        stems: as for :func:`write_heatmaps` (multi-frame DICOM adds ``_f<frame>``).

    Returns:
        The files written.

    Raises:
        OSError: a mask could not be written.
    """

    def images(result: Classification) -> Iterator[tuple[str, np.ndarray]]:
        if result.lesion_mask is not None:
            yield "mask", result.lesion_mask

    return _write_images(results, directory, stems, images, "lesion mask")


def _write_images(
    results: Iterable[Result],
    directory: Path,
    stems: Mapping[str, str] | None,
    images: Callable[[Classification], Iterable[tuple[str, np.ndarray]]],
    what: str,
) -> list[Path]:
    """``<stem>_<kind>.png`` for each ``(kind, image)`` that ``images`` gives per classification."""
    results = list(results)
    if stems is None:
        stems = heatmap_stems(r.source for r in results)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        if not isinstance(result, Classification):
            continue
        for kind, image in images(result):
            path = directory / f"{_stem(result, stems)}_{kind}.png"
            try:
                _write_png(path, image, kind)
            except OSError as exc:
                raise OSError(
                    f"{display_path(path)}: could not write the {what} ({exc}). Check that "
                    f"{display_path(directory)} is writable and has space."
                ) from exc
            written.append(path)
    return written


def _stem(result: Result, stems: Mapping[str, str]) -> str:
    stem = stems.get(result.source) or Path(result.source).stem
    stem = stem if result.frame is None else f"{stem}_f{result.frame}"
    return stem if result.region is None else f"{stem}_r{result.region}"


def _write_png(path: Path, image: np.ndarray, kind: str) -> None:
    """Encode in memory, mark as edge-classify's ``kind`` (so that no later run takes it for a
    scan) and write with Python, which keeps any file name the system allows (``cv2.imwrite``
    cannot take a name that is not UTF-8)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError("OpenCV could not encode the image as PNG")
    path.write_bytes(own_images.mark(data.tobytes(), kind))
