"""``edge-classify adapt`` of an ensemble parent (training/model/ensemble.py ``combine``): its
members' layers are found and averaged into one prior over the ``features`` output, and the
adapted model reads one layer over that output (edge_runtime/adapt/graph.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.adapt.fit import Head, fit_with_strength, softmax
from edge_runtime.adapt.graph import (
    EnsembleHeadGraph,
    HeadGraph,
    find_head,
    read_head,
    with_features,
    with_head,
)
from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.model.contract import ContractError, ModelSpec, Precision, ResizePolicy
from edge_runtime.model.session import Provider, open_model
from tests.onnx_models import CLASSES, make_ensemble_model
from tests.test_adapt import SIZE, scans, write_site

WIDTHS = (24, 16)  # the members' pooled widths D_m


def member_heads(seed: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    kernels = tuple(rng.normal(0, 1.0, (d, len(CLASSES))).astype(np.float32) for d in WIDTHS)
    biases = tuple(rng.normal(0, 0.3, len(CLASSES)).astype(np.float32) for _ in WIDTHS)
    return kernels, biases


def squares(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([fit_to_square(i, SIZE, ResizePolicy.LETTERBOX) for i in images])[..., None]


def run(model: Path | onnx.ModelProto, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(names, {"image": batch})


@pytest.mark.parametrize("mirror", [False, True])
def test_the_prior_of_an_ensemble_is_its_members_logit_average(tmp_path, mirror):
    kernels, biases = member_heads(0)
    path = make_ensemble_model(tmp_path / "ens.onnx", kernels, biases, size=SIZE, mirror=mirror)
    proto = onnx.load(str(path))
    where = find_head(proto)
    assert isinstance(where, EnsembleHeadGraph)
    assert where.widths == WIDTHS
    assert [m.kernel for m in where.members] == ["m0_kernel", "m1_kernel"]
    head = read_head(proto, where)
    np.testing.assert_array_equal(head.kernel, np.concatenate(kernels) / np.float32(2))
    np.testing.assert_allclose(head.bias, (biases[0] + biases[1]) / 2, rtol=1e-6)
    assert with_features(proto, where).graph.output == proto.graph.output

    images, _ = scans(2, seed=5, shifted=False)
    batch = squares(images)
    features, probabilities = run(path, ["features", "probabilities"], batch)
    # exactly the mean of the members' logits over members (and views, with mirror) ...
    views = [batch, batch[:, :, ::-1]] if mirror else [batch]
    plain = make_ensemble_model(tmp_path / "plain.onnx", kernels, biases, size=SIZE)
    member_logits = []
    for view in views:
        (pooled,) = run(plain, ["features"], np.ascontiguousarray(view))
        parts = np.split(pooled, np.cumsum(WIDTHS)[:-1], axis=1)
        member_logits += [p @ k + b for p, k, b in zip(parts, kernels, biases, strict=True)]
    np.testing.assert_allclose(
        head.logits(features), np.mean(member_logits, axis=0), rtol=1e-4, atol=1e-4
    )
    # ... and close to, not equal to, the mean of their probabilities the parent outputs
    mean_probabilities = np.mean([softmax(z) for z in member_logits], axis=0)
    np.testing.assert_allclose(probabilities, mean_probabilities, atol=1e-5)
    assert np.abs(softmax(head.logits(features)) - probabilities).max() > 1e-4


def test_an_adapted_ensemble_computes_its_layer_over_the_features_and_classifies(tmp_path):
    kernels, biases = member_heads(1)
    spec = ModelSpec(class_names=CLASSES, input_size=SIZE, lesion_stride=4, model_version="2.0")
    path = make_ensemble_model(tmp_path / "ens.onnx", kernels, biases, spec=spec, mirror=True)
    proto = onnx.load(str(path))
    where = find_head(proto)
    rng = np.random.default_rng(2)
    fitted = Head(
        rng.normal(0, 1, (sum(WIDTHS), 3)).astype(np.float32), np.float32([0.1, -0.2, 0.3])
    )
    meta = {p.key: p.value for p in proto.metadata_props}
    adapted = with_head(proto, where, fitted, meta)
    softmaxes = [n for n in adapted.graph.node if n.op_type == "Softmax"]
    assert [n.output[0] for n in softmaxes] == ["probabilities"]  # the members' are gone
    out = tmp_path / "adapted-fp32.onnx"
    onnx.save(adapted, str(out))

    loaded = open_model(out, provider=Provider.CPU)  # reloads under the contract
    assert loaded.spec.model_version == "2.0"
    images, _ = scans(2, seed=6, shifted=True)
    batch = squares(images)
    features, probabilities, cam = loaded.session.run(
        ["features", "probabilities", "cam"], {"image": batch}
    )
    np.testing.assert_allclose(probabilities, softmax(fitted.logits(features)), atol=1e-5)
    (parent_cam,) = run(path, ["cam"], batch)
    np.testing.assert_array_equal(cam, parent_cam)  # the parent's cam
    with Classifier.from_path(out, provider="cpu") as clf:
        results = clf.classify(images)
    assert [r.label for r in results] == [CLASSES[i] for i in probabilities.argmax(1)]

    # adapted again, it is found as one layer over the features output, the cam left alone
    again = find_head(adapted)
    assert isinstance(again, HeadGraph) and again.pooled == "features" and again.cam == ""
    np.testing.assert_array_equal(read_head(adapted, again).kernel, fitted.kernel)
    twice = with_head(adapted, again, Head(fitted.kernel * 2, fitted.bias), meta)
    (p2,) = run(twice, ["probabilities"], batch)
    np.testing.assert_allclose(p2, softmax(2 * features @ fitted.kernel + fitted.bias), atol=1e-5)


def test_an_ensemble_that_is_not_the_pattern_is_refused_naming_what_was_found(tmp_path):
    kernels, biases = member_heads(0)
    path = make_ensemble_model(tmp_path / "ens.onnx", kernels, biases, size=SIZE)
    sigmoid = onnx.load(str(path))
    for node in sigmoid.graph.node:
        if node.op_type == "Softmax":
            node.op_type = "Sigmoid"
            del node.attribute[:]
    with pytest.raises(ContractError, match=r"not come from a Softmax.*found Sigmoid"):
        find_head(sigmoid)

    swapped = onnx.load(str(path))
    concat = next(n for n in swapped.graph.node if n.output[0] == "features")
    concat.input[:] = list(reversed(concat.input))
    head = read_head(swapped, find_head(swapped))  # the members follow the features' order
    np.testing.assert_array_equal(head.kernel, np.concatenate(kernels[::-1]) / np.float32(2))

    partial = onnx.load(str(path))
    concat = next(n for n in partial.graph.node if n.output[0] == "features")
    concat.input[:] = ["m0_pooled", "m0_pooled"]
    with pytest.raises(ContractError, match="'features' output holds 2 parts for 2 members"):
        find_head(partial)


@pytest.fixture(scope="module")
def ensemble_parents(tmp_path_factory) -> dict[str, Path]:
    """An FP32 ensemble of two mirrored members fitted on the ordinary synthetic scanner, and its
    INT8 model (quantized by export's own code) with the FP32 one as its recheck partner."""
    from edge_runtime.postprocess.recheck import recheck_margin
    from export.convert import write_metadata
    from export.quantize import QuantConfig, quantize_int8

    root = tmp_path_factory.mktemp("ensemble")
    zeros = tuple(np.zeros((d, 3), np.float32) for d in WIDTHS)
    bias0 = (np.zeros(3, np.float32),) * 2
    probe = make_ensemble_model(root / "probe.onnx", zeros, bias0, size=SIZE)
    images, labels = scans(40, seed=1, shifted=False)
    batch = squares(images)
    (features,) = run(probe, ["features"], batch)
    parts = np.split(features, np.cumsum(WIDTHS)[:-1], axis=1)
    heads = [
        fit_with_strength(x, labels, Head(z, b), strength)
        for x, z, b, strength in zip(parts, zeros, bias0, (0.01, 0.03), strict=True)
    ]
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=SIZE,
        model_version="2.0",
        temperature=0.9,
        lesion_stride=4,
        lesion_threshold=0.5,
    )
    fp32 = make_ensemble_model(
        root / "ens-fp32.onnx",
        tuple(h.kernel for h in heads),
        tuple(h.bias for h in heads),
        spec=spec,
        mirror=True,
    )
    int8 = quantize_int8(fp32, root / "ens-int8.onnx", batch, QuantConfig(batch_size=8))
    probabilities = [run(p, ["probabilities"], batch)[0] for p in (fp32, int8)]
    int8_spec = replace(
        spec,
        precision=Precision.INT8,
        recheck_margin=max(recheck_margin(*probabilities), 0.01),
        recheck_model=fp32.name,
    )
    write_metadata(int8, int8_spec)
    return {"fp32": fp32, "int8": int8}


