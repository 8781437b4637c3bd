"""`edge-classify adapt`: a parent that fails on a synthetic "new scanner" recovers from 10 scans
per class; refusals write nothing; the record round-trips; INT8 stays within the parity gate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.adapt.fit import Head, balanced_weights, fit_head, fit_with_strength
from edge_runtime.adapt.graph import find_head, read_head, with_features, with_head
from edge_runtime.adapt.site import read_site
from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier, default_model_path
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.card import file_sha256, verify_against_card
from edge_runtime.model.contract import ModelSpec, NormalRule, Precision, ResizePolicy
from edge_runtime.postprocess.recheck import recheck_margin
from tests.onnx_models import CLASSES, head_feature_count, make_head_model
from training.synthetic import synthetic_scan

SIZE = 64


def new_scanner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another maker's screen: darker gain, softer and stronger speckle, text and a side bar."""
    x = image.astype(np.float32) / 255
    x = 0.55 * cv2.GaussianBlur(x, (0, 0), 1.0)
    x *= 1 + 0.3 * (rng.rayleigh(0.5, x.shape).astype(np.float32) / 0.627 - 1)
    out = np.clip(x * 255, 0, 255).astype(np.uint8)
    cv2.putText(out, "LOGIQ 7L", (5, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 230, 1)
    cv2.rectangle(out, (out.shape[1] - 20, 0), (out.shape[1] - 1, out.shape[0] - 1), 180, -1)
    return out


def scans(per_class: int, seed: int, shifted: bool) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for _ in range(per_class):
            image = synthetic_scan(name, rng, (192, 192))
            images.append(new_scanner(image, rng) if shifted else image)
            labels.append(c)
    return images, np.array(labels)


def write_site(root: Path, images: list[np.ndarray], labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"scan-{i:03d}.png"), image)
    return root


def pooled(model: Path, images: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model))
    batch = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]
    return session.run(["features"], {"image": batch})[0]


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    """A parent pair fitted on the ordinary synthetic scanner: FP32, and INT8 (QDQ, quantized
    by export's own code) with the FP32 model as its recheck partner. Neither has `features`."""
    from export.convert import write_metadata
    from export.quantize import QuantConfig, quantize_int8

    root = tmp_path_factory.mktemp("parents")
    d = head_feature_count()
    zero = Head(np.zeros((d, 3), np.float32), np.zeros(3, np.float32))
    probe = make_head_model(root / "probe.onnx", zero.kernel, zero.bias, size=SIZE, features=True)
    images, labels = scans(40, seed=1, shifted=False)
    head = fit_with_strength(pooled(probe, images), labels, zero, 0.01)
    fp32 = root / "parent-fp32.onnx"
    spec = ModelSpec(class_names=CLASSES, input_size=SIZE, model_version="1.0", temperature=0.9)
    make_head_model(fp32, head.kernel, head.bias, size=SIZE, spec=spec)
    squares = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]
    # Calibrated on the source scanner alone, as a real parent is: the new scanner's (darker, so
    # larger) pooled features go past its ranges, which adapt widens (adapt_quant).
    int8 = quantize_int8(
        fp32, root / "parent-int8.onnx", squares, QuantConfig(batch_size=8, float_convs=2)
    )
    probabilities = {
        p: ort.InferenceSession(str(p)).run(["probabilities"], {"image": squares})[0]
        for p in (fp32, int8)
    }
    margin = recheck_margin(probabilities[fp32], probabilities[int8])
    int8_spec = ModelSpec(
        class_names=CLASSES,
        input_size=SIZE,
        model_version="1.0",
        temperature=0.9,
        precision=Precision.INT8,
        recheck_margin=max(margin, 0.01),
        recheck_model=fp32.name,
    )
    write_metadata(int8, int8_spec)
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    images, labels = scans(10, seed=2, shifted=True)
    return write_site(tmp_path_factory.mktemp("site") / "clinic", images, labels)


@pytest.fixture(scope="module")
def new_scans() -> tuple[list[np.ndarray], np.ndarray]:
    return scans(30, seed=3, shifted=True)


