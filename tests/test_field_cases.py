"""The field cases of ../shared/field-cases, rebuilt here (no shared data needed), as kinds.

Non-UTF-8 names in every output and side file, EXIF orientation, every TIFF page, one "is this a
scan" predicate (DICOM by content) for folders, globs, links and watch, memory bounded by the
batch for a long cine, and PALETTE COLOR shown as a viewer shows it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from edge_runtime.io.decode import Scan, display_path, load_frames, load_gray
from tests.onnx_models import make_contract_model
from tests.test_cli import write_scan

LATIN1_NAME = os.fsdecode(b"caf\xe9.jpg")  # a name that is not UTF-8, as Python holds it


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def write_jpeg(path: Path, shape: tuple[int, int] = (60, 80), seed: int = 0) -> Path:
    """A scan-like JPEG, written by Python (cv2.imwrite cannot take a name that is not UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path.write_bytes(cv2.imencode(".jpg", image)[1].tobytes())
    return path


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def jpeg_with_exif_orientation(image: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose APP1 Exif segment carries the given Orientation (0x0112) tag."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    return jpeg[:2] + app1 + jpeg[2:]


# --- names as bytes ---------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_shown_escaped_in_every_format(tmp_path, model):
    scan = write_jpeg(tmp_path / "in" / LATIN1_NAME)
    shown = display_path(scan)
    assert shown.endswith("caf\\xe9.jpg")
    for fmt in ("table", "jsonl", "csv"):
        status, out, err = run(tmp_path / "in", "--model", model, "--format", fmt)
        assert status == 0, err
        assert "Traceback" not in err
        if fmt == "jsonl":
            out = json.loads(out)["path"]
        assert shown in out
    status, out, _ = run(scan, "--model", model, "--format", "jsonl")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["path"] == shown and record["label"]


@pytest.mark.skipif(os.sep != "/", reason="a backslash separates folders there")
def test_a_name_holding_a_backslash_is_not_taken_for_an_escaped_byte(tmp_path, model):
    """``caf\\xe9.jpg`` written literally and the name holding byte 0xE9 were both shown
    ``caf\\xe9.jpg``: two records no reader could tell apart."""
    write_jpeg(tmp_path / "in" / LATIN1_NAME)
    write_jpeg(tmp_path / "in" / "caf\\xe9.jpg", seed=1)
    status, out, err = run(tmp_path / "in", "--model", model, "--format", "jsonl")
    assert status == 0, err
    names = sorted(Path(json.loads(line)["path"]).name for line in out.splitlines())
    assert names == ["caf\\\\xe9.jpg", "caf\\xe9.jpg"], names


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_output_file_and_heatmaps_keep_a_name_that_is_not_utf8(tmp_path, model, fmt):
    write_jpeg(tmp_path / "in" / LATIN1_NAME)
    write_jpeg(tmp_path / "in" / "plain.jpg", seed=1)
    target, heat = tmp_path / f"out.{fmt}", tmp_path / "heat"
    status, _, err = run(
        tmp_path / "in", "--model", model, "--format", fmt, "--output", target, "--heatmaps", heat
    )
    assert status == 0, err
    text = target.read_text(encoding="utf-8")
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        paths = [row["path"] for row in rows]
    else:
        paths = [json.loads(line)["path"] for line in text.splitlines()]
    assert len(paths) == 2 and any(p.endswith("caf\\xe9.jpg") for p in paths)
    written = sorted(os.listdir(os.fsencode(heat)))  # side files keep the name's own bytes
    assert b"caf\xe9_heatmap.png" in written and b"caf\xe9_overlay.png" in written
    assert cv2.imdecode(
        np.fromfile(heat / os.fsdecode(b"caf\xe9_heatmap.png"), np.uint8), 0
    ).shape == (
        60,
        80,
    )


# --- what the file says about itself ----------------------------------------------------------


def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path):
    stored = np.zeros((40, 64), np.uint8)
    stored[:, :8] = 255  # a bright band on the left of the stored pixels
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_with_exif_orientation(stored, 6))  # 6: rotate 90 degrees clockwise
    shown = load_gray(path)
    assert shown.shape == (64, 40)
    assert shown[:8].mean() > 200 and shown[-8:].mean() < 50  # the band is now at the top
    np.testing.assert_allclose(shown, np.rot90(stored, -1), atol=8)


def test_every_tiff_page_is_a_frame_with_its_own_record(tmp_path, model):
    blank = np.zeros((60, 80), np.uint8)
    scan = cv2.imread(str(write_scan(tmp_path / "s.png", shape=(60, 80))), cv2.IMREAD_GRAYSCALE)
    path = tmp_path / "two.tif"
    assert cv2.imwritemulti(str(path), [blank, scan])
    frames = load_frames(path)
    assert len(frames) == 2 and frames[0].max() == 0
    np.testing.assert_array_equal(frames[1], scan)
    status, out, err = run(path, "--model", model, "--format", "jsonl")
    *records, summary = [json.loads(line) for line in out.splitlines()]
    assert status == 0, err
    assert [r["frame"] for r in records] == [0, 1] and all(r["label"] for r in records)
    assert summary["frames"] == 2 and summary["frame"] in (0, 1)  # the file's summary record


