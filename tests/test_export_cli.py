"""edge-export and export.requantize refuse impossible options at parse time, naming the option,
before anything loads; the advice after an INT8 refusal leaves out what was just tried."""

from __future__ import annotations

import io

import pytest

from edge_runtime.app.status import ExitStatus

BAD_OPTIONS = [
    (["--min-agreement", "1.5"], "--min-agreement", "(0, 1]"),
    (["--min-agreement", "0"], "--min-agreement", "(0, 1]"),
    (["--min-agreement", "nan"], "--min-agreement", "(0, 1]"),
    (["--max-accuracy-drop", "-1"], "--max-accuracy-drop", "[0, 1]"),
    (["--max-accuracy-drop", "2"], "--max-accuracy-drop", "[0, 1]"),
    (["--float-convs", "-1"], "--float-convs", ">= 0"),
    (["--float-convs", "two"], "--float-convs", ">= 0"),
]


@pytest.fixture
def export_main(monkeypatch):
    """edge-export's main, whose export must never start."""
    from export import cli

    monkeypatch.setattr(cli, "_export", lambda *a: pytest.fail("the export started"))
    return cli.main


def _refused(main, argv: list[str]) -> str:
    stderr = io.StringIO()
    assert main(argv, stdout=io.StringIO(), stderr=stderr) == ExitStatus.USAGE
    return stderr.getvalue()


@pytest.mark.parametrize(
    ("option", "flag", "expected"),
    [
        *BAD_OPTIONS,
        (["--calibration-images", "0"], "--calibration-images", ">= 1"),
        (["--name", "a/b"], "--name", "plain file-name stem"),
        (["--name", ".."], "--name", "plain file-name stem"),
        (["--name", ""], "--name", "plain file-name stem"),
    ],
)
def test_edge_export_refuses_an_impossible_option_naming_it(
    export_main, tmp_path, option, flag, expected
):
    message = _refused(export_main, [str(tmp_path), "--output", str(tmp_path / "o"), *option])
    assert f"argument {flag}: " in message and expected in message, message
    assert "QuantConfig" not in message


@pytest.mark.parametrize(("option", "flag", "expected"), BAD_OPTIONS)
def test_requantize_refuses_an_impossible_option_naming_it(
    capsys, tmp_path, option, flag, expected
):
    from export.requantize import main

    args = [str(tmp_path), "--split-dir", str(tmp_path), "--data-root", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *option])
    assert exit_.value.code == ExitStatus.USAGE
    message = capsys.readouterr().err
    assert f"argument {flag}: " in message and expected in message, message


@pytest.mark.parametrize("cards", [(), ("default", "model")])
def test_requantize_without_name_needs_exactly_one_model_card(capsys, tmp_path, cards):
    from export.requantize import main

    for name in cards:
        (tmp_path / f"{name}.card.json").write_text("{}")
    args = [str(tmp_path), "--split-dir", str(tmp_path), "--data-root", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == ExitStatus.USAGE
    found = "models default, model" if cards else "no model card (*.card.json)"
    assert f"{tmp_path}: {found}; name the model with --name" in capsys.readouterr().err


def test_edge_export_refuses_an_output_it_could_never_write_before_the_export(
    export_main, tmp_path, monkeypatch
):
    afile = tmp_path / "afile.txt"
    afile.write_text("notes")
    run = str(tmp_path)
    message = _refused(export_main, [run, "--output", str(afile)])
    assert f"--output {afile}: exists and is not a folder" in message
    message = _refused(export_main, [run, "--output", str(afile / "sub" / "dir")])
    assert f"--output {afile / 'sub' / 'dir'}: cannot be created: {afile} is not a folder" in (
        message
    )
    assert afile.read_text() == "notes"
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: path != locked)  # root may write anywhere
    message = _refused(export_main, [run, "--output", str(locked / "new")])
    assert f"--output {locked / 'new'}: the folder {locked} is not writable" in message
    assert not (locked / "new").exists()


def test_int8_advice_leaves_out_what_was_just_tried():
    from export.pipeline import int8_advice

    first = int8_advice(2, all_float=False, tried_auto=False)
    assert "--float-convs N (e.g. 11:" in first and "--calibration auto" in first
    assert "--float-convs N (above 11:" in int8_advice(11, all_float=False, tried_auto=False)
    every = int8_advice(100, all_float=True, tried_auto=True)
    assert "--float-convs" not in every and "--calibration auto" not in every
    assert "longer training" in every and "--precision fp32" in every


def test_int8_advice_after_requantize_names_only_what_requantize_can_be_asked():
    from export.pipeline import int8_advice

    for all_float in (False, True):
        advice = int8_advice(2, all_float=all_float, tried_auto=False, requantize=True)
        for other in ("--calibration", "--precision", "training"):
            assert other not in advice, advice
        assert ("--float-convs N (e.g. 11:" in advice) is not all_float
        assert "keep the INT8 file as it is" in advice


def _conv_chain(path, convs: int):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    nodes, weights, name = [], [], "image"
    for k in range(convs):
        weights.append(numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), f"w{k}"))
        nodes.append(helper.make_node("Conv", [name, f"w{k}"], [f"c{k}"], name=f"conv{k}"))
        name = f"c{k}"
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "chain",
        [value("image", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [value(name, onnx.TensorProto.FLOAT, None)],
        weights,
    )
    onnx.save(helper.make_model(graph), path)
    return path


def test_every_conv_float_says_whether_float_convs_covered_the_whole_model(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from export.quantize import every_conv_float

    chain = _conv_chain(tmp_path / "chain.onnx", 3)
    assert not every_conv_float(chain, 2)
    assert every_conv_float(chain, 3) and every_conv_float(chain, 100)