@pytest.fixture(scope="module")
def adapted_fp32(parents, site, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "clinic-fp32.onnx"
    code = main(["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)])
    assert code == 0
    return out


def accuracy(model: Path, images, labels) -> float:
    with Classifier.from_path(model, provider="cpu") as clf:
        predicted = [CLASSES.index(r.label) for r in clf.classify(images)]
    return float(np.mean(np.array(predicted) == labels))


def test_adapt_recovers_a_parent_that_fails_on_a_new_scanner(parents, adapted_fp32, new_scans):
    out = adapted_fp32
    before = accuracy(parents["fp32"], *new_scans)
    after = accuracy(out, *new_scans)
    assert before < 0.5, before  # the parent calls the new scanner's scans wrongly
    assert after >= 0.8, (before, after)
    record = ModelSpec.from_metadata(
        ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    ).adaptation
    cv = record["cross_validation"]
    assert cv["after"]["accuracy"]["value"] > cv["before"]["accuracy"]["value"] + 0.3
    low, high = cv["difference"]["accuracy"]["ci95"]
    assert low <= cv["difference"]["accuracy"]["value"] <= high


def test_adapted_int8_passes_the_contract_and_the_parity_gate_with_its_partner(
    parents, site, new_scans, tmp_path
):
    from export.parity import int8_recheck_gate

    out = tmp_path / "clinic-int8.onnx"
    assert main(["adapt", str(site), "--model", str(parents["int8"]), "--output", str(out)]) == 0
    partner = tmp_path / "clinic-fp32.onnx"
    assert partner.is_file() and (tmp_path / "clinic.card.json").is_file()
    with Classifier.from_path(out, provider="cpu") as clf:  # opens and checks the partner too
        assert clf.recheck_model_path == partner
        spec = clf.spec
    assert spec.precision is Precision.INT8 and spec.recheck_model == partner.name
    images, labels = new_scans
    squares = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]
    run = {
        p: ort.InferenceSession(str(p)).run(["probabilities"], {"image": squares})[0]
        for p in (out, partner)
    }
    report = int8_recheck_gate(run[partner], run[out], spec.recheck_margin, labels)
    assert report.passed, report.summary()
    assert accuracy(out, images, labels) >= 0.8
    widened = spec.adaptation["int8_ranges_widened"]
    assert widened["count"] >= 1 and "pooled" in widened["tensors"], widened
    assert spec.adaptation["int8"]["rechecked_fraction"] <= 0.2


def test_widening_int8_ranges_stops_the_clipping_of_a_new_scanners_features(parents, site):
    from edge_runtime.adapt.quant import widen_ranges

    proto = onnx.load(str(parents["int8"]))
    where = find_head(proto)
    fp32 = onnx.load(str(parents["fp32"]))
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(site.rglob("*.png"))]
    batch = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]

    def features(model) -> np.ndarray:
        graph = with_features(model, find_head(model))
        return ort.InferenceSession(graph.SerializeToString()).run(["features"], {"image": batch})[
            0
        ]

    reference = features(fp32)
    featured = with_features(fp32, find_head(fp32))
    widened, changes = widen_ranges(with_features(proto, where), featured, [batch[:16], batch[16:]])
    error_before = np.abs(features(proto) - reference).max()
    error_after = np.abs(features(widened) - reference).max()
    pooled = {c.tensor: c for c in changes}["pooled"]  # (and the parent's logits)
    # the record rounds ranges to 6 decimals, the widening itself does not
    assert pooled.after[1] >= reference.max() - 1e-6 and reference.max() > pooled.before[1]
    assert error_after < 0.25 * error_before, (error_before, error_after)
    source = scans(5, seed=8, shifted=False)[0]
    inside = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in source])[..., None]
    nudged = {c.tensor: c for c in widen_ranges(proto, fp32, [inside])[1]}.get("pooled")
    if nudged is not None:  # the parent's own scanner: at most a nudge (the new one: +47%)
        assert nudged.after[1] < 1.05 * nudged.before[1], nudged


