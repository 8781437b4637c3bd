"""The dashboard: its logic with Streamlit's AppTest, the command, and the real page in Chromium.

Scans are made here (synthetic ultrasound-like PNGs, DICOM written with pydicom into memory);
the browser test drives Debian's Chromium with Playwright and saves screenshots to
``.artifacts/dashboard/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import ExitStatus, main
from tests.onnx_models import make_contract_model
from training.synthetic import synthetic_scan

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / ".artifacts" / "dashboard"
CLASSES = ("normal", "benign", "malignant")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

needs_streamlit = pytest.mark.skipif(
    find_spec("streamlit") is None,
    reason="Streamlit (the dashboard extra) is not installed: pip install -e '.[dev]'",
)


# ---------------------------------------------------------------- scans made in memory


def png_bytes(label: str, seed: int = 0, size: tuple[int, int] = (120, 160)) -> bytes:
    scan = synthetic_scan(label, np.random.default_rng(seed), size)
    return cv2.imencode(".png", scan)[1].tobytes()


def dicom_bytes(frames: np.ndarray) -> bytes:
    """A valid ultrasound DICOM (multi-frame when ``frames`` has more than one), in memory."""
    pytest.importorskip("pydicom", minversion="3.0", reason="pydicom (the dicom extra) missing")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    count, rows, columns = frames.shape
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US multi-frame image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if count > 1:
        ds.NumberOfFrames = count
    ds.PixelData = np.ascontiguousarray(frames, np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def cine(count: int = 3, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.stack(
        [synthetic_scan(("benign", "malignant")[i % 2], rng, size) for i in range(count)]
    )


# ---------------------------------------------------------------- AppTest


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def open_app(monkeypatch, model: Path | None, *extra: str):
    from streamlit.testing.v1 import AppTest

    from edge_runtime.app.dashboard import APP_PATH

    argv = [str(APP_PATH)] + ([] if model is None else ["--model", str(model)]) + list(extra)
    monkeypatch.setattr(sys, "argv", argv)  # what `streamlit run app.py -- --model M` gives it
    at = AppTest.from_file(str(APP_PATH), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at, files: list[tuple[str, bytes]], timeout: float = 60):
    at.file_uploader(key="uploads").set_value(
        [(name, data, "application/octet-stream") for name, data in files]
    )
    at.run(timeout=timeout)
    assert not at.exception, at.exception
    return at


def batch_table(at):
    return at.dataframe[0].value  # the batch table, the only st.dataframe


def banner_text(at) -> str:
    return " ".join(w.value for w in at.warning)


@needs_streamlit
def test_two_uploads_show_a_row_each_with_label_images_and_the_banner(monkeypatch, model):
    at = open_app(monkeypatch, model)
    assert "Not a medical device" in banner_text(at)
    one_frame = dicom_bytes(cine(1))
    upload(at, [("benign-1.png", png_bytes("benign")), ("scan.dcm", one_frame)])
    table = batch_table(at)
    assert list(table["file"]) == ["benign-1.png", "scan.dcm"]
    assert set(table["label"]) <= set(CLASSES)
    assert table["confidence"].between(0, 1).all()
    assert {"abstained", "rechecked", *CLASSES} <= set(table.columns)
    assert len(at.image) == 2  # the scan on view and its heatmap overlay
    assert "Not a medical device" in banner_text(at)  # still there after the upload
    assert not at.error


# a bright square scan, with a dark disc where the lesion model sees "the lesion"
SCAN_SIDE, BLOB = 128, ((80, 48), 20)  # centre (x, y) and radius in pixels


def bright_scan(blob: bool) -> bytes:
    scan = np.full((SCAN_SIDE, SCAN_SIDE), 220, np.uint8)
    if blob:
        cv2.circle(scan, BLOB[0], BLOB[1], 20, thickness=-1)
    return cv2.imencode(".png", scan)[1].tobytes()


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    """A tiny model with a lesion output (dark pixels) and the unfamiliar-scan score, whose one
    familiar scan is the plain bright one (its features are the only 'training' class means)."""
    from edge_runtime.classifier import Classifier
    from edge_runtime.model.contract import ModelSpec
    from edge_runtime.postprocess.decision import unfamiliar_stats

    folder = tmp_path_factory.mktemp("lesion-model")
    plain = make_contract_model(folder / "plain.onnx", lesion_stride=4, features=True)
    with Classifier.from_path(plain) as classifier:
        bright = np.full((1, 64, 64, 1), 220, np.uint8)
        [features] = classifier._model.session.run(["features"], {"image": bright})
    stats = unfamiliar_stats(
        np.repeat(features, 4, axis=0) + 1e-3 * np.arange(4)[:, None], np.array([0, 1, 2, 0]), 3
    )
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=64,
        lesion_stride=4,
        lesion_threshold=0.5,
        unfamiliar={**stats, "threshold": 3.0},
    )
    return make_contract_model(folder / "lesion.onnx", spec=spec, lesion_stride=4, features=True)


def view(at, index: int):
    """Put the ``index``-th scan classified (in upload order) on view."""
    at.selectbox(key="scan_on_view").select_index(index)
    at.run()
    assert not at.exception, at.exception
    return at


@needs_streamlit
def test_a_lesion_model_outlines_the_lesion_with_its_size_or_says_none_was_found(
    monkeypatch, lesion_model
):
    at = upload(
        open_app(monkeypatch, lesion_model),
        [("blob.png", bright_scan(True)), ("plain.png", bright_scan(False))],
    )
    view(at, 0)
    captions = [c for image in at.image for c in image.captions]
    assert "Lesion outline: blob.png" in captions
    outlined = next(i for i in at.image if "Lesion outline: blob.png" in i.captions)
    assert outlined.value  # an image was sent to the page
    (x, y), radius = BLOB
    text = " ".join(m.value for m in at.markdown)
    box = re.search(r"box x (\d+), y (\d+), (\d+) x (\d+) px; area ([\d,]+) px", text)
    assert box, text
    bx, by, bw, bh, area = (int(v.replace(",", "")) for v in box.groups())
    assert abs(bx - (x - radius)) <= 4 and abs(by - (y - radius)) <= 4
    assert abs(bw - 2 * radius) <= 8 and abs(bh - 2 * radius) <= 8
    assert 0.7 < area / (np.pi * radius**2) < 1.3
    assert "size in mm unknown" in text  # a PNG carries no pixel spacing
    assert ":orange-badge[unfamiliar]" in text  # unlike the model's one familiar (plain) scan
    assert not any("No lesion found" in i.value for i in at.info)

    view(at, 1)
    assert any(i.value.startswith("No lesion found") for i in at.info)
    assert not any("Lesion outline" in c for image in at.image for c in image.captions)
    assert ":gray-badge[not unfamiliar]" in " ".join(m.value for m in at.markdown)

    table = batch_table(at)
    assert list(table["file"]) == ["blob.png", "plain.png"]
    assert list(table["unfamiliar"]) == [True, False]
    assert list(table["lesion_bbox"][0]) == [bx, by, bw, bh]
    assert list(table["lesion_area_px"].isna()) == [False, True]
    assert table["lesion_area_px"][0] == area
    assert table[["lesion_area_mm2", "lesion_diameter_mm"]].isna().all().all()
    assert {m.label: m.value for m in at.metric}["unfamiliar"] == "1"


def test_lesion_size_gives_pixels_and_mm_where_known():
    from edge_runtime.app.dashboard.scans import lesion_size
    from edge_runtime.postprocess.lesion import Lesion

    known = lesion_size(Lesion((40, 30, 41, 39), 1264, 28.44, 7.06))
    assert known == "box x 40, y 30, 41 x 39 px; area 1,264 px (28.4 mm²); largest diameter 7.1 mm"
    unknown = lesion_size(Lesion((0, 0, 3, 2), 5, None, None))
    assert unknown.endswith("area 5 px; size in mm unknown (the scan gives no pixel spacing)")


@needs_streamlit
def test_a_bad_upload_shows_its_own_error_and_the_rest_are_classified(monkeypatch, model):
    good = png_bytes("malignant")
    at = upload(
        open_app(monkeypatch, model),
        [
            ("notes.png", b"this is not an image"),
            ("empty.png", b""),
            ("cut.png", good[: len(good) // 2]),
            ("fine.png", good),
        ],
    )
    table = batch_table(at)
    assert list(table["label"][:3]) == ["failed"] * 3
    assert table["label"].iloc[3] in CLASSES
    errors = [e.value for e in at.error]
    assert any(e.startswith("notes.png: not a supported image") for e in errors), errors
    assert any(e.startswith("empty.png: file is empty") for e in errors), errors
    assert any(e.startswith("cut.png: ") and "truncated" in e for e in errors), errors


@needs_streamlit
def test_a_cine_is_browsable_frame_by_frame(monkeypatch, model):
    at = upload(open_app(monkeypatch, model), [("cine.dcm", dicom_bytes(cine(3)))])
    table = batch_table(at)
    assert list(table["file"]) == ["cine.dcm"] * 3 and list(table["frame"]) == [0, 1, 2]
    slider = at.slider[0]
    assert (slider.min, slider.max) == (0, 2)
    slider.set_value(2)
    at.run()
    assert not at.exception
    assert "cine.dcm, frame 2" in [c for image in at.image for c in image.captions]


@needs_streamlit
def test_removing_an_upload_removes_its_rows(monkeypatch, model):
    a, b = ("a.png", png_bytes("benign", 1)), ("b.png", png_bytes("normal", 2))
    at = upload(open_app(monkeypatch, model), [a, b])
    assert list(batch_table(at)["file"]) == ["a.png", "b.png"]
    at = upload(at, [b])
    assert list(batch_table(at)["file"]) == ["b.png"]


@needs_streamlit
def test_the_batch_table_filters_by_label_flag_and_name(monkeypatch, model):
    files = [(f"scan-{i}.png", png_bytes(CLASSES[i % 3], i)) for i in range(6)]
    at = upload(open_app(monkeypatch, model), [*files, ("junk.png", b"junk")])
    every = batch_table(at)
    assert len(every) == 7
    at.multiselect(key="label_filter").set_value(["failed"])
    at.run()
    assert list(batch_table(at)["file"]) == ["junk.png"]
    at.multiselect(key="label_filter").set_value([])
    at.text_input(key="name_filter").input("SCAN-1")
    at.run()
    assert list(batch_table(at)["file"]) == ["scan-1.png"]
    at.text_input(key="name_filter").input("")
    at.multiselect(key="flag_filter").set_value(["abstained"])
    at.run()
    assert len(batch_table(at)) == int(every["abstained"].sum())
    counts = {m.label: m.value for m in at.metric if m.label in (*CLASSES, "failed")}
    assert counts["failed"] == "1"
    abstained = int(every["abstained"].sum())  # the synthetic scans are no ultrasound
    assert {m.label: m.value for m in at.metric}["abstained"] == str(abstained)
    assert sum(int(v) for v in counts.values()) == 7 - abstained  # not counted by label
    shown = len(batch_table(at))
    labels = [button.label for button in at.download_button]
    assert labels == [f"CSV ({shown} rows)", f"JSON lines ({shown} rows)"]


@needs_streamlit
def test_a_folder_on_the_host_is_classified(monkeypatch, model, tmp_path):
    folder = tmp_path / "today"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.png").write_bytes(png_bytes("benign", 3))
    (folder / "sub" / "two.png").write_bytes(png_bytes("malignant", 4))
    at = open_app(monkeypatch, model, "--data-root", str(tmp_path))  # launch's root
    at.text_input(key="folder").input(str(folder))
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    files = list(batch_table(at)["file"])
    assert files == [str(folder / "one.png"), str(folder / "sub" / "two.png")]
    at.text_input(key="folder").input(str(tmp_path / "missing"))
    at.form_submit_button[0].click()
    at.run()
    assert any("no such file or folder" in e.value for e in at.error)
    assert len(batch_table(at)) == 2  # earlier results stay


@needs_streamlit
def test_200_uploads_are_all_classified(monkeypatch, model):
    files = [(f"scan-{i:03d}.png", png_bytes(CLASSES[i % 3], i, (64, 80))) for i in range(200)]
    at = upload(open_app(monkeypatch, model), files, timeout=120)
    table = batch_table(at)
    assert len(table) == 200 and set(table["label"]) <= set(CLASSES)
    assert any("Classified 200 scans" in t.value for t in at.toast)


def test_scans_are_classified_chunk_by_chunk_so_progress_can_be_shown(model):
    from edge_runtime.app.dashboard.scans import Scan, classify_scans
    from edge_runtime.classifier import Classifier

    pulled = []

    def scans() -> Iterator[Scan]:
        for i in range(40):
            pulled.append(i)
            yield Scan(f"k{i}", f"s{i}.png", data=png_bytes("benign", i, (48, 64)))

    with Classifier.from_path(model) as classifier:
        stream = classify_scans(classifier, scans(), chunk_size=8)
        first, results = next(stream)
        assert first.name == "s0.png" and results[0].ok
        assert len(pulled) == 8  # the first results came before the rest was even read
        rest = list(stream)
    assert [scan.name for scan, _ in rest] == [f"s{i}.png" for i in range(1, 40)]


@needs_streamlit
def test_the_page_writes_nothing_to_disk(monkeypatch, model, tmp_path):
    home, temp, cwd = (tmp_path / name for name in ("home", "tmp", "cwd"))
    for folder in (home, temp, cwd):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    at = upload(open_app(monkeypatch, model), [("a.png", png_bytes("benign")), ("b.png", b"x")])
    assert len(batch_table(at)) == 2
    written = [p for folder in (home, temp, cwd) for p in folder.rglob("*")]
    assert written == []


def test_downloads_are_the_records_the_cli_writes(model, tmp_path, monkeypatch):
    from edge_runtime.app.dashboard.scans import Scan, classify_scans, to_csv, to_jsonl
    from edge_runtime.classifier import Classifier

    files = {"a.png": png_bytes("benign", 5), "b.png": png_bytes("malignant", 6), "c.png": b"x"}
    files["d.dcm"] = dicom_bytes(cine(2))
    monkeypatch.chdir(tmp_path)
    for name, data in files.items():
        Path(name).write_bytes(data)
    for fmt in ("jsonl", "csv"):
        assert main([*files, "--model", str(model), "--format", fmt, "--output", fmt]) == 1
    with Classifier.from_path(model) as classifier:
        scans = [Scan(name, name, data=data) for name, data in files.items()]
        results = [r for _, rs in classify_scans(classifier, scans) for r in rs]
    ours = [json.loads(line) for line in to_jsonl(results).splitlines()]
    *cli, cine_summary = [json.loads(line) for line in Path("jsonl").read_text().splitlines()]
    assert cine_summary["path"] == "d.dcm" and cine_summary["frames"] == 2  # the CLI's, not ours
    for record in (*ours, *cli):
        assert record.pop("elapsed_ms") >= 0
    assert ours == cli and len(ours) == 5  # a.png, b.png, c.png (failed), d.dcm frames 0 and 1
    ours_csv = list(csv.reader(io.StringIO(to_csv(results, CLASSES))))
    with open("csv", newline="") as handle:
        cli_csv = list(csv.reader(handle))[:-1]  # without the cine's summary row
    elapsed = cli_csv[0].index("elapsed_ms")
    assert ours_csv[0] == cli_csv[0]
    assert [r[:elapsed] for r in ours_csv] == [r[:elapsed] for r in cli_csv]


@needs_streamlit
def test_the_model_panel_shows_the_card_provider_and_precision(monkeypatch):
    at = open_app(monkeypatch, None)  # the bundled model, with its card
    facts = at.table[0].value
    assert facts.loc["precision"].iloc[0] in ("int8", "fp32")
    assert "ExecutionProvider" in facts.loc["provider"].iloc[0]
    bundled = Path(facts.loc["path"].iloc[0])
    assert facts.loc["SHA-256"].iloc[0] == hashlib.sha256(bundled.read_bytes()).hexdigest()
    text = " ".join(m.value for m in at.markdown)
    assert "Model card: default" in text and "95% bootstrap CI" in text
    assert "## Limitations" in text
    assert "Not a medical device" in banner_text(at)


@needs_streamlit
def test_a_model_that_cannot_be_opened_is_reported_on_the_page(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "missing.onnx")
    assert any("could not be opened" in e.value and "missing.onnx" in e.value for e in at.error)
    assert not at.file_uploader


def test_a_scan_on_view_gets_the_same_answer_with_its_heatmap(model):
    from edge_runtime.app.dashboard.scans import Scan, classify_scans, explain
    from edge_runtime.classifier import Classifier
    from edge_runtime.postprocess.heatmap import overlay

    scan = Scan("k", "a.png", data=png_bytes("malignant", 9))
    with Classifier.from_path(model) as classifier:
        [(_, [result])] = list(classify_scans(classifier, [scan]))
        again = explain(classifier, scan.frames()[0], scan.name)
    assert again.label == result.label and again.probabilities == result.probabilities
    assert again.heatmap.shape == again.image.shape == (120, 160)
    assert overlay(again.image, again.heatmap).shape == (120, 160, 3)


def test_flags_come_from_the_classification_dataclass():
    from edge_runtime.app.dashboard.scans import flag_names
    from edge_runtime.classifier import Classification

    booleans = [f.name for f in dataclasses.fields(Classification) if f.type in ("bool", bool)]
    assert "abstained" in flag_names() and "rechecked" in flag_names()
    assert list(flag_names()) == booleans


def test_label_tiles_leave_abstained_results_to_the_abstained_tile():
    """A blank TIFF page abstains "normal": never act on it, so it is no normal in the tiles."""
    from edge_runtime.app.dashboard.scans import label_counts
    from edge_runtime.classifier import Classification, Failure, Timing

    def called(label: str, abstained: bool) -> Classification:
        probabilities = {"normal": 0.2, "benign": 0.2, "malignant": 0.2, label: 0.6}
        return Classification(
            source=f"{label}-{abstained}.png",
            label=label,
            probabilities=probabilities,
            confidence=0.6,
            abstained=abstained,
            timing=Timing(1.0, 1.0, 1.0, 1.0),
        )

    results = [called("normal", True), called("normal", False), called("benign", True)]
    results.append(Failure(source="bad.png", error="truncated"))
    counts = label_counts(results, ("normal", "benign", "malignant"))
    assert counts == {"normal": 1, "benign": 0, "malignant": 0, "failed": 1}


# ---------------------------------------------------------------- the command


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


def test_dashboard_help_is_examples():
    status, out, _ = run_cli("dashboard", "--help")
    assert status == ExitStatus.SUCCESS
    assert "examples:" in out and "edge-classify dashboard --model" in out and "--host" in out


def test_dashboard_without_the_extra_names_it_and_exits_2(monkeypatch):
    import edge_runtime.app.dashboard

    monkeypatch.setattr(edge_runtime.app.dashboard, "streamlit_available", lambda: False)
    status, _, err = run_cli("dashboard")
    assert status == ExitStatus.USAGE
    assert "pip install '.[dashboard]' in a clone of edge-classify" in err


def test_dashboard_refuses_a_bad_port_or_model_before_starting(tmp_path, monkeypatch):
    import edge_runtime.app.dashboard

    monkeypatch.setattr(edge_runtime.app.dashboard, "streamlit_available", lambda: True)
    monkeypatch.setattr(edge_runtime.app.dashboard, "run_dashboard", pytest.fail)  # never reached
    status, _, err = run_cli("dashboard", "--port", "70000")
    assert status == ExitStatus.USAGE and "port from 1 to 65535" in err
    status, _, err = run_cli("dashboard", "--model", str(tmp_path / "none.onnx"))
    assert status == ExitStatus.USAGE and "none.onnx" in err


def test_importing_the_runtime_and_its_cli_does_not_import_streamlit():
    code = textwrap.dedent("""
        import sys
        import edge_runtime, edge_runtime.app.cli, edge_runtime.app.dashboard
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'pandas')))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_runtime_keeps_onnxruntime_telemetry_off(tmp_path, model):
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), temp.mkdir()
    code = textwrap.dedent(f"""
        import os, numpy as np
        from edge_runtime.classifier import Classifier
        with Classifier.from_path({str(model)!r}) as clf:
            assert clf.classify([np.full((64, 64), 99, np.uint8)])[0].ok
        print(os.environ["ORT_DISABLE_TELEMETRY"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(temp))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert [p for folder in (home, temp) for p in folder.rglob("*")] == []  # no device id, queue


# ---------------------------------------------------------------- the served page


@dataclasses.dataclass
class Served:
    url: str
    process: subprocess.Popen
    private: tuple[Path, ...]  # the server's HOME, TMPDIR and working directory
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[Served]:
    """``edge-classify dashboard --port P`` in a subprocess, healthy, stopped afterwards."""
    private = tuple(tmp_path / name for name in ("home", "tmp", "cwd"))
    for folder in private:
        folder.mkdir()
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HOME": str(private[0]), "TMPDIR": str(private[1]), "PYTHONPATH": path}
    port, log = _free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "edge_runtime.app.cli", "dashboard", "--port", str(port)]
    command += list(args)
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=private[2], env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", process, private, log)
    try:
        _wait_healthy(served, timeout_s=120)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_healthy(served: Served, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail(f"dashboard exited with {served.process.returncode}:\n{_log(served)}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{served.url}/_stcore/health", timeout=2) as response,
        ):
            if response.read() == b"ok":
                return
        time.sleep(0.3)
    pytest.fail(f"dashboard not healthy after {timeout_s} s:\n{_log(served)}")


def _log(served: Served) -> str:
    return served.log.read_text(errors="replace")[-4000:]


@needs_streamlit
def test_the_command_serves_health_on_localhost_and_ctrl_c_stops_it_with_130(tmp_path, model):
    with serve(tmp_path, "--model", str(model)) as served:
        port = int(served.url.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"{served.url}/_stcore/health", timeout=5) as response:
            assert response.read() == b"ok"
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True)
        if listening.returncode == 0:  # iproute2 present: bound to localhost only
            local = [line.split()[3] for line in listening.stdout.decode().splitlines()]
            assert local and all(address.startswith("127.0.0.1:") for address in local), local
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=30) == 130
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{served.url}/_stcore/health", timeout=2)
    assert "dashboard at http://127.0.0.1:" in _log(served)


def _chromium() -> str:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
    )
    assert sync_api
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("Chromium not found (/usr/bin/chromium): apt-get install -y chromium to run it")


@needs_streamlit
def _bundled_model_outlines(png: bytes) -> int:
    """1 when the bundled model finds a lesion on this scan (the page then shows its outline)."""
    from edge_runtime import Classifier, ClassifierOptions
    from edge_runtime.io.decode import decode_gray

    with Classifier.from_options(ClassifierOptions()) as clf:
        (result,) = clf.classify([decode_gray(png, "scan.png")])
    return int(result.ok and result.lesion is not None)


def test_in_chromium_an_upload_shows_rows_labels_images_and_the_banner(tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    scans = [
        ("benign-1.png", "image/png", png_bytes("benign", 11, (300, 400))),
        ("malignant-1.png", "image/png", png_bytes("malignant", 12, (300, 400))),
        ("cine.dcm", "application/dicom", dicom_bytes(cine(3, (300, 400)))),
    ]
    with serve(tmp_path) as served, sync_playwright() as playwright:  # the bundled model
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page_errors, requests = [], []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(served.url)
        banner = page.locator("[data-testid=stAlert]").filter(has_text="Not a medical device.")
        expect(banner).to_be_visible(timeout=60_000)
        uploader = page.locator("[data-testid=stFileUploaderDropzoneInput]")
        uploader.wait_for(state="attached", timeout=60_000)
        uploader.set_input_files([{"name": n, "mimeType": m, "buffer": b} for n, m, b in scans])

        images = page.locator("[data-testid=stImage] img")
        # the scan and its heatmap overlay, and the lesion outline where the model finds one
        expect(images).to_have_count(2 + _bundled_model_outlines(scans[0][2]), timeout=60_000)
        for image in images.all():
            assert image.evaluate("img => img.complete && img.naturalWidth") > 0
        page.wait_for_timeout(500)
        page.screenshot(path=ARTIFACTS / "classify.png", full_page=True)

        page.get_by_role("tab", name="Batch").click()
        rows = page.locator("[data-testid=stDataFrame] tbody tr[role=row]")
        expect(rows).to_have_count(5, timeout=30_000)  # two PNGs, three frames of the cine
        table = [row.locator("td").all_inner_texts() for row in rows.all()]
        headers = page.locator("[data-testid=stDataFrame] thead th").all_inner_texts()
        file_at, label_at = headers.index("file"), headers.index("label")
        assert [r[file_at] for r in table] == ["benign-1.png", "malignant-1.png"] + ["cine.dcm"] * 3
        assert {r[label_at] for r in table} <= set(CLASSES)
        page.screenshot(path=ARTIFACTS / "batch.png", full_page=True)

        page.get_by_role("tab", name="Classify").click()
        page.locator("[data-testid=stSelectbox]").click()
        page.get_by_role("option", name="cine.dcm: 3 frames").click()
        page.get_by_role("slider").focus()
        page.keyboard.press("End")
        expect(page.get_by_text("cine.dcm, frame 2")).to_be_visible(timeout=30_000)
        page.screenshot(path=ARTIFACTS / "cine.png", full_page=True)

        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text("Model card: default").first).to_be_visible(timeout=30_000)
        expect(page.get_by_role("cell", name="CPUExecutionProvider")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "model.png", full_page=True)
        expect(banner).to_be_visible()  # on every tab

        assert page.locator("[data-testid=stException]").count() == 0
        assert "Traceback" not in page.content()
        assert page_errors == []
        foreign = [u for u in requests if not u.startswith((served.url, "data:", "blob:"))]
        assert foreign == [], f"the page reached outside the dashboard: {foreign}"
        browser.close()
    written = [p for folder in served.private for p in folder.rglob("*")]
    assert written == [], f"the dashboard wrote files: {written}"
