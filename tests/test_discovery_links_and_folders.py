"""Finding scans the same way everywhere (``edge-classify PATH...`` and ``watch``): links that lead
nowhere, files reached twice, folders that cannot be listed, pipes; and ``watch`` never writing
into a file that is not its own (a new user's ``watch DIR --output DIR/scan.png`` appended JSON
to the scan)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from edge_runtime.app.cli import main
from edge_runtime.io.sources import expand_sources
from tests.onnx_models import make_contract_model
from tests.test_cli import write_scan

DICOM_HEAD = b"\x00" * 128 + b"DICM" + b"\x00" * 16


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def watch_once(folder: Path, output: Path, model: Path, *extra: object) -> tuple[int, str]:
    status, _, err = run(
        "watch", folder, "--output", output, "--model", model, "--once", "--settle", "0", *extra
    )
    return status, err


def records(output: Path) -> list[dict]:
    if not output.exists():
        return []
    return [json.loads(line) for line in output.read_text().splitlines() if line.strip()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- watch writes only into its own files ------------------------------------------------------


def test_watch_refuses_an_output_that_is_a_scan_in_the_watched_folder(tmp_path, model):
    folder = tmp_path / "fu-w3"
    scan = write_scan(folder / "good1.png")
    write_scan(folder / "good2.png", seed=1)
    before, names = digest(scan), listing(folder)
    status, err = watch_once(folder, scan, model)
    assert status == 2, err
    assert digest(scan) == before and listing(folder) == names  # no state, no lock, no record
    assert "good1.png" in err and "is a scan (a PNG image)" in err
    assert "not a result record" not in err and "cutting off" not in err


def test_watch_refuses_an_output_that_is_a_scan_outside_the_folder(tmp_path, model):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    dicom = tmp_path / "IMG0001"  # a DICOM file with no suffix: its bytes say what it is
    dicom.write_bytes(DICOM_HEAD + b"\x00" * 64)
    before = digest(dicom)
    status, err = watch_once(folder, dicom, model)
    assert status == 2 and digest(dicom) == before
    assert "IMG0001" in err and "a DICOM file" in err
    assert listing(tmp_path) == ["IMG0001", "in"]  # no state file, no lock beside it


def test_watch_refuses_an_output_the_watcher_would_take_for_a_scan(tmp_path, model):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    status, err = watch_once(folder, folder / "results.png", model)
    assert status == 2
    assert "results.png" in err and "a scan's name (.png)" in err
    assert listing(folder) == ["a.png"]


def test_watch_refuses_an_existing_file_that_is_not_a_results_file(tmp_path, model):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    table = tmp_path / "today.csv"
    table.write_bytes(b"path,label\nx.png,benign")  # no newline at the end: would be cut off
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"note": "a JSON line, not a result record"}\n')
    for path in (table, notes):
        before = digest(path)
        status, err = watch_once(folder, path, model)
        assert status == 2 and digest(path) == before
        assert path.name in err and "not a results file" in err


def test_watch_refuses_a_state_file_that_is_a_scan_or_the_output(tmp_path, model):
    folder = tmp_path / "in"
    scan = write_scan(folder / "a.png")
    output = tmp_path / "out.jsonl"
    before = digest(scan)
    status, err = watch_once(folder, output, model, "--state", scan)
    assert status == 2 and digest(scan) == before and not output.exists()
    assert "--state" in err and "a.png" in err and "is a scan" in err
    status, err = watch_once(folder, output, model, "--state", output)
    assert status == 2 and not output.exists()
    assert "the same file as --output" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    status, err = watch_once(folder, output, model, "--state", notes)
    assert status == 2 and notes.read_text() == "my notes\n"
    assert "not a watch state file" in err


def test_watch_keeps_appending_to_its_own_results_file_inside_the_folder(tmp_path, model):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    output = folder / "results.jsonl"
    assert watch_once(folder, output, model)[0] == 0
    write_scan(folder / "b.png", seed=1)
    status, err = watch_once(folder, output, model)
    assert status == 0, err
    assert sorted(Path(r["path"]).name for r in records(output)) == ["a.png", "b.png"]


def test_watch_takes_a_results_file_whose_only_record_a_crash_cut_off(tmp_path, model):
    folder = tmp_path / "in"
    scan = write_scan(folder / "a.png")
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"path": str(scan), "label": None, "error": None})[:20])
    status, err = watch_once(folder, output, model)
    assert status == 0, err
    assert [Path(r["path"]).name for r in records(output)] == ["a.png"]


# --- folders that cannot be listed --------------------------------------------------------------


@pytest.fixture
def locked(monkeypatch):
    """``os.scandir`` refuses folders named ``noperm``, as for a mode-000 folder and a user who
    is not root (root reads it whatever its mode)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path).rstrip(os.sep)) == "noperm":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_a_problem_naming_it(tmp_path, locked):
    write_scan(tmp_path / "top" / "ok" / "a.png")
    write_scan(tmp_path / "top" / "noperm" / "b.png")
    files, problems = expand_sources([str(tmp_path / "top")])
    assert [p.name for p in files] == ["a.png"]
    assert problems == [
        (str(tmp_path / "top" / "noperm"), "folder cannot be listed: permission denied")
    ]
    files, problems = expand_sources([str(tmp_path / "top" / "noperm")])  # named itself
    assert files == []
    assert problems == [
        (str(tmp_path / "top" / "noperm"), "folder cannot be listed: permission denied")
    ]


