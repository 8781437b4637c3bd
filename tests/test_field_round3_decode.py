"""Field cases of issue 32 (decoding and coordinates), rebuilt here: no data files needed.

A native YBR_FULL_422 cine, lesion boxes and masks in the whole frame's pixels on DICOM with
ultrasound regions (and a region one pixel past the frame's edge), 16-bit PNG with ``sBIT``,
the pixel spacing of an Enhanced US Volume, and BigTIFF.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from edge_runtime.io.decode import InputError, load_frames, open_scan
from edge_runtime.model.session import Provider
from tests.test_lesion import _ellipse_mask, _model, _read_mask, _scan


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("lesion") / "lesion.onnx")


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


# --- 1. native YBR_FULL_422 cine --------------------------------------------------------------


def ybr_full_422(luma: np.ndarray, cb: int = 128, cr: int = 128) -> bytes:
    """Native YBR_FULL_422 pixel bytes of one frame: Y1 Y2 Cb Cr for each pair of columns."""
    rows, columns = luma.shape
    packed = np.empty((rows, columns // 2, 4), np.uint8)
    packed[..., 0], packed[..., 1] = luma[:, 0::2], luma[:, 1::2]
    packed[..., 2], packed[..., 3] = cb, cr
    return packed.tobytes()


def test_a_native_ybr_full_422_cine_gives_every_frame_s_luma(tmp_path: Path) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    rows, columns, count = 40, 64, 3
    lumas = [
        (np.arange(rows * columns).reshape(rows, columns) * (k + 1) % 200 + 20).astype(np.uint8)
        for k in range(count)
    ]
    data = b"".join(ybr_full_422(luma) for luma in lumas)
    assert len(data) == rows * columns * 2 * count  # two bytes a pixel, not three
    path = make_dicom(
        tmp_path / "cine.dcm",
        np.frombuffer(data, np.uint8),
        rows=rows,
        columns=columns,
        photometric="YBR_FULL_422",
        samples=3,
        frames=count,
    )
    scan = open_scan(path)
    frames = scan.read()
    assert scan.count == count and len(frames) == count
    for frame, luma in zip(frames, lumas, strict=True):  # neutral chroma: gray is Y
        assert frame.shape == (rows, columns)
        assert np.abs(frame.astype(int) - luma).max() <= 1
    (middle,) = scan.read(1, 2)  # a batch that starts inside the file
    np.testing.assert_array_equal(middle, frames[1])


# --- 3. lesion boxes and masks in the frame's pixels ------------------------------------------

ROWS, COLUMNS = 600, 720
LEFT = (60, 20, 359, 579)  # Region Location Min X0, Min Y0, Max X1, Max Y1
RIGHT = (360, 20, COLUMNS, 579)  # Max X1 one past the last column: an off-by-one writer


def dual_view_screen(centres: list[tuple[int, int]], axes: tuple[int, int]) -> np.ndarray:
    """A 720 x 600 screen: black around two bright B-mode views, a dark lesion in each."""
    screen = np.zeros((ROWS, COLUMNS), np.uint8)
    for (x0, y0, x1, y1), centre in zip((LEFT, RIGHT), centres, strict=True):
        x1 = min(x1, COLUMNS - 1)
        view = _scan((y1 - y0 + 1, x1 - x0 + 1), (centre[0] - x0, centre[1] - y0), axes)
        screen[y0 : y1 + 1, x0 : x1 + 1] = view
    return screen


def write_dual_view(path: Path, screen: np.ndarray) -> Path:
    from tests.test_dicom import make_dicom, us_region

    regions = [us_region(*LEFT, delta=(0.01, 0.01)), us_region(*RIGHT, delta=(0.02, 0.02))]
    return make_dicom(path, screen, rows=ROWS, columns=COLUMNS, SequenceOfUltrasoundRegions=regions)


def test_a_region_one_past_the_frame_s_edge_is_clamped_with_a_warning_naming_the_file(
    tmp_path: Path, caplog
) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    path = write_dual_view(tmp_path / "dual.dcm", np.full((ROWS, COLUMNS), 128, np.uint8))
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        scan = open_scan(path)
    assert scan.count == 2 and scan.regions == ((0.1, 0.1), (0.2, 0.2))
    assert [image.shape for image in scan.read()] == [(560, 300), (560, 360)]
    assert scan.origin(0) == (60, 20) and scan.origin(1) == (360, 20)
    assert scan.frame_shape == (ROWS, COLUMNS)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage() and "clamped" in warning.getMessage()
    assert "Max X1" in warning.getMessage() and "720" in warning.getMessage()


def test_a_region_far_outside_the_frame_is_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom, us_region

    path = make_dicom(
        tmp_path / "a.dcm",
        np.full((40, 48), 128, np.uint8),
        rows=40,
        columns=48,
        SequenceOfUltrasoundRegions=[us_region(10, 10, 400, 300)],
    )
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        scan = open_scan(path)
    assert scan.pixel_spacing_mm is None and scan.origins == ()
    assert any(str(path) in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_lesion_boxes_and_masks_of_a_dual_view_are_in_the_frame_s_pixels(
    tmp_path: Path, lesion_model: Path
) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    centres, axes = [(282 + 30, 214 + 25), (540, 300)], (30, 25)
    path = write_dual_view(tmp_path / "dual.dcm", dual_view_screen(centres, axes))
    truths = [_ellipse_mask((ROWS, COLUMNS), centre, axes) for centre in centres]
    assert cv2.boundingRect(truths[0])[:2] == (282, 214)  # the lesion of the issue
    masks = tmp_path / "masks"
    status, out, err = run(path, "--model", lesion_model, "--format", "jsonl", "--masks", masks)
    assert status == 0, err
    assert f"{path}: " in err and "clamped" in err  # the off-by-one region, logged
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["region"] for r in records] == [0, 1]
    for record, truth in zip(records, truths, strict=True):
        box = np.array(record["lesion_bbox"])
        assert np.abs(box - cv2.boundingRect(truth)).max() <= 6, (box, cv2.boundingRect(truth))
        assert record["lesion_area_mm2"] is not None and record["lesion_diameter_mm"] is not None
    assert records[1]["lesion_diameter_mm"] == pytest.approx(2 * 30 * 0.2, abs=1.0)
    for region, truth in enumerate(truths):
        mask = _read_mask(masks / f"dual_r{region}_mask.png")
        assert mask.shape == (ROWS, COLUMNS) and _iou(mask, truth) > 0.8
        record = records[region]
        assert list(cv2.boundingRect(mask)) == record["lesion_bbox"]
        assert cv2.countNonZero(mask) == record["lesion_area_px"]


def test_a_single_tissue_region_s_lesion_is_placed_at_its_offset_in_python_too(
    tmp_path: Path, lesion_model: Path
) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom, us_region

    region, centre, axes = (80, 50, 399, 289), (250, 170), (35, 25)
    screen = np.zeros((300, 480), np.uint8)
    x0, y0, x1, y1 = region
    screen[y0 : y1 + 1, x0 : x1 + 1] = _scan(
        (y1 - y0 + 1, x1 - x0 + 1), (centre[0] - x0, centre[1] - y0), axes
    )
    path = make_dicom(
        tmp_path / "one.dcm",
        screen,
        rows=300,
        columns=480,
        SequenceOfUltrasoundRegions=[us_region(*region)],
    )
    truth = _ellipse_mask((300, 480), centre, axes)
    with Classifier.from_path(lesion_model, provider=Provider.CPU) as clf:
        (result,) = clf.classify([path], masks=True)
        (shown,) = clf.classify([path], heatmaps=True)
    assert result.ok and result.region is None and result.origin == (80, 50)
    assert result.lesion_mask.shape == (300, 480) and _iou(result.lesion_mask, truth) > 0.8
    assert tuple(cv2.boundingRect(result.lesion_mask)) == result.lesion.bbox
    assert np.abs(np.array(result.lesion.bbox) - cv2.boundingRect(truth)).max() <= 6
    # the heatmap and image stay the classified region's; the mask is the frame's
    assert shown.image.shape == shown.heatmap.shape == (240, 320)
    assert shown.lesion_mask.shape == (300, 480) and shown.lesion == result.lesion


def test_the_heatmap_overlay_of_a_region_outlines_its_lesion(
    tmp_path: Path, lesion_model: Path
) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    centres, axes = [(282 + 30, 214 + 25), (540, 300)], (30, 25)
    path = write_dual_view(tmp_path / "dual.dcm", dual_view_screen(centres, axes))
    status, _, err = run(path, "--model", lesion_model, "--heatmaps", tmp_path / "heat")
    assert status == 0, err
    for region, ((x0, y0, x1, y1), centre) in enumerate(zip((LEFT, RIGHT), centres, strict=True)):
        colour = cv2.imread(str(tmp_path / "heat" / f"dual_r{region}_overlay.png"))
        x1 = min(x1, COLUMNS - 1)
        assert colour.shape[:2] == (y1 - y0 + 1, x1 - x0 + 1)
        outline = np.all(colour == 255, axis=-1)
        truth = _ellipse_mask(colour.shape[:2], (centre[0] - x0, centre[1] - y0), axes)
        band = cv2.dilate(truth, np.ones((13, 13), np.uint8)) != cv2.erode(
            truth, np.ones((13, 13), np.uint8)
        )
        assert outline.sum() > 100 and outline[band].sum() == outline.sum()


# --- 4. 16-bit PNG with sBIT ------------------------------------------------------------------


def png_with_sbit(image: np.ndarray, bits: int) -> bytes:
    """A 16-bit gray PNG (OpenCV's) with an ``sBIT`` chunk inserted after its IHDR."""
    ok, encoded = cv2.imencode(".png", image)
    assert ok and image.dtype == np.uint16
    data = encoded.tobytes()
    ihdr_end = 8 + 8 + 13 + 4
    body = bytes([bits])
    chunk = struct.pack(">I", 1) + b"sBIT" + body
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def test_a_16bit_png_with_sbit_spans_the_16bit_range_as_the_png_standard_stores_it(
    tmp_path: Path, caplog
) -> None:
    original = np.linspace(0, 4095, 48 * 64).astype(np.uint16).reshape(48, 64)  # 12 bits
    stored = (original << 4) | (original >> 8)  # scaled to 16 bits by bit replication
    path = tmp_path / "scan.png"
    path.write_bytes(png_with_sbit(stored, 12))
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        (frame,) = load_frames(path)
    np.testing.assert_allclose(frame, original * 255.0 / 4095.0, atol=1.0)
    assert frame.mean() < 140  # read as 12-bit data, nearly all of it would be 255
    assert not caplog.records


def test_a_16bit_png_whose_values_fit_its_sbit_is_read_by_its_bits_with_a_warning(
    tmp_path: Path, caplog
) -> None:
    """A writer that broke the standard: 12-bit values stored unscaled, sBIT 12."""
    original = np.linspace(0, 4095, 48 * 64).astype(np.uint16).reshape(48, 64)
    path = tmp_path / "raw12.png"
    path.write_bytes(png_with_sbit(original, 12))
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        (frame,) = load_frames(path)
    np.testing.assert_allclose(frame, original * 255.0 / 4095.0, atol=1.0)
    (warning,) = caplog.records
    assert warning.getMessage().startswith(f"{path}: ") and "sBIT" in warning.getMessage()


# --- 5. Enhanced US Volume --------------------------------------------------------------------

ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"


def _measures(row_mm: float, column_mm: float):
    from pydicom.dataset import Dataset

    measures, group = Dataset(), Dataset()
    measures.PixelSpacing = [row_mm, column_mm]
    measures.SliceThickness = 0.5
    group.PixelMeasuresSequence = [measures]
    return group


def test_an_enhanced_us_volume_s_shared_pixel_measures_give_the_lesion_in_mm(
    tmp_path: Path, lesion_model: Path
) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    shape, centre, axes = (200, 330), (160, 100), (60, 40)
    stack = np.stack([_scan(shape, centre, axes), _scan(shape, centre, axes)])
    path = make_dicom(
        tmp_path / "volume.dcm",
        stack,
        rows=shape[0],
        columns=shape[1],
        frames=2,
        SOPClassUID=ENHANCED_US_VOLUME,
        SharedFunctionalGroupsSequence=[_measures(0.2, 0.1)],
    )
    assert open_scan(path).pixel_spacing_mm == (0.2, 0.1)
    with Classifier.from_path(lesion_model, provider=Provider.CPU) as clf:
        results = clf.classify([path])
    for result in results:
        assert result.ok and result.pixel_spacing_mm == (0.2, 0.1)
        assert result.lesion.area_mm2 == pytest.approx(result.lesion.area_px * 0.02)
        assert result.lesion.diameter_mm == pytest.approx(2 * 40 * 0.2, abs=0.8)


def test_per_frame_pixel_measures_count_when_every_frame_states_the_same(tmp_path: Path) -> None:
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    def volume(name: str, spacings: list[tuple[float, float]]) -> Path:
        stack = np.full((len(spacings), 40, 48), 100, np.uint8)
        return make_dicom(
            tmp_path / name,
            stack,
            rows=40,
            columns=48,
            frames=len(spacings),
            SOPClassUID=ENHANCED_US_VOLUME,
            PerFrameFunctionalGroupsSequence=[_measures(*s) for s in spacings],
        )

    assert open_scan(volume("same.dcm", [(0.3, 0.3)] * 3)).pixel_spacing_mm == (0.3, 0.3)
    assert open_scan(volume("differ.dcm", [(0.3, 0.3), (0.4, 0.4)])).pixel_spacing_mm is None


# --- 10. BigTIFF ------------------------------------------------------------------------------


def test_a_bigtiff_s_every_page_is_a_frame(tmp_path: Path) -> None:
    from PIL import Image

    pages = [
        (np.arange(40 * 64).reshape(40, 64) * (k + 1) % 256).astype(np.uint8) for k in range(3)
    ]
    path = tmp_path / "stack.tif"
    first, *rest = (Image.fromarray(page) for page in pages)
    first.save(path, format="TIFF", big_tiff=True, save_all=True, append_images=rest)
    assert path.read_bytes()[:4] == b"II+\x00"
    frames = load_frames(path)
    assert len(frames) == 3
    for frame, page in zip(frames, pages, strict=True):
        np.testing.assert_array_equal(frame, page)


def test_a_16bit_bigtiff_is_scaled_and_classified(tmp_path: Path, lesion_model: Path) -> None:
    from PIL import Image

    image = np.linspace(0, 65535, 64 * 96).astype(np.uint16).reshape(64, 96)
    path = tmp_path / "deep.tiff"
    Image.fromarray(image).save(path, format="TIFF", big_tiff=True)
    (frame,) = load_frames(path)
    np.testing.assert_allclose(frame, image / 257.0, atol=1)
    status, out, err = run(path, "--model", lesion_model, "--format", "jsonl")
    assert status == 0, err
    assert json.loads(out)["error"] is None


def bigtiff_header_only(width: int, height: int, order: bytes = b"II") -> bytes:
    """A BigTIFF header and one IFD declaring the given size (LONG8 values), no pixels."""
    e = "<" if order == b"II" else ">"
    magic = struct.pack(e + "HHHQ", 43, 8, 0, 16)
    entries = [(256, 16, 1, width), (257, 16, 1, height), (258, 3, 1, 8), (277, 3, 1, 1)]
    ifd = struct.pack(e + "Q", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack(e + ("Q" if kind == 16 else "H"), value).ljust(8, b"\x00")
        ifd += struct.pack(e + "HHQ", tag, kind, count) + packed
    return order + magic + ifd + struct.pack(e + "Q", 0)


@pytest.mark.parametrize("order", [b"II", b"MM"])
def test_a_bigtiff_bomb_is_refused_from_its_header(tmp_path: Path, order: bytes, monkeypatch):
    path = tmp_path / "bomb.tif"
    path.write_bytes(bigtiff_header_only(100_000, 100_000, order))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    monkeypatch.setattr(cv2, "imdecodemulti", no_decoding)
    with pytest.raises(InputError, match=r"100000 x 100000 pixels.*decompression bomb"):
        load_frames(path)


def test_mutated_bigtiffs_raise_only_input_error(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(32)
    pages = [rng.integers(0, 256, (40, 48), np.uint8) for _ in range(2)]
    buffer = io.BytesIO()
    Image.fromarray(pages[0]).save(
        buffer,
        format="TIFF",
        big_tiff=True,
        save_all=True,
        append_images=[Image.fromarray(pages[1])],
    )
    seed = buffer.getvalue()
    far = seed[:8] + b"\xff" * 8 + seed[16:]  # a first IFD 2**64 - 1 bytes in
    with pytest.raises(InputError, match="empty image"):
        open_scan("far.tif", far).read()
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(int(rng.integers(1, 5))):
            if not data:
                break
            at = int(rng.integers(0, len(data)))
            if rng.random() < 0.2:
                del data[at:]
            else:
                data[at : at + 8] = rng.integers(0, 256, 8, np.uint8).tobytes()
        if not data:
            continue
        with contextlib.suppress(InputError):
            open_scan("fuzzed.tif", bytes(data)).read()
