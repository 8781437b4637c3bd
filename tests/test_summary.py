"""Typed results (Classification | Failure) and the per-file summary of multi-frame files."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_runtime
from edge_runtime.app.cli import main
from edge_runtime.app.output import OutputFormat, ResultWriter, result_record
from edge_runtime.classifier import Classification, Classifier, Failure, Timing
from edge_runtime.postprocess.summary import FileSummary, summarize, with_summaries
from tests.onnx_models import CLASSES, make_contract_model

FRAME_LEVELS = (30, 90, 150, 210, 250)  # gray level of each page of the synthetic cine


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def write_cine(path: Path, levels=FRAME_LEVELS, *, tiny: int | None = None) -> Path:
    """A multi-page TIFF (the runtime reads every page as a frame); page ``tiny`` is 8 x 8."""
    pages = []
    for index, level in enumerate(levels):
        side = 8 if index == tiny else 64
        page = np.full((side, side + 16), level, np.uint8)
        cv2.circle(page, (side // 2 + 8, side // 2), side // 4, 255 - level, -1)
        pages.append(page)
    assert cv2.imwritemulti(str(path), pages)
    return path


def classification(frame: int | None, malignant: float, source: str = "cine.dcm"):
    rest = (1.0 - malignant) / 2
    probabilities = {"normal": rest, "benign": rest, "malignant": malignant}
    top = max(probabilities, key=probabilities.get)
    return Classification(
        source=source,
        label=top,
        probabilities=probabilities,
        confidence=probabilities[top],
        abstained=False,
        timing=Timing(1.0, 2.0, 3.0, 4.0),
        frame=frame,
    )


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------ the two result types


def test_a_classification_has_its_label_and_a_failure_its_error():
    good = classification(None, 0.7)
    bad = Failure(source="x.png", error="file is empty (0 bytes)")
    assert good.ok and good.error is None and good.label == "malignant"
    assert not bad.ok and bad.error == "file is empty (0 bytes)" and bad.timing == Timing()
    assert not hasattr(bad, "label") and not hasattr(bad, "probabilities")
    assert isinstance(good, edge_runtime.Result) and isinstance(bad, edge_runtime.Result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bad.error = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError, match="error"):
        Failure(source="x.png")  # type: ignore[call-arg]


def test_ok_and_error_are_not_fields_so_replace_and_records_keep_them_right():
    good = dataclasses.replace(classification(None, 0.7), source="renamed.png")
    assert good.ok and good.source == "renamed.png"
    assert "ok" not in {f.name for f in dataclasses.fields(Failure)}
    assert "error" not in {f.name for f in dataclasses.fields(Classification)}


def test_a_failure_record_keeps_every_field_a_classification_record_has():
    good = result_record(classification(2, 0.7))
    bad = result_record(Failure(source="cine.dcm", error="truncated", frame=2))
    assert list(bad) == list(good)
    assert bad["label"] is None and bad["probabilities"] == {} and bad["confidence"] is None
    assert bad["abstained"] is bad["unfamiliar"] is bad["rechecked"] is False
    assert bad["error"] == "truncated" and bad["lesion_bbox"] is None


def test_the_package_exports_the_result_types_it_lists():
    for name in ("Classification", "Failure", "Result", "FileSummary", "summarize"):
        assert name in edge_runtime.__all__ and hasattr(edge_runtime, name)
    assert all(hasattr(edge_runtime, name) for name in edge_runtime.__all__)


# ------------------------------------------------------------------------------ the summary


def test_the_summary_names_the_frame_with_the_highest_p_malignant_and_counts_failures():
    frames = [
        classification(0, 0.2),
        Failure(source="cine.dcm", error="image is 8 x 8 pixels", frame=1),
        classification(2, 0.9),
        classification(3, 0.5),
    ]
    summary = summarize(frames)
    assert summary.frames == 4 and summary.failed_frames == 1
    assert summary.most_suspicious is frames[2] and summary.ok and summary.error is None
    assert summary.timing.total_ms == pytest.approx(3 * 10.0)  # failures took no time here


def test_the_summary_takes_the_earliest_frame_on_a_tie_whatever_the_order():
    frames = [classification(i, p) for i, p in enumerate((0.4, 0.8, 0.8, 0.1))]
    assert summarize(frames).most_suspicious.frame == 1
    assert summarize(frames[::-1]).most_suspicious.frame == 2  # the earliest in the list


def test_a_file_with_no_classified_frame_has_a_summary_with_its_error():
    frames = [Failure(source="cine.dcm", error="truncated", frame=i) for i in range(2)]
    summary = summarize(frames)
    assert not summary.ok and summary.most_suspicious is None and "2 frame records" in summary.error
    record = result_record(summary)
    assert record["label"] is None and record["frame"] is None and record["failed_frames"] == 2


def test_summarize_refuses_results_of_two_files_or_none():
    with pytest.raises(ValueError, match=r"one file\. Got 2 files"):
        summarize([classification(0, 0.1, "a.dcm"), classification(0, 0.1, "b.dcm")])
    with pytest.raises(ValueError, match="Got no results"):
        summarize([])


def test_with_summaries_adds_one_after_each_multi_frame_file_and_none_for_single_images():
    stream = [
        classification(None, 0.3, "a.png"),
        *(classification(i, p, "b.dcm") for i, p in enumerate((0.1, 0.6))),
        Failure(source="c.png", error="empty"),
        *(classification(i, p, "b2.dcm") for i, p in enumerate((0.7, 0.2, 0.3))),
        *(classification(i, 0.5, "b2.dcm") for i in range(2)),  # the same name listed again
    ]
    out = list(with_summaries(stream))
    kinds = [(type(r).__name__, r.source) for r in out]
    assert kinds == [
        ("Classification", "a.png"),
        ("Classification", "b.dcm"),
        ("Classification", "b.dcm"),
        ("FileSummary", "b.dcm"),
        ("Failure", "c.png"),
        *[("Classification", "b2.dcm")] * 3,
        ("FileSummary", "b2.dcm"),
        *[("Classification", "b2.dcm")] * 2,
        ("FileSummary", "b2.dcm"),
    ]
    summaries = [r for r in out if isinstance(r, FileSummary)]
    assert [(s.frames, s.most_suspicious.frame) for s in summaries] == [(2, 1), (3, 0), (2, 0)]
    assert [r for r in out if not isinstance(r, FileSummary)] == stream


def test_a_summary_in_csv_fills_frames_and_failed_frames_which_frame_rows_leave_empty():
    stream = io.StringIO(newline="")
    writer = ResultWriter(stream, OutputFormat.CSV, CLASSES)
    frames = [classification(0, 0.2), classification(1, 0.9)]
    for record in with_summaries(frames):
        writer.write(record)
    rows = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert [(r["frame"], r["frames"], r["failed_frames"]) for r in rows] == [
        ("0", "", ""),
        ("1", "", ""),
        ("1", "2", "0"),
    ]
    assert rows[2]["label"] == "malignant" and float(rows[2]["malignant"]) == pytest.approx(0.9)
    assert float(rows[2]["elapsed_ms"]) == pytest.approx(20.0)


# ------------------------------------------------------------- a synthetic cine, end to end


def test_edge_classify_writes_a_cine_summary_that_agrees_with_its_frame_records(tmp_path, model):
    cine = write_cine(tmp_path / "cine.tif", tiny=1)
    status, out, err = run(cine, "--model", model, "--format", "jsonl")
    *frames, summary = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and "4 classified" in err and "1 failed" in err  # the tiny page
    assert [r["frame"] for r in frames] == list(range(len(FRAME_LEVELS)))
    assert all("frames" not in r for r in frames)
    classified = [r for r in frames if r["error"] is None]
    malignant = [r["probabilities"]["malignant"] for r in classified]
    assert len(set(malignant)) == len(malignant)  # the frames differ: the choice means something
    top = classified[int(np.argmax(malignant))]
    assert summary["frames"] == len(FRAME_LEVELS) and summary["failed_frames"] == 1
    assert summary["frame"] == top["frame"] and summary["label"] == top["label"]
    assert summary["probabilities"] == top["probabilities"] and summary["error"] is None
    assert summary["elapsed_ms"] == pytest.approx(sum(r["elapsed_ms"] for r in frames), abs=0.01)


def test_the_chosen_frame_follows_its_pixels_when_the_cine_is_reversed(tmp_path, model):
    forward = write_cine(tmp_path / "forward.tif")
    backward = write_cine(tmp_path / "backward.tif", FRAME_LEVELS[::-1])
    with Classifier.from_path(model) as clf:
        results = list(with_summaries(clf.classify([forward, backward])))
    first, second = (r for r in results if isinstance(r, FileSummary))
    last = len(FRAME_LEVELS) - 1
    assert second.most_suspicious.frame == last - first.most_suspicious.frame
    assert second.most_suspicious.probabilities == first.most_suspicious.probabilities


def test_the_table_shows_a_summary_row_after_the_frames(tmp_path, model):
    cine = write_cine(tmp_path / "cine.tif")
    status, out, _ = run(cine, "--model", model)
    lines = out.splitlines()
    assert status == 0 and len(lines) == 1 + len(FRAME_LEVELS) + 1
    files = rf"\[file: frame \d of {len(FRAME_LEVELS)} frames, 0 failed\]"
    assert re.search(files + r"(: not an ultrasound scan: .*)?$", lines[-1])  # flat pages
    assert lines[-1].split()[0] in CLASSES


def test_watch_appends_a_cine_summary_once_and_a_restart_adds_nothing(tmp_path, model):
    folder = tmp_path / "incoming"
    folder.mkdir()
    write_cine(folder / "cine.tif")
    output = tmp_path / "out.jsonl"
    argv = ["watch", folder, "--output", output, "--model", model, "--once", "--settle", "0"]
    for _ in range(2):
        status, _, err = run(*argv)
        assert status == 0, err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [("frames" in r, r["frame"]) for r in lines][:-1] == [
        (False, i) for i in range(len(FRAME_LEVELS))
    ]
    assert lines[-1]["frames"] == len(FRAME_LEVELS) and lines[-1]["failed_frames"] == 0
