"""``edge-classify PATH...``'s output: the format its ``--output`` names, records in the order the
inputs were named, CSV cells no spreadsheet takes for a formula, and a reader that leaves."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.app.output import OutputFormat, ResultWriter
from edge_runtime.classifier import Failure
from tests.onnx_models import CLASSES, make_contract_model
from tests.test_cli import jsonl, run, write_scan


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("today.csv", "csv"), ("today.jsonl", "jsonl"), ("TODAY.NDJSON", "jsonl"), ("x.txt", "table")],
)
def test_without_format_the_output_suffix_chooses_it(tmp_path, model, name, expected):
    """``--output today.csv`` wrote the text table into the .csv file."""
    scan = write_scan(tmp_path / "a.png")
    target = tmp_path / name
    status, out, err = run(scan, "--model", model, "--output", target)
    assert status == 0 and out == "" and "--format" not in err, err
    text = target.read_text()
    if expected == "csv":
        assert [row["path"] for row in csv.DictReader(io.StringIO(text))] == [str(scan)]
    elif expected == "jsonl":
        assert [record["path"] for record in jsonl(text)] == [str(scan)]
    else:
        assert text.split()[:2] == ["label", "conf"]


def test_an_explicit_format_that_differs_from_the_suffix_is_kept_with_a_warning(tmp_path, model):
    scan = write_scan(tmp_path / "a.png")
    target = tmp_path / "today.csv"
    status, _, err = run(scan, "--model", model, "--format", "jsonl", "--output", target)
    assert status == 0
    assert [record["path"] for record in jsonl(target.read_text())] == [str(scan)]
    assert f"--output {target}: writing jsonl, as --format says, though its suffix .csv" in err
    status, _, err = run(scan, "--model", model, "--format", "csv", "--output", target)
    assert status == 0 and "--format" not in err  # they agree: no word


def test_records_come_in_the_order_the_inputs_were_named(tmp_path, model, monkeypatch):
    """Inputs that yield no scan were written before every scan's record."""
    monkeypatch.chdir(tmp_path)
    write_scan(tmp_path / "good1.png", seed=1)
    write_scan(tmp_path / "good two.png", seed=2)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    named = ["good1.png", "missing.png", "good two.png", "empty", "text.png", "gone.png"]
    status, out, err = run(*named, "--model", model, "--format", "csv")
    assert status == 1, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["path"] for row in rows] == named
    assert [bool(row["error"]) for row in rows] == [False, True, False, True, True, True]
    assert rows[1]["error"] == "no such file or folder"
    assert "2 classified" in err and "4 failed" in err


def test_csv_cells_a_spreadsheet_would_take_for_a_formula_start_with_a_quote(
    tmp_path, model, monkeypatch
):
    """A file named ``=1+2.png`` was written as the row's first cell unescaped (OWASP: CSV
    injection); a path that does not start with such a character is left as it is."""
    monkeypatch.chdir(tmp_path)
    for name in ("=1+2.png", "+a.png", "-b.png", "@c.png", "plain.png"):
        write_scan(tmp_path / name)
    # "./-b.png": argparse would take "-b.png" for an option; the path drops the "./"
    names = ("=1+2.png", "+a.png", "./-b.png", "@c.png", tmp_path / "plain.png")
    status, out, err = run(*names, "--model", model, "--format", "csv")
    assert status == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    paths = ["'=1+2.png", "'+a.png", "'-b.png", "'@c.png", str(tmp_path / "plain.png")]
    assert [row["path"] for row in rows] == paths
    assert all(row["label"] in CLASSES for row in rows)


def test_the_csv_writer_quotes_every_text_cell_from_outside_and_keeps_numbers():
    stream = io.StringIO()
    writer = ResultWriter(stream, OutputFormat.CSV, ["=x", "b", "c"])
    writer.write(Failure(source="\tscan.png", error='=HYPERLINK("http://x")', model_version="-1"))
    writer.write(Failure(source="/data/=scan.png", error="@SUM(1)"))
    header, *rows = list(csv.reader(io.StringIO(stream.getvalue())))
    assert header[3] == "'=x" and header[4:6] == ["b", "c"]
    first = dict(zip(header, rows[0], strict=True))
    assert first["path"] == "'\tscan.png" and first["error"] == '\'=HYPERLINK("http://x")'
    assert first["model_version"] == "'-1" and first["elapsed_ms"] == "0.0"
    second = dict(zip(header, rows[1], strict=True))
    assert second["path"] == "/data/=scan.png" and second["error"] == "'@SUM(1)"


def test_a_reader_that_leaves_ends_the_run_quietly_with_141(tmp_path, model):
    """``edge-classify DIR | head -2`` exited 1 (some inputs failed), as if a scan had failed.
    The records (~140 kB) outgrow the pipe's buffer, so the run is still writing when the
    reader closes it."""
    for i in range(200):
        write_scan(tmp_path / f"{'s' * 150}{i:03d}.png", seed=i)
    argv = [sys.executable, "-m", "edge_runtime.app.cli", str(tmp_path), "--model", str(model)]
    process = subprocess.Popen(
        [*argv, "--format", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, err
    assert json.loads(first)["path"].startswith(str(tmp_path))
    assert "Error" not in err and "Exception" not in err and "classified" not in err, err
