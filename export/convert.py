"""Keras -> ONNX FP32 with tf2onnx, and the contract metadata written into the file."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from edge_runtime.model.contract import CAM, FEATURES, INPUT_NAME, LESION, PROBABILITIES, ModelSpec

log = logging.getLogger(__name__)
OPSET = 17


def keras_to_onnx(model, input_size: int, path: Path) -> Path:
    """Convert a classifier to ONNX (opset 17), input ``image`` uint8 [N,S,S,1]; outputs
    ``probabilities`` and ``cam``, and ``features`` and ``lesion`` where the model has them."""
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, input_size, input_size, 1), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    outputs = {o.name for o in proto.graph.output}
    if not {PROBABILITIES, CAM} <= outputs <= {PROBABILITIES, CAM, FEATURES, LESION}:
        raise ValueError(
            f"The Keras model's outputs must be {PROBABILITIES!r} and {CAM!r}, with optional "
            f"{FEATURES!r} and {LESION!r}. Got {sorted(outputs)} "
            "instead: train it with `edge-train` (training.model.classifier.build_classifier)."
        )
    onnx.save(proto, path)
    return path


def write_metadata(path: Path, spec: ModelSpec, *, doc: str = "") -> None:
    """Replace the file's ``metadata_props`` with the contract metadata of ``spec``."""
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "edge-classify"
    if doc:
        model.doc_string = doc
    onnx.save(model, path)
