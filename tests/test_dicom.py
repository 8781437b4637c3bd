"""DICOM decoding: files made with pydicom in tmp_path, no data files committed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.io.decode import InputError, load_frames, open_scan

pydicom = pytest.importorskip("pydicom", minversion="3.0")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def make_dicom(
    path: Path,
    pixels: np.ndarray | bytes,
    *,
    rows: int,
    columns: int,
    photometric: str = "MONOCHROME2",
    samples: int = 1,
    bits: int = 8,
    frames: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    **extra: object,
) -> Path:
    """Write a minimal, valid DICOM file holding the given pixel bytes."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_STORAGE if frames else US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    if isinstance(pixels, np.ndarray):
        ds.PixelData = pixels.tobytes()
    else:
        ds.PixelData = pixels
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def gray_ramp(rows: int = 16, columns: int = 24) -> np.ndarray:
    return (np.arange(rows * columns) % 256).astype(np.uint8).reshape(rows, columns)


def test_monochrome2_8bit_decodes_to_the_stored_values(tmp_path: Path) -> None:
    image = gray_ramp()
    path = make_dicom(tmp_path / "a.dcm", image, rows=16, columns=24)
    (frame,) = load_frames(path)
    assert frame.dtype == np.uint8 and frame.shape == (16, 24)
    np.testing.assert_array_equal(frame, image)


def test_16bit_without_window_is_scaled_by_its_bits_stored_not_its_own_range(
    tmp_path: Path,
) -> None:
    image = np.linspace(1000, 3000, 16 * 24).astype(np.uint16).reshape(16, 24)
    path = make_dicom(tmp_path / "a.dcm", image, rows=16, columns=24, bits=16, BitsStored=12)
    (frame,) = load_frames(path)
    assert frame.dtype == np.uint8 and frame.shape == (16, 24)
    np.testing.assert_allclose(frame, image * 255.0 / 4095.0, atol=0.51)
    assert np.all(np.diff(frame.ravel().astype(int)) >= 0)  # order kept


def test_16bit_with_a_window_is_shown_through_the_window(tmp_path: Path) -> None:
    image = np.array([[0, 1000, 1500, 2000, 4000]], np.uint16)
    path = make_dicom(
        tmp_path / "a.dcm", image, rows=1, columns=5, bits=16, WindowCenter=1500, WindowWidth=1000
    )
    (frame,) = load_frames(path)
    assert frame[0, 0] == 0 and frame[0, 1] <= 1
    assert abs(int(frame[0, 2]) - 128) <= 2
    assert frame[0, 3] >= 254 and frame[0, 4] == 255


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    image = gray_ramp()
    path = make_dicom(tmp_path / "a.dcm", image, rows=16, columns=24, photometric="MONOCHROME1")
    (frame,) = load_frames(path)
    np.testing.assert_array_equal(frame, 255 - image)


