"""The dashboard's logic, free of Streamlit: scans in memory or on this host -> runtime results.

Uploaded bytes are decoded with the runtime's own decoders
(:func:`~edge_runtime.io.decode.decode_gray`, and :func:`~edge_runtime.io.dicom.load_dicom_frames`
for DICOM, which reads bytes too) and handed to the :class:`~edge_runtime.classifier.Classifier` as
arrays, so a scan never touches the disk. The
records and downloads are the runtime's own (:func:`~edge_runtime.app.output.result_record`,
:class:`~edge_runtime.app.output.ResultWriter`), so they carry the same fields as ``edge-classify``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.app.output import LESION_FIELDS, OutputFormat, ResultWriter, result_record
from edge_runtime.classifier import Classification, Classifier, Failure, Result, Timing
from edge_runtime.io.decode import InputError, decode_gray, is_dicom, load_frames
from edge_runtime.model.card import card_path_for
from edge_runtime.postprocess.lesion import Lesion
from edge_runtime.postprocess.recheck import rerun_rule

FAILED = "failed"  # the label column of a scan that could not be classified
_DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Scan:
    """One scan to classify: a file uploaded into memory, or a file on this host.

    Attributes:
        key: unique within a session (the upload's id, or the file's absolute path).
        name: what the page and the records show (the upload's file name, or the path).
        data: the uploaded bytes; None for a file on this host.
        path: the file on this host; None for an upload.
    """

    key: str
    name: str
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    def frames(self) -> list[np.ndarray]:
        """The scan as 2-D uint8 frames (several for a multi-frame DICOM).

        Raises:
            InputError: empty, truncated, not an image, too large, or an unreadable DICOM.
        """
        if self.data is None:
            if self.path is None:
                raise InputError(self.name, "scan has neither uploaded bytes nor a path")
            return load_frames(self.path)
        return decode_frames(self.data, self.name)


def decode_frames(data: bytes, name: str) -> list[np.ndarray]:
    """Decode a scan file's bytes in memory into 2-D uint8 frames, as the runtime reads files.

    DICOM (a ``.dcm``/``.dicom`` name, or ``DICM`` at byte 128) goes through the runtime's pydicom
    reader (the ``dicom`` extra); anything else through :func:`~edge_runtime.io.decode.decode_gray`.

    Raises:
        InputError: naming ``name`` and the reason.
    """
    if not data:
        raise InputError(name, "file is empty (0 bytes)")
    if is_dicom(name, data):
        from edge_runtime.io.dicom import load_dicom_frames  # pydicom stays an optional import

        return load_dicom_frames(name, data)
    return [decode_gray(data, name)]


def classify_scans(
    classifier: Classifier, scans: Iterable[Scan], *, chunk_size: int = 16
) -> Iterator[tuple[Scan, list[Result]]]:
    """Classify scans ``chunk_size`` at a time, yielding each scan with its results in order.

    Each result has the scan's name as ``source`` and, for a multi-frame scan, its frame index,
    as ``edge-classify`` would report the file. A scan that cannot be decoded yields one failed
    result with the reason; it never stops the others.
    """
    chunk: list[Scan] = []
    with ThreadPoolExecutor(_DECODE_WORKERS, thread_name_prefix="dashboard-decode") as pool:
        for scan in scans:
            chunk.append(scan)
            if len(chunk) >= chunk_size:
                yield from _classify_chunk(classifier, chunk, pool)
                chunk = []
        if chunk:
            yield from _classify_chunk(classifier, chunk, pool)


def _classify_chunk(
    classifier: Classifier, chunk: Sequence[Scan], pool: ThreadPoolExecutor
) -> list[tuple[Scan, list[Result]]]:
    decoded = list(pool.map(_decode, chunk))
    arrays = [frame for frames, _, _ in decoded for frame in frames]
    results = iter(classifier.classify(arrays) if arrays else [])
    done = []
    for scan, (frames, decode_ms, error) in zip(chunk, decoded, strict=True):
        if error is not None:
            failure = Failure(
                source=scan.name,
                error=error,
                timing=Timing(decode_ms),
                **classifier.model_fields,
            )
            done.append((scan, [failure]))
            continue
        many = len(frames) > 1
        done.append(
            (
                scan,
                [
                    _renamed(next(results), scan.name, index if many else None, decode_ms)
                    for index in range(len(frames))
                ],
            )
        )
    return done


def _decode(scan: Scan) -> tuple[list[np.ndarray], float, str | None]:
    start = time.perf_counter()
    try:
        frames = scan.frames()
        return frames, _ms_since(start) / len(frames), None
    except InputError as exc:
        return [], _ms_since(start), exc.reason
    except Exception as exc:  # a decoder bug must cost one scan, never the batch
        return [], _ms_since(start), f"could not be decoded ({type(exc).__name__}: {exc})"


def _renamed(result: Result, name: str, frame: int | None, decode_ms: float) -> Result:
    timing = dataclasses.replace(result.timing, decode_ms=result.timing.decode_ms + decode_ms)
    return dataclasses.replace(result, source=name, frame=frame, timing=timing)


def explain(classifier: Classifier, frame: np.ndarray, name: str) -> Result:
    """Classify one frame again with its heatmap (``result.heatmap``, ``result.image``).

    The batch runs without heatmaps to stay fast and small in memory; the scan on view gets its
    heatmap from the same model, which gives the same answer for the same pixels.
    """
    result = classifier.classify([frame], heatmaps=True)[0]
    return dataclasses.replace(result, source=name)


def flag_names() -> tuple[str, ...]:
    """The yes/no fields of :class:`~edge_runtime.classifier.Classification` (abstained,
    rechecked...); a failure has none of them set.

    Read from the dataclass, so a flag the runtime adds later shows up without a change here.
    """
    return tuple(f.name for f in dataclasses.fields(Classification) if f.type in (bool, "bool"))


def table_rows(
    results: Iterable[Result], class_names: Sequence[str], *, lesion: bool = False
) -> list[dict[str, Any]]:
    """One row per result for the batch table: file, label, confidence, flags, probabilities.

    ``frame`` (after ``file``) only when some result is a frame of a multi-frame scan; with
    ``lesion`` (a model with a lesion output), the records' ``lesion_*`` fields, as
    :func:`~edge_runtime.app.output.result_record` gives them, after the probabilities.
    """
    results = list(results)
    frames = any(result.frame is not None for result in results)
    rows = []
    for result in results:
        row: dict[str, Any] = {"file": result.source}
        if frames:
            row["frame"] = result.frame
        answer = result if isinstance(result, Classification) else None
        row["label"] = FAILED if answer is None else answer.label
        row["confidence"] = None if answer is None else answer.confidence
        row.update({name: bool(getattr(answer, name, False)) for name in flag_names()})
        probabilities = {} if answer is None else answer.probabilities
        row.update({name: probabilities.get(name) for name in class_names})
        if lesion:
            record = result_record(result)
            row.update({name: record[name] for name in LESION_FIELDS})
        row["error"] = result.error or ""
        rows.append(row)
    return rows


def lesion_size(lesion: Lesion) -> str:
    """The lesion's box and size in words: always in pixels, in mm where the spacing is known.

    Example: ``"box x 40, y 30, 41 x 39 px; area 1,264 px (28.4 mm²); largest diameter 7.1 mm"``.
    """
    x, y, width, height = lesion.bbox
    area = f"area {lesion.area_px:,} px"
    if lesion.area_mm2 is not None:
        area += f" ({lesion.area_mm2:,.1f} mm²)"
    if lesion.diameter_mm is not None:
        diameter = f"largest diameter {lesion.diameter_mm:.1f} mm"
    else:
        diameter = "size in mm unknown (the scan gives no pixel spacing)"
    return f"box x {x}, y {y}, {width} x {height} px; {area}; {diameter}"


def label_counts(results: Iterable[Result], class_names: Sequence[str]) -> dict[str, int]:
    """Results per label, every class listed (0 included), then ``failed``. An abstained result
    is not counted under its label (never act on it: the ``abstained`` count has it)."""
    counts = Counter(
        r.label if isinstance(r, Classification) else FAILED
        for r in results
        if not getattr(r, "abstained", False)
    )
    return {name: counts.get(name, 0) for name in (*class_names, FAILED)}


def to_jsonl(results: Iterable[Result]) -> str:
    """The results as ``edge-classify --format jsonl`` writes them."""
    return _written(results, OutputFormat.JSONL, ())


def to_csv(results: Iterable[Result], class_names: Sequence[str]) -> str:
    """The results as ``edge-classify --format csv`` writes them."""
    return _written(results, OutputFormat.CSV, class_names)


def _written(results: Iterable[Result], fmt: OutputFormat, class_names: Sequence[str]) -> str:
    stream = io.StringIO(newline="")
    writer = ResultWriter(stream, fmt, class_names)
    for result in results:
        writer.write(result)
    return stream.getvalue()


def model_facts(classifier: Classifier) -> dict[str, str]:
    """What the model panel shows: which model runs, where, and how it decides."""
    spec = classifier.spec
    recheck = classifier.recheck_model_path
    return {
        "model": classifier.model_path.name,
        "path": str(classifier.model_path),
        "version": spec.model_version,
        "SHA-256": classifier.model_sha256,
        "backbone": spec.backbone,
        "precision": spec.precision.value,
        "provider": ", ".join(classifier.providers),
        "classes": ", ".join(spec.class_names),
        "input": f"{spec.input_size} x {spec.input_size} gray, {spec.resize_policy.value}",
        "calibration temperature": f"{spec.temperature:.3f}",
        "abstains below": f"{classifier.abstain_below:.2f}",
        "FP32 recheck": (f"{recheck.name} (reruns: {rerun_rule(spec)})" if recheck else "off"),
        "lesion output": "yes" if spec.has_lesion else "no",
    }


def model_card(model_path: Path) -> tuple[str, str | Mapping[str, Any]] | None:
    """The model's card beside it: ``("markdown", text)`` or ``("json", dict)``; None if none.

    ``dir/<name>-int8.onnx`` has its card at ``dir/<name>.card.md`` (preferred, for people) or
    ``dir/<name>.card.json`` (:func:`~edge_runtime.model.card.card_path_for`).
    """
    import json

    json_path = card_path_for(model_path)
    md_path = json_path.with_name(json_path.name.removesuffix(".json") + ".md")
    path = md_path if md_path.is_file() else json_path
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return ("markdown", text) if path is md_path else ("json", json.loads(text))
    except (OSError, ValueError) as exc:
        return "markdown", f"{path}: the model card could not be read ({exc})."


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
