"""DICOM files to 2-D uint8 grayscale frames, through pydicom (the optional ``dicom`` extra).

pydicom is imported only when a DICOM file is read, so the runtime imports without it. The header
is read first (pixel data deferred) and the geometry of one frame is bounded before any pixel is
decoded; frames are then decoded a few at a time, straight from the file (pydicom reads only the
frames asked for), so a cine's memory follows the batch. Gray levels are those a viewer shows,
through pydicom's own pipeline: Modality LUT (rescale or LUT), VOI LUT (a VOI LUT Sequence, or a
window with its LINEAR, LINEAR_EXACT or SIGMOID function), Palette Color LUT then luminance,
YBR to RGB then luminance; MONOCHROME1 is inverted. The output range of that pipeline (what the
file's bits and LUTs can hold) maps onto 0..255, never an image's own min-max.

Files without File Meta (no preamble, no ``DICM``: older files, still common in archives) are
read as bare datasets, their transfer syntax taken from the encoding pydicom finds.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO

import cv2
import numpy as np

from edge_runtime.extras import install_hint
from edge_runtime.io.frames import (
    DICOM_MAGIC,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    SNIFF_BYTES,
    InputError,
    Scan,
    bare_dataset,
    check_file,
    display_path,
    to_uint8,
)
from edge_runtime.io.regions import Region, pixel_spacing, tissue_regions

DICOM_EXTRA_HINT = f"DICOM support needs the dicom extra: {install_hint('dicom')}"
DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_FRAMES = 100_000
_DEFER = 1024 * 1024  # header values larger than this (the pixel data) stay on disk
_COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})
# The plug-in tried first for a transfer syntax, where installed: the fastest measured here
# (README, "DICOM"); pydicom's own order (GDCM first) is the fallback when it fails.
_PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pillow",  # JPEG Extended (8-bit)
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pillow",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pillow",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pylibjpeg",  # RLE Lossless (pylibjpeg-rle)
}


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str


def open_dicom(path: str | os.PathLike[str], data: bytes | None = None) -> Scan:
    """Open a DICOM file: header, geometry and decoder checks; frames decode on :meth:`Scan.read`.

    The frames are the tissue region of the Sequence of Ultrasound Regions when the file has one
    (:mod:`edge_runtime.io.regions`), else the whole image; ``pixel_spacing_mm`` comes from that
    region, or from Pixel Spacing. With several tissue regions (a dual view), each frame gives
    one image per region (:attr:`Scan.regions`). Where the images are regions, the scan says
    where each lies in the frame (:attr:`Scan.origins`, :attr:`Scan.frame_shape`).

    Args:
        path: the file's path (read from disk unless ``data`` is given; used in messages).
        data: the file's bytes, when already in memory.

    Raises:
        InputError: pydicom missing, not DICOM, truncated, no pixel data, a frame over the pixel
            limit, not 8 or 16 bits, or a transfer syntax that no installed decoder handles.
    """
    _require_pydicom(path)
    if data is None:
        check_file(path)

    def opener() -> BinaryIO:
        return BytesIO(data) if data is not None else open(path, "rb")

    try:
        with opener() as handle:
            inflated = _inflated(path, handle)
    except OSError as exc:
        raise InputError(path, f"could not be read: {exc.strerror or exc}") from None
    if inflated is not None:  # read from memory from now on, as Explicit VR Little Endian

        def opener() -> BinaryIO:
            return BytesIO(inflated)

    ds, syntax = _read_header(path, opener)
    geometry = _check_geometry(path, ds)
    _check_decoder(path, syntax)
    regions = tissue_regions(ds, geometry.rows, geometry.columns, source=display_path(path))
    origins = tuple((r.x0, r.y0) for r in regions)
    frame_shape = (geometry.rows, geometry.columns) if regions else None
    frames_of = _frame_reader(path, opener, ds, syntax)
    independent = bool(syntax.is_encapsulated)  # one fragment set a frame
    if len(regions) > 1:  # a dual view: every region of every frame, one image each
        displays = [_Display(ds, geometry, region) for region in regions]
        per_frame = len(regions)

        def read(start: int, stop: int) -> list[np.ndarray]:
            first, last = start // per_frame, (stop - 1) // per_frame + 1
            arrays = frames_of(first, last)
            if len(arrays) != last - first:
                raise InputError(path, f"DICOM file holds fewer frames than its {geometry.frames}")
            return [
                displays[k % per_frame](arrays[k // per_frame - first], path)
                for k in range(start, stop)
            ]

        spacings = tuple(r.pixel_spacing_mm for r in regions)
        count = geometry.frames * per_frame
        return Scan(
            str(path), count, spacings[0], read, spacings, origins, frame_shape, independent
        )
    region = regions[0] if regions else None
    spacing = region.pixel_spacing_mm if region is not None else pixel_spacing(ds)
    display = _Display(ds, geometry, region)

    def read(start: int, stop: int) -> list[np.ndarray]:
        arrays = frames_of(start, stop)
        if len(arrays) != stop - start:
            raise InputError(path, f"DICOM file holds fewer frames than its {geometry.frames}")
        return [display(array, path) for array in arrays]

    return Scan(str(path), geometry.frames, spacing, read, (), origins, frame_shape, independent)


def load_dicom_frames(path: str | os.PathLike[str], data: bytes | None = None) -> list[np.ndarray]:
    """Every frame of a DICOM file as 2-D uint8 arrays (:func:`open_dicom`, all at once)."""
    return open_dicom(path, data).read()


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


def _read_header(path: str | os.PathLike[str], opener: Callable[[], BinaryIO]) -> tuple[Any, Any]:
    """The dataset with its pixel data left on disk, and its transfer syntax."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID

    try:
        with opener() as handle:
            head = handle.read(SNIFF_BYTES + 16)
            bare = head[128:132] != DICOM_MAGIC
            if bare and not bare_dataset(head):
                raise InputError(
                    path,
                    "not a valid DICOM file: no File Meta header or 'DICM' marker at byte 128, "
                    "and it does not start like a DICOM dataset",
                )
            handle.seek(0)
            ds = dcmread(handle, force=bare, defer_size=_DEFER)
    except InputError:
        raise
    except InvalidDicomError:
        raise InputError(
            path, "not a valid DICOM file: no File Meta header or 'DICM' marker at byte 128"
        ) from None
    except OSError as exc:
        raise InputError(path, f"could not be read: {exc.strerror or exc}") from None
    except Exception as exc:  # pydicom raises many types for corrupt input
        raise InputError(path, f"DICOM file is corrupt or truncated ({_describe(exc)})") from None
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:  # a bare dataset, or File Meta without a syntax: as pydicom read it
        implicit, little = ds.original_encoding
        syntax = UID(
            "1.2.840.10008.1.2"
            if implicit in (True, None)
            else "1.2.840.10008.1.2.1"
            if little in (True, None)
            else "1.2.840.10008.1.2.2"
        )
        meta.TransferSyntaxUID = syntax
    return ds, UID(str(syntax))


