"""The shell the three commands share (edge_runtime.app.shell): --version, --quiet and --traceback
everywhere, did-you-mean, cross-flag rules at parse time, and one exit status per kind of end."""

from __future__ import annotations

import contextlib
import io

import pytest

from edge_runtime.app.cli import main as classify_main
from edge_runtime.app.shell import package_version
from edge_runtime.app.status import ExitStatus
from export.cli import main as export_main
from training.cli import main as train_main

COMMANDS = {"edge-classify": classify_main, "edge-train": train_main, "edge-export": export_main}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_version_quiet_and_traceback(name):
    out = io.StringIO()
    assert COMMANDS[name](["--version"], stdout=out, stderr=io.StringIO()) == ExitStatus.SUCCESS
    assert out.getvalue().strip() == f"{name} (edge-classify {package_version()})"
    out = io.StringIO()
    assert COMMANDS[name](["--help"], stdout=out, stderr=io.StringIO()) == ExitStatus.SUCCESS
    assert "--quiet" in out.getvalue() and "--traceback" in out.getvalue()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_mistyped_option_gets_a_suggestion_never_a_correction(name):
    err = io.StringIO()
    status = COMMANDS[name](["x", "--output", "o", "--quite"], stdout=io.StringIO(), stderr=err)
    assert status == ExitStatus.USAGE and "did you mean --quiet?" in err.getvalue()


def test_a_known_option_named_in_a_sentence_gets_no_suggestion():
    from edge_runtime.app.shell import Parser

    parser = Parser(prog="p")
    parser.add_argument("--backbone")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        parser.error("takes members 1 to 2 (one per --backbone). Got 3 instead.")
    assert "one per --backbone)." in err.getvalue() and "did you mean" not in err.getvalue()


def test_ray_flags_without_the_ray_engine_are_refused_before_the_model_loads(tmp_path):
    err = io.StringIO()
    argv = [str(tmp_path), "--model", str(tmp_path / "missing.onnx"), "--workers", "2"]
    assert classify_main(argv, stdout=io.StringIO(), stderr=err) == ExitStatus.USAGE
    assert "need --engine ray" in err.getvalue() and "missing.onnx" not in err.getvalue()


def test_a_bug_in_edge_classify_exits_with_the_internal_error_status(monkeypatch, tmp_path):
    import edge_runtime.app.cli as cli

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_classify", broken)
    err = io.StringIO()
    status = classify_main([str(tmp_path)], stdout=io.StringIO(), stderr=err)
    assert status == ExitStatus.INTERNAL_ERROR and status not in (0, 1, 2)
    assert "internal error: TypeError: a bug" in err.getvalue()
    assert "rerun with --traceback" in err.getvalue()
    with pytest.raises(TypeError, match="a bug"):
        classify_main([str(tmp_path), "--traceback"], stdout=io.StringIO(), stderr=err)


def test_one_meaning_per_flag_edge_train_names_its_worker_addresses_worker_hosts(tmp_path):
    err = io.StringIO()
    argv = [str(tmp_path), "--output", str(tmp_path / "o"), "--workers", "a:1"]
    assert train_main(argv, stdout=io.StringIO(), stderr=err) == ExitStatus.USAGE
    assert "--worker-hosts" in err.getvalue()


def test_the_public_namespace_is_what_a_user_calls_and_moved_helpers_still_resolve_with_a_warning():
    import edge_runtime
    from edge_runtime.io.preprocess import fit_to_square

    assert edge_runtime.__version__ == package_version()
    assert "fit_to_square" not in edge_runtime.__all__ and len(edge_runtime.__all__) <= 20
    with pytest.warns(DeprecationWarning, match="import it from edge_runtime.io.preprocess"):
        assert edge_runtime.fit_to_square is fit_to_square


def test_run_is_renamed_run_raw_and_the_old_name_warns(tmp_path):
    import numpy as np

    from edge_runtime import Classifier, ClassifierOptions
    from tests.onnx_models import make_contract_model

    model = make_contract_model(tmp_path / "m.onnx")
    options = ClassifierOptions(batch_size=1)
    with Classifier.from_path(model, options) as clf:
        images = np.zeros((2, clf.spec.input_size, clf.spec.input_size, 1), np.uint8)
        raw, _ = clf.run_raw(images)
        with pytest.warns(DeprecationWarning, match="run_raw"):
            old, _ = clf.run(images)
    np.testing.assert_array_equal(raw, old)
    with pytest.raises(TypeError):
        Classifier.from_path(model, options, batch_sizes=2)
