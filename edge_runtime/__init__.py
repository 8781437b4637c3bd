"""edge-classify runtime: ONNX Runtime + OpenCV, no TensorFlow.

The public surface is what a user calls: :class:`Classifier` with its :class:`ClassifierOptions`,
the results it gives (:class:`Classification`, :class:`Failure`, :data:`Result`, :class:`Timing`,
:class:`Lesion`, :class:`FileSummary` and :func:`with_summaries` / :func:`summarize` for
multi-frame files), :class:`Watcher` and :class:`WatchOptions`, the errors (:class:`ContractError`,
:class:`InputError`), the enums a user passes (:class:`Precision`, :class:`Provider`),
:class:`ModelSpec` and ``__version__``. Helpers live in their modules (docs/architecture.md).
"""

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
from edge_runtime.io.decode import InputError
from edge_runtime.model.contract import ContractError, ModelSpec, Precision
from edge_runtime.model.session import Provider
from edge_runtime.postprocess.lesion import Lesion
from edge_runtime.postprocess.summary import FileSummary, summarize, with_summaries

_LAZY = {"Watcher": "edge_runtime.app.watch", "WatchOptions": "edge_runtime.app.watch"}
# names this namespace exported before 0.2; they still resolve, with a warning, for one release
_MOVED = {
    "CAM": "edge_runtime.model.contract",
    "FEATURES": "edge_runtime.model.contract",
    "INPUT_NAME": "edge_runtime.model.contract",
    "LESION": "edge_runtime.model.contract",
    "PROBABILITIES": "edge_runtime.model.contract",
    "ResizePolicy": "edge_runtime.model.contract",
    "decode_gray": "edge_runtime.io.decode",
    "load_gray": "edge_runtime.io.decode",
    "find_lesion": "edge_runtime.postprocess.lesion",
    "fit_to_square": "edge_runtime.io.preprocess",
    "make_batch": "edge_runtime.io.preprocess",
}


def __getattr__(name: str):
    """``Watcher`` and ``WatchOptions`` are imported on first use (``edge-classify one.png`` never
    needs them: a shorter cold start); ``__version__`` is read from the installed package; the
    helpers this namespace used to export resolve with a DeprecationWarning."""
    import importlib

    if name == "__version__":
        from edge_runtime.app.shell import package_version

        return package_version()
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        import warnings

        warnings.warn(
            f"edge_runtime.{name} is deprecated: import it from {_MOVED[name]}; the top-level "
            "alias will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")


__all__ = [
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
    "Result",
    "Timing",
    "WatchOptions",
    "Watcher",
    "__version__",
    "summarize",
    "with_summaries",
]
