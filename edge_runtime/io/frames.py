"""What every decoder shares (:mod:`.decode` for images, :mod:`.dicom`, :mod:`.video`): the error
that names a file and the reason, the :class:`Scan` whose frames are decoded a batch at a time,
the limits checked before any pixel is decoded, reading a file safely, and turning decoded values
into 2-D uint8 grayscale."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # one frame of ~8000 x 8000; larger is refused before decoding


MAX_FILE_BYTES = 512 * 1024 * 1024


DICOM_MAGIC = b"DICM"  # at byte offset 128, after the preamble


SNIFF_BYTES = 132
# OpenCV applies EXIF orientation for every flag except IMREAD_UNCHANGED; these keep the depth
# (8/16-bit) and the channels (alpha is dropped, which gray conversion drops anyway).


class InputError(ValueError):
    """A file could not be turned into an image. ``str()`` starts with the file's path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
        self.reason = reason
        super().__init__(f"{display_path(self.path)}: {reason}")


def display_path(path: str | os.PathLike[str] | bytes) -> str:
    """A file name as text that any output can hold: bytes that are not UTF-8 become ``\\xNN``,
    and (where ``/`` separates folders) a backslash in a name becomes ``\\\\``.

    Python keeps such bytes in ``str`` paths as lone surrogates (PEP 383), which UTF-8 writers,
    CSV files and terminals refuse; the escaped form shows them and loses nothing. The doubled
    backslash keeps it unambiguous: a file literally named ``caf\\xe9.jpg`` is not the one whose
    name holds the byte 0xE9.

    Example:
        >>> display_path(os.fsdecode(b"caf\\xe9.jpg"))
        'caf\\\\xe9.jpg'
        >>> display_path("caf\\\\xe9.jpg")
        'caf\\\\\\\\xe9.jpg'
    """
    raw = os.fsencode(path)
    if os.sep == "/":
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Scan:
    """An opened scan file whose frames are decoded on demand.

    Attributes:
        path: the file's path as given.
        count: number of images :meth:`read` gives: frames (1 for a plain image; pages of a
            TIFF; frames of a DICOM cine), times the regions of each frame.
        pixel_spacing_mm: (row, column) spacing in millimetres of the frames :meth:`read`
            returns, when the file states it (DICOM), else None.
        regions: for a DICOM file with several tissue regions (a dual view,
            :mod:`edge_runtime.io.regions`), each region's pixel spacing (or None), in order; the
            images are then frame 0's regions, frame 1's, ...: image ``k`` is region
            ``k % len(regions)`` of frame ``k // len(regions)``. Empty: one image a frame.
        origins: where each image lies in its frame when the images are crops of it (DICOM
            ultrasound regions): the ``(x, y)`` of its top-left pixel, one per region (one for
            a single cropped region). Empty: the images are the whole frames.
        frame_shape: ``(rows, columns)`` of the whole frame when the images are crops of it,
            else None.
        frames_independent: each frame decodes on its own (a compressed DICOM: each frame its
            own fragments), so a damaged one costs no other; else a damaged frame ends the
            reading (a video, a truncated uncompressed file).
    """

    path: str
    count: int
    pixel_spacing_mm: tuple[float, float] | None
    _read: Callable[[int, int], list[np.ndarray]]
    regions: tuple[tuple[float, float] | None, ...] = ()
    origins: tuple[tuple[int, int], ...] = ()
    frame_shape: tuple[int, int] | None = None
    frames_independent: bool = False

    def where(self, index: int) -> tuple[int | None, int | None, tuple[float, float] | None]:
        """Image ``index``'s frame number (None for a single-frame file), region number (None
        without several regions) and pixel spacing."""
        per_frame = max(1, len(self.regions))
        frame = index // per_frame if self.count > per_frame else None
        if not self.regions:
            return frame, None, self.pixel_spacing_mm
        return frame, index % per_frame, self.regions[index % per_frame]

    def origin(self, index: int) -> tuple[int, int]:
        """The ``(x, y)`` in its frame of image ``index``'s top-left pixel: ``(0, 0)`` unless
        the images are crops of the frame (:attr:`origins`)."""
        return self.origins[index % len(self.origins)] if self.origins else (0, 0)

    def read(self, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
        """Decode frames ``start`` to ``stop`` (exclusive) as 2-D uint8 arrays.

        Raises:
            InputError: the frames could not be decoded.
        """
        stop = self.count if stop is None else min(stop, self.count)
        return self._read(start, stop) if start < stop else []


def bare_dataset(head: bytes) -> bool:
    """A DICOM dataset written without preamble and File Meta (older files, archives): it starts
    with a group 0x0008 element, little endian, explicit VR or implicit with a sane length."""
    if len(head) < 8 or head[:2] != b"\x08\x00":
        return False
    element = struct.unpack("<H", head[2:4])[0]
    if head[4:6].isalpha() and head[4:6].isupper():  # explicit VR
        return element < 0x0100
    (length,) = struct.unpack("<I", head[4:8])
    return element < 0x0100 and length < 1 << 16


def to_gray_uint8(
    image: np.ndarray,
    path: str | os.PathLike[str] = "<array>",
    *,
    significant_bits: int | None = None,
) -> np.ndarray:
    """Convert a decoded array (H x W, H x W x 3 BGR, H x W x 4 BGRA; 8/16-bit) to 2-D uint8.

    Args:
        image: the decoded pixels.
        path: used in error messages.
        significant_bits: for integer data over 8 bits, the bits the file says it uses (its
            range is ``0 .. 2**bits - 1``); None: the fewest bits that hold the largest value.

    Raises:
        InputError: a channel count, shape or pixel type that is not an image.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(image.shape[2])
        if code is None:
            raise InputError(path, f"unsupported channel count {image.shape[2]}")
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            image = image.astype(np.float32)
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise InputError(path, f"unsupported image shape {image.shape}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.unsignedinteger):
        bits = significant_bits or max(8, int(image.max()).bit_length())
        return to_uint8(image, 0.0, float(2**bits - 1))
    if np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer):
        finite = image[np.isfinite(image)] if np.issubdtype(image.dtype, np.floating) else image
        if finite.size == 0:
            raise InputError(path, "image holds no finite pixel values")
        return to_uint8(np.nan_to_num(image), float(finite.min()), float(finite.max()))
    raise InputError(path, f"unsupported pixel type {image.dtype}")


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low .. high`` linearly onto ``0 .. 255`` (rounded, clipped) as uint8.

    The one mapping from wide pixel values to the 8 bits the model reads: a file's significant
    bits, a DICOM window's output range, a palette's entry depth. Never the image's own min-max
    (that would change gray levels from one image, or frame, to the next).
    """
    if values.dtype == np.uint8 and low == 0.0 and high == 255.0:
        return np.ascontiguousarray(values)
    scale = 255.0 / (high - low) if high > low else 0.0
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(scale) + np.float32(0.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def check_file(path: str | os.PathLike[str]) -> None:
    """Refuse what cannot be a scan file before reading it.

    Raises:
        InputError: missing, a dangling link, not a regular file, unreadable, or over
            :data:`MAX_FILE_BYTES`.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise InputError(path, "a folder, not a file (edge-classify expands folders)")
        if not p.is_file():
            raise InputError(path, "not a regular file")
    except OSError as exc:
        raise InputError(path, os_reason(p, exc)) from None
    if size > MAX_FILE_BYTES:
        raise InputError(path, f"file is {size:,} bytes, over the {MAX_FILE_BYTES:,} limit")


def read_head(path: str | os.PathLike[str]) -> bytes:
    check_file(path)
    try:
        with open(path, "rb") as handle:
            return handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputError(path, os_reason(Path(path), exc)) from None


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    check_file(path)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(path, os_reason(Path(path), exc)) from None


def os_reason(p: Path, exc: OSError) -> str:
    """Why reading a file failed, in a few words."""
    if isinstance(exc, FileNotFoundError):
        return "dangling symbolic link" if p.is_symlink() else "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return f"could not be read: {exc.strerror or exc}"
