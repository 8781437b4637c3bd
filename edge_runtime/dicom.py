"""DICOM files to 2-D uint8 grayscale frames, through pydicom (the optional ``dicom`` extra).

pydicom is imported only when a DICOM file is read, so the runtime imports without it. The image
geometry is checked before any pixel is decoded (a header can declare a decompression bomb), and
every pydicom failure is turned into an :class:`~edge_runtime.decode.InputError` naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import cv2
import numpy as np

from edge_runtime.decode import MAX_PIXELS, InputError

DICOM_EXTRA_HINT = "DICOM support needs the dicom extra: pip install 'edge-classify[dicom]'"
_COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str


def load_dicom_frames(path: str | os.PathLike[str], data: bytes) -> list[np.ndarray]:
    """Decode a DICOM file's pixel data to a list of 2-D uint8 grayscale frames.

    Handles single- and multi-frame data; MONOCHROME1 (inverted), MONOCHROME2, RGB, YBR_FULL,
    YBR_FULL_422 and PALETTE COLOR; 8- and 16-bit. Data over 8 bits is shown through its
    window (a single linear Window Center/Width) when it has one, else scaled by its actual range.

    Args:
        path: the file's path, used in error messages.
        data: the file's bytes.

    Returns:
        One array per frame, each ``rows x columns`` uint8.

    Raises:
        InputError: pydicom missing, not DICOM, truncated, no pixel data, too many pixels, or a
            compressed transfer syntax that no installed decoder handles.
    """
    _require_pydicom(path)
    ds = _read_dataset(path, data)
    geometry = _check_geometry(path, ds)
    _check_decoder(path, ds)
    pixels = _decode_pixels(path, ds, geometry)
    return _to_gray_frames(path, ds, pixels, geometry)


def _require_pydicom(path: str | os.PathLike[str]) -> None:
    try:
        import pydicom
    except ImportError:
        raise InputError(path, DICOM_EXTRA_HINT) from None
    try:
        import pydicom.pixels
    except ImportError:
        version = getattr(pydicom, "__version__", "unknown")
        raise InputError(
            path, f"DICOM support needs pydicom 3.0 or newer (found {version}): {DICOM_EXTRA_HINT}"
        ) from None


def _read_dataset(path: str | os.PathLike[str], data: bytes) -> Any:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(BytesIO(data))
    except InvalidDicomError:
        raise InputError(
            path, "not a valid DICOM file: no File Meta header or 'DICM' marker at byte 128"
        ) from None
    except Exception as exc:  # pydicom raises many types for corrupt input
        raise InputError(path, f"DICOM file is corrupt or truncated ({_describe(exc)})") from None


def _check_geometry(path: str | os.PathLike[str], ds: Any) -> _Geometry:
    """Read and bound the image geometry from the header, before any pixel is decoded."""
    try:
        if "PixelData" not in ds:
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                raise InputError(path, "DICOM float pixel data is not supported")
            raise InputError(
                path,
                "DICOM file has no Pixel Data element: it is truncated, or holds no image "
                "(a report, a structured document or a DICOMDIR)",
            )
        geometry = _Geometry(
            rows=int(ds.get("Rows") or 0),
            columns=int(ds.get("Columns") or 0),
            frames=int(ds.get("NumberOfFrames") or 1),
            samples=int(ds.get("SamplesPerPixel") or 1),
            bits_allocated=int(ds.get("BitsAllocated") or 0),
            bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
            photometric=str(ds.get("PhotometricInterpretation") or "").strip().upper(),
        )
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"DICOM image header is invalid ({_describe(exc)})") from None
    g = geometry
    if g.rows <= 0 or g.columns <= 0 or g.frames <= 0:
        raise InputError(
            path,
            f"DICOM header declares an empty image ({g.columns} x {g.rows}, {g.frames} frames)",
        )
    if g.rows * g.columns * g.frames > MAX_PIXELS:
        frames = f" x {g.frames} frames" if g.frames > 1 else ""
        raise InputError(
            path,
            f"DICOM image is {g.columns} x {g.rows} pixels{frames}, over the {MAX_PIXELS:,}-pixel "
            "limit (refused before decoding, as a possible decompression bomb)",
        )
    if g.bits_allocated not in (8, 16, 32):
        raise InputError(path, f"unsupported DICOM Bits Allocated {g.bits_allocated} (need 8/16)")
    if g.photometric not in _MONO | _COLOR:
        raise InputError(path, f"unsupported Photometric Interpretation '{g.photometric}'")
    return geometry


def _check_decoder(path: str | os.PathLike[str], ds: Any) -> None:
    """Refuse, with the package to install, a transfer syntax no installed plugin decodes."""
    from pydicom.pixels import get_decoder

    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        raise InputError(path, "DICOM file meta has no Transfer Syntax UID")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputError(
            path,
            f"DICOM transfer syntax {_syntax_name(uid)} is not supported: pydicom has no decoder "
            "for it (video and other unsupported compressions cannot be read)",
        ) from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "no known plugin"
        raise InputError(
            path,
            f"DICOM pixel data is compressed as {_syntax_name(uid)} and no installed decoder "
            f"handles it; install one of these: {options}",
        )


def _decode_pixels(path: str | os.PathLike[str], ds: Any, geometry: _Geometry) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        pixels = pixel_array(ds)  # YBR_FULL / YBR_FULL_422 come back as RGB
        if geometry.photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    except Exception as exc:  # corrupt, truncated, or rejected by every plugin
        uid = ds.file_meta.get("TransferSyntaxUID")
        raise InputError(
            path,
            f"DICOM pixel data ({_syntax_name(uid)}) could not be decoded: {_describe(exc)}",
        ) from None
    return pixels


def _to_gray_frames(
    path: str | os.PathLike[str], ds: Any, pixels: np.ndarray, geometry: _Geometry
) -> list[np.ndarray]:
    color = pixels.ndim == (4 if geometry.frames > 1 else 3)
    stack = pixels if geometry.frames > 1 else pixels[np.newaxis]
    if stack.shape[1:3] != (geometry.rows, geometry.columns):
        raise InputError(path, f"DICOM pixel data has unexpected shape {pixels.shape}")
    if color:
        stack = _scale_to_uint8(stack)
        return [np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)) for frame in stack]
    stack = _window(ds, stack, geometry)
    if geometry.photometric == "MONOCHROME1":
        stack = 255 - stack
    return [np.ascontiguousarray(frame) for frame in stack]


def _window(ds: Any, stack: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """Monochrome data to uint8: 8-bit as is, wider data through its window or its range."""
    if stack.dtype == np.uint8:
        return stack
    values = _rescale(ds, stack)
    window = _linear_window(ds)
    if window is None:
        return _scale_to_uint8(values)
    center, width = window
    low = center - 0.5 - (width - 1) / 2
    scaled = (values - low) * (255.0 / max(width - 1, 1.0))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _rescale(ds: Any, stack: np.ndarray) -> np.ndarray:
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return stack.astype(np.float32) * slope + intercept


def _linear_window(ds: Any) -> tuple[float, float] | None:
    """The first Window Center/Width pair when the VOI function is linear, else None."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    if str(ds.get("VOILUTFunction") or "LINEAR").upper() != "LINEAR":
        return None
    try:
        center, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    except (TypeError, ValueError):
        return None
    return (center, width) if width >= 1 else None


def _first(value: Any) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def _scale_to_uint8(stack: np.ndarray) -> np.ndarray:
    """Map any numeric array to uint8: uint8 unchanged, else by its actual range."""
    if stack.dtype == np.uint8:
        return stack
    lo, hi = float(np.min(stack)), float(np.max(stack))
    factor = 255.0 / (hi - lo) if hi > lo else 0.0
    scaled = (stack.astype(np.float32) - lo) * factor
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _syntax_name(uid: Any) -> str:
    name = getattr(uid, "name", "") or "unknown"
    return f"'{name}' ({uid})"


def _describe(exc: BaseException, limit: int = 300) -> str:
    """One line from an exception: its type and message, lines joined, object ids dropped."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