def test_a_glob_over_a_folder_that_cannot_be_listed_says_so(tmp_path, locked):
    write_scan(tmp_path / "top" / "noperm" / "b.png")
    files, problems = expand_sources([str(tmp_path / "top" / "*")])
    assert files == []
    assert problems == [
        (str(tmp_path / "top" / "noperm"), "folder cannot be listed: permission denied")
    ]


def test_edge_classify_reports_a_folder_it_cannot_list_and_goes_on(
    tmp_path, model, locked, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_scan(tmp_path / "a.png")
    write_scan(tmp_path / "noperm" / "b.png")
    status, out, err = run(".", "--model", model, "--format", "jsonl")
    assert status == 1
    assert "noperm: folder cannot be listed: permission denied" in err
    by_name = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert by_name["a.png"]["error"] is None
    assert by_name["noperm"]["error"] == "folder cannot be listed: permission denied"


def test_edge_classify_on_a_folder_it_cannot_list_gives_the_reason(tmp_path, model, locked):
    (tmp_path / "noperm").mkdir()
    status, _, err = run(tmp_path / "noperm", "--model", model)
    assert status == 2
    assert "noperm: folder cannot be listed: permission denied" in err
    assert "folder contains no images" not in err


def test_watch_reports_a_folder_it_cannot_list_once_with_a_record(tmp_path, model, locked):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    write_scan(folder / "a.png")
    write_scan(folder / "noperm" / "b.png")
    status, err = watch_once(folder, output, model)
    assert status == 1, err
    assert err.count("noperm: folder cannot be listed: permission denied") == 1
    by_name = {Path(r["path"]).name: r for r in records(output)}
    assert set(by_name) == {"a.png", "noperm"}
    assert by_name["noperm"]["error"] == "folder cannot be listed: permission denied"
    assert by_name["noperm"]["label"] is None
    status, err = watch_once(folder, output, model)  # said again, recorded once
    assert "noperm: folder cannot be listed" in err
    assert len(records(output)) == 2


# --- links: one predicate for edge-classify and watch -------------------------------------------


@pytest.fixture
def linked(tmp_path) -> Path:
    folder = tmp_path / "links"
    write_scan(folder / "a.png")
    (folder / "dang.png").symlink_to(tmp_path / "gone.png")
    (folder / "IMGDANGLE").symlink_to(tmp_path / "gone")
    (folder / "loop1").symlink_to(folder / "loop2")
    (folder / "loop2").symlink_to(folder / "loop1")
    (folder / "loopx").symlink_to(folder / "loop1")  # into the loop: its real path is loop1's
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "loopA").symlink_to(folder / "loopB")
    (folder / "loopB").symlink_to(folder / "loopA")
    return folder