def test_rgb_converts_to_luma(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # (200, 100, 50) -> 0.299*200 + 0.587*100 + 0.114*50 = 124.4
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    path = make_dicom(tmp_path / "a.dcm", rgb, rows=8, columns=8, photometric="RGB", samples=3)
    (frame,) = load_frames(path)
    assert frame.shape == (8, 8)
    assert np.all(np.abs(frame.astype(int) - 124) <= 3)


# Y=150, Cb=100, Cr=160 is RGB (195, 137, 100): its gray is Y (150). Read as RGB it would be 122.
YBR = (150, 100, 160)


def test_ybr_full_converts_to_rgb_before_gray(tmp_path: Path) -> None:
    ybr = np.empty((8, 8, 3), np.uint8)
    ybr[...] = YBR
    path = make_dicom(tmp_path / "a.dcm", ybr, rows=8, columns=8, photometric="YBR_FULL", samples=3)
    (frame,) = load_frames(path)
    assert np.all(np.abs(frame.astype(int) - 150) <= 3)


def test_ybr_full_422_is_upsampled_and_converted(tmp_path: Path) -> None:
    y, cb, cr = YBR
    pairs = np.tile(np.array([y, y, cb, cr], np.uint8), 8 * 8 // 2)  # Y1 Y2 Cb Cr per 2 pixels
    path = make_dicom(
        tmp_path / "a.dcm", pairs, rows=8, columns=8, photometric="YBR_FULL_422", samples=3
    )
    (frame,) = load_frames(path)
    assert frame.shape == (8, 8)
    assert np.all(np.abs(frame.astype(int) - 150) <= 3)


def test_multiframe_gives_one_array_per_frame(tmp_path: Path) -> None:
    stack = np.stack([np.full((10, 12), v, np.uint8) for v in (10, 120, 240)])
    path = make_dicom(tmp_path / "cine.dcm", stack, rows=10, columns=12, frames=3)
    frames = load_frames(path)
    assert len(frames) == 3
    assert [int(f[0, 0]) for f in frames] == [10, 120, 240]
    assert all(f.shape == (10, 12) and f.dtype == np.uint8 for f in frames)


def test_suffixless_dicom_is_found_by_content(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "IM_0001", gray_ramp(), rows=16, columns=24)
    (frame,) = load_frames(path)
    assert frame.shape == (16, 24)


def test_compressed_syntax_with_junk_data_is_refused_clearly(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "j2k.dcm",
        encapsulate([b"\x00junk" * 20]),
        rows=16,
        columns=16,
        syntax=JPEG2000_LOSSLESS,
    )
    with pytest.raises(InputError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.90") as info:
        load_frames(path)
    assert str(info.value).startswith(str(path))


def test_compressed_syntax_without_decoder_names_the_package(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEG_LOSSLESS_SV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = make_dicom(
        tmp_path / "lossless.dcm",
        encapsulate([b"\xff\xd8junk"]),
        rows=16,
        columns=16,
        syntax=JPEG_LOSSLESS_SV1,
    )
    with pytest.raises(InputError, match=r"1\.2\.840\.10008\.1\.2\.4\.70.*no installed decoder"):
        load_frames(path)
    with pytest.raises(InputError, match=r"pylibjpeg|gdcm"):
        load_frames(path)


def test_huge_declared_geometry_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = make_dicom(tmp_path / "bomb.dcm", np.zeros(16, np.uint8), rows=60000, columns=60000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr("pydicom.pixels.pixel_array", no_decoding)
    with pytest.raises(InputError, match="decompression bomb"):
        load_frames(path)


def test_a_frame_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "bomb.dcm", np.zeros(16, np.uint8), rows=9000, columns=9000, frames=2
    )
    with pytest.raises(InputError, match=r"9000 x 9000 pixels a frame, over the"):
        open_scan(path)


def test_a_long_cine_is_not_a_bomb_its_frames_are_read_a_few_at_a_time(tmp_path: Path) -> None:
    """300 frames of 640 x 480 (a 10-second clip): the limit guards one frame, not the file."""
    frames = np.arange(300, dtype=np.uint8)[:, None, None] * np.ones((1, 480, 640), np.uint8)
    path = make_dicom(tmp_path / "cine.dcm", frames, rows=480, columns=640, frames=300)
    scan = open_scan(path)
    assert scan.count == 300
    some = scan.read(297, 300)
    assert [int(f[0, 0]) for f in some] == [297 % 256, 298 % 256, 299 % 256]
    assert all(f.shape == (480, 640) for f in some)


def test_declared_frames_missing_from_the_data_are_reported(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "short.dcm", np.zeros(16, np.uint8), rows=64, columns=64, frames=9)
    with pytest.raises(InputError, match="could not be decoded") as info:
        load_frames(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_pixel_data_is_reported(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", gray_ramp(), rows=16, columns=24)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(InputError, match="no Pixel Data"):
        load_frames(path)


def test_truncated_dicom_is_reported_without_traceback(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", gray_ramp(64, 64), rows=64, columns=64)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError) as info:
        load_frames(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("cut", [140, 200, 300])
def test_dicom_cut_inside_the_header_is_reported(tmp_path: Path, cut: int) -> None:
    path = make_dicom(tmp_path / "a.dcm", gray_ramp(), rows=16, columns=24)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(InputError) as info:
        load_frames(path)
    assert str(info.value).startswith(f"{path}: ")


def test_dcm_suffix_on_a_non_dicom_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not DICOM")
    with pytest.raises(InputError, match="not a valid DICOM file"):
        load_frames(path)


def test_missing_pydicom_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_dicom(tmp_path / "a.dcm", gray_ramp(), rows=16, columns=24)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InputError, match=r"pip install '\.\[dicom\]' in a clone of edge-classify"):
        load_frames(path)


# --- pydicom's pixel pipeline -----------------------------------------------------------------


def pipeline(ds_path: Path) -> np.ndarray:
    """What pydicom's own functions give, mapped from their output range to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(ds_path)
    return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_follow_pydicom(tmp_path: Path, function: str) -> None:
    image = np.linspace(0, 4095, 32 * 40).astype(np.uint16).reshape(32, 40)
    path = make_dicom(
        tmp_path / "a.dcm",
        image,
        rows=32,
        columns=40,
        bits=16,
        BitsStored=12,
        WindowCenter=2000,
        WindowWidth=1500,
        VOILUTFunction=function,
    )
    (frame,) = load_frames(path)
    expected = pipeline(path) * 255.0 / 4095.0  # the window's output range is the stored range
    assert np.abs(frame - expected).max() <= 1.0
    assert frame.min() <= 2 and frame.max() >= 250  # SIGMOID only nears its ends


def test_voi_lut_sequence_is_applied_and_scaled_by_its_entry_bits(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 10]  # 256 entries from value 0, 10-bit output
    lut.LUTData = [min(1023, 4 * i) for i in range(256)]
    lut["LUTData"].VR = "US"
    image = np.arange(0, 256, dtype=np.uint16).reshape(16, 16) * np.uint16(1)
    path = make_dicom(tmp_path / "a.dcm", image, rows=16, columns=16, bits=16, VOILUTSequence=[lut])
    (frame,) = load_frames(path)
    expected = np.minimum(1023, 4 * image) * 255.0 / 1023.0
    assert np.abs(frame - expected).max() <= 1.0


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    image = np.array([[0, 1000, 2000, 3000]], np.uint16)
    path = make_dicom(
        tmp_path / "a.dcm",
        image,
        rows=1,
        columns=4,
        bits=16,
        BitsStored=12,
        RescaleSlope=1,
        RescaleIntercept=-1000,
        WindowCenter=1000,
        WindowWidth=2000,
    )
    (frame,) = load_frames(path)
    assert frame[0, 0] == 0 and frame[0, 1] <= 1 and abs(int(frame[0, 2]) - 128) <= 2
    assert frame[0, 3] == 255


def test_a_dataset_without_file_meta_is_read(tmp_path: Path) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    image = gray_ramp(40, 48)
    path = make_dicom(tmp_path / "a.dcm", image, rows=40, columns=48)
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    bare = tmp_path / "OLD0001"  # no preamble, no 'DICM', no File Meta: implicit VR LE
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    (frame,) = load_frames(bare)
    np.testing.assert_array_equal(frame, image)


def test_deflated_data_with_padding_after_the_stream_is_read(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    image = gray_ramp(40, 48)
    path = make_dicom(
        tmp_path / "a.dcm", image, rows=40, columns=48, syntax=DeflatedExplicitVRLittleEndian
    )
    path.write_bytes(path.read_bytes() + b"\x00")  # as some writers pad to an even length
    (frame,) = load_frames(path)
    np.testing.assert_array_equal(frame, image)


def test_a_deflate_bomb_is_refused_before_it_fills_memory(tmp_path: Path, monkeypatch) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    import edge_runtime.io.dicom as dicom

    frames = np.zeros((50, 256, 256), np.uint8)
    path = make_dicom(
        tmp_path / "bomb.dcm",
        frames,
        rows=256,
        columns=256,
        frames=50,
        syntax=DeflatedExplicitVRLittleEndian,
    )
    monkeypatch.setattr(dicom, "MAX_FILE_BYTES", 1_000_000)  # 3.3 MB inflated
    with pytest.raises(InputError, match="inflate past 1,000,000 bytes"):
        load_frames(path)


# --- ultrasound regions -----------------------------------------------------------------------


def us_region(
    x0: int, y0: int, x1: int, y1: int, *, fmt: int = 1, units: int = 3, delta=(0.02, 0.03)
):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RegionSpatialFormat = fmt
    item.RegionDataType = 1
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX, item.PhysicalDeltaY = delta
    return item


def test_the_tissue_region_is_cropped_and_its_spacing_carried_in_mm(tmp_path: Path) -> None:
    from edge_runtime.io.decode import open_scan

    screen = np.full((120, 160), 200, np.uint8)  # screen chrome around the image
    screen[20:100, 30:130] = gray_ramp(80, 100)
    regions = [us_region(30, 20, 129, 99), us_region(0, 110, 159, 119, fmt=3, units=4)]
    path = make_dicom(
        tmp_path / "us.dcm",
        screen,
        rows=120,
        columns=160,
        SequenceOfUltrasoundRegions=regions,
        PixelSpacing=[0.5, 0.5],
    )
    scan = open_scan(path)
    (frame,) = scan.read()
    np.testing.assert_array_equal(frame, gray_ramp(80, 100))
    assert scan.pixel_spacing_mm == pytest.approx((0.3, 0.2))  # (row = Y, column = X), cm -> mm


def _dual_view(frames: int = 1) -> tuple[np.ndarray, list]:
    """A 60 x 200 screen (``frames`` of them) with two 40 x 80 B-mode images side by side."""
    screen = np.full((frames, 60, 200), 200, np.uint8)
    for f in range(frames):
        screen[f, 10:50, 10:90] = 10 + f  # left view
        screen[f, 10:50, 110:190] = 100 + f  # right view
    regions = [
        us_region(10, 10, 89, 49, delta=(0.01, 0.01)),
        us_region(110, 10, 189, 49, delta=(0.02, 0.04)),
    ]
    return screen, regions


def test_a_dual_view_gives_one_image_per_tissue_region_in_the_files_order(tmp_path: Path) -> None:
    screen, regions = _dual_view()
    path = make_dicom(
        tmp_path / "dual.dcm",
        screen[0],
        rows=60,
        columns=200,
        SequenceOfUltrasoundRegions=regions,
    )
    scan = open_scan(path)
    left, right = scan.read()
    assert scan.count == 2 and left.shape == right.shape == (40, 80)
    assert np.all(left == 10) and np.all(right == 100)
    assert scan.where(0) == (None, 0, pytest.approx((0.1, 0.1)))
    assert scan.where(1) == (None, 1, pytest.approx((0.4, 0.2)))


def test_a_dual_view_cine_gives_each_frames_regions_in_turn(tmp_path: Path) -> None:
    screen, regions = _dual_view(frames=3)
    path = make_dicom(
        tmp_path / "dual.dcm",
        screen,
        rows=60,
        columns=200,
        frames=3,
        SequenceOfUltrasoundRegions=regions,
    )
    scan = open_scan(path)
    assert scan.count == 6
    images = scan.read(1, 5)  # frame 0 right, frame 1 left and right, frame 2 left
    assert [int(image[0, 0]) for image in images] == [100, 11, 101, 12]
    assert [scan.where(k)[:2] for k in range(1, 5)] == [(0, 1), (1, 0), (1, 1), (2, 0)]


def test_a_region_inside_another_or_not_of_tissue_is_not_a_view_of_its_own(
    tmp_path: Path,
) -> None:
    screen, (tissue, _) = _dual_view()
    colour_box = us_region(30, 20, 60, 40)  # a 2-D region within the B-mode image
    doppler = us_region(110, 10, 189, 49)
    doppler.RegionDataType = 2  # colour flow
    path = make_dicom(
        tmp_path / "one.dcm",
        screen[0],
        rows=60,
        columns=200,
        SequenceOfUltrasoundRegions=[tissue, colour_box, doppler],
    )
    scan = open_scan(path)
    (image,) = scan.read()
    assert scan.count == 1 and scan.regions == () and image.shape == (40, 80)
    assert scan.where(0) == (None, None, pytest.approx((0.1, 0.1)))


def test_each_region_of_a_dual_view_gets_its_own_record(tmp_path: Path) -> None:
    from edge_runtime.app.output import result_record
    from edge_runtime.classifier import Classifier
    from tests.onnx_models import make_contract_model

    screen, regions = _dual_view(frames=2)
    path = make_dicom(
        tmp_path / "dual.dcm",
        screen,
        rows=60,
        columns=200,
        frames=2,
        SequenceOfUltrasoundRegions=regions,
    )
    with Classifier.from_path(make_contract_model(tmp_path / "m.onnx"), batch_size=3) as clf:
        results = clf.classify([path])
    assert all(r.ok for r in results)
    assert [(r.frame, r.region) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert results[1].pixel_spacing_mm == pytest.approx((0.4, 0.2))
    assert result_record(results[3])["region"] == 1 and result_record(results[3])["frame"] == 1


def test_without_regions_the_spacing_is_pixel_spacing_and_reaches_the_result(
    tmp_path: Path,
) -> None:
    from edge_runtime.classifier import Classifier
    from tests.onnx_models import make_contract_model

    path = make_dicom(
        tmp_path / "a.dcm", gray_ramp(40, 48), rows=40, columns=48, PixelSpacing=[0.25, 0.3]
    )
    with Classifier.from_path(make_contract_model(tmp_path / "m.onnx")) as clf:
        (result,) = clf.classify([path])
    assert result.ok and result.pixel_spacing_mm == pytest.approx((0.25, 0.3))
    assert result.image is None


def test_a_region_outside_the_frame_is_ignored(tmp_path: Path) -> None:
    from edge_runtime.io.decode import open_scan

    path = make_dicom(
        tmp_path / "a.dcm",
        gray_ramp(40, 48),
        rows=40,
        columns=48,
        SequenceOfUltrasoundRegions=[us_region(10, 10, 400, 300)],
    )
    scan = open_scan(path)
    assert scan.read()[0].shape == (40, 48) and scan.pixel_spacing_mm is None
