"""edge-classify runtime: ONNX Runtime + OpenCV, no TensorFlow."""

import os

# onnxruntime (1.32, Linux) starts Microsoft's 1DS telemetry when it is imported: it writes a
# device id and an event queue under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and sends
# them to mobile.events.data.microsoft.com when it can. A device host beside a scanner must not
# call out, so it is off unless the user set ORT_DISABLE_TELEMETRY themselves. This runs before
# any submodule imports onnxruntime (onnxruntime.disable_telemetry_events() does not stop it).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from edge_runtime.classifier import (
    Classification,
    Classifier,
    ClassifierOptions,
    Failure,
    Result,
    Timing,
)
from edge_runtime.contract import (
    CAM,
    FEATURES,
    INPUT_NAME,
    LESION,
    PROBABILITIES,
    ContractError,
    ModelSpec,
    Precision,
    ResizePolicy,
)
from edge_runtime.decode import InputError, decode_gray, load_gray
from edge_runtime.lesion import Lesion, find_lesion
from edge_runtime.preprocess import fit_to_square, make_batch
from edge_runtime.session import Provider
from edge_runtime.summary import FileSummary, summarize, with_summaries

_LAZY = {"Watcher": "edge_runtime.watch", "WatchOptions": "edge_runtime.watch"}


def __getattr__(name: str):
    """``Watcher`` and ``WatchOptions`` are imported on first use: ``edge-classify one.png``
    never needs them (a shorter cold start)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")


__all__ = [
    "CAM",
    "FEATURES",
    "INPUT_NAME",
    "LESION",
    "PROBABILITIES",
    "Classification",
    "Classifier",
    "ClassifierOptions",
    "ContractError",
    "Failure",
    "FileSummary",
    "InputError",
    "Lesion",
    "ModelSpec",
    "Precision",
    "Provider",
    "ResizePolicy",
    "Result",
    "Timing",
    "WatchOptions",
    "Watcher",
    "decode_gray",
    "find_lesion",
    "fit_to_square",
    "load_gray",
    "make_batch",
    "summarize",
    "with_summaries",
]
