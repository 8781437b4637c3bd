"""The runtime refuses models that break the contract, and says what is wrong."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto

from edge_runtime.contract import ContractError, ModelSpec, Precision
from edge_runtime.session import Provider, open_model
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
