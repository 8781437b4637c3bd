"""Messages that decoders print while reading a file, caught and tied to that file.

libpng, libjpeg and libtiff write warnings straight to the process's standard error (``libpng
warning: iCCP: known incorrect sRGB profile``, ``Corrupt JPEG data: 3 extraneous bytes``), OpenCV
adds its own ``[ WARN:0@0.03] ...`` lines, and pydicom logs and warns about what it had to guess.
Raw, they land between a table's rows or a JSON stream's lines and name no file.

Each decode thread of the runtime gets its own file-descriptor table (Linux ``unshare
(CLONE_FILES)``) whose standard error is a private in-memory file: whatever the C libraries
print while that thread decodes is read back after each file and returned with it, as are
pydicom's messages (a filter on its logger, per thread). The runtime logs them in the main
thread as ``<file>: <message>`` warnings, which ``--quiet`` silences. Where the platform has no
``unshare``, decoder lines still reach standard error raw; pydicom's are still caught.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator

_CLONE_FILES = 0x00000400
_local = threading.local()
_installed = threading.Lock()
_OPENCV_PREFIX = re.compile(r"^\[ ?(WARN|ERROR|INFO):\d+@[\d.]+\] global \S+ \S+ ")


def private_stderr() -> None:
    """Give the calling thread its own standard error (a ThreadPoolExecutor ``initializer``).

    Every file descriptor the thread inherited but does not own is closed in its private table,
    so it keeps no file (or lock) of the main thread open.
    """
    install_pydicom_filter()
    if not hasattr(os, "memfd_create"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_FILES) != 0:
            return
        memfd = os.memfd_create("edge-classify-stderr", os.MFD_CLOEXEC)
        os.dup2(memfd, 2)
        os.close(memfd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)
    except (AttributeError, OSError, ValueError):
        return
    _local.stderr = True


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Collect, in the list it yields, what the code inside prints and what pydicom says.

    The list is filled when the block ends (also when it raises).
    """
    messages: list[str] = []
    own = getattr(_local, "stderr", False)
    if own:
        os.lseek(2, 0, os.SEEK_SET)
        os.ftruncate(2, 0)
    previous = getattr(_local, "sink", None)
    _local.sink = messages
    try:
        yield messages
    finally:
        _local.sink = previous
        if own:
            size = os.lseek(2, 0, os.SEEK_END)
            os.lseek(2, 0, os.SEEK_SET)
            printed = os.read(2, min(size, 1 << 16)).decode("utf-8", "replace")
            os.ftruncate(2, 0)
            os.lseek(2, 0, os.SEEK_SET)
            messages[:0] = [_clean(line) for line in printed.splitlines() if line.strip()]


def note(message: str) -> None:
    """Add a message about the file being decoded (logged with its name by the runtime);
    outside :func:`collecting`, log it as a warning."""
    sink = getattr(_local, "sink", None)
    if sink is None:
        logging.getLogger("edge_runtime").warning(message)
    else:
        sink.append(message)


class _PydicomSink(logging.Filter):
    """Diverts pydicom's log records into the current thread's list, if it is collecting."""

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_local, "sink", None)
        if sink is None:
            return True
        sink.append(f"pydicom: {record.getMessage()}")
        return False


def install_pydicom_filter() -> None:
    """Route pydicom's messages through :func:`collecting` (once per process).

    pydicom sends each warning to its logger and also to :func:`warnings.warn`; the second copy
    is ignored for pydicom's modules, the logged one is kept.
    """
    with _installed:
        logger = logging.getLogger("pydicom")
        if any(isinstance(f, _PydicomSink) for f in logger.filters):
            return
        logger.addFilter(_PydicomSink())
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _clean(line: str) -> str:
    """``[ WARN:0@0.03] global grfmt_png.cpp:793 readFromStreamOrBuffer PNG input ...`` ->
    ``OpenCV: PNG input ...``; other lines as printed."""
    line = line.strip()
    match = _OPENCV_PREFIX.match(line)
    return f"OpenCV: {line[match.end() :]}" if match else line
