"""edge-train and edge-export behave like edge-classify: exit statuses, quiet errors, fast help."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.app.shell import run_command
from edge_runtime.app.status import ExitStatus

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_a_wrong_path_answer_before_tensorflow_loads(tmp_path):
    """One fresh interpreter runs all four; TensorFlow must still be absent at the end."""
    script = f"""
import contextlib, io, json, sys
from export.cli import main as export_main
from training.cli import main as train_main
missing = {str(tmp_path / "missing")!r}
out = io.StringIO()
with contextlib.redirect_stdout(out):
    statuses = [
        int(train_main(["--help"])),
        int(export_main(["--help"])),
        int(train_main([missing, "--output", missing + "-run"], stderr=out)),
        int(export_main([missing, "--output", missing + "-export"], stderr=out)),
    ]
print(json.dumps({{"statuses": statuses, "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules, "text": out.getvalue()}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["statuses"] == [0, 0, 2, 2]
    assert not report["tensorflow"] and not report["keras"]
    assert "usage: edge-train" in report["text"] and "usage: edge-export" in report["text"]
    assert f"edge-train: error: {tmp_path / 'missing'}: no such file or folder" in report["text"]
    assert f"edge-export: error: {tmp_path / 'missing'}: run folder not found" in report["text"]
    assert not (tmp_path / "missing-run").exists() and not (tmp_path / "missing-export").exists()


def test_exit_statuses_are_those_of_edge_classify_with_130_for_ctrl_c():
    from edge_runtime.app.cli import ExitStatus as ClassifyStatus

    assert ClassifyStatus is ExitStatus
    assert (ExitStatus.SUCCESS, ExitStatus.PARTIAL, ExitStatus.USAGE) == (0, 1, 2)
    assert ExitStatus.GATE_FAILED is ExitStatus.PARTIAL
    assert ExitStatus.INTERRUPTED == 130


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


def test_a_usage_error_is_one_line_and_traceback_shows_the_stack():
    err = io.StringIO()
    status = run_command("edge-x", _raise(ValueError("data/: no images")), stderr=err)
    assert status == ExitStatus.USAGE and err.getvalue() == "edge-x: error: data/: no images\n"
    with pytest.raises(ValueError, match="no images"):
        run_command("edge-x", _raise(ValueError("no images")), stderr=err, traceback=True)


def test_ctrl_c_is_130_and_a_bug_says_how_to_see_its_stack():
    err = io.StringIO()
    assert run_command("edge-x", _raise(KeyboardInterrupt()), stderr=err) == 130
    status = run_command("edge-x", _raise(TypeError("unsupported format")), stderr=err)
    assert status == ExitStatus.INTERNAL_ERROR and status not in (1, 2)
    assert "edge-x: internal error: TypeError: unsupported format" in err.getvalue()
    assert "rerun with --traceback" in err.getvalue()


def test_a_closed_pipe_ends_quietly():
    err = io.StringIO()
    assert run_command("edge-x", _raise(BrokenPipeError()), stderr=err) == ExitStatus.PARTIAL
    assert err.getvalue() == ""


def test_a_failed_edge_train_removes_the_run_folder_it_made_and_keeps_one_it_found(tmp_path):
    from training.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    err = io.StringIO()
    run = tmp_path / "run"
    assert main([str(empty), "--output", str(run)], stderr=err) == ExitStatus.USAGE
    assert f"edge-train: error: {empty}" in err.getvalue()
    assert f"edge-train: removed {run}: nothing was trained" in err.getvalue()
    assert not run.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main([str(empty), "--output", str(kept)], stderr=io.StringIO()) == ExitStatus.USAGE
    assert kept.is_dir()  # not ours to remove


def test_edge_export_defaults_are_those_of_its_typed_config():
    pytest.importorskip("tf2onnx")
    from export.cli import build_parser
    from export.pipeline import ExportOptions
    from export.quantize import QuantConfig

    args = build_parser().parse_args(["run", "--output", "out"])
    options, quant = ExportOptions(Path("run"), Path("out")), QuantConfig()
    assert args.min_agreement == options.min_agreement
    assert args.max_accuracy_drop == options.max_accuracy_drop
    assert (args.recheck, args.fp16, args.name) == (options.recheck, options.fp16, options.name)
    assert args.calibration_images == quant.max_calibration_images
    assert args.float_convs == quant.float_convs
    assert args.activations == quant.activations.value
    assert args.calibration == quant.calibration.value


@pytest.mark.parametrize(
    ("command", "extra", "absent"),
    [("edge-export", "export", "onnx"), ("edge-train", "train", "keras")],
)
def test_without_its_extra_a_command_says_which_to_install(
    monkeypatch, tmp_path, command, extra, absent
):
    """The base install has neither: ``--help`` works and names the extra; a run answers with
    the extra to install, not a traceback or an "internal error"."""
    import importlib.util

    from export.cli import main as export_main
    from training.cli import main as train_main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a)
    )
    main = {"edge-export": export_main, "edge-train": train_main}[command]
    argv = [str(tmp_path), "--output", str(tmp_path / "out")]
    stdout = io.StringIO()
    assert main(["--help"], stdout=stdout, stderr=io.StringIO()) == ExitStatus.SUCCESS
    hint = f"pip install '.[{extra}]' in a clone of edge-classify, or 'edge-classify[{extra}]'"
    assert hint in " ".join(stdout.getvalue().split())
    stderr = io.StringIO()
    assert main(argv, stdout=io.StringIO(), stderr=stderr) == ExitStatus.USAGE
    message = stderr.getvalue()
    assert hint in message and absent in message, message
    assert "Traceback" not in message and "internal error" not in message


@pytest.mark.parametrize(
    ("subcommand", "extra", "absent"),
    [("serve", "node", "pydicom"), ("serve", "node", "highdicom"), ("adapt", "adapt", None)],
)
def test_the_help_of_a_subcommand_with_an_extra_names_it(
    monkeypatch, tmp_path, subcommand, extra, absent
):
    """``--help`` names the extra; ``serve`` without it says which to install, also when the
    ``dicom`` extra's pydicom is missing (importing the node package needs pydicom: the message
    was "No module named 'pydicom'")."""
    import importlib.util

    from edge_runtime.app.cli import main

    stdout = io.StringIO()
    assert main([subcommand, "--help"], stdout=stdout, stderr=io.StringIO()) == 0
    hint = f"pip install '.[{extra}]' in a clone of edge-classify, or 'edge-classify[{extra}]'"
    assert hint in " ".join(stdout.getvalue().split())
    if absent is None:
        return
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a)
    )
    stderr = io.StringIO()
    argv = [subcommand, "--output", str(tmp_path / "out")]
    assert main(argv, stdout=io.StringIO(), stderr=stderr) == ExitStatus.USAGE
    message = stderr.getvalue()
    assert hint in message and absent in message, message
