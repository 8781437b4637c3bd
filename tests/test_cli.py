"""``edge-classify PATH...`` in-process: exit codes, output formats, heatmaps; TF-free models."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import ExitStatus, main
from edge_runtime.app.output import heatmap_stems
from tests.onnx_models import CLASSES, make_contract_model

RECORD_KEYS = {
    "path",
    "label",
    "probabilities",
    "confidence",
    "abstained",
    "abstain_reason",
    "unfamiliar",
    "rechecked",
    "lesion_bbox",
    "lesion_area_px",
    "lesion_area_mm2",
    "lesion_diameter_mm",
    "error",
    "elapsed_ms",
    "model_version",
    "model_sha256",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def write_scan(path: Path, shape: tuple[int, int] = (48, 80), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    cv2.circle(image, (shape[1] // 2, shape[0] // 2), min(shape) // 4, 20, -1)
    assert cv2.imwrite(str(path), image)
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_scan_classified_exits_0_with_one_jsonl_record_each(tmp_path, model):
    scans = [write_scan(tmp_path / f"s{i}.png", seed=i) for i in range(3)]
    status, out, err = run(tmp_path, "--model", model, "--format", "jsonl")
    assert status == ExitStatus.SUCCESS == 0, err
    records = jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(map(str, scans))
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["label"] in CLASSES and record["error"] is None
        assert set(record["probabilities"]) == set(CLASSES)
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert record["confidence"] == max(record["probabilities"].values())
        assert isinstance(record["abstained"], bool) and record["elapsed_ms"] >= 0
    assert "3 classified" in err


def test_one_broken_file_exits_1_and_the_good_ones_are_still_classified(tmp_path, model):
    good = [write_scan(tmp_path / f"good{i}.png", seed=i) for i in range(2)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])  # truncated PNG
    status, out, err = run(tmp_path, "--model", model, "--format", "jsonl")
    assert status == ExitStatus.PARTIAL == 1
    records = {r["path"]: r for r in jsonl(out)}
    assert {records[str(p)]["label"] for p in good} <= set(CLASSES)
    assert records[str(broken)]["label"] is None
    assert isinstance(records[str(broken)]["error"], str) and records[str(broken)]["error"]
    assert "Traceback" not in err and "1 failed" in err


def test_every_record_names_the_model_by_its_sha256_where_versions_are_alike(tmp_path, model):
    """Two models with the same model_version: each record, a failure's too, carries the SHA-256
    of the file that answered it, so a result can be traced to the exact model."""
    other = make_contract_model(tmp_path / "other.onnx", seed=1)
    scans = tmp_path / "scans"
    write_scan(scans / "a.png")
    (scans / "broken.png").write_bytes(b"not a png")
    for path in (model, other):
        status, out, err = run(scans, "--model", path, "--format", "csv")
        assert status == ExitStatus.PARTIAL, err
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {row["error"] != "" for row in rows} == {True, False}
        wanted = hashlib.sha256(path.read_bytes()).hexdigest()
        assert [row["model_sha256"] for row in rows] == [wanted, wanted]
        assert rows[0]["model_version"] == "0"
    assert model.read_bytes() != other.read_bytes()


def test_a_missing_input_among_good_ones_exits_1(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    status, out, err = run(scan, tmp_path / "nope.png", "--model", model, "--format", "jsonl")
    assert status == ExitStatus.PARTIAL
    records = {r["path"]: r for r in jsonl(out)}
    assert set(records) == {str(scan), str(tmp_path / "nope.png")}  # its own record
    assert records[str(tmp_path / "nope.png")]["error"] == "no such file or folder"
    assert records[str(scan)]["error"] is None
    assert "nope.png" in err


def test_a_missing_model_file_exits_2_naming_the_file(tmp_path):
    scan = write_scan(tmp_path / "a.png")
    status, out, err = run(scan, "--model", tmp_path / "missing.onnx")
    assert status == ExitStatus.USAGE == 2
    assert "missing.onnx" in err and "not found" in err
    assert "Traceback" not in err and out == ""


def test_a_model_that_breaks_the_contract_exits_2(tmp_path):
    bad = make_contract_model(tmp_path / "bad.onnx", outputs=("scores", "cam"))
    scan = write_scan(tmp_path / "a.png")
    status, _, err = run(scan, "--model", bad)
    assert status == ExitStatus.USAGE
    assert "bad.onnx" in err and "Traceback" not in err


def test_a_file_that_is_not_onnx_exits_2(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    status, _, err = run(write_scan(tmp_path / "a.png"), "--model", junk)
    assert status == ExitStatus.USAGE and "junk.onnx" in err


def test_bad_options_exit_2_and_suggest_the_right_one(tmp_path, model, capsys):
    status, _, err = run(tmp_path, "--modle", model)
    assert status == ExitStatus.USAGE
    assert "did you mean --model" in err
    # a wrong value of a right option, or a right option left without its value: no hint
    for args in (("--format", "json"), ("--threads", "abc"), ("--abstain-below",)):
        status, _, err = run(tmp_path, *args)
        assert status == ExitStatus.USAGE and "did you mean" not in err, err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--abstain-below", "1.5", "must be in [0, 1]"),
        ("--abstain-below", "nan", "must be in [0, 1]"),
        ("--malignant-threshold", "1", "must be in [0, 1)"),
        ("--batch-size", "0", "must be a whole number >= 1"),
        ("--threads", "0", "must be a whole number >= 1"),
    ],
)
def test_a_value_out_of_range_names_the_option_not_the_python_field(
    tmp_path, model, option, value, message
):
    """``--abstain-below 1.5`` said ``abstain_below must be in [0, 1]``, the Python name."""
    status, out, err = run(write_scan(tmp_path / "a.png"), "--model", model, option, value)
    assert status == ExitStatus.USAGE and out == ""
    assert f"error: argument {option}: {message}. Got '{value}' instead." in err, err
    assert f"{option.strip('-').replace('-', '_')} must" not in err


def test_the_python_api_keeps_its_own_names_in_range_errors():
    from edge_runtime.classifier import ClassifierOptions

    with pytest.raises(ValueError, match=r"^abstain_below must be in \[0, 1\]"):
        ClassifierOptions(abstain_below=1.5)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1"):
        ClassifierOptions(batch_size=0)


def test_help_states_the_defaults_inputs_and_every_exit_status():
    status, out, _ = run("--help")
    text = " ".join(out.split())  # argparse wraps the option help
    assert status == 0
    assert "images per inference batch (default 8)" in text
    assert "TIFF: every page" in text and "AVI, MP4" in text
    assert "on x86 CPUs without VNNI" in text
    assert "from --output's suffix: csv for .csv, jsonl for .jsonl" in text
    exit_status = text[text.index("exit status:") :]
    for words in ("heatmap/mask files could not be written", "130 interrupted", "141", "143"):
        assert words in exit_status, exit_status


def test_nothing_to_classify_exits_2(tmp_path, model):
    status, _, err = run(tmp_path / "nope", "--model", model)
    assert status == ExitStatus.USAGE and "no scans to classify" in err


def test_a_mistyped_subcommand_gets_a_hint(tmp_path, model):
    _, _, err = run("wacth", "--model", model)
    assert "did you mean the subcommand 'watch'" in err


def test_help_is_examples_and_exits_0():
    status, out, _ = run("--help")
    assert status == ExitStatus.SUCCESS
    assert "examples:" in out and "edge-classify watch" in out and "./watch" in out
    for sub in ("watch", "bench"):
        status, out, _ = run(sub, "--help")
        assert status == 0 and "examples:" in out and f"edge-classify {sub}" in out


def test_a_file_named_like_a_subcommand_is_classified_as_a_path(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_scan(tmp_path / "watch" / "a.png")
    status, out, _ = run("./watch", "--model", model, "--format", "jsonl")
    assert status == 0 and len(jsonl(out)) == 1


def test_csv_output_file_has_a_column_per_class(tmp_path, model):
    scans = [write_scan(tmp_path / "in" / f"s{i}.png", seed=i) for i in range(2)]
    target = tmp_path / "out.csv"
    status, out, _ = run(tmp_path / "in", "--model", model, "--format", "csv", "--output", target)
    assert status == 0 and out == ""
    rows = list(csv.DictReader(target.open(newline="")))
    assert [r["path"] for r in rows] == [str(p) for p in scans]
    expected = ["path", "frame", "label", *CLASSES, "confidence", "abstained", "abstain_reason"]
    expected.append("unfamiliar")
    expected.append("rechecked")
    assert list(rows[0])[: len(expected)] == expected
    for row in rows:
        assert row["label"] in CLASSES
        assert sum(float(row[c]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)


def test_table_output_lists_label_confidence_and_path(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    status, out, _ = run(scan, "--model", model)
    lines = out.splitlines()
    assert status == 0 and lines[0].split()[:2] == ["label", "conf"]
    label, confidence, *_ = lines[1].split()
    assert label in CLASSES and 0.0 <= float(confidence) <= 1.0
    assert f"? {scan}: not an ultrasound scan" in lines[1]  # this noise is no scan: abstained


def test_abstain_below_marks_low_confidence_results(tmp_path, model):
    write_scan(tmp_path / "a.png")
    _, out, _ = run(tmp_path, "--model", model, "--format", "jsonl", "--abstain-below", "0.99")
    assert all(r["abstained"] for r in jsonl(out))


def test_abstain_below_never_hides_a_malignant_call(tmp_path, model):
    """At an operating point a malignant call's confidence is P(malignant), low by design: with
    --abstain-below 0.7 every such call abstained, and an abstained frame never decides a cine."""
    for seed in range(3):
        write_scan(tmp_path / f"s{seed}.png", seed=seed)
    argv = (tmp_path, "--model", model, "--format", "jsonl", "--abstain-below", "0.99")
    _, out, _ = run(*argv, "--malignant-threshold", "0.001")
    records = jsonl(out)
    assert {r["label"] for r in records} == {"malignant"}
    assert all(r["confidence"] == r["probabilities"]["malignant"] < 0.99 for r in records)
    assert not any("low confidence" in (r["abstain_reason"] or "") for r in records), records
    _, out, _ = run(*argv, "--malignant-threshold", "0")  # top-1: the same scans abstain
    assert all("low confidence" in r["abstain_reason"] for r in jsonl(out))


def test_heatmaps_are_gray_at_the_scan_size_with_colour_overlays(tmp_path, model):
    scan = write_scan(tmp_path / "in" / "scan.png", shape=(90, 130))
    heat_dir = tmp_path / "heat"
    status, _, _ = run(scan, "--model", model, "--heatmaps", heat_dir)
    assert status == 0
    assert sorted(p.name for p in heat_dir.iterdir()) == ["scan_heatmap.png", "scan_overlay.png"]
    heat = cv2.imread(str(heat_dir / "scan_heatmap.png"), cv2.IMREAD_UNCHANGED)
    assert heat.dtype == np.uint8 and heat.shape == (90, 130)
    colour = cv2.imread(str(heat_dir / "scan_overlay.png"), cv2.IMREAD_UNCHANGED)
    assert colour.dtype == np.uint8 and colour.shape == (90, 130, 3)


def test_heatmaps_of_two_scans_with_the_same_name_do_not_overwrite_each_other(tmp_path, model):
    first = write_scan(tmp_path / "a" / "x.png", shape=(40, 60), seed=1)
    second = write_scan(tmp_path / "b" / "x.png", shape=(70, 50), seed=2)
    heat_dir = tmp_path / "heat"
    assert run(tmp_path / "a", tmp_path / "b", "--model", model, "--heatmaps", heat_dir)[0] == 0
    heatmaps = sorted(heat_dir.glob("*_heatmap.png"))
    assert len(heatmaps) == 2 and len(list(heat_dir.glob("*_overlay.png"))) == 2
    shapes = {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape for p in heatmaps}
    assert shapes == {(40, 60), (70, 50)}
    stems = heatmap_stems([first, second])
    assert {f"{s}_heatmap.png" for s in stems.values()} == {p.name for p in heatmaps}


def test_heatmap_stems_depend_on_the_paths_not_their_order():
    names = ["a/x.png", "b/x.png", "c/y.png"]
    forward, backward = heatmap_stems(names), heatmap_stems(names[::-1])
    assert forward == backward
    assert forward["c/y.png"] == "y"
    assert forward["a/x.png"] != forward["b/x.png"]
    assert all(forward[n].startswith("x_") for n in names[:2])


def test_multiframe_dicom_gives_one_record_per_frame_then_its_summary(tmp_path, model):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    stack = np.stack([np.full((32, 40), v, np.uint8) for v in (10, 120, 240)])
    path = make_dicom(tmp_path / "cine.dcm", stack, rows=32, columns=40, frames=3)
    heat_dir = tmp_path / "heat"
    status, out, err = run(path, "--model", model, "--format", "jsonl", "--heatmaps", heat_dir)
    *records, summary = jsonl(out)
    assert status == 0
    assert [r["frame"] for r in records] == [0, 1, 2]
    assert all(r["path"] == str(path) and set(r) == RECORD_KEYS | {"frame"} for r in records)
    assert summary["frames"] == 3 and summary["failed_frames"] == 0 and "3 classified" in err
    assert {p.name for p in heat_dir.glob("*_heatmap.png")} == {
        f"cine_f{i}_heatmap.png" for i in range(3)
    }


def test_masks_with_a_model_without_a_lesion_output_exits_2_before_classifying(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    masks = tmp_path / "masks"
    status, out, err = run(scan, "--model", model, "--format", "jsonl", "--masks", masks)
    assert status == ExitStatus.USAGE == 2
    assert f"{model}: this model has no lesion output" in err and "leave out --masks" in err
    assert out == "" and not masks.exists()


@pytest.mark.parametrize("flag", ["--output", "--heatmaps", "--masks"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_scan(tmp_path, model, flag):
    """A folder given to --output, or a file given to --heatmaps or --masks: exit 2 with the
    path and the reason, before the model loads (it was a raw "[Errno 21] Is a directory", and
    for --heatmaps only after every scan had been classified)."""
    scan = write_scan(tmp_path / "a.png")
    target = tmp_path / ("folder" if flag == "--output" else "file.txt")
    target.mkdir() if flag == "--output" else target.write_text("x")
    status, out, err = run(scan, "--model", model, "--format", "jsonl", flag, target)
    assert status == ExitStatus.USAGE
    assert f"{flag} {target}" in err and ("is a folder" in err or "not a folder" in err), err
    assert out == "" and "Errno" not in err


def test_output_into_a_missing_folder_is_refused_before_any_scan(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    target = tmp_path / "no-such-folder" / "out.jsonl"
    status, _, err = run(scan, "--model", model, "--output", target)
    assert status == ExitStatus.USAGE and "does not exist" in err, err


def test_watch_refuses_a_folder_as_its_output_before_it_starts(tmp_path, model):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    args = ("watch", tmp_path / "in", "--output", tmp_path / "out", "--model", model, "--once")
    status, _, err = run(*args)
    assert status == ExitStatus.USAGE and "is a folder" in err and "Errno" not in err, err


def test_an_output_that_names_one_of_the_scans_is_refused_and_the_scan_kept(tmp_path, model):
    """Opening --output for writing emptied the scan before it was read."""
    scan = write_scan(tmp_path / "a.png")
    before = scan.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(scan)
    for target in (scan, link):
        status, _, err = run(tmp_path, "--model", model, "--format", "jsonl", "--output", target)
        assert status == ExitStatus.USAGE, err
        assert f"--output {target}: is one of the scans to classify" in err, err
        assert scan.read_bytes() == before


def test_a_heatmap_that_cannot_be_written_is_named_and_the_batch_goes_on(tmp_path, model):
    """A side file that cannot be written stopped the whole run (exit 2) after 2 of 6 records."""
    scans = [write_scan(tmp_path / "in" / f"s{i}.png", seed=i) for i in range(3)]
    heat_dir = tmp_path / "heat"
    (heat_dir / "s1_heatmap.png").mkdir(parents=True)  # where s1's heatmap should go
    status, out, err = run(
        tmp_path / "in", "--model", model, "--format", "jsonl", "--heatmaps", heat_dir
    )
    assert status == ExitStatus.PARTIAL, err
    assert sorted(r["path"] for r in jsonl(out)) == sorted(map(str, scans))
    assert all(r["error"] is None for r in jsonl(out))
    assert "s1_heatmap.png: could not write the heatmap" in err, err
    assert "1 without their heatmap or mask file" in err, err
    assert (heat_dir / "s0_heatmap.png").is_file() and (heat_dir / "s2_overlay.png").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a folder without write bits")
def test_a_heatmap_folder_that_cannot_be_written_is_refused_before_any_scan(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    status, out, err = run(scan, "--model", model, "--heatmaps", locked / "heat")
    assert status == ExitStatus.USAGE and out == "", err
    assert f"--heatmaps {locked / 'heat'}: cannot be written ({locked} is not writable)" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_mask_folder_that_cannot_be_made_is_refused_before_any_scan_even_for_root(
    tmp_path, model
):
    """/proc takes no new folder, whoever asks: that was a raw errno and exit 1 mid-run."""
    scan = write_scan(tmp_path / "a.png")
    status, out, err = run(scan, "--model", model, "--masks", "/proc/edge-classify-masks")
    assert status == ExitStatus.USAGE and out == "", err
    assert "--masks /proc/edge-classify-masks: cannot be made (" in err, err
    assert "Errno" not in err


def test_heatmaps_written_beside_the_scans_are_never_classified_as_scans(tmp_path, model):
    """A run's own overlays passed the ultrasound check: a second run called a benign scan's
    overlay malignant. They carry a mark now; a folder leaves them out with a word, and one
    named on the command line gets an error record."""
    scan = write_scan(tmp_path / "a.png")
    status, _, _ = run(tmp_path, "--model", model, "--heatmaps", tmp_path)
    written = sorted(tmp_path.glob("a_*.png"))
    assert status == 0 and [p.name for p in written] == ["a_heatmap.png", "a_overlay.png"]
    assert cv2.imread(str(written[1])).shape[:2] == cv2.imread(str(scan)).shape[:2]

    status, out, err = run(tmp_path, "--model", model, "--format", "jsonl")
    assert status == 0 and [r["path"] for r in jsonl(out)] == [str(scan)], err
    assert f"{written[0]}: not taken as a scan: an edge-classify heatmap" in err
    status, out, _ = run(written[1], "--model", model, "--format", "jsonl")
    assert status == ExitStatus.PARTIAL
    assert (
        jsonl(out)[0]["error"]
        == "an edge-classify overlay (written by --heatmaps or --masks), not a scan"
    )


def test_the_mark_is_read_only_from_the_images_edge_classify_wrote(tmp_path):
    from edge_runtime.io import own_images

    _, png = cv2.imencode(".png", np.zeros((40, 50), np.uint8))
    plain = png.tobytes()
    marked = own_images.mark(plain, "mask")
    assert own_images.written_kind(marked[:132]) == "mask"
    assert own_images.written_kind(plain[:132]) is None
    assert cv2.imdecode(np.frombuffer(marked, np.uint8), cv2.IMREAD_UNCHANGED).shape == (40, 50)
    with pytest.raises(ValueError, match="not an encoded PNG"):
        own_images.mark(b"\xff\xd8\xff" + plain[3:], "mask")
