"""Decoding scan files into 2-D uint8 grayscale frames, safely.

Every failure is an :class:`InputError` that names the file and the reason; nothing else escapes
for a bad file. Dimensions are read from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger is refused before decoding
MAX_FILE_BYTES = 512 * 1024 * 1024

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DICOM_MAGIC = b"DICM"  # at byte offset 128, after the preamble


class InputError(ValueError):
    """A file could not be turned into an image. ``str()`` starts with the file's path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file as a 2-D uint8 grayscale array.

    Raises:
        InputError: missing, unreadable, empty, truncated, not an image, or too large.
    """
    data = _read_bytes(path)
    return decode_gray(data, path)


def load_frames(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read one scan file as one or more 2-D uint8 grayscale frames.

    DICOM files (a ``.dcm``/``.dicom`` suffix, or ``DICM`` at byte 128 whatever the name) go
    through pydicom, an optional extra, and may hold several frames; every other file is decoded
    as a single image by :func:`decode_gray`.

    Raises:
        InputError: missing, unreadable, empty, truncated, not an image, too large, or a DICOM
            file that pydicom (or an installed decoder) cannot read.
    """
    data = _read_bytes(path)
    if not data:
        raise InputError(path, "file is empty (0 bytes)")
    if is_dicom(path, data):
        from edge_runtime.dicom import load_dicom_frames  # pydicom stays an optional import

        return load_dicom_frames(path, data)
    return [decode_gray(data, path)]


def is_dicom(path: str | os.PathLike[str], data: bytes) -> bool:
    """Whether a file is DICOM, by its suffix or by the ``DICM`` marker at byte 128."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or data[128:132] == DICOM_MAGIC


def decode_gray(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF) to 2-D uint8 grayscale.

    8- and 16-bit, gray, RGB and RGBA are accepted; 16-bit is scaled to 8-bit by its full range.
    """
    if not data:
        raise InputError(path, "file is empty (0 bytes)")
    dims = image_dimensions(data)
    if dims is None:
        raise InputError(path, "not a supported image (PNG, JPEG, BMP, TIFF or DICOM)")
    width, height = dims
    if width <= 0 or height <= 0:
        raise InputError(path, f"header declares an empty image ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise InputError(
            path,
            f"image is {width} x {height} pixels, over the {MAX_PIXELS:,}-pixel limit "
            "(refused before decoding, as a possible decompression bomb)",
        )
    buffer = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(path, "image data is corrupt or truncated and could not be decoded")
    return to_gray_uint8(image, path)


def to_gray_uint8(image: np.ndarray, path: str | os.PathLike[str] = "<array>") -> np.ndarray:
    """Convert a decoded array (H x W, H x W x 3 BGR, H x W x 4 BGRA; 8/16-bit) to 2-D uint8."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(image.shape[2])
        if code is None:
            raise InputError(path, f"unsupported channel count {image.shape[2]}")
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise InputError(path, f"unsupported image shape {image.shape}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    if np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer):
        lo, hi = float(np.min(image)), float(np.max(image))
        scaled = (image.astype(np.float32) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    raise InputError(path, f"unsupported pixel type {image.dtype}")


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, JPEG, BMP or TIFF header, or None if not recognised."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", data[16:24]) if len(data) >= 24 else (0, 0)
        if data[:2] == b"\xff\xd8":
            return _jpeg_dimensions(data)
        if data[:2] == b"BM":
            width, height = struct.unpack("<ii", data[18:26])
            return width, abs(height)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_dimensions(data)
    except struct.error:
        return 0, 0
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return 0, 0


def _tiff_dimensions(data: bytes) -> tuple[int, int]:
    endian = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    found: dict[int, int] = {}
    for n in range(count):
        entry = data[offset + 2 + 12 * n : offset + 14 + 12 * n]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"
            (found[tag],) = struct.unpack(endian + fmt, entry[8 : 8 + struct.calcsize(fmt)])
    return found.get(256, 0), found.get(257, 0)


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(path, f"file is {size:,} bytes, over the {MAX_FILE_BYTES:,} limit")
        if not p.is_file():
            raise InputError(path, "not a regular file")
        return p.read_bytes()
    except FileNotFoundError:
        reason = "dangling symbolic link" if p.is_symlink() else "file not found"
        raise InputError(path, reason) from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory") from None
    except OSError as exc:
        raise InputError(path, f"could not be read: {exc.strerror or exc}") from None
