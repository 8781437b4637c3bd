"""edge-train refuses numbers out of range and an --output that cannot be a folder: exit 2,
naming the option, before TensorFlow loads (``_train`` is where it loads)."""

from __future__ import annotations

import argparse
import io

import pytest

from edge_runtime.app.status import ExitStatus
from training import cli

SMALL = ["--backbone", "small-cnn", "--weights", "none"]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("TensorFlow would have loaded")

    monkeypatch.setattr(cli, "_train", refuse)


def _usage_error(tmp_path, *options: str) -> str:
    err = io.StringIO()
    argv = [str(tmp_path), "--output", str(tmp_path / "run"), *SMALL, *options]
    assert cli.main(argv, stdout=io.StringIO(), stderr=err) == ExitStatus.USAGE
    assert not (tmp_path / "run").exists()
    return err.getvalue()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1. Got 0 instead."),
        (["--epochs", "-1"], "--epochs must be >= 0. Got -1 instead."),
        (["--frozen-epochs", "-2"], "--frozen-epochs must be >= 0. Got -2 instead."),
        (["--epochs", "0", "--frozen-epochs", "0"], "--epochs 0 with --frozen-epochs 0 trains"),
        (["--learning-rate", "-1"], "--learning-rate must be >= 0 (0 picks one by a short"),
        (["--learning-rate", "nan"], "--learning-rate must be >= 0"),
        (["--folds", "1"], "--folds must be 0 (no cross-validation, the default) or K >= 2"),
        (["--folds", "-3"], "--folds must be 0"),
        (["--image-size", "-64"], "--image-size must be 16 to 4096: the sides a model"),
        (["--image-size", "8"], "--image-size must be 16 to 4096"),
        (["--pixel-noise", "-0.1"], "--pixel-noise must be 0 to 1, a fraction of full scale"),
        (["--seg-weight", "inf"], "--seg-weight must be >= 0. Got inf instead."),
        (["--seed", "-1"], "--seed must be 0 to 4294967295"),
        (["--jobs", "0"], "--jobs must be >= 1. Got 0 instead."),
        (["--clutter", "nan"], "--clutter is a probability in [0, 1]. Got nan instead."),
    ],
)
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(
    tmp_path, no_training, options, message
):
    assert f"edge-train: error: {message}" in _usage_error(tmp_path, *options)


@pytest.mark.parametrize(
    "options",
    [
        ["--epochs", "0"],  # the frozen stage alone
        ["--frozen-epochs", "0"],
        ["--folds", "0"],
        ["--folds", "2"],
        ["--learning-rate", "0"],  # picked by a search
        ["--image-size", "16"],
        ["--seed", "4294967295"],
    ],
)
def test_the_edges_of_each_range_are_accepted(tmp_path, options):
    argv = [str(tmp_path), "--output", str(tmp_path / "run"), *SMALL, *options]
    args = cli.parse_arguments(argv, io.StringIO(), io.StringIO())
    assert isinstance(args, argparse.Namespace)


def test_an_output_that_is_a_file_or_lies_under_one_is_refused_before_tensorflow(
    tmp_path, no_training
):
    afile = tmp_path / "afile.txt"
    afile.write_text("notes\n")
    for output, message in (
        (afile, f"--output {afile}: exists and is not a folder"),
        (afile / "run", f"--output {afile / 'run'}: cannot be created: {afile} is not a folder"),
    ):
        err = io.StringIO()
        argv = [str(tmp_path), "--output", str(output), *SMALL]
        assert cli.main(argv, stdout=io.StringIO(), stderr=err) == ExitStatus.USAGE
        assert f"edge-train: error: {message}\n" in err.getvalue()
        assert "Traceback" not in err.getvalue()
    assert afile.read_text() == "notes\n"
