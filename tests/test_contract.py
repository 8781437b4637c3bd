"""The runtime refuses models that break the contract, and says what is wrong."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto

from edge_runtime.model.contract import ContractError, ModelSpec, NormalRule, Precision
from edge_runtime.model.session import Provider, open_model
from tests.onnx_models import CLASSES, make_contract_model


def test_contract_metadata_round_trips():
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=224,
        precision=Precision.INT8,
        temperature=1.3,
        abstain_threshold=0.6,
        metrics={"accuracy": 0.8},
    )
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


def test_contract_v2_metadata_round_trips():
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=224,
        lesion_stride=4,
        lesion_threshold=0.4,
        malignant_threshold=0.2,
        unfamiliar={"score": "feature_distance", "threshold": 3.5},
        adaptation={"site": "clinic-a"},
    )
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


@pytest.mark.parametrize(
    "changes",
    [
        {"lesion_min_area": 0.005},
        {"normal_rule": NormalRule.LESION_HEAD_OR_CLASSIFIER},
        {"normal_rule": NormalRule.LESION_HEAD_OR_CLASSIFIER, "normal_gate": 0.15},
    ],
)
def test_a_lesion_rule_an_older_runtime_cannot_apply_writes_contract_version_3(changes):
    plain = ModelSpec(class_names=CLASSES, input_size=224, lesion_stride=4)
    spec = ModelSpec(class_names=CLASSES, input_size=224, lesion_stride=4, **changes)
    assert plain.to_metadata()["edge_classify.contract_version"] == "2"
    assert spec.to_metadata()["edge_classify.contract_version"] == "3"
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lesion_stride": 4, "normal_gate": 0.15}, "a normal gate .0.15. needs the"),
        ({"lesion_min_area": 0.01}, "a lesion minimum area .0.01. needs a lesion output"),
    ],
)
def test_lesion_rule_parts_without_what_they_apply_to_are_refused(changes, message):
    meta = ModelSpec(class_names=CLASSES, input_size=224, **changes).to_metadata()
    with pytest.raises(ContractError, match=message):
        ModelSpec.from_metadata(meta)


def test_the_or_classifier_normal_rule_needs_a_lesion_output():
    meta = ModelSpec(
        class_names=CLASSES, input_size=224, normal_rule=NormalRule.LESION_HEAD_OR_CLASSIFIER
    ).to_metadata()
    with pytest.raises(ContractError, match="lesion_head_or_classifier normal rule needs"):
        ModelSpec.from_metadata(meta)


def test_a_version_1_model_stays_valid(tmp_path):
    path = make_contract_model(tmp_path / "m.onnx")
    proto = onnx.load(path)
    for prop in proto.metadata_props:
        if prop.key == "edge_classify.contract_version":
            prop.value = "1"
    onnx.save(proto, path)
    model = open_model(path)
    assert not model.spec.has_lesion


def test_open_model_accepts_lesion_and_features_outputs(tmp_path):
    model = open_model(
        make_contract_model(tmp_path / "m.onnx", lesion_stride=4, features=True),
        provider=Provider.CPU,
    )
    assert model.spec.has_lesion and model.spec.lesion_stride == 4
    assert {o.name for o in model.session.get_outputs()} >= {"lesion", "features"}


def test_open_model_refuses_a_lesion_stride_without_a_lesion_output(tmp_path):
    spec = ModelSpec(class_names=CLASSES, input_size=64, lesion_stride=4)
    path = make_contract_model(tmp_path / "m.onnx", spec=spec)
    with pytest.raises(ContractError, match=r"lesion stride .4. and the outputs"):
        open_model(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lesion_threshold", 1.0, "lesion threshold must be in"),
        ("malignant_threshold", -0.1, "malignant threshold must be in"),
        ("lesion_stride", 1000, "lesion stride must be"),
        ("lesion_min_area", 1.0, "lesion minimum area must be a share"),
        ("lesion_min_area", -0.01, "lesion minimum area must be a share"),
        ("normal_gate", 1.0, "normal gate must be a probability"),
    ],
)
def test_contract_refuses_thresholds_out_of_range(field, value, message):
    meta = ModelSpec(class_names=CLASSES, input_size=224, **{field: value}).to_metadata()
    with pytest.raises(ContractError, match=message):
        ModelSpec.from_metadata(meta)


def test_open_model_accepts_a_conforming_model(tmp_path):
    model = open_model(make_contract_model(tmp_path / "m.onnx"), provider=Provider.CPU)
    assert model.spec.class_names == CLASSES
    assert model.providers[0] == "CPUExecutionProvider"


def test_open_model_refuses_missing_metadata(tmp_path):
    path = make_contract_model(tmp_path / "m.onnx")
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, path)
    with pytest.raises(ContractError, match=r"metadata lacks edge_classify\.contract_version"):
        open_model(path)


def test_open_model_refuses_float_input(tmp_path):
    path = make_contract_model(tmp_path / "m.onnx", input_dtype=TensorProto.FLOAT)
    with pytest.raises(ContractError, match="input 'image' must be uint8"):
        open_model(path)


def test_open_model_refuses_missing_cam_output(tmp_path):
    path = make_contract_model(tmp_path / "m.onnx", outputs=("probabilities", "heat"))
    with pytest.raises(ContractError, match="lacks output 'cam'"):
        open_model(path)


def test_open_model_refuses_input_size_that_disagrees_with_metadata(tmp_path):
    spec = ModelSpec(class_names=CLASSES, input_size=96)
    path = make_contract_model(tmp_path / "m.onnx", size=64, spec=spec)
    with pytest.raises(ContractError, match=r"must be \[N, 96, 96, 1\]"):
        open_model(path)


def test_open_model_refuses_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ContractError, match="could not load it as a model"):
        open_model(path)


def test_open_model_refuses_a_file_changed_after_export(tmp_path):
    path = make_contract_model(tmp_path / "m-int8.onnx")
    card = {"files": {"m-int8.onnx": {"sha256": "0" * 64}}}
    (tmp_path / "m.card.json").write_text(json.dumps(card))
    with pytest.raises(ContractError, match="does not match"):
        open_model(path)


def test_metadata_with_one_class_is_refused():
    meta = ModelSpec(class_names=("only",) * 2, input_size=64).to_metadata()
    meta["edge_classify.class_names"] = json.dumps(["only"])
    with pytest.raises(ContractError, match="at least two"):
        ModelSpec.from_metadata(meta)
