"""Field round 3 (issue 32, items 2, 6, 7, 8, 9, 11), rebuilt here from inputs the tests make.

Dual-view cines get one summary; AVI/MP4 cines are classified frame by frame, and nothing in a
folder is skipped without a word; watch records a file once, whole; a file's summary never takes
an abstained frame over a classified one; images that are not ultrasound scans abstain with their
reason in every output; a newline in a file name never splits a table row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import main
from edge_runtime.app.output import OutputFormat, ResultWriter, result_record
from edge_runtime.app.watch import Watcher, WatchOptions
from edge_runtime.classifier import Classification, Classifier, Failure, Timing
from edge_runtime.io.scan_check import NOT_A_SCAN, check_scan
from edge_runtime.io.sources import expand_sources, is_scan_file, skip_reason
from edge_runtime.postprocess.summary import FileSummary, summarize, with_summaries
from tests.conftest import SHARED
from tests.onnx_models import make_contract_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pydicom_test_file(name: str) -> Path:
    """A file that ships inside the pydicom wheel (never downloaded), or skip."""
    pydicom = pytest.importorskip("pydicom", minversion="3.0")
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this pydicom installation")
    return path


# ------------------------------------------------------------------- images the tests make


def speckle_scan(shape: tuple[int, int] = (240, 320), seed: int = 0) -> np.ndarray:
    """A B-mode-like image: Rayleigh echoes blurred by a beam wider across than along (speckle
    correlated between neighbours, longer across), fading with depth, with a dark oval lesion."""
    rng = np.random.default_rng(seed)
    height, width = shape
    echoes = rng.rayleigh(1.0, shape).astype(np.float32)
    echoes = cv2.GaussianBlur(echoes, (0, 0), sigmaX=2.0, sigmaY=0.8)
    image = 80.0 * echoes * np.linspace(1.0, 0.5, height, dtype=np.float32)[:, None]
    lesion = np.zeros(shape, np.uint8)
    cv2.ellipse(lesion, (width // 2, height // 2), (width // 8, height // 12), 0, 0, 360, 1, -1)
    image[lesion > 0] *= 0.3
    return np.clip(image, 0, 255).astype(np.uint8)


def text_report(shape: tuple[int, int] = (600, 800), seed: int = 0) -> np.ndarray:
    """A screenshot of a text report: black text on white, a coloured title bar."""
    rng = np.random.default_rng(seed)
    image = np.full((*shape, 3), 255, np.uint8)
    cv2.rectangle(image, (0, 0), (shape[1], 40), (200, 120, 40), -1)
    cv2.putText(image, "Ultrasound report", (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255,) * 3, 2)
    words = ["breast", "lesion", "BI-RADS", "3", "left", "outer", "quadrant", "mm", "no", "cyst"]
    for y in range(80, shape[0] - 20, 28):
        line = " ".join(rng.choice(words, 8))
        cv2.putText(image, line, (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0,) * 3, 1, cv2.LINE_AA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def ct_like(shape: tuple[int, int] = (512, 512), seed: int = 0) -> np.ndarray:
    """A CT-like slice: a body (soft tissue, lungs, a vertebra) ringed by bright skin and bone,
    on air, with the scanner's correlated noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    centre = (shape[1] // 2, shape[0] // 2)
    cv2.ellipse(image, centre, (200, 160), 0, 0, 360, 110, -1)
    cv2.ellipse(image, centre, (200, 160), 0, 0, 360, 240, 8)
    for dx in (-70, 70):
        cv2.circle(image, (centre[0] + dx, centre[1]), 50, 40, -1)
    cv2.circle(image, (centre[0], centre[1] + 90), 18, 250, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 1.0)
    image += 8 * noise / noise.std() * (image > 0)
    return np.clip(image, 0, 255).astype(np.uint8)


