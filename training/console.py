"""What ``edge-train`` and ``edge-export`` print and what goes to the log (their shell, the
parsing and the exit statuses, is :mod:`edge_runtime.app.shell`, shared with ``edge-classify``).

The console gets this project's own messages (INFO and up) and every ERROR; TensorFlow's
start-up noise (CUDA probes, CPU-feature notes, retracing warnings) and Python warnings go only to
the log file when there is one (``RUN_DIR/train.log``), never twice. TensorFlow is imported here,
lazily, so that ``--help`` and a wrong path answer before it loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

OWN_LOGGERS = ("training", "export", "edge_runtime")
_TAG = "_edge_classify_command"  # marks the handlers this module adds, so reruns replace them
TF_LOG_LEVEL = "3"  # TensorFlow's C++ logging: 3 keeps only FATAL


def _own_or_error(record: logging.LogRecord) -> bool:
    own = record.name.split(".")[0] in OWN_LOGGERS or record.name == "__main__"
    return own or record.levelno >= logging.ERROR


@contextlib.contextmanager
def command_logging(
    stream: TextIO, log_file: Path | None = None, *, quiet: bool = False, prefix: str = ""
) -> Iterator[None]:
    """Log this project's messages to ``stream`` (warnings and errors only when ``quiet``; each
    line after its time starts with ``prefix``) and everything to ``log_file`` (if given) while
    the block runs; the handlers are removed (and the file closed) afterwards.

    Python warnings are routed into logging (so into the file, not the console), and
    TensorFlow's own logger loses its handler, so that each of its messages appears once.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(stream)
    console.setFormatter(
        logging.Formatter("%(asctime)s " + prefix.replace("%", "%%") + "%(message)s", "%H:%M:%S")
    )
    console.addFilter(_own_or_error)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file)
    previous_level = root.level
    for handler in handlers:
        setattr(handler, _TAG, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)


def import_tensorflow() -> None:
    """Import TensorFlow and Keras with their start-up noise sent to the log (DEBUG).

    ``TF_CPP_MIN_LOG_LEVEL`` is set to 3 unless the caller set it (``TF_CPP_MIN_LOG_LEVEL=0
    edge-train ...`` shows everything); what the C++ side writes to stderr while importing is
    caught and logged; absl's and TensorFlow's Python loggers log through ours.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    log = logging.getLogger(__name__)
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(caught.fileno(), 2)
            import keras  # noqa: F401
            import tensorflow as tf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        noise = caught.read().decode(errors="replace").strip()
    if noise:
        log.debug("TensorFlow at import:\n%s", noise)
    tf_logger = tf.get_logger()
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)
    tf_logger.propagate = True
    tf.autograph.set_verbosity(0)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)
    log.debug("TF_CPP_MIN_LOG_LEVEL=%s", os.environ["TF_CPP_MIN_LOG_LEVEL"])
