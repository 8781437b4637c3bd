"""``edge-classify bench`` and :func:`edge_runtime.app.bench.benchmark` on a TF-free model."""

from __future__ import annotations

import io
import json

import pytest

from edge_runtime.app.bench import BatchTiming, BenchReport, benchmark, cpu_name
from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from tests.onnx_models import make_contract_model
from tests.test_cli import write_scan


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx", size=64)


def bench(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["bench", *map(str, argv)], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_json_report_has_the_machine_the_model_and_a_timing_per_batch_size(model):
    status, out, err = bench(
        "--model",
        model,
        "--provider",
        "cpu",
        "--batch-sizes",
        "1,4",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--format",
        "jsonl",
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["provider"] == "CPUExecutionProvider"
    assert report["precision"] == "fp32" and report["input_size"] == 64
    assert report["onnxruntime_version"] and report["cpu"] and report["threads"] == 1
    assert report["model_path"] == str(model)
    assert [b["batch_size"] for b in report["batches"]] == [1, 4]
    for timing in report["batches"]:
        assert timing["runs"] == 5
        assert 0 < timing["median_ms"] <= timing["p90_ms"]
        assert timing["images_per_s"] > 0 and timing["end_to_end_images_per_s"] > 0
        assert timing["preprocess_median_ms"] > 0 and timing["postprocess_median_ms"] >= 0
        assert timing["end_to_end_median_ms"] >= timing["median_ms"]


def test_table_report_names_provider_cpu_and_batch_rows(model):
    status, out, _ = bench("--model", model, "--provider", "cpu", "--runs", "3", "--warmup", "0")
    assert status == 0
    assert "CPUExecutionProvider" in out and cpu_name() in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "8"]


def test_given_images_are_used(tmp_path, model):
    for i in range(3):
        write_scan(tmp_path / f"s{i}.png", seed=i)
    status, out, _ = bench(
        "--model",
        model,
        "--images",
        tmp_path,
        "--runs",
        "2",
        "--batch-sizes",
        "2",
        "--format",
        "json",
    )
    assert status == 0
    assert json.loads(out)["images"].startswith(f"3 scans from {tmp_path}")


def test_bad_batch_sizes_and_empty_image_folders_exit_2(tmp_path, model):
    for sizes in ("1,zero", "1,,8", ","):
        status, _, err = bench("--model", model, "--batch-sizes", sizes)
        assert status == 2 and "argument --batch-sizes" in err and "1,8" in err, err
    for option, value in (("--runs", "0"), ("--warmup", "-1")):
        status, _, err = bench("--model", model, option, value)
        assert status == 2 and f"argument {option}: must be a whole number" in err, err
    status, _, err = bench("--model", model, "--images", tmp_path)
    assert status == 2 and str(tmp_path) in err and "Traceback" not in err


def test_benchmark_returns_frozen_dataclasses(model):
    with Classifier.from_path(model, threads=1) as classifier:
        report = benchmark(classifier, batch_sizes=(2,), runs=3, warmup=0, threads=1)
    assert isinstance(report, BenchReport) and isinstance(report.batches[0], BatchTiming)
    with pytest.raises(AttributeError):
        report.provider = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        benchmark(classifier, batch_sizes=(0,))


def test_the_report_counts_the_images_rechecked_in_fp32(tmp_path):
    """bench never said how many images its FP32 recheck reran (docs quoted "23 of 32")."""
    from dataclasses import replace

    from edge_runtime.model.contract import ModelSpec, Precision
    from tests.onnx_models import CLASSES

    fp32_spec = ModelSpec(class_names=CLASSES, input_size=64, model_version="7")
    make_contract_model(tmp_path / "m-fp32.onnx", spec=fp32_spec, seed=1)
    int8_spec = replace(  # margin 1: every lead is below it, so every image is rechecked
        fp32_spec, precision=Precision.INT8, recheck_margin=1.0, recheck_model="m-fp32.onnx"
    )
    int8 = make_contract_model(tmp_path / "m-int8.onnx", spec=int8_spec, seed=0)
    argv = ("--model", int8, "--provider", "cpu", "--batch-sizes", "1,4", "--runs", "1")
    argv += ("--warmup", "0")
    status, out, err = bench(*argv, "--format", "jsonl")
    assert status == 0, err
    assert [b["rechecked"] for b in json.loads(out)["batches"]] == [1, 4]
    status, out, _ = bench(*argv, "--no-recheck", "--format", "jsonl")
    assert [b["rechecked"] for b in json.loads(out)["batches"]] == [0, 0]
    status, out, _ = bench(*argv)
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("batch")))
    assert lines[header].split()[-1] == "rechecked"
    assert [line.split()[-1] for line in lines[header + 1 :]] == ["1", "4"]
