"""Decoding scan files into 2-D uint8 grayscale frames, safely and lazily.

Every failure is an :class:`InputError` that names the file and the reason; nothing else escapes
for a bad file. Dimensions are read from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it. The pixel limit guards one frame: a file
with many frames (a cine loop, a multi-page TIFF) is opened as a :class:`Scan` whose frames are
decoded a few at a time (:meth:`Scan.read`), so memory follows the batch, not the file.

What the file says about itself is applied: EXIF orientation (OpenCV applies it unless told not
to), every TIFF page (classic TIFF and BigTIFF), and the range of 16-bit images: TIFF
``MaxSampleValue`` scales them the way DICOM's Bits Stored scales DICOM data (:func:`to_uint8`);
a PNG's samples span the whole 16 bits, as the PNG standard stores them (``sBIT`` only records
the original depth), unless they all fit in its ``sBIT`` bits (a writer that broke the standard:
read by those bits, with a warning); else the fewest bits that hold the largest value.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.io import own_images
from edge_runtime.io.frames import (
    DICOM_MAGIC,
    MAX_PIXELS,
    SNIFF_BYTES,
    InputError,
    Scan,
    bare_dataset,
    display_path,
    read_bytes,
    read_head,
    to_gray_uint8,
)

MAX_PAGES = 10_000  # TIFF pages (each also bounded by MAX_PIXELS)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
BIGTIFF_MAGIC = (b"II+\x00", b"MM\x00+")  # 64-bit offsets (microscopes, large exports)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
log = logging.getLogger(__name__)


def load_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file (its first page) as a 2-D uint8 grayscale array.

    Raises:
        InputError: missing, unreadable, empty, truncated, not an image, or too large.
    """
    return decode_gray(read_bytes(path), path)