def probe_lifted(shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A black frame with the scanner's overlays and a faint reverberation at the top."""
    image = np.zeros(shape, np.uint8)
    image[4:10] = 40
    cv2.putText(image, "L12-5 38mm 30Hz", (10, 470), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1)
    cv2.putText(image, "BREAST", (520, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1)
    return image


def chessboard(shape: tuple[int, int] = (480, 640), cell: int = 40) -> np.ndarray:
    y, x = np.indices(shape)
    return (((y // cell) + (x // cell)) % 2 * 255).astype(np.uint8)


def dark_theme_screenshot(shape: tuple[int, int] = (500, 800)) -> np.ndarray:
    """Light text on a dark grey background, as code editors and dark PACS screens show it."""
    image = np.full(shape, 30, np.uint8)
    for row in range(30):
        text = f"def foo(x): return x*{row}  # some code here lorem ipsum"
        cv2.putText(image, text, (10, 15 + row * 15), cv2.FONT_HERSHEY_PLAIN, 0.8, 200, 1)
    return image


def photograph_grain(shape: tuple[int, int] = (400, 500)) -> np.ndarray:
    """1/f noise, the power spectrum of natural photographs."""
    spectrum = np.fft.fft2(np.random.default_rng(0).normal(size=shape))
    radius = np.hypot(
        *np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
    )
    radius[0, 0] = 1.0
    image = np.real(np.fft.ifft2(spectrum / radius))
    return ((image - image.min()) / np.ptp(image) * 255).astype(np.uint8)


NON_SCANS = {  # name -> (image, what the reason must say)
    "black": (lambda: np.zeros((480, 640), np.uint8), "blank frame"),
    "grey": (lambda: np.full((480, 640), 128, np.uint8), "blank frame"),
    "probe-lifted": (probe_lifted, "almost entirely dark"),
    "noise": (
        lambda: np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8),
        "pixel noise",
    ),
    "report": (text_report, "mostly white"),
    "ct-like": (ct_like, "CT or MR"),
    "chessboard": (chessboard, "no grey levels"),
    "dark-theme-screenshot": (dark_theme_screenshot, "like a program's screen"),
    "photograph-grain": (photograph_grain, "a photograph's grain"),
}


# ------------------------------------------------------------------ 9. the input check


@pytest.mark.parametrize("name", sorted(NON_SCANS))
def test_the_input_check_names_what_each_non_scan_is(name):
    make, expected = NON_SCANS[name]
    reason = check_scan(make())
    assert reason is not None and reason.startswith(f"{NOT_A_SCAN}: ") and expected in reason


@pytest.mark.parametrize("shape", [(480, 32), (40, 4000), (100, 401)])
def test_the_input_check_calls_a_sliver_of_a_scan_no_scan(shape):
    """A strip cut from a scan, or one squashed flat: speckle, but too little to read once the
    model's square shrinks it (found called normal at P(malignant) 0.49)."""
    reason = check_scan(speckle_scan(shape))
    assert reason is not None and reason.startswith(f"{NOT_A_SCAN}: a sliver of ")
    assert f"{shape[1]} x {shape[0]} pixels" in reason
    assert check_scan(speckle_scan((100, 400))) is None  # 4 : 1, the most a scan may have


def test_the_input_check_reads_a_pydicom_ct_slice_as_no_scan():
    from edge_runtime.io.decode import load_frames

    (frame,) = load_frames(pydicom_test_file("CT_small.dcm"))
    assert check_scan(frame).startswith(f"{NOT_A_SCAN}: a blank frame")


@pytest.mark.parametrize("shape", [(64, 64), (240, 320), (600, 800), (1080, 1920)])
def test_the_input_check_passes_speckle_at_any_size_and_either_orientation(shape):
    scan = speckle_scan(shape)
    assert check_scan(scan) is None
    assert check_scan(np.ascontiguousarray(scan.T)) is None  # a portrait export
    framed = np.zeros((shape[0] + 80, shape[1] + 40), np.uint8)  # in a black window, with text
    framed[60:-20, 20:-20] = scan
    cv2.putText(framed, "GE LOGIQ", (4, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)
    assert check_scan(framed) is None


def test_non_scans_abstain_with_their_reason_in_every_output(tmp_path):
    """With the bundled model, as the field saw it: none of these may be called normal bare."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (make, _) in NON_SCANS.items():
        cv2.imwrite(str(folder / f"{name}.png"), make())
    shutil.copy(pydicom_test_file("CT_small.dcm"), folder / "ct-small.dcm")
    shutil.copy(pydicom_test_file("MR_small.dcm"), folder / "mr-small.dcm")
    cv2.imwrite(str(folder / "scan.png"), speckle_scan())
    status, out, err = run(folder, "--format", "jsonl")
    assert status == 0, err
    records = {Path(r["path"]).stem: r for r in jsonl(out)}
    assert len(records) == len(NON_SCANS) + 3
    for name, record in records.items():
        if name == "scan":
            assert not record["abstained"] and record["abstain_reason"] is None
        elif name == "mr-small":  # the model's unfamiliar-scan score flags it
            assert record["abstained"] and "unfamiliar" in record["abstain_reason"]
        else:
            assert record["abstained"], name
            assert record["abstain_reason"].startswith(f"{NOT_A_SCAN}: "), name
    status, out, _ = run(folder, "--format", "csv")
    rows = {Path(r["path"]).stem: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["black"]["abstained"] == "True"
    assert rows["black"]["abstain_reason"] == records["black"]["abstain_reason"]
    assert rows["scan"]["abstain_reason"] == ""
    status, out, _ = run(folder)
    (row,) = [line for line in out.splitlines() if "report.png" in line]
    assert " ? " in row and f"{folder / 'report.png'}: {NOT_A_SCAN}: mostly white" in row


def test_the_input_check_can_be_turned_off_and_never_costs_a_frame(tmp_path, model, monkeypatch):
    blank = np.zeros((64, 80), np.uint8)
    with Classifier.from_path(model, check_input=False) as clf:
        (result,) = clf.classify([blank])
    assert result.abstain_reason is None and not result.abstained

    def broken(frame):
        raise RuntimeError("a bug")

    monkeypatch.setattr("edge_runtime.io.reader.check_scan", broken)
    with Classifier.from_path(model) as clf:
        (result,) = clf.classify([blank])
    assert result.ok and result.abstain_reason is None  # classified without the check


def test_every_reason_to_abstain_is_given(tmp_path, model):
    # malignant only at P >= 0.999: a malignant call is never abstained for low confidence
    with Classifier.from_path(model, abstain_below=0.99, malignant_threshold=0.999) as clf:
        blank, scan = clf.classify([np.zeros((64, 80), np.uint8), speckle_scan()])
    assert blank.abstain_reason.startswith(f"{NOT_A_SCAN}: a blank frame")
    assert "; low confidence: " in blank.abstain_reason
    assert scan.abstain_reason.startswith("low confidence: ") and scan.abstained


def test_the_input_check_costs_real_held_out_scans_at_most_5_percent():
    """The bundled model's held-out BUSI/BUS-BRA scans (every other one): the input check may
    abstain on at most 5% of them, and all reasons together on at most 5% as well."""
    data = SHARED / "data"
    listing = Path(__file__).resolve().parents[1] / "edge_runtime" / "models"
    listing = listing / "default.heldout.csv"
    if not (data / "busi").is_dir() or not (data / "busbra").is_dir():
        pytest.skip(
            f"real data not found at {data}: put the shared data folder beside the repository "
            "(or set EDGE_CLASSIFY_SHARED) to run this test"
        )
    with open(listing, newline="") as handle:
        paths = [data / row["path"] for row in csv.DictReader(handle)][::2]
    start = time.perf_counter()
    with Classifier.default() as clf:
        results = clf.classify(paths)
    assert all(r.ok for r in results)
    not_scans = [r for r in results if r.abstain_reason and NOT_A_SCAN in r.abstain_reason]
    abstained = [r for r in results if r.abstained]
    assert len(not_scans) / len(results) <= 0.05, [r.abstain_reason for r in not_scans]
    assert len(abstained) / len(results) <= 0.05
    assert time.perf_counter() - start < 60


# --------------------------------------------------- 8. a summary that never reassures wrongly


def frame_result(frame, label, p_malignant, *, abstained=False, source="two.tif"):
    rest = (1.0 - p_malignant) / 2
    return Classification(
        source=source,
        label=label,
        probabilities={"normal": rest, "benign": rest, "malignant": p_malignant},
        confidence=max(rest, p_malignant),
        abstained=abstained,
        not_a_scan=abstained,
        abstain_reason="not an ultrasound scan: a blank frame" if abstained else None,
        timing=Timing(),
        frame=frame,
    )


def unsure_result(frame, label, p_malignant):
    """A frame that shows tissue and abstained: unlike the training scans."""
    return dataclasses.replace(
        frame_result(frame, label, p_malignant),
        abstained=True,
        unfamiliar=True,
        abstain_reason="unfamiliar: unlike the scans the model was trained on",
    )


def test_the_summary_takes_the_most_severe_call_among_frames_that_did_not_abstain():
    blank = frame_result(0, "normal", 0.33, abstained=True)
    lesion = frame_result(1, "benign", 0.20)
    assert summarize([blank, lesion]).most_suspicious is lesion
    called_normal = frame_result(0, "normal", 0.33)  # a higher P(malignant), a milder call
    assert summarize([called_normal, lesion]).most_suspicious is lesion
    malignant = frame_result(2, "malignant", 0.30)
    assert summarize([called_normal, lesion, malignant]).most_suspicious is malignant


def test_a_normal_summary_never_stands_beside_a_frame_that_shows_tissue_and_abstained():
    """ "Normal" claims every frame: a blank frame cannot hide a lesion, an unsure one can."""
    normal = frame_result(0, "normal", 0.05)
    blank = frame_result(1, "malignant", 0.40, abstained=True)
    assert summarize([normal, blank]).most_suspicious is normal
    unsure = unsure_result(1, "normal", 0.10)
    unsure_benign = unsure_result(2, "benign", 0.08)
    summary = summarize([normal, unsure, blank, unsure_benign])
    assert summary.most_suspicious is unsure_benign and summary.most_suspicious.abstained
    assert result_record(summary)["abstain_reason"].startswith("unfamiliar")
    lesion = frame_result(3, "benign", 0.2)  # a finding stands beside milder unsure frames
    assert summarize([normal, unsure, unsure_benign, lesion]).most_suspicious is lesion
    unsure_malignant = unsure_result(4, "malignant", 0.96)  # but never hides a worse one
    summary = summarize([lesion, unsure_malignant, normal])
    assert summary.most_suspicious is unsure_malignant and summary.most_suspicious.abstained
    only_abstained = summarize([unsure, blank])  # the blank page has the higher P(malignant)
    assert only_abstained.most_suspicious is unsure


def test_a_file_whose_every_frame_abstained_has_an_abstained_summary():
    frames = [
        frame_result(0, "normal", 0.4, abstained=True),
        frame_result(1, "benign", 0.2, abstained=True),
    ]
    summary = summarize(frames)
    assert summary.most_suspicious is frames[1] and summary.most_suspicious.abstained
    assert result_record(summary)["abstain_reason"].startswith(NOT_A_SCAN)


def test_a_blank_first_page_never_decides_a_tiffs_summary(tmp_path):
    path = tmp_path / "two.tif"
    assert cv2.imwritemulti(str(path), [np.zeros((240, 320), np.uint8), speckle_scan()])
    status, out, err = run(path, "--format", "jsonl")
    blank, scan, summary = jsonl(out)
    assert status == 0, err
    assert blank["abstained"] and blank["abstain_reason"].startswith(f"{NOT_A_SCAN}: a blank")
    assert not scan["abstained"]
    assert summary["frames"] == 2 and summary["frame"] == 1
    assert summary["label"] == scan["label"] and not summary["abstained"]


# ------------------------------------------------------------------- 2. dual-view cines


def test_a_dual_view_cines_regions_make_one_file_and_one_summary():
    records = [  # frame 0's two regions, frame 1's, frame 2's
        dataclasses.replace(frame_result(frame, "benign", 0.1, source="dual.dcm"), region=region)
        for frame in range(3)
        for region in range(2)
    ]
    out = list(with_summaries(records))
    summaries = [r for r in out if isinstance(r, FileSummary)]
    assert len(summaries) == 1 and out[-1] is summaries[0] and summaries[0].frames == 6
    again = list(with_summaries(records + records))  # the same file listed twice: two files
    assert [s.frames for s in again if isinstance(s, FileSummary)] == [6, 6]


def test_a_dual_view_dicom_cine_gets_one_summary_after_its_records(tmp_path, model):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import _dual_view, make_dicom

    screen, regions = _dual_view(frames=3)
    path = make_dicom(
        tmp_path / "dual.dcm",
        screen,
        rows=60,
        columns=200,
        frames=3,
        SequenceOfUltrasoundRegions=regions,
    )
    status, out, err = run(path, "--model", model, "--format", "jsonl")
    records = jsonl(out)
    assert status == 0, err
    assert [(r["frame"], r["region"]) for r in records[:-1]] == [
        (f, g) for f in range(3) for g in range(2)
    ]
    assert ["frames" in r for r in records] == [False] * 6 + [True]
    assert records[-1]["frames"] == 6 and records[-1]["failed_frames"] == 0


# ------------------------------------------------------------------ 6. videos and folders


def write_video(path: Path, frames: int = 12, fourcc: str = "MJPG", size=(160, 120)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} here"
    for index in range(frames):
        frame = speckle_scan((size[1], size[0]), seed=index)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@pytest.fixture
def usb_export(tmp_path) -> Path:
    """A scanner's USB export: a JPEG beside an AVI and an MP4 cine (upper-case names)."""
    folder = tmp_path / "USB"
    folder.mkdir()
    cv2.imwrite(str(folder / "IMG0001.JPG"), speckle_scan())
    write_video(folder / "CINE0001.AVI", 12, "MJPG")
    write_video(folder / "CINE0002.MP4", 9, "mp4v")
    return folder


def test_a_usb_exports_avi_and_mp4_cines_are_classified_frame_by_frame(usb_export, model):
    status, out, err = run(usb_export, "--model", model, "--format", "jsonl")
    assert status == 0, err
    records = jsonl(out)
    by_file: dict[str, list[dict]] = {}
    for record in records:
        by_file.setdefault(Path(record["path"]).name, []).append(record)
    assert sorted(by_file) == ["CINE0001.AVI", "CINE0002.MP4", "IMG0001.JPG"]
    for name, count in (("CINE0001.AVI", 12), ("CINE0002.MP4", 9)):
        *frames, summary = by_file[name]
        assert [r["frame"] for r in frames] == list(range(count))
        assert all(r["error"] is None and r["label"] for r in frames)
        assert summary["frames"] == count and summary["failed_frames"] == 0
    assert "22 classified" in err and "0 failed" in err
    status, out, _ = run(usb_export / "CINE0001.AVI", "--model", model, "--format", "jsonl")
    assert status == 0 and len(jsonl(out)) == 13  # named on the command line: the same


def test_a_video_is_read_a_batch_of_frames_at_a_time(tmp_path, model, monkeypatch):
    from edge_runtime.io import video

    path = write_video(tmp_path / "long.avi", 30)
    reads, batches = [], []
    real_read = video._Reader.read
    monkeypatch.setattr(
        video._Reader, "read", lambda self, a, b: reads.append((a, b)) or real_read(self, a, b)
    )
    with Classifier.from_path(model, batch_size=4) as clf:
        real_run = clf._model.session.run

        def run_model(names, feeds):
            batches.append(len(feeds["image"]))
            return real_run(names, feeds)

        monkeypatch.setattr(clf._model.session, "run", run_model, raising=False)
        results = clf.classify([path])
    assert [r.frame for r in results] == list(range(30)) and all(r.ok for r in results)
    assert max(b - a for a, b in reads) <= 4 and max(batches) <= 4


def test_a_video_that_cannot_be_read_gets_a_clear_error_record_each(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    whole = write_video(tmp_path / "whole.avi", 20).read_bytes()
    (folder / "cut.avi").write_bytes(whole[: len(whole) * 6 // 10])  # ends midway
    (folder / "garbage.avi").write_bytes(b"RIFF\x00\x10\x00\x00AVI LIST" + b"\x00" * 300)
    mp4 = write_video(tmp_path / "whole.mp4", 6, "mp4v").read_bytes()
    (folder / "no-index.mp4").write_bytes(mp4[: len(mp4) // 2])  # its index is at the end
    status, out, err = run(folder, "--model", model, "--format", "jsonl")
    assert status == 1 and "Traceback" not in err
    by_file: dict[str, list[dict]] = {}
    for record in jsonl(out):
        by_file.setdefault(Path(record["path"]).name, []).append(record)
    for name in ("garbage.avi", "no-index.mp4"):
        (record,) = by_file[name]
        assert record["label"] is None and record["error"].startswith("not a readable video")
    *frames, summary = by_file["cut.avi"]
    assert "before the 20 frames its container declares" in (frames[-1]["error"] or "")
    assert all(r["error"] is None for r in frames[:-1]) and len(frames) > 1
    assert summary["frames"] == len(frames) and summary["failed_frames"] == 1


def records_by_batch_size(path: Path, model: Path, sizes=(8, 1)) -> list[list[dict]]:
    """The file's frame records (its summary left out) at each ``--batch-size``."""
    runs = []
    for size in sizes:
        status, out, err = run(path, "--model", model, "--format", "jsonl", "--batch-size", size)
        assert status == 1 and "Traceback" not in err, err
        *frames, summary = jsonl(out)
        assert summary["frames"] == len(frames) and summary["failed_frames"] == 1
        runs.append([{k: r[k] for k in ("frame", "label", "error")} for r in frames])
    return runs


def test_a_cut_video_keeps_every_frame_before_the_damage_at_any_batch_size(tmp_path, model):
    """A batch that reached the damage lost its good frames: their records depended on
    --batch-size (frames 0-5 not classified at 8, frames 0-3 kept at 1)."""
    whole = write_video(tmp_path / "whole.avi", 20).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) * 6 // 10])
    in_eights, one_by_one = records_by_batch_size(cut, model)
    assert in_eights == one_by_one
    *good, failed = in_eights
    assert [r["frame"] for r in good] == list(range(len(good))) and len(good) % 8 != 0
    assert all(r["error"] is None and r["label"] for r in good)
    assert failed["frame"] == len(good) and f"frame {len(good)} could not" in failed["error"]
    assert failed["error"].endswith(f"(frames {len(good) + 1}-19 are not read)"), failed["error"]


def test_a_cine_cut_in_its_last_frame_keeps_the_frames_before_it(tmp_path, model):
    """DICOM too: a batch of 3 failed whole ("frames 1-3", counted from 1, on the record of
    frame 0); now frames 0 and 1 are classified and frame 2 has the error, counted from 0."""
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    stack = np.stack([speckle_scan((96, 96), seed=i) for i in range(3)])
    path = make_dicom(tmp_path / "cine.dcm", stack, rows=96, columns=96, frames=3)
    path.write_bytes(path.read_bytes()[: -96 * 96 // 2])  # half of frame 2 is missing
    in_eights, one_by_one = records_by_batch_size(path, model)
    assert in_eights == one_by_one
    kept = [(r["frame"], r["error"] is None) for r in in_eights]
    assert kept == [(0, True), (1, True), (2, False)]
    assert "frame 2 could not be decoded" in in_eights[2]["error"]


def test_a_compressed_cine_with_one_damaged_frame_keeps_every_frame_after_it(tmp_path, model):
    """Each frame of a compressed DICOM is its own fragment: one cut in half cost the intact
    frames after it (frames 4 and 5 had no record, and the summary counted 4 frames)."""
    pytest.importorskip("pydicom", minversion="3.0")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from tests.test_dicom import make_dicom

    encoded = [
        cv2.imencode(".jpg", speckle_scan((96, 96), seed=i), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        for i in range(6)
    ]
    fragments = [e.tobytes() for e in encoded]
    fragments[3] = fragments[3][: len(fragments[3]) // 2]  # frame 3 cut in half
    path = make_dicom(
        tmp_path / "cine.dcm",
        encapsulate(fragments),
        rows=96,
        columns=96,
        frames=6,
        syntax=JPEGBaseline8Bit,
    )
    in_eights, one_by_one = records_by_batch_size(path, model)
    assert in_eights == one_by_one
    assert [(r["frame"], r["error"] is None) for r in in_eights] == [
        (0, True),
        (1, True),
        (2, True),
        (3, False),
        (4, True),
        (5, True),
    ]
    assert "frame 3 could not be decoded" in in_eights[3]["error"]
    assert "not read" not in in_eights[3]["error"]


def test_an_uncompressed_cine_cut_short_says_which_frames_go_unread(tmp_path, model):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    stack = np.stack([speckle_scan((96, 96), seed=i) for i in range(4)])
    path = make_dicom(tmp_path / "cine.dcm", stack, rows=96, columns=96, frames=4)
    path.write_bytes(path.read_bytes()[: -96 * 96 * 5 // 2])  # half of frame 1, all of 2-3 gone
    in_eights, one_by_one = records_by_batch_size(path, model)
    assert in_eights == one_by_one
    assert [(r["frame"], r["error"] is None) for r in in_eights] == [(0, True), (1, False)]
    assert in_eights[1]["error"].endswith("(frames 2-3 are not read)"), in_eights[1]["error"]


def test_a_folder_says_why_it_left_out_each_file_that_looks_like_a_scan(tmp_path, caplog):
    folder = tmp_path / "USB"
    folder.mkdir()
    cv2.imwrite(str(folder / "IMG0001.JPG"), speckle_scan())
    (folder / "CINE0003.GIF").write_bytes(b"GIF89a" + b"\x00" * 40)
    (folder / "1.2.840.99.part").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 16)
    (folder / "clip").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40)  # MP4, no suffix
    (folder / "notes.txt").write_text("not a scan")
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.io.sources"):
        files, problems = expand_sources([str(folder)])
    assert [p.name for p in files] == ["IMG0001.JPG", "clip"] and problems == []
    said = {Path(r.args[0]).name: (r.levelno, r.getMessage()) for r in caplog.records}
    assert said["CINE0003.GIF"][0] == logging.WARNING and "GIF, a format" in said["CINE0003.GIF"][1]
    assert said["1.2.840.99.part"][0] == logging.WARNING
    assert "temporary name" in said["1.2.840.99.part"][1]
    assert said["notes.txt"][0] == logging.DEBUG
    assert skip_reason(folder / "IMG0001.JPG") is None and is_scan_file(folder / "clip")


def test_edge_classify_warns_about_what_it_left_out(tmp_path, model):
    folder = tmp_path / "USB"
    folder.mkdir()
    cv2.imwrite(str(folder / "IMG0001.JPG"), speckle_scan())
    (folder / "CINE0003.GIF").write_bytes(b"GIF89a" + b"\x00" * 40)
    status, _, err = run(folder, "--model", model)
    assert status == 0
    assert "CINE0003.GIF: not taken as a scan: GIF, a format edge-classify does not read" in err


# ----------------------------------------------------------------------- 7. watch mode


def write_dicom_cine(path: Path, count: int = 20) -> bytes:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    frames = np.stack([speckle_scan((96, 128), seed=i) for i in range(count)])
    make_dicom(path, frames, rows=96, columns=128, frames=count)
    return path.read_bytes()


def watch_records(output: Path) -> list[dict]:
    if not output.exists():
        return []
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_a_cine_copied_in_with_a_long_stall_is_recorded_once_whole(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    whole = write_dicom_cine(tmp_path / "whole.dcm")
    cine = folder / "cine.dcm"
    cine.write_bytes(whole[: len(whole) * 45 // 100])  # the copy stalls here, past --settle
    now = [time.time() + 10]
    options = WatchOptions(folder, output, settle_s=2.0, error_hold_s=60.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        ready, _ = watcher._poll(count_skipped=False)
        watcher._process(ready)  # some frames, then an error: held, not written
        assert watch_records(output) == []
        now[0] += 5
        with open(cine, "ab") as handle:  # the copy resumes and completes
            handle.write(whole[len(whole) * 45 // 100 :])
        os.utime(cine, (now[0], now[0]))
        now[0] += 3
        ready, _ = watcher._poll(count_skipped=False)
        watcher._process(ready)
        watcher.run(_stopped())  # stopping writes what is held: nothing is
    records = watch_records(output)
    assert [r["frame"] for r in records[:-1]] == list(range(20))
    assert all(r["error"] is None for r in records[:-1])
    assert records[-1]["frames"] == 20


def _stopped():
    import threading

    event = threading.Event()
    event.set()
    return event


def test_a_storage_nodes_part_file_renamed_when_complete_has_one_record(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    whole = write_dicom_cine(tmp_path / "whole.dcm", 4)
    part = folder / "1.2.826.0.1.3680043.8.498.7.part"
    part.write_bytes(whole[: len(whole) // 2])
    now = [time.time() + 10]
    options = WatchOptions(folder, output, settle_s=0.0, error_hold_s=60.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        assert watcher._poll(count_skipped=False)[0] == []  # never a scan under that name
        part.write_bytes(whole)
        part.rename(folder / "1.2.826.0.1.3680043.8.498.7")
        now[0] += 1
        watcher._process(watcher._poll(count_skipped=False)[0])
        watcher.run(_stopped())
    names = {Path(r["path"]).name for r in watch_records(output)}
    assert names == {"1.2.826.0.1.3680043.8.498.7"} and len(watch_records(output)) == 5


def test_a_file_that_changes_while_it_is_read_is_read_again_once_settled(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    scan = folder / "a.png"
    cv2.imwrite(str(scan), speckle_scan(seed=1))
    now = [time.time() + 10]
    options = WatchOptions(folder, output, settle_s=2.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        real = classifier.iter_classify

        def classify_while_it_grows(paths, **kwargs):
            results = list(real(paths, **kwargs))
            cv2.imwrite(str(scan), speckle_scan((300, 400), seed=2))  # rewritten meanwhile
            os.utime(scan, (now[0], now[0]))
            return iter(results)

        classifier.iter_classify = classify_while_it_grows
        watcher._process(watcher._poll(count_skipped=False)[0])
        assert watch_records(output) == []  # what was read is not what is there now
        classifier.iter_classify = real
        now[0] += 1
        assert watcher._poll(count_skipped=False)[0] == []  # settles first
        now[0] += 2
        watcher._process(watcher._poll(count_skipped=False)[0])
    (record,) = watch_records(output)
    assert record["error"] is None


# ------------------------------------------------------------------ 11. the table's rows


def test_a_newline_in_a_file_name_never_splits_a_table_row(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "two\nlines.png"), speckle_scan())
    (folder / "broken\r\nfile.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    status, out, _ = run(folder, "--model", model)
    lines = out.splitlines()
    assert status == 1 and len(lines) == 3  # the header and one row each
    assert any(line.endswith("two\\nlines.png") for line in lines)
    assert any("broken\\r\\nfile.png: " in line and line.startswith("ERROR") for line in lines)


def test_the_table_escapes_control_characters_in_errors_too():
    stream = io.StringIO()
    writer = ResultWriter(stream, OutputFormat.TABLE, ("normal", "benign", "malignant"))
    writer.write(Failure(source="tab\there.png", error="line one\nline two"))
    (_, row) = stream.getvalue().splitlines()
    assert row.endswith("tab\\there.png: line one\\nline two")


# ----------------------------------------------------------------------------- dashboard


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("streamlit") is None,
    reason="Streamlit (the dashboard extra) is not installed: pip install -e '.[dev]'",
)
def test_the_dashboard_shows_why_a_scan_abstained(monkeypatch, model):
    from tests.test_dashboard import batch_table, open_app, upload

    blank = cv2.imencode(".png", np.zeros((120, 160), np.uint8))[1].tobytes()
    at = upload(open_app(monkeypatch, model), [("blank.png", blank)])
    assert any("Abstained: not an ultrasound scan: a blank frame" in w.value for w in at.warning)
    table = batch_table(at)
    (reason,) = table["abstain_reason"]
    assert reason.startswith(f"{NOT_A_SCAN}: a blank frame")
    assert list(table.columns).index("abstain_reason") == list(table.columns).index("abstained") + 1
