"""edge-classify runtime: ONNX Runtime + OpenCV, no TensorFlow."""

import os

# onnxruntime (1.32, Linux) starts Microsoft's 1DS telemetry when it is imported: it writes a
# device id and an event queue under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and sends
# them to mobile.events.data.microsoft.com when it can. A device host beside a scanner must not
# call out, so it is off unless the user set ORT_DISABLE_TELEMETRY themselves. This runs before
# any submodule imports onnxruntime (onnxruntime.disable_telemetry_events() does not stop it).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

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
