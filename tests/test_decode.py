"""Decoding: every supported format, and a hostile-input corpus that must fail cleanly."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.io.decode import InputError, decode_gray, is_dicom, load_frames, load_gray


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def ramp(dtype: type = np.uint8, rows: int = 32, columns: int = 48) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 65535
    return np.linspace(0, top, rows * columns).astype(dtype).reshape(rows, columns)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring the given size, with a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- every format -----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_lossless_8bit_gray_round_trips_exactly(tmp_path: Path, ext: str) -> None:
    image = ramp()
    path = write(tmp_path, f"a{ext}", encode(image, ext))
    (frame,) = load_frames(path)
    assert frame.dtype == np.uint8 and frame.shape == (32, 48)
    np.testing.assert_array_equal(frame, image)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_gray_is_scaled_to_8bit(tmp_path: Path, ext: str) -> None:
    image = ramp(np.uint16)
    path = write(tmp_path, f"a{ext}", encode(image, ext))
    (frame,) = load_frames(path)
    assert frame.dtype == np.uint8 and frame.shape == (32, 48)
    np.testing.assert_allclose(frame, image / 257.0, atol=1)


def test_rgb_png_converts_to_luma(tmp_path: Path) -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[...] = (50, 100, 200)  # B, G, R -> 0.299*200 + 0.587*100 + 0.114*50 = 124.4
    (frame,) = load_frames(write(tmp_path, "a.png", encode(bgr, ".png")))
    assert frame.shape == (8, 8)
    assert np.all(np.abs(frame.astype(int) - 124) <= 1)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[...] = (90, 90, 90, 10)
    (frame,) = load_frames(write(tmp_path, "a.png", encode(bgra, ".png")))
    assert frame.shape == (8, 8)
    assert np.all(frame == 90)


def test_jpeg_decodes_close_to_the_original(tmp_path: Path) -> None:
    image = np.full((32, 48), 128, np.uint8)
    image[:, 24:] = 200
    (frame,) = load_frames(write(tmp_path, "a.jpg", encode(image, ".jpg")))
    assert frame.dtype == np.uint8 and frame.shape == (32, 48)
    assert np.abs(frame.astype(int) - image).mean() < 3


def test_load_gray_and_load_frames_agree(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", encode(ramp(), ".png"))
    np.testing.assert_array_equal(load_gray(path), load_frames(path)[0])


def test_odd_extension_is_decoded_by_content(tmp_path: Path) -> None:
    (frame,) = load_frames(write(tmp_path, "scan.data", encode(ramp(), ".png")))
    assert frame.shape == (32, 48)


def test_is_dicom_uses_suffix_or_marker() -> None:
    assert is_dicom("a.DCM", b"")
    assert is_dicom("IM_0001", b"\x00" * 128 + b"DICM")
    assert not is_dicom("a.png", b"\x89PNG" + b"\x00" * 200)


# --- hostile inputs ---------------------------------------------------------------------------


def check_refused(path: Path, reason: str) -> None:
    with pytest.raises(InputError, match=reason) as info:
        load_frames(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == str(path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    check_refused(write(tmp_path, "empty.png", b""), "empty")


def test_empty_dcm_file_is_refused_as_empty(tmp_path: Path) -> None:
    check_refused(write(tmp_path, "empty.dcm", b""), "empty")


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    data = encode(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8), ".png")
    check_refused(write(tmp_path, "cut.png", data[: len(data) // 2]), "corrupt or truncated")


def test_png_cut_inside_its_header_is_refused(tmp_path: Path) -> None:
    check_refused(write(tmp_path, "cut.png", encode(ramp(), ".png")[:20]), "empty image|corrupt")


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = encode(ramp(), ".jpg")
    check_refused(write(tmp_path, "cut.jpg", data[:100]), "corrupt or truncated|empty image")


def test_text_file_named_png_is_refused(tmp_path: Path) -> None:
    check_refused(write(tmp_path, "notes.png", b"patient list\n" * 20), "not a supported image")


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()
    check_refused(write(tmp_path, "noise.jpg", b"\x00" + data), "not a supported image")


def test_decompression_bomb_png_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, "bomb.png", png_header_only(100_000, 100_000))

    def no_decoding(*args):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    check_refused(path, r"100000 x 100000 pixels.*decompression bomb")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    check_refused(tmp_path / "nowhere.png", "file not found")


def test_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    check_refused(link, "dangling symbolic link")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file"
)
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "locked.png", encode(ramp(), ".png"))
    path.chmod(0)
    try:
        check_refused(path, "permission denied")
    finally:
        path.chmod(0o600)


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    check_refused(folder, "a folder, not a file")


def test_decode_gray_refuses_bytes_with_a_placeholder_path() -> None:
    with pytest.raises(InputError, match=r"^<bytes>: file is empty"):
        decode_gray(b"")