def test_adapt_writes_an_ensembles_int8_model_and_partner_and_records_the_prior(
    ensemble_parents, tmp_path
):
    images, labels = scans(10, seed=2, shifted=True)
    site = write_site(tmp_path / "clinic", images, labels)
    int8 = ensemble_parents["int8"]
    assert isinstance(find_head(onnx.load(str(int8))), EnsembleHeadGraph)  # through QDQ pairs
    out = tmp_path / "out" / "clinic-int8.onnx"
    code = main(["adapt", str(site), "--model", str(int8), "--output", str(out)])
    assert code in (0, 1)  # written, or refused by its criteria: never a crash
    if code == 1:
        pytest.skip("the synthetic site did not justify adapting this ensemble")
    partner = out.with_name("clinic-fp32.onnx")
    batch = squares(images)
    for path in (out, partner):
        spec = open_model(path, provider=Provider.CPU).spec
        record = spec.adaptation
        assert record["ensemble"]["members"] == 2
        assert record["ensemble"]["feature_widths"] == list(WIDTHS)
        head = read_head(onnx.load(str(path)), find_head(onnx.load(str(path))))
        features, probabilities = run(path, ["features", "probabilities"], batch)
        tolerance = 1e-4 if spec.precision is Precision.FP32 else 4e-3
        np.testing.assert_allclose(probabilities, softmax(head.logits(features)), atol=tolerance)
    card = json.loads((out.parent / "clinic.card.json").read_text())
    assert card["adaptation"]["ensemble"]["before"].startswith("the parent's calls are its own")
    assert "Ensemble parent (2 members" in (out.parent / "clinic.card.md").read_text()


