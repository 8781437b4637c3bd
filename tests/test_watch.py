"""``edge-classify watch``: exactly one record per scan across restarts, crashes and signals."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from edge_runtime.app.cli import main
from edge_runtime.app.watch import Watcher, WatchOptions
from edge_runtime.classifier import Classifier
from tests.onnx_models import make_contract_model
from tests.test_cli import write_scan

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


def records(output: Path) -> list[dict]:
    if not output.exists():
        return []
    return [json.loads(line) for line in output.read_text().splitlines() if line.strip()]


def watch_once(folder: Path, output: Path, model: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    argv = ["watch", str(folder), "--output", str(output), "--model", str(model), "--once"]
    status = main([*argv, "--settle", "0", *extra], stdout=io.StringIO(), stderr=err)
    return status, err.getvalue()


def spawn_watch(folder: Path, output: Path, model: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "edge_runtime.app.cli", "watch", str(folder)]
    command += ["--output", str(output), "--model", str(model), "--settle", "0"]
    command += ["--interval", "0.05", "--batch-size", "4", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def test_once_classifies_every_scan_in_the_folder_tree_and_writes_state(tmp_path, model):
    scans = [write_scan(tmp_path / "in" / sub / f"s{i}.png", seed=i) for i, sub in enumerate("aab")]
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    output = tmp_path / "out.jsonl"
    status, err = watch_once(tmp_path / "in", output, model)
    assert status == 0, err
    got = records(output)
    assert sorted(r["path"] for r in got) == sorted(os.path.abspath(p) for p in scans)
    assert all(r["error"] is None and r["label"] for r in got)
    state = json.loads((tmp_path / "out.jsonl.state.json").read_text())
    assert sorted(e["path"] for e in state["processed"]) == sorted(r["path"] for r in got)
    assert "3 files" in err


def test_the_closing_line_counts_every_line_written_file_summaries_too(tmp_path, model):
    from PIL import Image

    folder = tmp_path / "in"
    write_scan(folder / "one.png", seed=1)
    pages = [Image.open(write_scan(tmp_path / f"page{i}.png", seed=i)) for i in (2, 3)]
    pages[0].save(folder / "two.tiff", save_all=True, append_images=pages[1:])
    output = tmp_path / "out.jsonl"
    status, err = watch_once(folder, output, model)
    assert status == 0, err
    lines = output.read_text().splitlines()
    assert len(lines) == 4  # one.png, two frames of two.tiff, two.tiff's summary
    assert "2 files, 3 records (" in err and "failed) and 1 file summary, 0 skipped" in err, err


def test_a_second_run_skips_what_was_done_and_classifies_only_new_scans(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    write_scan(folder / "one.png")
    watch_once(folder, output, model)
    write_scan(folder / "two.png", seed=1)
    status, err = watch_once(folder, output, model)
    assert status == 0
    assert Counter(Path(r["path"]).name for r in records(output)) == {"one.png": 1, "two.png": 1}
    assert "1 skipped" in err


def test_a_changed_scan_is_classified_again(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    scan = write_scan(folder / "one.png", shape=(40, 40))
    watch_once(folder, output, model)
    write_scan(scan, shape=(60, 60))
    watch_once(folder, output, model)
    assert len(records(output)) == 2


def test_a_broken_scan_gets_an_error_record_and_once_exits_1(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    write_scan(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    status, err = watch_once(folder, output, model)
    by_name = {Path(r["path"]).name: r for r in records(output)}
    assert status == 1 and "Traceback" not in err
    assert by_name["bad.png"]["label"] is None and by_name["bad.png"]["error"]
    assert by_name["good.png"]["error"] is None


def test_a_crash_before_the_state_was_written_duplicates_nothing(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    for i in range(4):
        write_scan(folder / f"s{i}.png", seed=i)
    watch_once(folder, output, model)
    (tmp_path / "out.jsonl.state.json").unlink()  # as if killed between the two writes
    watch_once(folder, output, model)
    assert len(records(output)) == 4


def test_a_torn_last_record_is_cut_off_and_its_scan_classified_again(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    first, second = write_scan(folder / "a.png"), write_scan(folder / "b.png", seed=1)
    watch_once(folder, output, model)
    lines = output.read_text().splitlines(keepends=True)
    torn = next(line for line in lines if Path(json.loads(line)["path"]).name == "b.png")
    kept = [line for line in lines if line is not torn]
    output.write_text("".join(kept) + torn[: len(torn) // 2])  # killed mid-write
    (tmp_path / "out.jsonl.state.json").unlink()
    watch_once(folder, output, model)
    got = records(output)  # every line parses again
    assert Counter(r["path"] for r in got) == {
        os.path.abspath(first): 1,
        os.path.abspath(second): 1,
    }


def test_a_scan_is_ready_only_after_it_stopped_changing_for_settle_seconds(tmp_path, model):
    folder = tmp_path / "in"
    scan = write_scan(folder / "a.png")
    now = [scan.stat().st_mtime]
    options = WatchOptions(folder, tmp_path / "out.jsonl", settle_s=5.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        assert watcher._poll(count_skipped=False)[0] == []
        now[0] += 6.0
        assert [Path(p).name for p, _ in watcher._poll(count_skipped=False)[0]] == ["a.png"]
        write_scan(scan, shape=(90, 90))  # written again at (fake) now: starts over
        os.utime(scan, (now[0], now[0]))
        now[0] += 1.0
        assert watcher._poll(count_skipped=False)[0] == []
        now[0] += 5.0
        assert len(watcher._poll(count_skipped=False)[0]) == 1


def test_two_watchers_cannot_share_one_output(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    options = WatchOptions(folder, output)
    with Classifier.from_path(model) as classifier, Watcher(classifier, options):
        status, err = watch_once(folder, output, model)
    assert status == 2 and "another edge-classify watch" in err


def test_a_missing_folder_exits_2_naming_it(tmp_path, model):
    status, err = watch_once(tmp_path / "nope", tmp_path / "out.jsonl", model)
    assert status == 2 and "nope" in err and "Traceback" not in err


def test_sigkill_mid_run_then_restart_leaves_exactly_one_record_per_scan(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    names = [f"scan{i:03d}.png" for i in range(120)]
    arrived = threading.Event()

    def deliver() -> None:  # scans keep arriving while the watcher runs and is killed
        for i, name in enumerate(names):
            tmp = write_scan(folder / f".{name}", seed=i)  # hidden until complete
            os.replace(tmp, folder / name)
            if i == 20:
                arrived.set()
            time.sleep(0.005)

    process = spawn_watch(folder, output, model)
    try:
        writer = threading.Thread(target=deliver)
        writer.start()
        assert arrived.wait(30)
        wait_for(lambda: len(records(output)) >= 10)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        writer.join()
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    killed_with = len(records(output))
    assert 0 < killed_with < len(names)  # killed mid-run, with scans still to come

    status, err = watch_once(folder, output, model)
    assert status == 0, err
    counts = Counter(Path(r["path"]).name for r in records(output))
    assert sorted(counts) == names  # none lost
    assert set(counts.values()) == {1}  # none twice


def test_sigint_finishes_the_batch_writes_state_and_exits_0(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    for i in range(6):
        write_scan(folder / f"s{i}.png", seed=i)
    process = spawn_watch(folder, output, model)
    try:
        wait_for(lambda: len(records(output)) == 6)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped by signal" in err and "Traceback" not in err
    state = json.loads((tmp_path / "out.jsonl.state.json").read_text())
    assert len(state["processed"]) == 6


def test_sigterm_also_stops_cleanly(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    write_scan(folder / "a.png")
    process = spawn_watch(folder, output, model)
    try:
        wait_for(lambda: len(records(output)) == 1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped by signal" in err


def test_a_file_that_fails_then_changes_ends_with_one_record_its_final_one(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    good = write_scan(tmp_path / "whole.png", shape=(60, 80))
    scan = folder / "copy.png"
    folder.mkdir()
    scan.write_bytes(good.read_bytes()[:100])  # a copy that stalled past --settle
    now = [time.time() + 10]
    options = WatchOptions(folder, output, settle_s=5.0, error_hold_s=60.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        ready, _ = watcher._poll(count_skipped=False)
        watcher._process(ready)  # fails: held, not written
        assert records(output) == []
        scan.write_bytes(good.read_bytes())  # the copy resumes and completes
        os.utime(scan, (now[0], now[0]))
        now[0] += 2.0
        assert watcher._poll(count_skipped=False)[0] == []  # changed: settles again first
        now[0] += 4.0
        ready, _ = watcher._poll(count_skipped=False)
        watcher._process(ready)
    (record,) = records(output)
    assert record["error"] is None and record["label"]


def test_a_file_that_stays_broken_is_recorded_once_after_the_hold(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    now = [time.time() + 10]
    options = WatchOptions(folder, output, settle_s=0.0, error_hold_s=30.0)
    with (
        Classifier.from_path(model) as classifier,
        Watcher(classifier, options, clock=lambda: now[0]) as watcher,
    ):
        watcher._process(watcher._poll(count_skipped=False)[0])
        now[0] += 10
        watcher._poll(count_skipped=False)
        assert records(output) == []
        now[0] += 30
        watcher._poll(count_skipped=False)
        now[0] += 100
        watcher._poll(count_skipped=False)
    (record,) = records(output)
    assert record["label"] is None and "empty image" in record["error"]


def test_watch_takes_a_file_reached_by_two_names_once(tmp_path, model):
    folder, output = tmp_path / "in", tmp_path / "out.jsonl"
    write_scan(folder / "a.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    (folder / "loop").symlink_to(folder)  # a link back up: walked once, no cycle
    status, err = watch_once(folder, output, model)
    assert status == 0, err
    assert [Path(r["path"]).name for r in records(output)] == ["a.png"]