def _inflated(path: str | os.PathLike[str], handle: BinaryIO) -> bytes | None:
    """For a Deflated Explicit VR Little Endian file, the same file inflated, its File Meta
    saying Explicit VR Little Endian; None for any other file.

    Inflated once, here, in bounded steps: a file that inflates past :data:`MAX_FILE_BYTES` (a
    deflate bomb) is refused before it fills memory (pydicom would inflate it whole, and again
    for each read).

    Raises:
        InputError: a deflate bomb, or data that do not inflate.
    """
    head = handle.read(4096)
    syntax = DEFLATED.encode()
    at = head.find(b"\x02\x00\x10\x00UI" + len(syntax).to_bytes(2, "little") + syntax)
    if head[128:132] != DICOM_MAGIC or at < 0 or head[132:136] != b"\x02\x00\x00\x00":
        return None
    meta_end = 144 + int.from_bytes(head[140:144], "little")
    # Same length: UIDs are padded with NUL, which pydicom strips.
    plain = b"1.2.840.10008.1.2.1".ljust(len(syntax), b"\x00")
    meta = head[:meta_end].replace(syntax, plain, 1)
    handle.seek(meta_end)
    inflater, parts, total = zlib.decompressobj(-zlib.MAX_WBITS), [meta], 0
    try:
        while not inflater.eof and (chunk := handle.read(1 << 20)):
            while chunk and not inflater.eof:  # after the end: padding, ignored
                part = inflater.decompress(chunk, 1 << 24)
                total += len(part)
                if total > MAX_FILE_BYTES:
                    raise InputError(
                        path,
                        f"deflated DICOM data inflate past {MAX_FILE_BYTES:,} bytes (refused "
                        "before decoding, as a possible decompression bomb)",
                    )
                parts.append(part)
                chunk = inflater.unconsumed_tail
        parts.append(inflater.flush())
    except zlib.error as exc:
        raise InputError(path, f"deflated DICOM data do not inflate ({exc})") from None
    return b"".join(parts)


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
    if g.rows * g.columns > MAX_PIXELS:
        raise InputError(
            path,
            f"DICOM image is {g.columns} x {g.rows} pixels a frame, over the {MAX_PIXELS:,}-pixel "
            "limit (refused before decoding, as a possible decompression bomb)",
        )
    if g.frames > MAX_FRAMES:
        raise InputError(path, f"DICOM header declares {g.frames:,} frames, over {MAX_FRAMES:,}")
    if g.bits_allocated not in (8, 16):
        raise InputError(
            path,
            f"DICOM Bits Allocated is {g.bits_allocated}: scans are 8 or 16 bits (1-bit data is "
            "a mask or overlay, 32-bit data a dose grid or parametric map)",
        )
    if not 1 <= g.bits_stored <= g.bits_allocated:
        raise InputError(path, f"DICOM Bits Stored {g.bits_stored} does not fit {g.bits_allocated}")
    if g.photometric not in _MONO | _COLOR:
        raise InputError(path, f"unsupported Photometric Interpretation '{g.photometric}'")
    return geometry


