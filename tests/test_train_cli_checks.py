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


@pytest.mark.parametrize(
    ("backbone", "weights", "message"),
    [
        ("small-cnn", "nofile.h5", "--weights nofile.h5: small-cnn takes no weights, it always "
         "trains from scratch: pass --weights none"),
        ("small-cnn", "imagenet", "small-cnn has no ImageNet weights: add --weights none"),
        ("mobilenet-v2", "nofile.h5", "--weights nofile.h5: no such file. --weights takes "
         "'imagenet', 'none' (train from scratch) or the path of an existing weights file: for "
         "mobilenet-v2, a Keras .h5 or .weights.h5 file"),
        ("efficientnet-lite0", "nofile.pth", "--weights nofile.pth: no such file. --weights "
         "takes 'imagenet'"),
    ],
)  # fmt: skip
def test_weights_a_backbone_cannot_take_are_refused_before_the_data_loads(
    tmp_path, no_training, backbone, weights, message
):
    err = io.StringIO()
    argv = [str(tmp_path), "--output", str(tmp_path / "run"), "--backbone", backbone]
    assert cli.main([*argv, "--weights", weights], stderr=err) == ExitStatus.USAGE
    assert f"edge-train: error: {message}" in err.getvalue()
    assert not (tmp_path / "run").exists()


def test_a_weights_file_that_exists_and_the_keywords_in_any_case_are_accepted(tmp_path):
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"")
    argv = [str(tmp_path), "--output", str(tmp_path / "run"), "--backbone", "efficientnet-lite0"]
    for given, kept in ((str(weights), str(weights)), ("ImageNet", "imagenet"), ("None", "none")):
        args = cli.parse_arguments([*argv, "--weights", given], io.StringIO(), io.StringIO())
        assert isinstance(args, argparse.Namespace) and args.weights == kept


def test_the_help_says_a_backbone_trained_from_scratch_adds_the_frozen_epochs_to_epochs():
    helps = {action.dest: " ".join(action.help.split()) for action in cli.build_parser()._actions}
    epochs = "freezes nothing: it trains one stage of --frozen-epochs + --epochs epochs"
    frozen = "From scratch (--weights none; small-cnn) they are added to --epochs, in one stage"
    assert epochs in helps["epochs"] and frozen in helps["frozen_epochs"]
