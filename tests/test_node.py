"""``edge-classify serve``: the DICOM node against real peers on loopback.

dcmtk's ``storescu``/``echoscu`` play the scanner and ``storescp`` the PACS (Debian package
``dcmtk``; skipped with a reason when absent), pynetdicom's SCU the odd peers. Every network
wait is bounded in time; every port is an ephemeral one on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason="the node extra is missing: pip install -e '.[dev]'")
pytest.importorskip("highdicom", reason="the node extra is missing: pip install -e '.[dev]'")

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from edge_runtime import Classifier
from edge_runtime.app.cli import main
from edge_runtime.app.node import Node, NodeOptions
from training.synthetic import synthetic_scan

REPO_ROOT = Path(__file__).resolve().parents[1]
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_AE = "EDGE-CLASSIFY"


# ---------------------------------------------------------------- scans and peers


def us_dataset(
    label: str = "malignant",
    seed: int = 0,
    *,
    frames: int = 1,
    jpeg: bool = False,
    size: tuple[int, int] = (300, 400),
    spacing_mm: float | None = 0.1,
) -> Dataset:
    """A synthetic ultrasound instance (US Image, or US Multi-frame for ``frames`` > 1), native
    or JPEG Baseline, with Pixel Spacing in mm when ``spacing_mm`` is given."""
    rng = np.random.default_rng(seed)
    images = np.stack([synthetic_scan(label, rng, size) for _ in range(frames)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = US_MULTIFRAME if frames > 1 else US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "US", f"P{seed}", "Test^Patient"
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "F", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "synthetic"
    ds.Rows, ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if spacing_mm is not None:
        ds.PixelSpacing = [spacing_mm, spacing_mm]
    if frames > 1:
        ds.NumberOfFrames, ds.FrameIncrementPointer, ds.FrameTime = frames, 0x00181063, 40
    if jpeg:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        encoded = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for f in images]
        ds.PixelData = encapsulate([e.tobytes() for e in encoded])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = images.tobytes()
    return ds


def write_scans(folder: Path, datasets: list[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"scan{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@functools.cache
def dcmtk(tool: str) -> str:
    """The path of dcmtk's ``tool`` on PATH. pynetdicom installs Python tools of the same names
    (storescp, storescu, ...) into the environment's bin folder, first on PATH in an activated
    environment: those are passed over (dcmtk's print ``$dcmtk:`` with ``--version``). Looked up
    once per session: asking pynetdicom's tool its version starts Python and imports pynetdicom,
    about 0.5 s of CPU, which the node benchmark had been timing four times per run."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(tool, path=folder)
        if path is None:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        if "$dcmtk:" in version.stdout + version.stderr:
            return path
    pytest.skip(f"dcmtk's {tool} not found: apt-get install -y dcmtk (as .ci/run does)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.1 s for at most ``timeout_s``; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"not within {timeout_s} s: {what}")


def records(output: Path) -> list[dict]:
    path = output / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answered_uids(output: Path) -> set[str]:
    return {r["sop_instance_uid"] for r in records(output)}


@contextlib.contextmanager
def storescp(folder: Path, port: int, ae: str = "PACS") -> Iterator[subprocess.Popen]:
    """dcmtk's storescp as the PACS, writing what it receives into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [dcmtk("storescp"), "-aet", ae, "-od", str(folder), "+xa", "+uf", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _listening(port), 20, f"storescp listening on {port}")
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pacs_answers(folder: Path, *, receiving: bool = False) -> dict[str, set[str]]:
    """Source SOP Instance UID -> the SOP Instance UIDs of the SRs the PACS received for it
    (storescp keeps every reception in its own file: one instance sent twice is one UID).
    ``receiving``: storescp may be writing a file right now; one that does not read yet is
    skipped (it is read again on the next poll), where otherwise it fails the test."""
    by_source: dict[str, set[str]] = {}
    for path in folder.glob("*"):
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            if receiving:
                continue
            raise
        if ds.SOPClassUID != SR_CLASS:
            continue
        evidence = ds.CurrentRequestedProcedureEvidenceSequence
        for study in evidence:
            for series in study.ReferencedSeriesSequence:
                for item in series.ReferencedSOPSequence:
                    if item.ReferencedSOPClassUID != SEG_CLASS:
                        by_source.setdefault(item.ReferencedSOPInstanceUID, set()).add(
                            ds.SOPInstanceUID
                        )
    return by_source


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def classifier() -> Iterator[Classifier]:
    with Classifier.default() as clf:
        yield clf


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """A native US lesion scan, a JPEG Baseline one, a 3-frame cine and a normal scan."""
    folder = tmp_path_factory.mktemp("scans")
    datasets = {
        "native": us_dataset("malignant", 1),
        "jpeg": us_dataset("malignant", 5, jpeg=True),
        "cine": us_dataset("malignant", 3, frames=3),
        "normal": us_dataset("normal", 4),
    }
    return dict(zip(datasets, write_scans(folder, list(datasets.values())), strict=True))


@contextlib.contextmanager
def running_node(classifier: Classifier, output: Path, **options) -> Iterator[Node]:
    node = Node(classifier, NodeOptions(output=output, host="127.0.0.1", port=0, **options))
    with node:
        yield node


def storescu(port: int, files: list[Path], *, ae: str = "US-ROOM1", jpeg: bool = False):
    command = [dcmtk("storescu"), "-aet", ae, "-aec", NODE_AE]
    command += ["-xy"] if jpeg else []
    command += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- the tests


def test_storescu_sends_native_jpeg_and_cine_and_each_gets_an_sr_with_the_cli_label(
    classifier, scans, tmp_path, caplog
):
    output = tmp_path / "out"
    with running_node(classifier, output) as node:
        native = storescu(node.scp.port, [scans["native"], scans["cine"], scans["normal"]])
        assert native.returncode == 0, native.stderr
        jpeg = storescu(node.scp.port, [scans["jpeg"]], jpeg=True)
        assert jpeg.returncode == 0, jpeg.stderr
        sent = {str(dcmread(p).SOPInstanceUID): name for name, p in scans.items()}
        wait_for(lambda: answered_uids(output) == set(sent), 60, "four instances answered")

    cli_out = tmp_path / "cli.jsonl"
    files = [str(scans[name]) for name in sent.values()]
    assert main([*files, "--format", "jsonl", "--output", str(cli_out), "--quiet"]) == 0
    cli = [json.loads(line) for line in cli_out.read_text().splitlines()]
    node_records = records(output)
    # the same records as edge-classify --format jsonl, with the DICOM UIDs added
    strip = ("path", "elapsed_ms")
    for name, path in scans.items():
        uid = str(dcmread(path).SOPInstanceUID)
        mine = [r for r in node_records if r["sop_instance_uid"] == uid]
        theirs = [r for r in cli if r["path"] == str(path)]
        assert len(mine) == len(theirs) == (4 if name == "cine" else 1), name
        for a, b in zip(mine, theirs, strict=True):
            assert {k: v for k, v in a.items() if k in b and k not in strip} == {
                k: v for k, v in b.items() if k not in strip
            }, name
            assert a["sr_sop_instance_uid"] and a["study_instance_uid"] == str(
                dcmread(path).StudyInstanceUID
            )

    for name, path in scans.items():
        source = dcmread(path)
        record = [r for r in node_records if r["sop_instance_uid"] == source.SOPInstanceUID][-1]
        sr_path = output / f"SR_{record['sr_sop_instance_uid']}.dcm"
        sr = hd.sr.srread(sr_path)  # highdicom parses it
        assert dcmread(sr_path).SOPClassUID == SR_CLASS  # and pydicom reads it
        report = sr.content
        groups = report.get_planar_roi_measurement_groups() or _plain_groups(report)
        (group,) = groups
        evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
        expected_label = {"malignant": "Malignant neoplastic disease", "normal": "Normal"}
        expected_label["benign"] = "Neoplasm, benign"
        assert evaluations["edge-classify label"] == expected_label[record["label"]]
        measures = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        for cls, p in record["probabilities"].items():
            assert measures[f"Probability of {cls}"][0] == pytest.approx(p, abs=1e-6)
        text = dcmread(sr_path).to_json()
        assert "not a diagnosis" in text and classifier.model_path.name in text
        if record["lesion_area_mm2"] is not None:
            assert measures["Area"] == (pytest.approx(record["lesion_area_mm2"], abs=1e-3), "mm2")
            assert measures["Diameter"][0] == pytest.approx(record["lesion_diameter_mm"], abs=1e-3)
            assert measures["Diameter"][1] == "mm"
        evidence = {
            item.ReferencedSOPInstanceUID
            for study in dcmread(sr_path).CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert source.SOPInstanceUID in evidence
        seg_uid = record["seg_sop_instance_uid"]
        if name == "cine":
            assert seg_uid is None  # highdicom refuses multi-frame US SEG: the SR names the frame
            assert "ReferencedFrameNumber" in text or "00081160" in text
            continue
        if record["lesion_bbox"] is None:
            assert seg_uid is None
            continue
        assert seg_uid in evidence
        assert group.referenced_segmentation_frame.referenced_sop_instance_uid == seg_uid
        seg = hd.seg.segread(output / f"SEG_{seg_uid}.dcm")
        assert seg.get_source_image_uids()[0][2] == source.SOPInstanceUID
        mask = seg.get_total_pixel_matrix() if seg.number_of_frames > 1 else seg.pixel_array
        assert mask.shape[-2:] == (source.Rows, source.Columns)
        assert int(np.count_nonzero(mask)) == record["lesion_area_px"]
    assert {r["label"] for r in node_records} >= {"malignant", "normal"}


def _plain_groups(report) -> list:
    """TID 1501 groups (highdicom's accessor for image-level measurement groups)."""
    return report.get_image_measurement_groups()


def test_echoscu_is_answered_and_an_unlisted_ae_title_is_rejected_and_logged(
    classifier, scans, tmp_path, caplog
):
    echoscu = dcmtk("echoscu")
    with running_node(classifier, tmp_path / "out", allow=("US-ROOM1@127.0.0.1",)) as node:
        port = str(node.scp.port)
        good = subprocess.run(
            [echoscu, "-aet", "US-ROOM1", "-aec", NODE_AE, "127.0.0.1", port],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert good.returncode == 0, good.stderr
        with caplog.at_level("WARNING", logger="edge_runtime"):
            bad = storescu(node.scp.port, [scans["native"]], ae="INTRUDER")
            assert bad.returncode != 0
            assert "Association Rejected" in bad.stderr or "rejected" in bad.stderr.lower()
        assert any("rejected association from INTRUDER@127.0.0.1" in m for m in caplog.messages)
        assert list((tmp_path / "out" / ".spool" / "received").iterdir()) == []
    assert records(tmp_path / "out") == []


def test_without_allow_only_this_machine_may_send():
    from edge_runtime.app.node import AllowList

    default = AllowList.parse([])
    assert default.allows("ANY", "127.0.0.1") and default.allows("ANY", "::1")
    assert not default.allows("ANY", "10.0.0.5")
    listed = AllowList.parse(["US-ROOM1@10.0.0.21", "US-ROOM2"])
    assert listed.allows("US-ROOM1", "10.0.0.21") and listed.allows("US-ROOM1", "::ffff:10.0.0.21")
    assert not listed.allows("US-ROOM1", "10.0.0.22") and not listed.allows("OTHER", "127.0.0.1")
    assert listed.allows("US-ROOM2", "192.168.1.9")
    with pytest.raises(ValueError, match="AE title of 1 to 16"):
        AllowList.parse(["A-TITLE-FAR-TOO-LONG"])
    for empty_host in ("US ROOM@", "US-ROOM1@ ", "US-ROOM1@[]"):  # was: any address
        with pytest.raises(ValueError, match="'@' with no host after it"):
            AllowList.parse([empty_host])


def test_a_refused_sop_class_is_rejected_in_the_association_not_accepted_then_dropped(
    classifier, tmp_path
):
    from pynetdicom import AE

    with running_node(classifier, tmp_path / "out") as node:
        ae = AE(ae_title="US-ROOM1")
        ae.add_requested_context(CT_IMAGE)
        ae.add_requested_context(US_IMAGE)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
        try:
            assert assoc.is_established
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
            assert accepted == {US_IMAGE} and rejected == {CT_IMAGE}
            ct = us_dataset()
            ct.SOPClassUID = CT_IMAGE
            with pytest.raises(ValueError, match="No presentation context"):
                assoc.send_c_store(ct)
        finally:
            assoc.release()


def test_garbage_an_abort_and_a_dataset_without_pixels_never_stop_the_node(
    classifier, scans, tmp_path, caplog
):
    from pynetdicom import AE

    output = tmp_path / "out"
    rng = np.random.default_rng(0)
    with running_node(classifier, output) as node, caplog.at_level("INFO", logger="edge_runtime"):
        port = node.scp.port
        garbage_ports = []
        for payload in (rng.bytes(4096), b"\x01\x00\x00\x00\xff\xff\xff\xff" + rng.bytes(64)):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                garbage_ports.append(sock.getsockname()[1])
                sock.sendall(payload)
                sock.settimeout(5)
                with contextlib.suppress(OSError):
                    sock.recv(1024)  # the node answers with an abort or closes
        ae = AE(ae_title="US-ROOM1")
        ae.add_requested_context(US_IMAGE)
        aborted = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert aborted.is_established
        aborted.abort()
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert assoc.is_established
        empty = us_dataset()
        del empty.PixelData
        status = assoc.send_c_store(empty)
        assert status.Status == 0xA900
        good = dcmread(scans["native"])
        assert assoc.send_c_store(good).Status == 0x0000
        assoc.release()
        wait_for(lambda: answered_uids(output) == {good.SOPInstanceUID}, 30, "answer")
    assert any("no pixel data: refused with 0xA900" in m for m in caplog.messages)
    assert any("aborted" in m for m in caplog.messages)
    for number in garbage_ports:  # one line each, naming the peer
        lines = [m for m in caplog.messages if f"connection from 127.0.0.1:{number} " in m]
        assert len(lines) == 1 and "without an association" in lines[0], lines


def test_an_instance_without_its_type2_patient_attributes_still_gets_its_sr(tmp_path):
    """Scanners leave out Type 2 attributes (Patient's Birth Date, Sex, Referring Physician's
    Name...); highdicom copies them into the SR, so the node fills them in empty."""
    import highdicom as hd
    from pydicom import dcmread

    from edge_runtime.app.node.answers import TYPE2_COPIED

    ds = us_dataset("malignant", 11)
    for keyword in TYPE2_COPIED:
        delattr(ds, keyword)
    (path,) = write_scans(tmp_path / "in", [ds])
    with Classifier.default() as classifier, running_node(classifier, tmp_path / "out") as node:
        assert storescu(node.scp.port, [path]).returncode == 0
        wait_for(lambda: any((tmp_path / "out").glob("SR_*.dcm")), 60, "the SR")
    (sr_path,) = (tmp_path / "out").glob("SR_*.dcm")
    sr = hd.sr.ComprehensiveSR.from_dataset(dcmread(sr_path))
    assert sr.PatientBirthDate == "" and str(sr.SOPInstanceUID)


def test_a_resent_duplicate_is_acknowledged_and_answered_once(classifier, scans, tmp_path):
    output = tmp_path / "out"
    with running_node(classifier, output) as node:
        for _ in range(2):
            done = storescu(node.scp.port, [scans["native"]])
            assert done.returncode == 0, done.stderr
        uid = str(dcmread(scans["native"]).SOPInstanceUID)
        wait_for(lambda: answered_uids(output) == {uid}, 30, "answer")
        again = storescu(node.scp.port, [scans["native"]])  # after it was answered
        assert again.returncode == 0, again.stderr
        time.sleep(1.0)
    assert len(records(output)) == 1
    assert len(list(output.glob("SR_*.dcm"))) == 1


def test_scanners_may_send_large_pdus_and_each_new_instance_is_reported_once_stored(
    classifier, scans, tmp_path
):
    """The SCP accepts P-DATA PDUs up to 1 MiB (a scan in one PDU, not 8 of pynetdicom's default
    16 KiB), and ``on_stored`` hears of each new instance once (a re-sent one is not stored)."""
    from pynetdicom import AE

    from edge_runtime.app.node.scp import MAX_PDU_BYTES

    stored: list[tuple[str, float]] = []
    options = NodeOptions(output=tmp_path / "out", host="127.0.0.1", port=0, answer_processes=0)
    before = time.time()
    with Node(classifier, options, on_stored=lambda uid, at: stored.append((uid, at))) as node:
        ae = AE(ae_title="US-ROOM1")
        ae.add_requested_context(US_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=NODE_AE)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == MAX_PDU_BYTES == 1 << 20
        assoc.release()
        sent = storescu(node.scp.port, [scans["native"], scans["native"]])  # the 2nd: a duplicate
        assert sent.returncode == 0, sent.stderr
        ((uid, at),) = stored
    assert uid == str(dcmread(scans["native"]).SOPInstanceUID)
    assert before <= at <= time.time()


def test_a_restart_answers_what_was_received_but_not_answered_exactly_once(
    classifier, scans, tmp_path
):
    from edge_runtime.app.node import Spool, Worker

    output = tmp_path / "out"
    spool = Spool(output / ".spool")
    uids = []
    for name in ("native", "normal"):
        ds = dcmread(scans[name])
        spool.store(str(ds.SOPInstanceUID), scans[name].read_bytes())
        uids.append(str(ds.SOPInstanceUID))
    with Worker(classifier, spool, output, answer_processes=0) as worker:  # on its thread
        worker.answer(spool.take(1, 1.0))  # the first answered, then a "crash"
    (output / "results.jsonl").open("a").write('{"sop_instance_uid": "' + uids[1] + '", "lab')
    with Worker(classifier, Spool(output / ".spool"), output) as second:  # the restart
        second.answer(second.spool.take(10, 1.0))
        assert [r["sop_instance_uid"] for r in records(output)] == uids
        assert second.spool.take(10, 0.1) == []


# ---------------------------------------------------------------- forwarding


def test_a_pacs_that_is_down_then_up_receives_every_answer_once(classifier, scans, tmp_path):
    output, pacs = tmp_path / "out", tmp_path / "pacs"
    pacs_port = free_port()
    options = {"forward": f"PACS@127.0.0.1:{pacs_port}", "retry_min_s": 0.2, "retry_max_s": 1.0}
    files = [scans["native"], scans["cine"], scans["normal"]]
    with running_node(classifier, output, **options) as node:
        assert storescu(node.scp.port, files).returncode == 0
        wait_for(lambda: len(answered_uids(output)) == 3, 60, "three answered")
        # the JSON lines come before the markers and the queue's release: wait for the release
        wait_for(lambda: node.worker.stats.answered == 3, 30, "three released to the queue")
        queued = sorted(p.name for p in (output / ".spool" / "outbox").glob("*.dcm"))
        assert len(queued) == len(list(output.glob("S*_*.dcm")))  # everything waits on disk
        with storescp(pacs, pacs_port):
            wait_for(lambda: not list((output / ".spool" / "outbox").glob("*.dcm")), 30, "sent")
            received = sorted(p.name for p in pacs.iterdir())
    sources = {str(dcmread(p).SOPInstanceUID) for p in files}
    by_source = pacs_answers(pacs)
    assert set(by_source) == sources and all(len(v) == 1 for v in by_source.values())
    assert len(received) == len(queued)
    assert node.forwarder.sent == len(queued) and node.forwarder.rejected == 0


def test_a_pacs_that_rejects_is_told_apart_from_one_that_is_down(
    classifier, scans, tmp_path, caplog
):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(ComprehensiveSRStorage)
    pacs.add_supported_context(SegmentationStorage)
    server = pacs.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    try:
        port = server.server_address[1]
        output = tmp_path / "out"
        options = {"forward": f"PACS@127.0.0.1:{port}", "retry_min_s": 0.2, "retry_max_s": 1.0}
        with (
            caplog.at_level("WARNING", logger="edge_runtime"),
            running_node(classifier, output, **options) as node,
        ):
            assert storescu(node.scp.port, [scans["native"]]).returncode == 0
            rejected = output / ".spool" / "outbox" / "rejected"
            wait_for(lambda: len(list(rejected.glob("*.dcm"))) >= 1, 60, "rejected answers")
            wait_for(lambda: not list(rejected.parent.glob("*.dcm")), 30, "queue emptied")
        reason = json.loads(next(rejected.glob("*.json")).read_text())
        assert reason["status"] == "0xA700" and "out of resources" in reason["meaning"]
        assert any("rejected SR_" in m and "0xA700" in m for m in caplog.messages)
        assert not any("is down" in m for m in caplog.messages)
    finally:
        server.shutdown()


def test_sigkill_mid_burst_loses_nothing_and_duplicates_nothing_at_the_pacs(tmp_path):
    """The node as a process (edge-classify serve), killed with SIGKILL while a scanner sends;
    restarted, every acknowledged instance has exactly one SR at the PACS."""
    from pynetdicom import AE

    burst = write_scans(tmp_path / "burst", [us_dataset("malignant", 100 + i) for i in range(24)])
    output, pacs = tmp_path / "out", tmp_path / "pacs"
    node_port, pacs_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "edge_runtime.app.cli", "serve", "--output", str(output),
        "--host", "127.0.0.1", "--port", str(node_port),
        "--forward", f"PACS@127.0.0.1:{pacs_port}",
    ]  # fmt: skip

    def start() -> subprocess.Popen:
        log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        wait_for(lambda: _listening(node_port) or process.poll() is not None, 60, "node up")
        assert process.poll() is None, (tmp_path / "node.log").read_text()
        return process

    acknowledged: list[str] = []

    def send(paths: list[Path]) -> None:
        ae = AE(ae_title="US-ROOM1")
        ae.add_requested_context(US_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node_port, ae_title=NODE_AE)
        if not assoc.is_established:
            return
        for path in paths:
            ds = dcmread(path)
            status = assoc.send_c_store(ds)
            if status is None or "Status" not in status or status.Status != 0:
                break
            acknowledged.append(str(ds.SOPInstanceUID))
        if assoc.is_established:
            assoc.release()

    with storescp(pacs, pacs_port):
        node = start()
        sender = threading.Thread(target=send, args=(burst,), daemon=True)
        sender.start()
        wait_for(lambda: len(acknowledged) >= 8, 60, "eight acknowledged")
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=10)
        sender.join(timeout=30)
        assert 8 <= len(acknowledged) < len(burst), "the kill came mid-burst"
        node = start()
        send(burst)  # the scanner sends everything again, acknowledged ones too
        try:
            wait_for(
                lambda: set(acknowledged) <= set(pacs_answers(pacs, receiving=True)),
                90,
                "every acknowledged SR",
            )
            time.sleep(1.0)  # anything sent twice would arrive now
        finally:
            node.send_signal(signal.SIGINT)
            node.wait(timeout=30)
    by_source = pacs_answers(pacs)
    assert set(by_source) == {str(dcmread(p).SOPInstanceUID) for p in burst}
    assert all(len(srs) == 1 for srs in by_source.values()), by_source
    uids = [r["sop_instance_uid"] for r in records(output)]
    assert sorted(uids) == sorted(set(uids)) and len(uids) == len(burst)
