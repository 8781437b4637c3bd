"""Hostile bytes into every decode entry point (PNG, JPEG, TIFF, BMP, DICOM): only InputError.

Hypothesis mutates real files of each format (flipped, cut, spliced and inserted bytes) and
feeds them to :func:`open_scan` and the frames it reads. CI runs ``FUZZ_EXAMPLES`` (default 150)
examples per format; ``EDGE_CLASSIFY_FUZZ_EXAMPLES=20000`` makes a long run.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_runtime.io.capture import collecting  # noqa: E402
from edge_runtime.io.decode import InputError, open_scan  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("EDGE_CLASSIFY_FUZZ_EXAMPLES", "150"))
FORMATS = ("png", "png16", "jpeg", "tiff", "bmp", "dicom", "dicom_rle", "dicom_deflated")


@cache
def seed_file(kind: str) -> bytes:
    """A small valid file of the kind, the fuzzer's starting point."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (40, 48), np.uint8), (5, 5), 1)
    if kind == "png16":
        return cv2.imencode(".png", image.astype(np.uint16) * 16)[1].tobytes()
    if kind == "tiff":
        ok, data = cv2.imencodemulti(".tif", [image, 255 - image])
        assert ok
        return data.tobytes()
    if kind in ("png", "jpeg", "bmp"):
        return cv2.imencode({"png": ".png", "jpeg": ".jpg", "bmp": ".bmp"}[kind], image)[
            1
        ].tobytes()
    pytest.importorskip("pydicom", minversion="3.0")
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    from tests.test_dicom import make_dicom

    folder = Path(tempfile.mkdtemp(prefix="fuzz-seed-"))
    extra = {"syntax": DeflatedExplicitVRLittleEndian} if kind == "dicom_deflated" else {}
    frames = np.stack([image, 255 - image])
    path = make_dicom(folder / "seed.dcm", frames, rows=40, columns=48, frames=2, **extra)
    if kind == "dicom_rle":
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    return path.read_bytes()


@st.composite
def mutated(draw, kind: str) -> bytes:
    data = bytearray(seed_file(kind))
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "splice", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "splice":
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
        else:
            data[at : at + draw(st.integers(1, 64))] = b"\x00" * 8
        if not data:
            break
    return bytes(data)


def decode_everything(kind: str, data: bytes) -> None:
    """What the runtime does with a file: open, then read every frame; only InputError."""
    with collecting():
        try:
            scan = open_scan(f"fuzz.{'dcm' if kind.startswith('dicom') else kind}", data)
            for frame in scan.read():
                assert frame.dtype == np.uint8 and frame.ndim == 2
        except InputError:
            pass


@pytest.mark.parametrize("kind", FORMATS)
def test_mutated_files_raise_only_input_error(kind: str) -> None:
    decode_everything(kind, seed_file(kind))  # the seed itself decodes

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=FUZZ_EXAMPLES <= 150,  # CI: the same examples every run
    )
    @given(mutated(kind))
    def run(data: bytes) -> None:
        decode_everything(kind, data)

    run()


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"BM"])
def test_magic_alone_is_refused(data: bytes) -> None:
    with pytest.raises(InputError):
        open_scan("x.bin", data).read()
