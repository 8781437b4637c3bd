"""FP32 recheck of uncertain INT8 answers: the bound it rests on, the contract, the runtime."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from edge_runtime.model.contract import ContractError, ModelSpec, Precision
from edge_runtime.model.session import Provider, open_model
from edge_runtime.postprocess.recheck import (
    call_margins,
    near_a_call,
    needs_recheck,
    recheck_margin,
    top1_lead,
    with_recheck,
)
from export.parity import int8_recheck_gate
from tests.onnx_models import CLASSES, make_contract_model

FP32_SPEC = ModelSpec(class_names=CLASSES, input_size=64, model_version="7")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_lead_and_margin_on_known_rows():
    fp32 = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    int8 = np.array([[0.45, 0.35, 0.2], [0.1, 0.12, 0.78]])
    np.testing.assert_allclose(top1_lead(int8), [0.10, 0.66])
    assert recheck_margin(fp32, int8) == pytest.approx(0.10)  # 2 * 0.05
    assert recheck_margin(np.zeros((1, 3)), np.ones((1, 3))) == 1.0  # capped: recheck all
    np.testing.assert_array_equal(needs_recheck(int8, 0.2), [True, False])
    with pytest.raises(ValueError, match="one shape"):
        recheck_margin(fp32, int8[:1])


def test_no_flip_escapes_a_margin_as_large_as_the_changes():
    """The bound the recheck rests on: where the margin covers twice every probability change,
    the rechecked answers are FP32's top-1 on every row, although INT8 alone flips some."""
    rng = np.random.default_rng(0)
    fp32 = _softmax(rng.normal(0, 1.5, (20_000, 3)))
    int8 = _softmax(np.log(fp32) + rng.normal(0, 0.08, fp32.shape))
    margin = recheck_margin(fp32, int8)
    answers, redo = with_recheck(int8, fp32, margin)
    assert np.sum(int8.argmax(1) != fp32.argmax(1)) > 50
    assert np.array_equal(answers.argmax(1), fp32.argmax(1))
    assert 0 < redo.mean() < 0.5


def test_recheck_gate_fails_when_too_much_is_rechecked():
    rng = np.random.default_rng(1)
    fp32 = _softmax(rng.normal(0, 1.0, (200, 3)))
    int8 = _softmax(np.log(fp32) + rng.normal(0, 0.05, fp32.shape))
    assert int8_recheck_gate(fp32, int8, recheck_margin(fp32, int8)).top1_agreement == 1.0
    report = int8_recheck_gate(fp32, int8, 1.0)
    assert not report.passed and "FP32 recheck of 100.0% of scans > 33%" in report.summary()


def test_recheck_gate_takes_every_row_the_runtime_reruns():
    """Export's gate scores the rows the runtime reruns (near a call too), not only the top-1
    rule's: a disagreement the lead misses counts once its row is in ``rerun``, and so does its
    share of the rechecked scans."""
    fp32 = np.array([[0.6, 0.3, 0.1]] * 9 + [[0.2, 0.3, 0.5]])
    int8 = np.array([[0.6, 0.3, 0.1]] * 9 + [[0.2, 0.5, 0.3]])  # last row: a wide wrong lead
    assert int8_recheck_gate(fp32, int8, 0.1).top1_agreement == 0.9
    rerun = np.zeros(10, bool)
    rerun[-1] = True
    report = int8_recheck_gate(fp32, int8, 0.1, rerun=rerun)
    assert report.top1_agreement == 1.0 and "near a call" in report.summary()
    assert not int8_recheck_gate(fp32, int8, 0.1, rerun=np.arange(10) < 4).passed  # 40% > 33%