def _check_decoder(path: str | os.PathLike[str], syntax: Any) -> None:
    """Refuse, with the package to install, a transfer syntax no installed plugin decodes."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise InputError(
            path,
            f"DICOM transfer syntax {_syntax_name(syntax)} is not supported: pydicom has no "
            "decoder for it (video and other unsupported compressions cannot be read)",
        ) from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "no known plugin"
        raise InputError(
            path,
            f"DICOM pixel data is compressed as {_syntax_name(syntax)} and no installed decoder "
            f"handles it; install one of these: {options}",
        )


def _frame_reader(
    path: str | os.PathLike[str], opener: Callable[[], BinaryIO], ds: Any, syntax: Any
) -> Callable[[int, int], list[np.ndarray]]:
    """A function decoding frames ``start .. stop`` from the file, reading only those frames.

    Native YBR_FULL_422 frames are decoded one per call of pydicom's frame iterator: after the
    first frame its decoder takes the frames for YBR_FULL (3 bytes a pixel, not 2) and finds
    too little data for the next (pydicom 3.0).
    """
    from pydicom import dcmread
    from pydicom.pixels import get_decoder, iter_pixels

    preferred = _PREFERRED_PLUGIN.get(str(syntax), "")
    if preferred not in get_decoder(syntax).available_plugins:
        preferred = ""
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    one_at_a_time = photometric == "YBR_FULL_422" and not syntax.is_encapsulated

    def runs(start: int, stop: int) -> list[range]:
        if one_at_a_time:
            return [range(index, index + 1) for index in range(start, stop)]
        return [range(start, stop)]

    def decode(start: int, stop: int, plugin: str) -> list[np.ndarray]:
        frames = []
        for indices in runs(start, stop):
            with opener() as handle:
                frames += iter_pixels(
                    handle, indices=indices, transfer_syntax_uid=syntax, decoding_plugin=plugin
                )
        return frames

    def decode_loaded(start: int, stop: int) -> list[np.ndarray]:
        """From the whole dataset as dcmread reads it: for files whose encoding differs from
        what their File Meta says (pydicom's reader corrects that, its frame reader does not)."""
        with opener() as handle:
            whole = dcmread(handle, force=True)
        whole.file_meta.TransferSyntaxUID = syntax
        return [
            frame for indices in runs(start, stop) for frame in iter_pixels(whole, indices=indices)
        ]

    def read(start: int, stop: int) -> list[np.ndarray]:
        try:
            try:
                return decode(start, stop, preferred)
            except Exception:
                if preferred:
                    with contextlib.suppress(Exception):
                        return decode(start, stop, "")  # every plug-in, pydicom's order
                return decode_loaded(start, stop)
        except Exception as exc:  # corrupt, truncated, or rejected by every plugin
            # counted from 0, as the records' ``frame`` is
            which = f"frames {start}-{stop - 1}" if stop - start > 1 else f"frame {start}"
            raise InputError(
                path,
                f"DICOM pixel data ({_syntax_name(syntax)}) {which} could not be decoded: "
                f"{_describe(exc)}",
            ) from None

    return read


class _Display:
    """One decoded frame -> the 2-D uint8 gray a viewer shows (see the module docstring)."""

    def __init__(self, ds: Any, geometry: _Geometry, region: Region | None) -> None:
        self._ds = ds
        self._geometry = geometry
        self._region = region
        self._has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        self._invert = (geometry.photometric == "MONOCHROME1") != (
            str(ds.get("PresentationLUTShape") or "").upper() == "INVERSE"
        )

    def __call__(self, frame: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
        if self._region is not None:
            r = self._region
            frame = frame[r.y0 : r.y1 + 1, r.x0 : r.x1 + 1]
        g = self._geometry
        try:
            if g.photometric == "PALETTE COLOR":
                return self._palette(frame)
            if frame.ndim == 3:  # RGB (YBR is converted to RGB by pydicom)
                gray = cv2.cvtColor(_cv_depth(frame), cv2.COLOR_RGB2GRAY)
                return to_uint8(gray, 0.0, float(2**g.bits_stored - 1))
            return self._monochrome(frame, path)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                path, f"DICOM pixels could not be displayed: {_describe(exc)}"
            ) from None

    def _monochrome(self, frame: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        from edge_runtime.io.capture import note

        ds = self._ds
        values = apply_modality_lut(frame, ds)
        low, high = _modality_range(ds)
        if self._has_voi:
            try:
                values = apply_voi_lut(values, ds, index=0)
                if "VOILUTSequence" in ds:
                    low, high = 0.0, float(2 ** _lut_bits(ds.VOILUTSequence[0]) - 1)
            except Exception as exc:  # a width below 1, a broken LUT: show the stored range
                note(f"VOI LUT ignored ({_describe(exc)}); showing the stored value range")
        gray = to_uint8(values, low, high)
        return 255 - gray if self._invert else gray

    def _palette(self, frame: np.ndarray) -> np.ndarray:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(frame, self._ds)
        gray = cv2.cvtColor(_cv_depth(rgb), cv2.COLOR_RGB2GRAY)
        bits = 8 if rgb.dtype == np.uint8 else 16
        return to_uint8(gray, 0.0, float(2**bits - 1))


def _modality_range(ds: Any) -> tuple[float, float]:
    """The range of values after the Modality LUT, as pydicom's windowing computes it."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** _lut_bits(ds.ModalityLUTSequence[0]) - 1)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted(
            (low * float(slope) + float(intercept), high * float(slope) + float(intercept))
        )
    return low, high


def _lut_bits(item: Any) -> int:
    bits = int(item.LUTDescriptor[2])
    return bits if 1 <= bits <= 16 else 16


def _cv_depth(array: np.ndarray) -> np.ndarray:
    """An array OpenCV's colour conversion takes: uint8 and uint16 as they are, else float32."""
    return array if array.dtype in (np.uint8, np.uint16) else array.astype(np.float32)


def _syntax_name(uid: Any) -> str:
    name = getattr(uid, "name", "") or "unknown"
    return f"'{name}' ({uid})"


def _describe(exc: BaseException, limit: int = 300) -> str:
    """One line from an exception: its type and message, lines joined, object ids dropped."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
