"""`edge-classify adapt` on a real new scanner: the bundled model adapted on the 30 labelled
Siemens ACUSON S2000 scans of ``shared/data/site-siemens`` (BUS-UCLM). Skipped without the
shared data. These scans are for adapt only: nothing here trains or chooses the default model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.adapt import AdaptOptions, adapt
from edge_runtime.classifier import Classifier
from edge_runtime.model.verify import verify_model_file
from tests.conftest import SHARED, _require


@pytest.fixture(scope="module")
def site_manifest(tmp_path_factory) -> Path:
    """The site's scans as a manifest grouped by patient (the file names' first four letters,
    as shared/data/README.md says), so that no patient spans a fold's two parts."""
    root = _require(SHARED / "data" / "site-siemens")
    manifest = tmp_path_factory.mktemp("site") / "site-siemens.csv"
    rows = [(str(p.resolve()), p.parent.name, p.name[:4]) for p in sorted(root.glob("*/*.png"))]
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    return manifest


@pytest.fixture(scope="module")
def adapted(site_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "siemens-int8.onnx"
    return adapt(AdaptOptions(site=site_manifest, output=out)), out


def test_adapt_with_its_defaults_writes_a_model_for_the_real_siemens_site(adapted):
    report, out = adapted
    assert out.is_file() and out.with_name("siemens-fp32.onnx").is_file()
    record = report.record
    cv = record["cross_validation"]
    assert cv["after"]["recall_normal"]["value"] > cv["before"]["recall_normal"]["value"]
    assert len(record["malignant_guard"]["lost_out_of_fold"]) <= 1
    assert record["int8"]["passed"] and record["int8"]["top1_agreement_with_recheck"] >= 0.99


def test_the_written_int8_file_as_the_runtime_runs_it_agrees_with_the_fitted_layer(
    adapted, site_manifest
):
    """Reloaded by the runtime (its FP32 recheck included), on the site's own scans: the INT8
    file agrees with its FP32 partner, and the runtime's calls are the calls adapt judged."""
    _report, out = adapted
    paths = [row[0] for row in csv.reader(site_manifest.read_text().splitlines()[1:])]
    with Classifier.from_path(out) as runtime:
        squares = _squares(runtime, paths)
        labels = [r.label for r in runtime.classify(paths)]
    check = verify_model_file(out, squares)
    assert check.passed, check.summary()
    with Classifier.from_path(out.with_name("siemens-fp32.onnx")) as fp32:
        fp32_labels = [r.label for r in fp32.classify(paths)]
    assert np.mean(np.array(labels) == np.array(fp32_labels)) >= 0.99
    card = json.loads(out.with_name("siemens.card.json").read_text())
    assert card["adaptation"]["malignant_guard"]["value"] is True


def test_every_malignant_site_scan_the_parent_caught_is_still_called_malignant(
    adapted, site_manifest
):
    _report, out = adapted
    rows = list(csv.reader(site_manifest.read_text().splitlines()[1:]))
    malignant = [r[0] for r in rows if r[1] == "malignant"]
    with Classifier.default() as parent:
        caught = [r.source for r in parent.classify(malignant) if r.label == "malignant"]
    with Classifier.from_path(out) as runtime:
        calls = {r.source: r.label for r in runtime.classify(caught)}
    assert caught and all(calls[s] == "malignant" for s in caught), calls


def test_adapts_rule_for_its_calls_is_the_runtimes(adapted, site_manifest):
    """adapt judges "after" with edge_runtime.postprocess.decision.decide on softmax(logits / T);
    the runtime, given the same FP32 file, must call every site scan the same."""
    import onnx

    from edge_runtime.adapt.fit import softmax
    from edge_runtime.adapt.graph import find_head, read_head
    from edge_runtime.postprocess.decision import decide

    _report, out = adapted
    fp32_path = out.with_name("siemens-fp32.onnx")
    paths = [row[0] for row in csv.reader(site_manifest.read_text().splitlines()[1:])]
    proto = onnx.load(str(fp32_path))
    head = read_head(proto, find_head(proto))
    with Classifier.from_path(fp32_path) as runtime:
        spec = runtime.spec
        squares = _squares(runtime, paths)
        labels = [r.label for r in runtime.classify(paths)]
    features = _features(proto, squares)
    probabilities = softmax(head.logits(features), spec.temperature)
    judged = decide(probabilities, spec.class_names, spec.malignant_threshold)
    assert [spec.class_names[i] for i in judged] == labels


def _features(proto, squares: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from edge_runtime.adapt.graph import find_head, with_features

    graph = with_features(proto, find_head(proto))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"image": squares[..., None]})[0]


def _squares(runtime: Classifier, paths: list[str]) -> np.ndarray:
    """The model's input squares of ``paths``, read as the classifier reads them."""
    from edge_runtime.io.reader import ScanReader

    spec = runtime.spec
    with ScanReader(spec.input_size, spec.resize_policy) as reader:
        return np.stack([s for _, _, s, e in reader.squares(paths) if e is None])


def test_readapting_the_adapted_model_is_judged_against_the_bundled_model_as_before(
    adapted, site_manifest, tmp_path_factory
):
    """The card of an adapted model adapted again names the bundled model as its parent; its
    "parent" column is then that model's calls (the ensemble's own, 0.600 accuracy here), the
    same as when the bundled model is adapted directly, and its ensemble record stays."""
    report, out = adapted
    out_again = tmp_path_factory.mktemp("again") / "again-int8.onnx"
    again = adapt(AdaptOptions(site=site_manifest, output=out_again, model=out)).record
    first = report.record
    assert again["cross_validation"]["before"] == first["cross_validation"]["before"]
    assert again["ensemble"] == first["ensemble"]
    card = json.loads(out_again.with_name("again.card.json").read_text())
    assert card["parents"]["again-int8.onnx"]["file"] == "default-int8.onnx"