def test_margin_and_partner_round_trip_through_metadata():
    spec = replace(
        FP32_SPEC,
        precision=Precision.INT8,
        recheck_margin=0.25,
        recheck_model="a.onnx",
        recheck_malignant_margin=0.03,
        recheck_lesion_margin=0.04,
    )
    back = ModelSpec.from_metadata(spec.to_metadata())
    assert (back.recheck_margin, back.recheck_model) == (0.25, "a.onnx")
    assert (back.recheck_malignant_margin, back.recheck_lesion_margin) == (0.03, 0.04)
    assert ModelSpec.from_metadata(FP32_SPEC.to_metadata()).recheck_margin == 0.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recheck_margin": 1.5, "recheck_model": "a.onnx"}, r"margin must be in \[0, 1\]"),
        ({"recheck_margin": 0.2, "recheck_model": ""}, "must be a file name beside"),
        ({"recheck_lesion_margin": 0.1, "recheck_model": ""}, "must be a file name beside"),
        (
            {"recheck_malignant_margin": -0.1, "recheck_model": "a.onnx"},
            r"margin of P\(malignant\) must be in \[0, 1\]",
        ),
        ({"recheck_margin": 0.2, "recheck_model": "../a.onnx"}, "must be a file name beside"),
        ({"recheck_margin": 0.2, "recheck_model": "a.onnx", "precision": Precision.FP32}, "FP32"),
    ],
)
def test_bad_recheck_metadata_is_refused(changes, message):
    spec = replace(FP32_SPEC, **{"precision": Precision.INT8, **changes})
    with pytest.raises(ContractError, match=message):
        ModelSpec.from_metadata(spec.to_metadata(), source="m.onnx")


def _pair(folder: Path, margin: float, fp32_spec: ModelSpec = FP32_SPEC) -> Path:
    """An "INT8" model and the "FP32" model it names, with different weights, so that it is
    visible which of the two answered."""
    folder.mkdir(parents=True, exist_ok=True)
    make_contract_model(folder / "m-fp32.onnx", spec=fp32_spec, seed=1)
    int8_spec = replace(
        FP32_SPEC, precision=Precision.INT8, recheck_margin=margin, recheck_model="m-fp32.onnx"
    )
    return make_contract_model(folder / "m-int8.onnx", spec=int8_spec, seed=0)


def _raw(path: Path, images: np.ndarray) -> np.ndarray:
    return open_model(path, provider=Provider.CPU).session.run(
        ["probabilities"], {"image": images}
    )[0]


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (n, 64, 64, 1), dtype=np.uint8)


def test_runtime_answers_with_fp32_exactly_where_int8_leads_by_less_than_the_margin(tmp_path):
    images = _images(64)
    int8_path = _pair(tmp_path, margin=0.0)  # margin 0 only to read the raw answers below
    int8, fp32 = _raw(int8_path, images), _raw(tmp_path / "m-fp32.onnx", images)
    margin = float(np.median(top1_lead(int8)))  # about half the rows rechecked
    int8_path = _pair(tmp_path / "pair", margin)
    with Classifier.from_path(int8_path, provider=Provider.CPU, batch_size=16) as clf:
        assert clf.recheck_model_path == tmp_path / "pair" / "m-fp32.onnx"
        probabilities, _ = clf.run_raw(images)
        results = clf.classify(list(images[..., 0]))
    redo = top1_lead(int8) < margin
    assert 0 < redo.sum() < len(redo)
    np.testing.assert_allclose(probabilities[redo], fp32[redo], rtol=1e-5)
    np.testing.assert_allclose(probabilities[~redo], int8[~redo], rtol=1e-5)
    assert [r.rechecked for r in results] == list(redo)