# --- one predicate for "is this a scan" -------------------------------------------------------


@pytest.fixture
def incoming(tmp_path) -> Path:
    """One DICOM scan under the names storage nodes and DICOMDIR media use, plus a link."""
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    folder = tmp_path / "incoming"
    folder.mkdir()
    image = cv2.imread(str(write_scan(tmp_path / "s.png", shape=(64, 96))), cv2.IMREAD_GRAYSCALE)
    for name in ("IMG0001", "1.2.826.0.1.3680043.8.498.12345", "US.1.2.826.0.1.3680043.8.498.99"):
        make_dicom(folder / name, image, rows=64, columns=96)
    (folder / "notes.txt").write_text("not a scan")
    (folder / "link-to-IMG0001").symlink_to(folder / "IMG0001")
    return folder


def test_dicom_files_without_a_suffix_are_found_by_folder_glob_and_watch(incoming, model):
    names = {"IMG0001", "1.2.826.0.1.3680043.8.498.12345", "US.1.2.826.0.1.3680043.8.498.99"}
    for argument in (incoming, incoming / "*"):
        status, out, err = run(argument, "--model", model, "--format", "jsonl")
        found = [Path(json.loads(line)["path"]).name for line in out.splitlines()]
        assert status == 0, err
        assert sorted(found) == sorted(names)  # the link reaches IMG0001: visited once
    output = incoming.parent / "watch.jsonl"
    argv = ["watch", incoming, "--output", output, "--model", model, "--once", "--settle", "0"]
    status, _, err = run(*argv)
    assert status == 0, err
    watched = [Path(json.loads(line)["path"]).name for line in output.read_text().splitlines()]
    assert sorted(watched) == sorted(names)


# --- memory bounded by the batch --------------------------------------------------------------


def test_a_long_deflated_cine_is_read_a_batch_at_a_time(tmp_path, model, monkeypatch):
    pytest.importorskip("pydicom", minversion="3.0")
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.test_dicom import make_dicom

    count = 200
    frames = np.arange(count, dtype=np.uint8)[:, None, None] + np.zeros((1, 480, 640), np.uint8)
    path = make_dicom(
        tmp_path / "cine.dcm",
        frames,
        rows=480,
        columns=640,
        frames=count,
        syntax=DeflatedExplicitVRLittleEndian,
    )
    assert path.stat().st_size < 2_000_000  # small on disk, 61 MB of pixels
    reads, batches = [], []
    real_read = Scan.read
    monkeypatch.setattr(
        Scan, "read", lambda s, a=0, b=None: reads.append((a, b)) or real_read(s, a, b)
    )
    with Classifier.from_path(model, batch_size=4) as clf:
        real_run = clf._model.session.run

        def run_model(names, feeds):
            batches.append(len(feeds["image"]))
            return real_run(names, feeds)

        monkeypatch.setattr(clf._model.session, "run", run_model, raising=False)
        results = clf.classify([path])
    assert [r.frame for r in results] == list(range(count)) and all(r.ok for r in results)
    assert max(batches) <= 4 and sum(batches) == count
    assert all(b - a <= 4 for a, b in reads)  # never more than a batch of frames decoded at once


# --- PALETTE COLOR ----------------------------------------------------------------------------


def test_palette_colour_shows_the_palette_luminance_without_a_per_image_stretch(tmp_path):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    entries = np.arange(256)
    red = (entries * 207 // 255 * 256).astype("<u2")  # brightest entry 207 of 255, 16-bit LUT
    green = (entries * 180 // 255 * 256).astype("<u2")
    blue = (entries * 120 // 255 * 256).astype("<u2")
    index = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))[:, :64]
    path = make_dicom(
        tmp_path / "palette.dcm",
        index,
        rows=40,
        columns=64,
        photometric="PALETTE COLOR",
        RedPaletteColorLookupTableDescriptor=[256, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
        BluePaletteColorLookupTableDescriptor=[256, 0, 16],
        RedPaletteColorLookupTableData=red.tobytes(),
        GreenPaletteColorLookupTableData=green.tobytes(),
        BluePaletteColorLookupTableData=blue.tobytes(),
    )
    (frame,) = load_frames(path)
    rgb = np.stack([red, green, blue], -1)[index].astype(float) / 257.0
    expected = rgb @ [0.299, 0.587, 0.114]
    assert np.abs(frame - expected).max() <= 1.0
    assert frame.max() <= 190  # a stretch to the image's own range would reach 255