def test_widening_keeps_the_clips_the_quantizer_folded_into_its_ranges(parents, site, tmp_path):
    """onnxruntime's quantizer deletes a Relu/Clip that its Q/DQ range covers and gives the
    convolution the activation's name: the INT8 graph without its Q/DQ pairs no longer clips
    there. Measured on the FP32 model instead, no range of a clipped tensor may go below 0."""
    from edge_runtime.adapt.quant import widen_ranges
    from export.quantize import QuantConfig, quantize_int8

    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(site.rglob("*.png"))]
    batch = np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]
    folded = quantize_int8(
        parents["fp32"], tmp_path / "folded-int8.onnx", batch, QuantConfig(float_convs=0)
    )
    proto, fp32 = onnx.load(str(folded)), onnx.load(str(parents["fp32"]))
    int8_ops = {n.op_type for n in proto.graph.node}
    fp32_ops = {n.op_type for n in fp32.graph.node}
    assert "Relu" in fp32_ops and "Relu" not in int8_ops  # the quantizer folded the Relu
    bright = np.full_like(batch[:4], 255)  # no dark area: every Relu input is far below 0
    widened, changes = widen_ranges(proto, fp32, [batch, bright])
    relu_outputs = {n.output[0] for n in fp32.graph.node if n.op_type == "Relu"}
    assert relu_outputs
    for change in changes:
        if change.tensor in relu_outputs:
            assert change.after[0] >= -1e-6, change
    probabilities = {
        name: ort.InferenceSession(m.SerializeToString()).run(["probabilities"], {"image": bright})
        for name, m in (("fp32", fp32), ("int8", widened))
    }
    probabilities = {name: outputs[0] for name, outputs in probabilities.items()}
    assert np.abs(probabilities["fp32"] - probabilities["int8"]).max() < 0.05


def test_adapting_a_lesion_model_lets_the_refitted_layer_call_normal(
    parents, site, new_scans, tmp_path
):
    from tests.onnx_models import make_head_model

    proto = onnx.load(str(parents["fp32"]))
    head = read_head(proto, find_head(proto))
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=SIZE,
        model_version="1.0",
        temperature=0.9,
        lesion_stride=4,
        lesion_threshold=0.5,
        normal_rule=NormalRule.LESION_HEAD,
    )
    parent = make_head_model(tmp_path / "lesion-fp32.onnx", head.kernel, head.bias, size=SIZE,
                             spec=spec, lesion_stride=4)  # fmt: skip
    out = tmp_path / "clinic-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(parent), "--output", str(out)]) == 0
    adapted = ModelSpec.from_metadata(
        ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    )
    assert adapted.normal_rule is NormalRule.CLASSIFIER
    assert adapted.adaptation["normal_rule"]["parent"] == "lesion_head"
    # "before" is the parent as it runs: its lesion head (dark everywhere on the new scanner)
    with Classifier.from_path(parent, provider="cpu") as clf:
        called = [r.label for r in clf.classify(sorted(site.rglob("*.png")))]
    site_labels = [p.parent.name for p in sorted(site.rglob("*.png"))]
    normal = [c for c, y in zip(called, site_labels, strict=True) if y == "normal"]
    before = adapted.adaptation["cross_validation"]["before"]["recall_normal"]["value"]
    assert before == pytest.approx(np.mean([c == "normal" for c in normal]))
    images, labels = new_scans
    with Classifier.from_path(out, provider="cpu") as clf:
        predicted = np.array([CLASSES.index(r.label) for r in clf.classify(images)])
    assert np.mean(predicted[labels == 0] == 0) >= 0.7  # the lesion rule would call them lesions
    assert np.mean(predicted == labels) >= 0.8


def test_metadata_and_card_record_the_site_and_parent_and_readapting_starts_from_it(
    parents, site, adapted_fp32, tmp_path
):
    first = adapted_fp32
    spec = ModelSpec.from_metadata(
        ort.InferenceSession(str(first)).get_modelmeta().custom_metadata_map
    )
    record = spec.adaptation
    assert record["site"] == "clinic"
    assert record["scans_per_class"] == {"normal": 10, "benign": 10, "malignant": 10}
    assert record["parent"]["sha256"] == file_sha256(parents["fp32"])
    assert record["parent_metrics_apply"] is False
    assert spec.model_version.startswith("1.0+adapted.")
    assert spec.metrics["evaluated_on"].startswith("site")
    assert verify_against_card(first)  # the card lists the file's SHA-256
    card = json.loads((first.parent / "clinic.card.json").read_text())
    assert card["parent_metrics_apply"] is False
    assert "do not apply" in (first.parent / "clinic.card.md").read_text()

    second = tmp_path / "b" / "again-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(first), "--output", str(second)]) == 0
    again = ModelSpec.from_metadata(
        ort.InferenceSession(str(second)).get_modelmeta().custom_metadata_map
    ).adaptation
    assert again["parent"]["sha256"] == file_sha256(parents["fp32"])  # the parent, not `first`
    assert again["parent"]["file"] == parents["fp32"].name
    assert again["parent"]["head"] == record["parent"]["head"]
    assert again["cross_validation"]["before"] == record["cross_validation"]["before"]


