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
    _declare_static_output_shapes(proto, model)
    onnx.save(proto, path)
    return path


def _declare_static_output_shapes(proto: onnx.ModelProto, model) -> None:
    """Give each graph output the dimensions (all but N) that Keras knows statically, where
    tf2onnx declared them unknown (it does after some reshapes, e.g. an ensemble member's lesion
    map resized to the ensemble's grid); the contract needs them, and the parity gates compare
    every output with Keras's element by element."""
    for output in proto.graph.output:
        known = model.get_layer(output.name).output.shape
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(known):
            continue
        for dim, size in zip(list(dims)[1:], known[1:], strict=True):
            if size is not None and not dim.HasField("dim_value"):
                dim.dim_value = int(size)


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