def test_readapting_an_adapted_ensemble_is_judged_against_the_ensemble_and_keeps_its_record(
    ensemble_parents, tmp_path, capsys
):
    """The card of a re-adapted ensemble names the ensemble as parent: its "parent" column must
    be the ensemble's own calls (not its members' logit average the adapted file carries), and
    its ensemble record stays. Without the ensemble's file, that baseline cannot be rebuilt."""
    import shutil

    from edge_runtime.model.card import file_sha256

    parent = tmp_path / "parent" / "ens-fp32.onnx"
    parent.parent.mkdir()
    shutil.copy(ensemble_parents["fp32"], parent)
    images, labels = scans(10, seed=2, shifted=True)
    site = write_site(tmp_path / "clinic", images, labels)
    first = tmp_path / "a" / "clinic-fp32.onnx"
    code = main(["adapt", str(site), "--model", str(parent), "--output", str(first)])
    assert code in (0, 1)
    if code == 1:
        pytest.skip("the synthetic site did not justify adapting this ensemble")
    second = tmp_path / "b" / "again-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(first), "--output", str(second)]) == 0
    assert "starting again from its parent ens-fp32.onnx" in capsys.readouterr().err
    record, again = (open_model(p, provider=Provider.CPU).spec.adaptation for p in (first, second))
    assert again["parent"]["sha256"] == file_sha256(parent)
    assert again["ensemble"] == record["ensemble"]
    assert again["cross_validation"]["before"] == record["cross_validation"]["before"]
    card = json.loads((second.parent / "again.card.json").read_text())
    assert card["parents"] == {"again-fp32.onnx": {"file": "ens-fp32.onnx",
                                                   "sha256": file_sha256(parent)}}  # fmt: skip
    assert card["adaptation"]["ensemble"] == record["ensemble"]

    parent.unlink()  # the ensemble's own calls are gone with its file
    third = tmp_path / "c" / "third-fp32.onnx"
    assert main(["adapt", str(site), "--model", str(first), "--output", str(third)]) == 2
    err = capsys.readouterr().err
    assert f"{first}: is an adapted ensemble, and its parent ens-fp32.onnx (SHA-256 " in err
    assert "was not found (" in err and "Pass that model as --model" in err
    assert not third.parent.exists()