def test_too_few_scans_of_a_class_refuses_and_writes_nothing(parents, tmp_path, capsys):
    images, labels = scans(10, seed=4, shifted=True)
    keep = np.r_[np.where(labels != 2)[0], np.where(labels == 2)[0][:4]]
    site = write_site(tmp_path / "site", [images[i] for i in keep], labels[keep])
    out = tmp_path / "out" / "m-int8.onnx"
    code = main(["adapt", str(site), "--model", str(parents["int8"]), "--output", str(out)])
    assert code == 1
    assert "malignant 4): at least 5 of each class are needed" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_adaptation_that_is_not_better_refuses_with_the_numbers(parents, tmp_path, capsys):
    # every scan the same scan: no layer can tell the classes apart (a blank frame would be left
    # out as not an ultrasound scan)
    same = [scans(1, seed=8, shifted=True)[0][0]] * 18
    site = write_site(tmp_path / "site", same, np.repeat([0, 1, 2], 6))
    out = tmp_path / "out" / "m-fp32.onnx"
    code = main(["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "not better" in err and "balanced_accuracy" in err and "recall_malignant" in err
    assert "What to try: check the labels, label more scans" in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_adapt_refuses_to_overwrite_its_parent(parents, site, capsys):
    code = main(["adapt", str(site), "--model", str(parents["fp32"]), "--output",
                 str(parents["fp32"])])  # fmt: skip
    assert code == 2
    assert "never modified" in capsys.readouterr().err


def test_a_labelled_file_that_cannot_be_read_is_left_out_and_named_in_the_card(
    parents, tmp_path, capsys
):
    images, labels = scans(10, seed=2, shifted=True)
    site = write_site(tmp_path / "site", images, labels)
    broken = site / "benign" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out" / "m-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)]) == 0
    assert f"{broken}: " in capsys.readouterr().err
    card = json.loads((out.parent / "m.card.json").read_text())
    (left_out,) = card["adaptation"]["left_out"]
    assert left_out["path"] == str(broken) and left_out["error"]
    assert card["adaptation"]["scans_per_class"] == {"normal": 10, "benign": 10, "malignant": 10}
    assert f"`{broken}` (" in (out.parent / "m.card.md").read_text()