LEAD_NOWHERE = ["IMGDANGLE", "dang.png", "loop.png", "loop1", "loop2", "loopA", "loopB", "loopx"]


def test_every_link_that_leads_nowhere_is_taken_under_its_own_name(linked):
    files, problems = expand_sources([str(linked)])
    assert problems == []
    assert sorted(p.name for p in files) == sorted(["a.png", *LEAD_NOWHERE])
    files, _ = expand_sources([str(linked / "loop1"), str(linked / "loopx")])
    assert [p.name for p in files] == ["loop1", "loopx"]


def test_edge_classify_and_watch_give_links_that_lead_nowhere_the_same_records(
    linked, tmp_path, model
):
    status, out, _ = run(linked, "--model", model, "--format", "jsonl")
    classify = {Path(r["path"]).name: r["error"] for r in map(json.loads, out.splitlines())}
    assert status == 1
    output = tmp_path / "out.jsonl"
    status, err = watch_once(linked, output, model)
    watched = {Path(r["path"]).name: r["error"] for r in records(output)}
    assert status == 1, err
    assert watched == classify
    assert sorted(watched) == sorted(["a.png", *LEAD_NOWHERE])
    assert watched["dang.png"] == "dangling symbolic link"
    assert all("symbolic links" in watched[name] for name in LEAD_NOWHERE if "loop" in name)


def test_a_file_named_again_under_another_name_is_classified_once_with_a_word(tmp_path, caplog):
    scan = write_scan(tmp_path / "a.png")
    (tmp_path / "link.png").symlink_to(scan)
    items = [str(scan), str(tmp_path / "link.png"), str(scan), str(tmp_path / "link.png")]
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        files, problems = expand_sources(items)
    assert files == [scan] and problems == []
    said = [r.getMessage() for r in caplog.records if "the same file as" in r.getMessage()]
    assert said == [f"{tmp_path / 'link.png'}: the same file as {scan}; classified once"]


def test_a_link_in_a_folder_to_a_file_taken_is_said_by_edge_classify_and_watch(tmp_path, model):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    status, out, err = run(folder, "--model", model, "--format", "jsonl")
    assert status == 0 and len(out.splitlines()) == 1
    assert err.count("b.png: the same file as") == 1 and "classified once" in err
    output = tmp_path / "out.jsonl"
    status, err = watch_once(folder, output, model)
    assert status == 0 and len(records(output)) == 1
    assert err.count("b.png: the same file as") == 1


def test_edge_classify_says_once_that_a_link_named_is_a_file_named_before(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    (tmp_path / "link.png").symlink_to(scan)
    status, out, err = run(scan, tmp_path / "link.png", scan, "--model", model, "--format", "jsonl")
    assert status == 0 and len(out.splitlines()) == 1
    assert err.count("link.png: the same file as") == 1 and "classified once" in err


def test_a_named_pipe_in_a_folder_is_left_out_with_a_word_not_read(tmp_path, caplog):
    folder = tmp_path / "in"
    write_scan(folder / "a.png")
    pipe = folder / "IMG0002"  # no suffix: sniffing would open it and wait for a writer
    os.mkfifo(pipe)
    found: list = []
    worker = threading.Thread(target=lambda: found.append(expand_sources([str(folder)])))
    worker.daemon = True
    with caplog.at_level(logging.DEBUG, logger="edge_runtime"):
        worker.start()
        worker.join(10)
        if worker.is_alive():  # release the blocked reader, then fail
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(10)
            pytest.fail("expand_sources opened a named pipe and waited on it")
    ((files, problems),) = found
    assert [p.name for p in files] == ["a.png"] and problems == []
    assert any(
        "IMG0002: not taken as a scan: not a regular file" in r.getMessage() for r in caplog.records
    )