def load_frames(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read every frame of a scan file as 2-D uint8 grayscale arrays (see :func:`open_scan`).

    All frames are held at once: for files of any length, iterate :meth:`Scan.read` instead.

    Raises:
        InputError: as :func:`open_scan` and :meth:`Scan.read`.
    """
    return open_scan(path).read()


def open_scan(path: str | os.PathLike[str], data: bytes | None = None) -> Scan:
    """Open a scan file: check its header and geometry, decode nothing yet.

    DICOM files (a ``.dcm``/``.dicom`` suffix, ``DICM`` at byte 128, or a bare dataset without
    File Meta) go through pydicom, an optional extra, and may hold many frames; videos (AVI, MP4,
    ...: :mod:`edge_runtime.io.video`) through OpenCV, a frame per video frame; TIFF pages are
    frames too; PNG, JPEG and BMP are one frame.

    Args:
        path: the file, also used in error messages.
        data: the file's bytes, when already in memory (then ``path`` is only a name).

    Raises:
        InputError: missing, unreadable, empty, not an image, too large, or a DICOM file that
            pydicom (or an installed decoder) cannot read.
    """
    head = data[:SNIFF_BYTES] if data is not None else read_head(path)
    if not head:
        raise InputError(path, "file is empty (0 bytes)")
    if is_dicom(path, head):
        from edge_runtime.io.dicom import open_dicom  # pydicom stays an optional import

        return open_dicom(path, data)
    from edge_runtime.io.video import is_video, open_video

    if is_video(path, head, sniff(head)):
        return open_video(path, data)
    if data is None:
        data = read_bytes(path)
    return open_image(data, path)


def sniff(head: bytes) -> str | None:
    """The kind of file its first bytes show: png, jpeg, tiff, bmp, dicom, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in TIFF_MAGIC or head[:4] in BIGTIFF_MAGIC:
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[128:132] == DICOM_MAGIC or bare_dataset(head):
        return "dicom"
    return None


def is_dicom(path: str | os.PathLike[str], data: bytes) -> bool:
    """Whether a file is DICOM, by its suffix or by its first bytes (:func:`sniff`)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or sniff(data[:SNIFF_BYTES]) == "dicom"


def decode_gray(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF: the first page) to 2-D uint8 gray.

    8- and 16-bit, gray, RGB and RGBA are accepted; 16-bit is scaled by its significant bits.

    Raises:
        InputError: empty, not an image, too large, corrupt or truncated.
    """
    return open_image(data, path).read(0, 1)[0]


def open_image(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> Scan:
    """Check an encoded image's header (every page of a TIFF) and return it as a :class:`Scan`.

    Raises:
        InputError: empty, not a supported image, an empty or too large page.
    """
    if not data:
        raise InputError(path, "file is empty (0 bytes)")
    kind = sniff(data[:SNIFF_BYTES])
    if kind is None or kind == "dicom":
        raise InputError(
            path,
            "not a supported image: its content is no PNG, JPEG, BMP, TIFF or DICOM, whatever its "
            "name says",
        )
    if written := own_images.written_kind(data[:SNIFF_BYTES]):
        raise InputError(path, f"{own_images.describe(written)}, not a scan")
    pages = _tiff_pages(data) if kind == "tiff" else [_dimensions(kind, data)]
    for number, (width, height, _) in enumerate(pages):
        where = f"page {number + 1}: " if len(pages) > 1 else ""
        if width <= 0 or height <= 0:
            raise InputError(path, f"{where}header declares an empty image ({width} x {height})")
        if width * height > MAX_PIXELS:
            raise InputError(
                path,
                f"{where}image is {width} x {height} pixels, over the {MAX_PIXELS:,}-pixel limit "
                "(refused before decoding, as a possible decompression bomb)",
            )
    significant = [bits for _, _, bits in pages]
    png_bits = _png_significant_bits(data) if kind == "png" else None

    def read(start: int, stop: int) -> list[np.ndarray]:
        buffer = np.frombuffer(data, np.uint8)
        if len(pages) == 1:
            image = cv2.imdecode(buffer, _IMREAD_FLAGS)
            images = [] if image is None else [image]
        else:
            ok, images = cv2.imdecodemulti(buffer, _IMREAD_FLAGS, range=(start, stop))
            images = list(images) if ok else []
        if len(images) != stop - start:
            what = f"pages {start + 1}-{stop}" if len(pages) > 1 else "image data"
            raise InputError(path, f"{what} corrupt or truncated and could not be decoded")
        bits = significant[start:stop]
        if png_bits is not None:
            bits = [_png_range_bits(images[0], png_bits, path)]
        return [
            to_gray_uint8(image, path, significant_bits=bits[i]) for i, image in enumerate(images)
        ]

    return Scan(str(path), len(pages), None, read)


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, JPEG, BMP or TIFF header (first page), or None."""
    kind = sniff(data[:SNIFF_BYTES])
    if kind is None or kind == "dicom":
        return None
    width, height, _ = _tiff_pages(data)[0] if kind == "tiff" else _dimensions(kind, data)
    return width, height


def _dimensions(kind: str, data: bytes) -> tuple[int, int, int | None]:
    try:
        if kind == "png":
            width, height = struct.unpack(">II", data[16:24]) if len(data) >= 24 else (0, 0)
            return width, height, None
        if kind == "jpeg":
            return (*_jpeg_dimensions(data), None)
        width, height = struct.unpack("<ii", data[18:26])
        return width, abs(height), None
    except struct.error:
        return 0, 0, None


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


def _tiff_pages(data: bytes) -> list[tuple[int, int, int | None]]:
    """(width, height, significant bits or None) of every page, following the IFD chain of a
    classic TIFF (32-bit offsets, 12-byte entries) or a BigTIFF (64-bit offsets, 20-byte
    entries)."""
    endian = "<" if data[:2] == b"II" else ">"
    big = data[:4] in BIGTIFF_MAGIC
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    value_at = 12 if big else 8  # after tag, type and count
    pages: list[tuple[int, int, int | None]] = []
    seen: set[int] = set()
    try:
        (offset,) = struct.unpack_from(endian + offset_format, data, 8 if big else 4)
        while offset and offset not in seen and len(pages) < MAX_PAGES:
            seen.add(offset)
            (count,) = struct.unpack_from(endian + count_format, data, offset)
            first = offset + struct.calcsize(count_format)
            found: dict[int, int] = {}
            for n in range(count):
                at = first + entry_size * n
                tag, kind = struct.unpack_from(endian + "HH", data, at)
                if tag in (256, 257, 281):  # width, height, MaxSampleValue
                    fmt = "H" if kind == 3 else "Q" if big and kind == 16 else "I"  # 16: LONG8
                    (found[tag],) = struct.unpack_from(endian + fmt, data, at + value_at)
            bits = found[281].bit_length() if found.get(281) else None
            pages.append((found.get(256, 0), found.get(257, 0), bits))
            (offset,) = struct.unpack_from(endian + offset_format, data, first + entry_size * count)
    except (struct.error, OverflowError):  # cut short, or a 64-bit offset past any buffer
        if not pages:
            return [(0, 0, None)]
    return pages or [(0, 0, None)]


def _png_significant_bits(data: bytes) -> int | None:
    """The largest of a PNG's ``sBIT`` values (before its image data), or None."""
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"sBIT":
            body = data[offset + 8 : offset + 8 + min(length, 4)]
            return max(body) if body and 0 < max(body) <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        offset += 12 + length
    return None


def _png_range_bits(image: np.ndarray, sbit: int, path: str | os.PathLike[str]) -> int | None:
    """The bits whose whole range a decoded 16-bit PNG's samples span, given its ``sBIT``.

    The PNG standard scales samples to the image's bit depth ("sample depth scaling"); ``sBIT``
    records how many bits the original had, so a 12-bit scan is stored as 0..65535, not 0..4095.
    Samples that all fit in ``sBIT`` bits were written unscaled, against the standard: they are
    read by those bits, with a warning naming the file.
    """
    if image.dtype != np.uint16:
        return None
    if sbit >= 16 or int(image.max()) >= 1 << sbit:
        return 16
    log.warning(
        "%s: every value of this 16-bit PNG fits in its sBIT of %d bits: read as %d-bit data "
        "stored unscaled (the PNG standard stores them scaled to 16 bits; check the program "
        "that wrote it)",
        display_path(path),
        sbit,
        sbit,
    )
    return sbit