def test_adapt_refuses_a_place_whose_card_belongs_to_another_model(parents, site, tmp_path, capsys):
    out = tmp_path / "q" / "clinic-int8.onnx"
    argv = ["adapt", str(site), "--model", str(parents["int8"])]
    assert main([*argv, "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    capsys.readouterr()
    # clinic.onnx would share clinic.card.json and clinic-fp32.onnx with clinic-int8.onnx
    assert main([*argv, "--output", str(out.parent / "clinic.onnx")]) == 2
    assert "clinic.card.json: the card of clinic-int8.onnx, which this run would not replace" in (
        capsys.readouterr().err
    )
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
    assert main([*argv, "--output", str(out)]) == 0  # its own place: replaced


def test_adapt_option_ranges_and_messages_name_what_to_do(parents, site, tmp_path, capsys):
    argv = [
        "adapt",
        str(site),
        "--model",
        str(parents["fp32"]),
        "--output",
        str(tmp_path / "m.onnx"),
    ]
    assert main([*argv, "--max-sensitivity-drop", "2"]) == 2
    assert "--max-sensitivity-drop: must be in [0, 1]" in capsys.readouterr().err
    manifest = tmp_path / "site.csv"
    manifest.write_text("path,label,group\n")
    with pytest.raises(ValueError, match=r"holds no rows of scans\. Give one row per scan"):
        read_site(manifest, CLASSES)
    manifest.write_text("a.png,cyst\n")
    with pytest.raises(ValueError, match=r"site.csv: 1 bad row: line 1"):
        read_site(manifest, CLASSES)


def test_adapt_runs_on_the_base_install_without_tensorflow(parents, tmp_path):
    images, labels = scans(5, seed=5, shifted=True)
    site = write_site(tmp_path / "site", images, labels)
    out = tmp_path / "m-fp32.onnx"
    code = textwrap.dedent(f"""
        import sys
        from edge_runtime.app.cli import main
        rc = main(["adapt", {str(site)!r}, "--model", {str(parents["fp32"])!r},
                   "--output", {str(out)!r}, "--quiet"])
        loaded = sorted(m for m in sys.modules
                        if m.split('.')[0] in {{"tensorflow", "keras", "training", "export"}})
        print(rc, ','.join(loaded))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() in (["0"], ["1"]), done.stdout  # adapted, or refused: it ran
    assert out.is_file()


def test_fit_head_without_pull_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, 3, 60)
    x[np.arange(60), y] += 1.5
    lam = 0.1
    zero = Head(np.zeros((5, 3), np.float32), np.zeros(3, np.float32))
    mine = fit_head(x, y, zero, weight_penalty=lam, bias_penalty=0.0)
    # sklearn: 0.5 ||W||^2 + C sum_i w_i CE_i; ours: sum_i w_i CE_i / sum w + lam/2 ||W||^2
    ref = LogisticRegression(C=1 / (lam * balanced_weights(y, 3).sum()), class_weight="balanced",
                             tol=1e-10, max_iter=10_000).fit(x, y)  # fmt: skip
    # softmax logits are defined up to a constant per row: compare centred
    assert np.allclose(mine.kernel - mine.kernel.mean(1, keepdims=True), ref.coef_.T, atol=1e-3)
    assert np.allclose(mine.bias - mine.bias.mean(), ref.intercept_ - ref.intercept_.mean(),
                       atol=1e-3)  # fmt: skip


def test_a_strong_pull_keeps_the_parent_and_a_weak_one_fits_the_scans():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = np.repeat([0, 1, 2], 10)
    x[np.arange(30), y] += 3
    parent = Head(rng.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32))
    kept = fit_with_strength(x, y, parent, 1e6)
    assert np.allclose(kept.kernel, parent.kernel, atol=1e-4)
    free = fit_with_strength(x, y, parent, 1e-4)
    assert np.mean(free.logits(x).argmax(1) == y) == 1.0


def test_the_operating_point_meets_the_sensitivity_target_even_where_float_products_round_up():
    from edge_runtime.postprocess.decision import malignant_operating_point

    p = np.linspace(0.05, 0.95, 20)
    malignant = np.arange(20) >= 10  # 0.9 * 10 is 9.000000000000002 in floating point
    threshold = malignant_operating_point(p, malignant, 0.9)["threshold"]
    assert np.mean(p[malignant] >= threshold) >= 0.9
    assert np.mean(p[malignant] >= np.nextafter(threshold, 1)) < 0.9


def test_manifest_reads_groups_and_reports_bad_labels(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "site.csv"
    manifest.write_text("path,label,group\na.png,normal,p1\nb.png,Benign,p1\nc.png,malignant,\n")
    site = read_site(manifest, CLASSES)
    assert [(s.path.name, s.label, s.group) for s in site] == [
        ("a.png", 0, "p1"),
        ("b.png", 1, "p1"),
        ("c.png", 2, str(tmp_path / "c.png")),
    ]
    manifest.write_text("a.png,cyst\n")
    with pytest.raises(ValueError, match=r"line 1: label 'cyst' is not one of"):
        read_site(manifest, CLASSES)
    folder = tmp_path / "f"
    (folder / "lesion").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"sub-folders \['lesion'\] are not classes"):
        read_site(folder, CLASSES)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_bundled_models_last_layer_is_found_and_replaced(precision):
    path = default_model_path(precision)
    proto = onnx.load(str(path))
    where = find_head(proto, source=str(path))
    parent = read_head(proto, where)
    features_out = next(o for o in proto.graph.output if o.name == "features")
    width = features_out.type.tensor_type.shape.dim[1].dim_value  # 1280 a Lite0 member, v4 2560
    assert parent.kernel.shape == (width, 3)
    rng = np.random.default_rng(0)
    head = Head(parent.kernel * 1.5 + 0.01, parent.bias + np.float32(0.5))
    meta = {p.key: p.value for p in proto.metadata_props}
    adapted = ort.InferenceSession(with_head(proto, where, head, meta).SerializeToString())
    size = ModelSpec.from_metadata(meta).input_size
    images = rng.integers(0, 255, (2, size, size, 1), dtype=np.uint8)
    features, probabilities = adapted.run(["features", "probabilities"], {"image": images})
    logits = head.logits(features)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert np.abs(expected - probabilities).max() < (1e-5 if precision == "fp32" else 3e-3)


def test_adapt_reads_dicom_scans_and_counts_a_multiframe_file_once(parents, tmp_path, capsys):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    images, labels = scans(6, seed=6, shifted=True)
    root = tmp_path / "site"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        if label != 2:
            cv2.imwrite(str(folder / f"scan-{i}.png"), image)
            continue
        frames = 2 if i % 2 else None  # every other malignant scan is a two-frame cine
        pixels = np.stack([image, image]) if frames else image
        rows, columns = image.shape
        make_dicom(folder / f"scan-{i}.dcm", pixels, rows=rows, columns=columns, frames=frames)
    out = tmp_path / "out" / "m-fp32.onnx"
    code = main(["adapt", str(root), "--model", str(parents["fp32"]), "--output", str(out)])
    assert code in (0, 1)  # adapted or refused on the numbers: both report the scans read
    assert "{'normal': 6, 'benign': 6, 'malignant': 6} scans" in capsys.readouterr().err


def test_the_refusal_rule_takes_a_point_gain_and_bounds_malignant_sensitivity():
    from edge_runtime.adapt.evaluate import compare
    from edge_runtime.adapt.run import _refusal_reasons

    def _refusal(*args) -> str:
        return "; ".join(reason.detail for reason in _refusal_reasons(*args))

    labels = np.repeat([0, 1, 2], 10)
    groups = np.arange(30).astype(str)
    before = labels.copy()
    before[:4] = 1  # the parent calls 4 normal scans benign
    gained = before.copy()
    gained[0] = 0  # one more normal scan right: a gain whose interval reaches 0
    numbers = compare(labels, before, gained, groups, CLASSES)
    assert numbers["difference"]["balanced_accuracy"]["ci95"][0] <= 0
    assert _refusal(numbers, 2, CLASSES, 0.0) == ""
    lost = gained.copy()
    lost[1], lost[25] = 0, 1  # a second normal scan right, but a malignant one missed
    reason = _refusal(compare(labels, before, lost, groups, CLASSES), 2, CLASSES, 0.0)
    assert reason.startswith("malignant sensitivity 1.000 -> 0.900"), reason  # the only reason
    assert _refusal(compare(labels, before, lost, groups, CLASSES), 2, CLASSES, 0.1) == ""
    reason = _refusal(compare(labels, before, before, groups, CLASSES), 2, CLASSES, 0.0)
    assert "not above 0" in reason


def test_a_fit_of_free_columns_keeps_the_others_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    labels = np.repeat([0, 1, 2], 10)
    parent = Head(rng.normal(size=(6, 3)).astype(np.float32), np.zeros(3, np.float32))
    head = fit_head(x, labels, parent, weight_penalty=0.01, bias_penalty=0.01, free_columns=[0])
    np.testing.assert_array_equal(head.kernel[:, 1:], parent.kernel[:, 1:])
    np.testing.assert_array_equal(head.bias[1:], parent.bias[1:])
    assert not np.allclose(head.kernel[:, 0], parent.kernel[:, 0])
    with pytest.raises(ValueError, match="free_columns must name classes"):
        fit_head(x, labels, parent, weight_penalty=0.01, bias_penalty=0.01, free_columns=[3])


def test_the_whole_layer_is_refitted_only_where_the_parent_s_lesion_classes_fail():
    from edge_runtime.adapt.run import _way

    labels = np.repeat([0, 1, 2], 10)
    normals_missed = np.where(labels == 0, 1, labels)  # every normal called benign
    free, why = _way(labels, normals_missed, CLASSES)
    assert free == [0] and "normal class is what a new scanner breaks" in why
    all_benign = np.ones(30, int)  # the synthetic new scanner's failure
    free, why = _way(labels, all_benign, CLASSES)
    assert free is None and "malignant 0.00" in why
    assert _way(np.repeat([0, 1], 10), np.zeros(20, int), ("benign", "malignant"))[0] is None


def test_the_synthetic_new_scanner_gets_its_whole_layer_refitted(adapted_fp32):
    record = ModelSpec.from_metadata(
        ort.InferenceSession(str(adapted_fp32)).get_modelmeta().custom_metadata_map
    ).adaptation
    assert record["refitted"]["value"] == "the whole last layer"
    assert "malignant" in record["refitted"]["why"]
    card = (adapted_fp32.parent / "clinic.card.md").read_text()
    assert "Refitted: the whole last layer, because the parent's recall of" in card


# ---------------------------------------------------------------- a new user's trial, round 2


def test_adapt_refuses_a_place_holding_a_model_it_did_not_write(
    parents, site, adapted_fp32, tmp_path, capsys
):
    from edge_runtime.model.card import file_record

    # edge-export's place: model-int8.onnx, model-fp32.onnx and a card with no adaptation record
    export = tmp_path / "export"
    export.mkdir()
    for precision in ("int8", "fp32"):
        (export / f"model-{precision}.onnx").write_bytes(parents[precision].read_bytes())
    files = {p.name: file_record(p) for p in sorted(export.glob("*.onnx"))}
    card = {"name": "model", "model_version": "1.0", "classes": list(CLASSES), "files": files}
    (export / "model.card.json").write_text(json.dumps(card))
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    argv = ["adapt", str(site), "--model", str(parents["int8"]), "--output"]
    assert main([*argv, str(export / "model-int8.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"{export / 'model.card.json'}: the card of model-fp32.onnx, model-int8.onnx, " in err
    assert "which edge-classify adapt did not write (it has no adaptation record" in err
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before

    # a model file in the way, with no card to say adapt wrote it
    loose = tmp_path / "loose" / "m-fp32.onnx"
    loose.parent.mkdir()
    loose.write_bytes(parents["fp32"].read_bytes())
    assert main(["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(loose)]) == 2
    assert f"{loose}: already there, and no card (m.card.json)" in capsys.readouterr().err

    # an earlier adaptation of another parent
    proto = onnx.load(str(parents["fp32"]))
    head = read_head(proto, find_head(proto))
    spec = ModelSpec(class_names=CLASSES, input_size=SIZE, model_version="2.0", temperature=0.9)
    other = make_head_model(tmp_path / "other-fp32.onnx", head.kernel, head.bias, size=SIZE,
                            spec=spec)  # fmt: skip
    kept = {p.name: p.read_bytes() for p in adapted_fp32.parent.iterdir()}
    assert main(["adapt", str(site), "--model", str(other), "--output", str(adapted_fp32)]) == 2
    err = capsys.readouterr().err
    assert "clinic.card.json: the card of an adaptation of parent-fp32.onnx (SHA-256 " in err
    assert "not of this run's parent other-fp32.onnx" in err
    assert {p.name: p.read_bytes() for p in adapted_fp32.parent.iterdir()} == kept


def test_a_manifest_that_lists_a_file_twice_is_refused_naming_both_lines(parents, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "site.csv"
    manifest.write_text("path,label\na.png,normal\nb.png,benign\n./a.png,malignant\n")
    with pytest.raises(ValueError, match=r"site\.csv: 1 bad row: line 4: .*a\.png labelled normal "
                       r"on line 2 and malignant on line 4; a scan has one label"):  # fmt: skip
        read_site(manifest, CLASSES)
    manifest.write_text("path,label\na.png,normal\nb.png,benign\nb.png,benign\n")
    with pytest.raises(ValueError, match=r"line 4: .*b\.png listed twice, on lines 3 and 4, as "
                       r"benign both times; list each scan once"):  # fmt: skip
        read_site(manifest, CLASSES)
    manifest.write_text("path,label\na.png,normal\na.png,malignant\n")
    out = tmp_path / "out" / "m-fp32.onnx"
    assert main(["adapt", str(manifest), "--model", str(parents["fp32"]), "--output",
                 str(out)]) == 2  # fmt: skip
    assert "line 3: " in capsys.readouterr().err and not out.parent.exists()


def test_files_that_are_not_one_ultrasound_scan_are_left_out_and_named_in_the_card(
    parents, tmp_path, capsys
):
    images, labels = scans(10, seed=2, shifted=True)
    site = write_site(tmp_path / "site", images, labels)
    rng = np.random.default_rng(0)
    odd = {
        site / "normal" / "black.png": "not an ultrasound scan: a blank frame",
        site / "benign" / "white.png": "not an ultrasound scan: a blank frame",
        site / "malignant" / "noise.png": "not an ultrasound scan: pixel noise",
        site / "malignant" / "two-pages.tif": "holds 2 pages; its label cannot say which one",
    }
    cv2.imwrite(str(site / "normal" / "black.png"), np.zeros((160, 200), np.uint8))
    cv2.imwrite(str(site / "benign" / "white.png"), np.full((160, 200), 255, np.uint8))
    cv2.imwrite(str(site / "malignant" / "noise.png"), rng.integers(0, 256, (160, 200), np.uint8))
    assert cv2.imwritemulti(str(site / "malignant" / "two-pages.tif"), [images[0], images[25]])
    out = tmp_path / "out" / "m-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    card = json.loads((out.parent / "m.card.json").read_text())
    left_out = {item["path"]: item["error"] for item in card["adaptation"]["left_out"]}
    assert set(left_out) == {str(p) for p in odd}
    for path, reason in odd.items():
        assert left_out[str(path)].startswith(reason), left_out[str(path)]
        assert f"{path}: {reason}" in err
    assert card["adaptation"]["scans_per_class"] == {"normal": 10, "benign": 10, "malignant": 10}


def test_manifest_columns_are_read_by_header_name_as_edge_train_reads_them(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "scans" / name).write_bytes(b"")
    manifest = tmp_path / "site.csv"

    def read(text: str) -> list[tuple[str, int, str, bool]]:
        manifest.write_text(text)
        return [(s.path.name, s.label, s.group, s.grouped) for s in read_site(manifest, CLASSES)]

    expected = [("a.png", 0, "p1", True), ("b.png", 2, "p2", True)]
    assert read("label,path,group\nnormal,scans/a.png,p1\nmalignant,scans/b.png,p2\n") == expected
    # edge-train's own manifest: any case, extra columns ignored, the patient as the group
    edge_train = (
        "Path,Label,Patient,Masks\nscans/a.png,normal,p1,a_mask.png\nscans/b.png,malignant,p2,\n"
    )
    assert read(edge_train) == expected
    grouped = "path,label,source,group\nscans/a.png,normal,x,p1\nscans/b.png,malignant,x,p2\n"
    assert read(grouped) == expected
    semicolons = "PATH;LABEL;PATIENT\nscans/a.png;normal;p1\nscans/b.png;malignant;p2\n"
    assert read(semicolons) == expected  # Excel's 'CSV' where a comma is the decimal separator
    # without a header: path,label[,group], as before
    assert read("scans/a.png,normal,p1\nscans/b.png,malignant,p2\n") == expected
    assert read("scans/a.png,normal\n") == [("a.png", 0, str(tmp_path / "scans" / "a.png"), False)]
    with pytest.raises(ValueError, match=r"line 1: label 'class' .*a header row must name"):
        read("file,class\nscans/a.png,normal\n")


def test_a_manifest_whose_paths_are_all_wrong_is_a_data_error_naming_the_csv_folder(
    parents, tmp_path, capsys, monkeypatch
):
    images, labels = scans(10, seed=2, shifted=True)
    write_site(tmp_path / "site", images, labels)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name},patient-{i}"
            for i, p in enumerate(sorted((tmp_path / "site").rglob("*.png")))]  # fmt: skip
    (lists / "site.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)  # the paths are relative to here, not to the CSV's folder
    out = tmp_path / "out" / "m-fp32.onnx"
    code = main(["adapt", "lists/site.csv", "--model", str(parents["fp32"]), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "lists/site.csv: none of the 30 listed files exist (paths are relative to the CSV's "
        f"folder, {lists})" in err
    )
    assert "no patient groups" not in err and "left out" not in err


def test_max_malignant_lost_below_zero_is_refused_before_any_scan_is_read(
    parents, site, tmp_path, capsys
):
    out = tmp_path / "out" / "m-fp32.onnx"
    argv = ["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)]
    assert main([*argv, "--max-malignant-lost", "-1"]) == 2
    err = capsys.readouterr().err
    # refused as the options are parsed: nothing was loaded, read or fitted before it
    assert err.startswith("usage: edge-classify adapt"), err
    assert "error: argument --max-malignant-lost: must be a whole number >= 0. Got '-1'" in err
    assert not out.parent.exists()


def test_a_refusal_by_the_cancer_guard_alone_names_it_and_not_a_lack_of_gain(
    parents, site, tmp_path, capsys, monkeypatch
):
    import edge_runtime.adapt.run as run

    estimate = run._estimate

    def one_cancer_lost(site_features, *args, **kwargs):
        best = estimate(site_features, *args, **kwargs)
        best["lost"] = [int(np.flatnonzero(site_features.labels == 2)[0])]
        return best

    monkeypatch.setattr(run, "_estimate", one_cancer_lost)
    out = tmp_path / "out" / "m-fp32.onnx"
    argv = ["adapt", str(site), "--model", str(parents["fp32"]), "--output", str(out)]
    assert main([*argv, "--max-malignant-lost", "0"]) == 1
    err = capsys.readouterr().err
    assert "the adapted last layer loses more of the cancers the parent caught than " in err
    assert "--max-malignant-lost allows on this site's scans (1 malignant scans" in err
    assert "not better" not in err  # it is better: +0.6 balanced accuracy
    assert not out.parent.exists() or not any(out.parent.iterdir())
