"""What ``edge-train`` and ``edge-export`` print, what goes to the log, and how they exit.

The console gets this project's own messages (INFO and up) and every ERROR; TensorFlow's
start-up noise (CUDA probes, CPU-feature notes, retracing warnings) and Python warnings go only to
the log file when there is one (``RUN_DIR/train.log``), never twice. TensorFlow is imported here,
lazily, so that ``--help`` and a wrong path answer before it loads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import traceback as tb
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.status import ExitStatus

OWN_LOGGERS = ("training", "export", "edge_runtime")
_TAG = "_edge_classify_command"  # marks the handlers this module adds, so reruns replace them
USAGE_ERRORS = (FileNotFoundError, ValueError, PermissionError)  # a message, not a stack
TF_LOG_LEVEL = "3"  # TensorFlow's C++ logging: 3 keeps only FATAL


def _own_or_error(record: logging.LogRecord) -> bool:
    own = record.name.split(".")[0] in OWN_LOGGERS or record.name == "__main__"
    return own or record.levelno >= logging.ERROR


@contextlib.contextmanager
def command_logging(stream: TextIO, log_file: Path | None = None) -> Iterator[None]:
    """Log this project's messages to ``stream`` and everything to ``log_file`` (if given)
    while the block runs; the handlers are removed (and the file closed) afterwards.

    Python warnings are routed into logging (so into the file, not the console), and
    TensorFlow's own logger loses its handler, so that each of its messages appears once.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(stream)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(_own_or_error)
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


def missing_extra(
    command: str, extra: str, modules: Sequence[str], stderr: TextIO
) -> ExitStatus | None:
    """Say which extra to install when any of ``modules`` is not installed (checked without
    importing them): writes the message to ``stderr`` and returns ``ExitStatus.USAGE``; None when
    all are there."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    stderr.write(
        f"{command}: error: {command} needs the {extra} extra: pip install "
        f"'edge-classify[{extra}]' (not installed: {', '.join(missing)})\n"
    )
    return ExitStatus.USAGE


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


def add_traceback_option(parser: argparse.ArgumentParser) -> None:
    """``--traceback``: errors show their Python stack (for bug reports)."""
    parser.add_argument(
        "--traceback", action="store_true", help="show the full Python traceback on an error"
    )


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    stdout: TextIO,
    stderr: TextIO,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.Namespace | ExitStatus:
    """The parsed arguments, or the status to exit with (``--help``: SUCCESS; a usage error,
    also one ``check`` raises with ``parser.error``: USAGE), with argparse's text on the
    given streams."""
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
            if check is not None:
                check(args)
    except SystemExit as exit_:
        return ExitStatus.SUCCESS if exit_.code == 0 else ExitStatus.USAGE
    return args


def run_command(
    prog: str,
    body: Callable[[], int],
    *,
    stderr: TextIO,
    traceback: bool = False,
    usage_errors: tuple[type[BaseException], ...] = (
        FileNotFoundError,
        ValueError,
        PermissionError,
    ),
) -> int:
    """Run a command's body and turn what it raises into an :class:`ExitStatus`.

    ``usage_errors`` print ``<prog>: error: <message>`` and give ``USAGE``; Ctrl-C gives
    ``INTERRUPTED``; a closed stdout (``| head``) ends quietly. With ``traceback``, errors are
    re-raised with their stack, for bug reports.
    """
    try:
        return body()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):  # keep Python's exit flush quiet too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.PARTIAL
    except KeyboardInterrupt:
        stderr.write(f"{prog}: interrupted\n")
        return ExitStatus.INTERRUPTED
    except usage_errors as exc:
        if traceback:
            raise
        stderr.write(f"{prog}: error: {exc}\n")
        return ExitStatus.USAGE
    except Exception as exc:
        if traceback:
            raise
        stderr.write(
            f"{prog}: internal error: {type(exc).__name__}: {exc}\n"
            f"  at {tb.extract_tb(exc.__traceback__)[-1].filename}; rerun with --traceback to "
            "see the stack, and report it with that output\n"
        )
        return ExitStatus.USAGE
