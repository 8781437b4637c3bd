"""Cines exported as video files (AVI, MP4...), read a batch of frames at a time like DICOM cines.

Scanners export cine loops to USB as AVI or MP4 beside their still images. OpenCV's video reader
(FFmpeg, in the base install) decodes them; each frame is one record, and the file gets a summary
(:mod:`edge_runtime.postprocess.summary`), as for a DICOM cine. Frames are decoded on demand, a
batch at a time (:meth:`edge_runtime.io.decode.Scan.read`), so memory follows the batch, never
the video's length.

OpenCV reads the file through a Python stream that opens the file again in the thread that reads
each batch and closes it after: the runtime's decode threads each have their own file-descriptor
table (:mod:`edge_runtime.io.capture`), so a descriptor opened by one is not valid in another.

A container FFmpeg cannot open (damaged, truncated before its index, an unknown codec) is an
:class:`~edge_runtime.io.decode.InputError` naming the file; a video that ends before the frames its
container declares gives its frames up to the last whole batch and one error record for the rest.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.io.frames import MAX_PIXELS, InputError, Scan, display_path, to_gray_uint8

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".wmv"})
MAX_FRAMES = 100_000  # about 55 minutes at 30 frames a second; longer is refused
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")  # WMV
_ISO_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})  # MP4, MOV
log = logging.getLogger(__name__)


def sniff_video(head: bytes) -> str | None:
    """The video container its first bytes show: avi, mp4 (MP4, MOV, M4V), matroska (MKV, WebM),
    asf (WMV), or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] in _ISO_BOXES:
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:16] == _ASF_GUID:
        return "asf"
    return None


def is_video(path: str | os.PathLike[str], head: bytes, image_kind: str | None = None) -> bool:
    """Whether a file is a video: its first bytes say so, or its suffix does and its first
    bytes are no image (``image_kind``: what :func:`edge_runtime.io.decode.sniff` found)."""
    if sniff_video(head) is not None:
        return True
    return image_kind is None and Path(path).suffix.lower() in VIDEO_SUFFIXES


def open_video(path: str | os.PathLike[str], data: bytes | None = None) -> Scan:
    """Open a video file: check its container and geometry, decode no frame yet.

    Args:
        path: the file, also used in error messages.
        data: the file's bytes, when already in memory (then ``path`` is only a name).

    Returns:
        A :class:`~edge_runtime.io.decode.Scan` with a frame per video frame.

    Raises:
        InputError: the container cannot be opened, declares no frames or frames too large.
    """
    stream = _Stream(path, data)
    with stream:
        capture = _open_capture(path, stream)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width <= 0 or height <= 0:
            raise InputError(path, f"video declares an empty frame ({width} x {height})")
        if width * height > MAX_PIXELS:
            raise InputError(
                path,
                f"video frames are {width} x {height} pixels, over the {MAX_PIXELS:,}-pixel "
                "limit (refused before decoding)",
            )
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:  # a container that does not say: count by reading through once
            count = _count_frames(capture)
            capture.release()
            capture = _open_capture(path, stream)
    if count <= 0:
        raise InputError(path, "video holds no frame that could be decoded")
    if count > MAX_FRAMES:
        raise InputError(
            path, f"video declares {count:,} frames, over the {MAX_FRAMES:,}-frame limit"
        )
    reader = _Reader(path, stream, capture, count)
    return Scan(str(path), count, None, reader.read)


class _Reader:
    """Reads frames in order from one capture, seeking when asked for frames elsewhere."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        stream: _Stream,
        capture: cv2.VideoCapture,
        count: int,
    ) -> None:
        self._path, self._stream, self._capture, self._count = path, stream, capture, count
        self._next = 0
        self._lock = threading.Lock()

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        with self._lock, self._stream:
            if self._capture is None:  # released after the last frame: open it again
                self._capture, self._next = _open_capture(self._path, self._stream), 0
            if start != self._next:
                self._seek(start)
            frames = []
            for _ in range(start, stop):
                ok, frame = self._capture.read()
                if not ok or frame is None:
                    break
                frames.append(to_gray_uint8(frame, self._path))
            self._next = start + len(frames)
            if len(frames) < stop - start:
                self._release()
                raise InputError(
                    self._path,
                    f"frame {start + len(frames)} could not be decoded: the video ends or is "
                    f"damaged there, before the {self._count} frames its container declares",
                )
            if stop >= self._count:
                if self._capture.grab():
                    log.warning(
                        "%s: the video holds more frames than the %d its container declares; "
                        "only those were classified",
                        display_path(self._path),
                        self._count,
                    )
                self._release()
            return frames

    def _seek(self, frame: int) -> None:
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, frame)
        if int(self._capture.get(cv2.CAP_PROP_POS_FRAMES)) == frame:
            return
        self._capture.release()  # no exact seek in this container: read through from the start
        self._capture = _open_capture(self._path, self._stream)
        for index in range(frame):
            if not self._capture.grab():
                raise InputError(self._path, f"frame {index} could not be decoded")

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class _Stream(io.BufferedIOBase):
    """The file as OpenCV reads it: opened in the thread that uses it, for as long as it does
    (``with stream:``); bytes already in memory need no file."""

    def __init__(self, path: str | os.PathLike[str], data: bytes | None) -> None:
        super().__init__()
        self._path = path
        self._memory = None if data is None else io.BytesIO(data)
        self._file: io.FileIO | None = None
        self._position = 0
        self._depth = 0

    def __enter__(self) -> _Stream:
        if self._memory is None and self._depth == 0:
            try:
                self._file = io.FileIO(self._path, "rb")
                self._file.seek(self._position)
            except OSError as exc:
                raise InputError(self._path, f"could not be read: {exc.strerror or exc}") from None
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0 and self._file is not None:
            self._position = self._file.tell()
            self._file.close()
            self._file = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        handle = self._handle()
        return b"" if handle is None else handle.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        handle = self._handle()
        return self._position if handle is None else handle.seek(offset, whence)

    def tell(self) -> int:
        handle = self._handle()
        return self._position if handle is None else handle.tell()

    def _handle(self) -> io.IOBase | None:
        return self._memory if self._memory is not None else self._file


def _open_capture(path: str | os.PathLike[str], stream: _Stream) -> cv2.VideoCapture:
    stream.seek(0)
    try:
        capture = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
    except cv2.error as exc:
        raise InputError(path, f"not a readable video ({exc.err or exc})") from None
    if not capture.isOpened():
        raise InputError(
            path,
            "not a readable video: OpenCV's FFmpeg reader could not open the container "
            "(damaged, truncated before its index, or a codec it lacks)",
        )
    return capture


def _count_frames(capture: cv2.VideoCapture) -> int:
    count = 0
    while count <= MAX_FRAMES and capture.grab():
        count += 1
    return count
