"""edge-classify runtime: ONNX Runtime + OpenCV, no TensorFlow."""

from edge_runtime.contract import (
    CAM,
    INPUT_NAME,
    PROBABILITIES,
    ContractError,
    ModelSpec,
    Precision,
    ResizePolicy,
)
from edge_runtime.decode import InputError, decode_gray, load_gray
from edge_runtime.preprocess import fit_to_square, make_batch

__all__ = [
    "CAM",
    "INPUT_NAME",
    "PROBABILITIES",
    "ContractError",
    "InputError",
    "ModelSpec",
    "Precision",
    "ResizePolicy",
    "decode_gray",
    "fit_to_square",
    "load_gray",
    "make_batch",
]