def test_missing_partner_is_named_and_no_recheck_runs_int8_alone(tmp_path):
    int8_path = _pair(tmp_path, margin=1.0)
    (tmp_path / "m-fp32.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"m-fp32\.onnx, which is missing.*--no-recheck"):
        Classifier.from_path(int8_path, provider=Provider.CPU)
    images = _images(8)
    with Classifier.from_path(int8_path, provider=Provider.CPU, recheck=False) as clf:
        assert clf.recheck_model_path is None
        np.testing.assert_allclose(clf.run_raw(images)[0], _raw(int8_path, images), rtol=1e-6)


def test_a_partner_from_another_model_is_refused(tmp_path):
    int8_path = _pair(tmp_path, margin=0.3, fp32_spec=replace(FP32_SPEC, model_version="8"))
    with pytest.raises(ContractError, match="its model_version is '8', the INT8 model's '7'"):
        Classifier.from_path(int8_path, provider=Provider.CPU)


def test_cli_reports_rechecks_and_runs_alone_with_no_recheck(tmp_path):
    int8_path = _pair(tmp_path, margin=1.0)
    scan = tmp_path / "scan.png"
    cv2.imwrite(str(scan), _images(1)[0, ..., 0])

    def run(*extra: str) -> tuple[int, dict, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(
            [str(scan), "--model", str(int8_path), "--format", "jsonl", *extra],
            stdout=out,
            stderr=err,
        )
        return status, json.loads(out.getvalue()), err.getvalue()

    status, record, summary = run()
    assert status == 0 and record["rechecked"] is True
    assert "1 classified (1 rechecked in FP32)" in summary
    status, record, summary = run("--no-recheck")
    assert status == 0 and record["rechecked"] is False
    assert "rechecked" not in summary


def test_bench_report_names_the_recheck(tmp_path):
    from edge_runtime.app.bench import benchmark, format_table

    int8_path = _pair(tmp_path, margin=0.4)
    with Classifier.from_path(int8_path, provider=Provider.CPU) as clf:
        report = benchmark(clf, batch_sizes=[1], runs=1, warmup=0)
    assert report.recheck_model == str(tmp_path / "m-fp32.onnx") and report.recheck_margin == 0.4
    assert "recheck   scans with INT8 top-1 lead < 0.400" in format_table(report)


def test_the_rerun_rule_in_words_names_each_margin_in_use():
    from edge_runtime.postprocess.recheck import rerun_rule

    spec = replace(FP32_SPEC, precision=Precision.INT8, recheck_margin=0.128)
    assert rerun_rule(spec) == "INT8 top-1 lead < 0.128"
    spec = replace(spec, recheck_malignant_margin=0.031, recheck_lesion_margin=0.05)
    assert rerun_rule(spec) == (
        "INT8 top-1 lead < 0.128, P(malignant) within 0.031 of the operating point or lesion "
        "peak within 0.050 of the lesion threshold"
    )


def test_near_a_call_reruns_rows_near_the_operating_point_or_the_lesion_threshold():
    spec = replace(
        FP32_SPEC,
        precision=Precision.INT8,
        recheck_margin=0.05,
        recheck_model="a.onnx",
        recheck_malignant_margin=0.03,
        recheck_lesion_margin=0.02,
        lesion_stride=8,
        lesion_threshold=0.5,
        malignant_threshold=0.3,
    )
    # wide top-1 leads everywhere; P(malignant) 0.32 is within 0.03 of the operating point
    int8 = np.array([[0.10, 0.58, 0.32], [0.10, 0.80, 0.10], [0.10, 0.80, 0.10], [0.8, 0.1, 0.1]])
    peaks = np.array([0.9, 0.51, 0.9, 0.1])
    np.testing.assert_array_equal(needs_recheck(int8, spec.recheck_margin), [False] * 4)
    np.testing.assert_array_equal(near_a_call(spec, int8, 0.3, peaks), [True, True, False, False])
    # top-1 (operating point 0) has no malignant boundary; without peaks, no lesion boundary
    np.testing.assert_array_equal(near_a_call(spec, int8, 0.0, None), [False] * 4)


def test_call_margins_reach_the_farthest_scan_whose_side_int8_changed():
    spec = replace(FP32_SPEC, malignant_threshold=0.3, lesion_stride=8, lesion_threshold=0.5)
    fp32 = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.42, 0.28]])
    # row 0 crosses 0.3 (0.30 -> 0.26), row 1 moves by 0.1 without crossing, row 2 crosses up
    int8 = np.array([[0.2, 0.54, 0.26], [0.1, 0.2, 0.7], [0.3, 0.39, 0.31]])
    fp32_peaks, int8_peaks = np.array([0.4, 0.9, 0.55]), np.array([0.45, 0.8, 0.45])
    malignant, lesion = call_margins(fp32, int8, spec, fp32_peaks, int8_peaks)
    assert malignant == pytest.approx(0.04) and lesion == pytest.approx(0.05)
    assert call_margins(fp32, fp32, spec, fp32_peaks, fp32_peaks) == (0.0, 0.0)
    sharper, _ = call_margins(fp32, int8, replace(spec, temperature=0.5))
    assert sharper != pytest.approx(0.04)  # measured after calibration, as the runtime calls
    top1 = replace(spec, malignant_threshold=0.0)
    assert call_margins(fp32, int8, top1) == (0.0, 0.0)  # no operating point, no peaks


def _sharpened(fp32: Path, path: Path, spec: ModelSpec, gain: float) -> Path:
    """A copy of the FP32 model with its logits times ``gain`` before the softmax: the same
    top-1 on every scan, other probabilities (a stand-in for INT8 rounding)."""
    import onnx
    from onnx import helper, numpy_helper

    from export.convert import write_metadata

    model = onnx.load(str(fp32))
    graph = model.graph
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    graph.initializer.append(numpy_helper.from_array(np.array(gain, np.float32), "gain"))
    graph.node.insert(
        list(graph.node).index(softmax),
        helper.make_node("Mul", [softmax.input[0], "gain"], ["sharpened"]),
    )
    softmax.input[0] = "sharpened"
    onnx.save(model, str(path))
    write_metadata(path, spec)
    return path


def test_the_gate_fails_calls_that_the_top1_gate_misses_until_the_recheck_covers_them(tmp_path):
    """An INT8 stand-in with FP32's top-1 on every scan, whose P(malignant) crosses the
    operating point on some: the gate fails it on the calls as made, and passes it once its
    malignant margin reruns the scans near the operating point."""
    from edge_runtime.model.verify import verify_model_file

    images = _images(200)
    fp32_spec = FP32_SPEC
    fp32_path = make_contract_model(tmp_path / "m-fp32.onnx", spec=fp32_spec, seed=1)
    fp32 = _raw(fp32_path, images)
    threshold = float(np.median(fp32[:, 2]))
    fp32_spec = replace(FP32_SPEC, malignant_threshold=threshold)
    fp32_path = make_contract_model(tmp_path / "m-fp32.onnx", spec=fp32_spec, seed=1)
    int8_spec = replace(
        fp32_spec, precision=Precision.INT8, recheck_margin=1e-9, recheck_model="m-fp32.onnx"
    )
    int8_path = _sharpened(fp32_path, tmp_path / "m-int8.onnx", int8_spec, gain=3.0)
    int8 = _raw(int8_path, images)
    assert np.array_equal(int8.argmax(1), fp32.argmax(1))

    check = verify_model_file(int8_path, images, max_recheck_fraction=1.0)
    assert check.top1_agreement == 1.0 and check.as_called_agreement < 0.99
    assert not check.passed and "calls (operating point and lesion rule applied)" in " ".join(
        check.failures
    )

    malignant, _ = call_margins(fp32, int8, fp32_spec)
    covered = replace(int8_spec, recheck_malignant_margin=malignant)
    int8_path = _sharpened(fp32_path, tmp_path / "m-int8.onnx", covered, gain=3.0)
    check = verify_model_file(int8_path, images, max_recheck_fraction=1.0)
    assert check.passed and check.as_called_agreement == 1.0
    assert 0 < check.rechecked_fraction < 1
    assert check.record()["as_called_agreement_with_recheck"] == 1.0


def test_the_gate_fails_an_int8_file_whose_unfamiliar_scores_are_not_its_partners(tmp_path):
    """The runtime abstains on a scan whose unfamiliar score is above the threshold, so an INT8
    file whose scores are not its FP32 partner's abstains on other scans; the class answers
    alone cannot show it."""
    from edge_runtime.model.verify import verify_model_file
    from edge_runtime.postprocess.decision import unfamiliar_stats

    images = _images(64)
    probe = make_contract_model(tmp_path / "probe.onnx", spec=FP32_SPEC, seed=1, features=True)
    probabilities, features = open_model(probe, provider=Provider.CPU).session.run(
        ["probabilities", "features"], {"image": images}
    )
    stats = unfamiliar_stats(features, probabilities.argmax(1), len(CLASSES))
    fp32_spec = replace(FP32_SPEC, unfamiliar={**stats, "threshold": 2.0})
    make_contract_model(tmp_path / "m-fp32.onnx", spec=fp32_spec, seed=1, features=True)
    int8_spec = replace(
        fp32_spec, precision=Precision.INT8, recheck_margin=1e-9, recheck_model="m-fp32.onnx"
    )
    int8_path = tmp_path / "m-int8.onnx"
    make_contract_model(int8_path, spec=int8_spec, seed=1, features=True)
    assert verify_model_file(int8_path, images).passed

    shrunk = {**int8_spec.unfamiliar, "scale": [s / 1000 for s in stats["scale"]]}
    make_contract_model(
        int8_path, spec=replace(int8_spec, unfamiliar=shrunk), seed=1, features=True
    )
    check = verify_model_file(int8_path, images)

    assert check.top1_agreement == 1.0 and check.as_called_agreement == 1.0
    assert not check.passed
    assert "unfamiliar-scan scores differ from its FP32 partner's by a median" in check.failures[0]
