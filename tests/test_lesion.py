"""Lesion outlines: the letterbox undone, the measures, the Classifier, the recheck, --masks."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_runtime.app.cli import main
from edge_runtime.classifier import Classifier
from edge_runtime.io.preprocess import fit_to_square, letterbox_box
from edge_runtime.io.reader import DecodedItem
from edge_runtime.model.contract import (
    ContractError,
    ModelSpec,
    NormalRule,
    Precision,
    ResizePolicy,
)
from edge_runtime.model.session import Provider, open_model
from edge_runtime.postprocess.lesion import feret_diameter, find_lesion, lesion_probability
from tests.onnx_models import CLASSES, make_contract_model

SIZE = 224  # the test models' input side: a lesion map cell is 4 x 4 input pixels
SHAPES = {"portrait": (300, 190), "landscape": (190, 300), "square": (240, 240)}
FULL_SIZE = {"portrait": (856, 606), "landscape": (606, 856), "square": (700, 700)}


def _model(path: Path, **spec_changes) -> Path:
    spec = ModelSpec(class_names=CLASSES, input_size=SIZE, lesion_stride=4, **spec_changes)
    return make_contract_model(path, size=SIZE, spec=spec, lesion_stride=4)


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("lesion") / "lesion.onnx")


def _scan(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
    """A bright noisy scan with one dark ellipse: what the test model calls the lesion."""
    rng = np.random.default_rng(sum(shape))
    scan = rng.integers(150, 230, shape, dtype=np.uint8)
    cv2.ellipse(scan, centre, axes, 0, 0, 360, 20, -1)
    return scan


def _ellipse_mask(shape, centre, axes, angle=0.0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1)
    return mask


def _half_a_pixel_along_the_outline(a: float, b: float) -> float:
    """Drawn pixels reach up to half a pixel beyond the ellipse: its perimeter (Ramanujan) / 2."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) / 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / (a | b).sum())


def _edges(bbox) -> np.ndarray:
    """``[x, y, w, h]`` -> first and last column and row."""
    x, y, w, h = bbox
    return np.array([x, y, x + w - 1, y + h - 1])


def _off_by_more_than_one_pixel(found: np.ndarray, truth: np.ndarray) -> int:
    """Pixels where ``found`` differs from ``truth`` farther than one pixel from its edge."""
    kernel = np.ones((3, 3), np.uint8)
    near_edge = cv2.dilate(truth, kernel) != cv2.erode(truth, kernel)
    return int(((found > 0) != (truth > 0))[~near_edge].sum())


@pytest.mark.parametrize("policy", list(ResizePolicy), ids=lambda p: p.value)
@pytest.mark.parametrize("orientation", list(SHAPES))
def test_a_mask_fitted_into_the_square_maps_back_to_the_same_pixels(orientation, policy):
    """Round trip at a stride of 1: the mask through fit_to_square, then back."""
    shape = SHAPES[orientation]
    truth = _ellipse_mask(shape, (shape[1] // 3, shape[0] // 2), (shape[1] // 5, shape[0] // 6))
    square = fit_to_square(truth, SIZE, policy).astype(np.float32) / 255.0
    lesion, mask = find_lesion(square, shape, input_size=SIZE, policy=policy)
    assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert _off_by_more_than_one_pixel(mask, truth) == 0
    assert np.abs(_edges(lesion.bbox) - _edges(cv2.boundingRect(truth))).max() <= 1


@pytest.mark.parametrize("orientation", list(FULL_SIZE))
def test_a_stride_4_map_of_a_full_size_scan_maps_back_within_one_pixel(orientation):
    """A disk drawn in the frame, seen by the model as a smooth map on its own grid (a cell is
    4 input pixels, 11-15 frame pixels here): the outline comes back within one frame pixel."""
    height, width = FULL_SIZE[orientation]
    top, left, new_h, new_w = letterbox_box(height, width, SIZE)
    cx, cy, radius = 0.4 * width, 0.55 * height, 0.15 * min(height, width)
    # frame coordinates (pixel index) of the map cells' centres, from the forward letterbox
    centres = (np.arange(SIZE // 4) + 0.5) * 4
    xs = (centres - left) * width / new_w - 0.5
    ys = (centres - top) * height / new_h - 0.5
    distance = np.hypot(xs[None, :] - cx, ys[:, None] - cy)
    ramp = 3 * 4 * max(height, width) / SIZE  # probability falls from 1 to 0 over 3 cells
    lesion_map = np.clip(0.5 + (radius - distance) / ramp, 0.0, 1.0).astype(np.float32)
    lesion, mask = find_lesion(lesion_map, (height, width), input_size=SIZE)
    yy, xx = np.mgrid[0:height, 0:width]
    truth = np.where(np.hypot(xx - cx, yy - cy) <= radius, 255, 0).astype(np.uint8)
    assert _off_by_more_than_one_pixel(mask, truth) == 0
    assert np.abs(_edges(lesion.bbox) - _edges(cv2.boundingRect(truth))).max() <= 1
    assert lesion.area_px == pytest.approx(math.pi * radius**2, rel=0.01)


def test_find_lesion_equals_the_largest_region_of_the_whole_frame_probability():
    """Computing only near the map's hot cells changes nothing: random multi-blob maps,
    blobs on the edges and in the padding included."""
    rng = np.random.default_rng(3)
    for trial in range(12):
        shape = [(606, 856), (856, 606), (500, 500), (90, 400)][trial % 4]
        noise = cv2.GaussianBlur(rng.random((56, 56)).astype(np.float32), (0, 0), 2.0)
        lesion_map = (noise - noise.min()) / np.ptp(noise)
        threshold = float(rng.uniform(0.6, 0.9))
        lesion, mask = find_lesion(lesion_map, shape, input_size=SIZE, threshold=threshold)
        binary = (lesion_probability(lesion_map, shape, SIZE) >= threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        if count == 1:
            assert lesion is None and not mask.any()
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        np.testing.assert_array_equal(mask > 0, labels == best)
        assert lesion.area_px == stats[best, cv2.CC_STAT_AREA]
        assert lesion.bbox == tuple(int(v) for v in stats[best, :4])


def test_no_pixel_at_the_threshold_is_no_lesion_and_an_empty_mask():
    lesion, mask = find_lesion(np.full((56, 56), 0.49, np.float32), (606, 856), input_size=SIZE)
    assert lesion is None and mask.shape == (606, 856) and not mask.any()
    assert find_lesion(np.ones((56, 56)), (606, 856), input_size=SIZE, with_mask=False)[1] is None


def test_box_area_and_diameter_of_a_drawn_ellipse_keep_only_the_largest_region():
    a, b = 150, 70  # semi-axes in pixels
    canvas = _ellipse_mask((512, 512), (250, 260), (a, b), angle=30)
    cv2.circle(canvas, (470, 40), 20, 255, -1)  # a smaller second region, ignored
    lesion, mask = find_lesion(canvas.astype(np.float32) / 255, (512, 512), input_size=512)
    assert cv2.countNonZero(mask) == lesion.area_px
    assert abs(lesion.area_px - math.pi * a * b) <= _half_a_pixel_along_the_outline(a, b)
    assert not mask[40, 470] and lesion.bbox == cv2.boundingRect(
        _ellipse_mask((512, 512), (250, 260), (a, b), angle=30)
    )
    assert lesion.area_mm2 is None and lesion.diameter_mm is None
    assert feret_diameter(mask) == pytest.approx(2 * a, abs=1.0)


@pytest.mark.parametrize(
    ("angle", "diameter_mm"),
    [(0, 2 * 150 * 0.1), (90, 2 * 150 * 0.25)],
    ids=["long-axis-along-columns", "long-axis-along-rows"],
)
def test_mm_use_the_row_and_column_spacing_each_on_its_own_axis(angle, diameter_mm):
    a, b = 150, 60
    canvas = _ellipse_mask((400, 400), (200, 200), (a, b), angle=angle)
    spacing = (0.25, 0.1)  # (row, column) mm, DICOM PixelSpacing order
    lesion, _ = find_lesion(
        canvas.astype(np.float32) / 255, (400, 400), input_size=400, pixel_spacing_mm=spacing
    )
    tolerance = _half_a_pixel_along_the_outline(a, b) * 0.25 * 0.1
    assert abs(lesion.area_mm2 - math.pi * a * b * 0.25 * 0.1) <= tolerance
    assert lesion.diameter_mm == pytest.approx(diameter_mm, abs=0.25)  # one pixel's size


def test_classifier_finds_the_dark_blob_in_the_frame_s_own_pixels(lesion_model):
    shape, centre, axes = (200, 330), (220, 90), (50, 30)
    with Classifier.from_path(lesion_model, provider=Provider.CPU) as clf:
        (result,) = clf.classify([_scan(shape, centre, axes)], masks=True)
        (plain,) = clf.classify([_scan(shape, centre, axes)])
    truth = _ellipse_mask(shape, centre, axes)
    assert result.lesion_mask.shape == shape and _iou(result.lesion_mask, truth) > 0.9
    assert np.abs(_edges(result.lesion.bbox) - _edges(cv2.boundingRect(truth))).max() <= 4
    assert result.lesion.area_px == cv2.countNonZero(result.lesion_mask)
    assert result.lesion.area_mm2 is None  # a plain array states no pixel spacing
    assert plain.lesion == result.lesion and plain.lesion_mask is None
    assert "lesion_mask" not in repr(result)


def test_a_scan_without_a_dark_blob_has_no_lesion(lesion_model):
    bright = np.full((150, 200), 200, np.uint8)
    with Classifier.from_path(lesion_model, provider=Provider.CPU) as clf:
        (result,) = clf.classify([bright], masks=True)
    assert result.ok and result.lesion is None and not result.lesion_mask.any()


def test_the_frame_s_pixel_spacing_gives_mm(lesion_model):
    """The decoder states the spacing on the item (another module fills it from DICOM)."""
    shape, centre, axes = (200, 330), (160, 100), (60, 40)
    with Classifier.from_path(lesion_model, provider=Provider.CPU) as clf:
        frame = _scan(shape, centre, axes)
        item = DecodedItem(
            "scan.dcm",
            None,
            square=fit_to_square(frame, SIZE),
            original=frame,
            pixel_spacing_mm=(0.2, 0.1),
        )
        (result,) = clf._run_batch([item], heatmaps=False, masks=False)
    assert result.pixel_spacing_mm == (0.2, 0.1)
    assert result.lesion.area_mm2 == pytest.approx(result.lesion.area_px * 0.02)
    # 60 columns * 0.1 mm = 6 mm across, 40 rows * 0.2 mm = 8 mm down: 16 mm; the map's cells
    # are about 6 frame pixels, so allow two rows' error at either end
    assert result.lesion.diameter_mm == pytest.approx(2 * 40 * 0.2, abs=0.8)


def _pair(folder: Path, margin: float) -> Path:
    """An "INT8" lesion model and its "FP32" partner, whose lesion output differs: it calls
    everything below gray 250 dark, so its lesion is the whole scan."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = _model(folder / "m-fp32.onnx", model_version="7")
    graph = onnx.load(fp32)
    for init in graph.graph.initializer:
        if init.name == "dark_at":
            init.CopyFrom(numpy_helper.from_array(np.array(250.0, np.float32), "dark_at"))
    onnx.save(graph, fp32)
    return _model(
        folder / "m-int8.onnx",
        model_version="7",
        precision=Precision.INT8,
        recheck_margin=margin,
        recheck_model="m-fp32.onnx",
    )


def test_the_fp32_recheck_replaces_the_lesion_rows_too(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, SIZE, SIZE, 1), dtype=np.uint8)
    images[::2] = np.clip(images[::2], 100, 255)  # half the scans with fewer dark pixels
    int8_path = _pair(tmp_path, margin=0.0)
    int8 = open_model(int8_path, provider=Provider.CPU).session
    fp32 = open_model(tmp_path / "m-fp32.onnx", provider=Provider.CPU).session
    (probabilities,) = int8.run(["probabilities"], {"image": images})
    lead = np.sort(probabilities, axis=1)
    lead = lead[:, -1] - lead[:, -2]
    margin = float(np.median(lead))
    int8_path = _pair(tmp_path / "pair", margin)
    with Classifier.from_path(int8_path, provider=Provider.CPU, batch_size=32) as clf:
        outputs = clf._run_rechecked(images, [(SIZE, SIZE)] * len(images))
    redo = lead < margin
    assert 0 < redo.sum() < len(redo)
    np.testing.assert_array_equal(outputs.rechecked, redo)
    (own,) = int8.run(["lesion"], {"image": images})
    (partner,) = fp32.run(["lesion"], {"image": images})
    assert not np.allclose(own[redo], partner[redo])  # so the test can tell them apart
    np.testing.assert_allclose(outputs.lesion[redo], partner[redo], rtol=1e-6)
    np.testing.assert_allclose(outputs.lesion[~redo], own[~redo], rtol=1e-6)


def test_a_rechecked_result_carries_the_fp32_lesion(tmp_path):
    int8_path = _pair(tmp_path, margin=1.0)  # every scan rechecked
    scan = _scan((200, 300), (150, 100), (40, 30))
    with Classifier.from_path(int8_path, provider=Provider.CPU) as clf:
        (rechecked,) = clf.classify([scan])
    with Classifier.from_path(int8_path, provider=Provider.CPU, recheck=False) as clf:
        (alone,) = clf.classify([scan])
    assert rechecked.rechecked and not alone.rechecked
    assert rechecked.lesion.area_px == 200 * 300  # the partner's: everything is lesion
    assert alone.lesion.area_px < 200 * 300 // 10


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.dtype == np.uint8 and mask.ndim == 2, path
    assert set(np.unique(mask)) <= {0, 255}
    return mask


def test_masks_for_png_and_jpeg_at_their_own_size_and_none_for_a_bad_file(tmp_path, lesion_model):
    shapes = {"a.png": (180, 320), "b.jpg": (330, 210)}
    truths = {}
    for name, shape in shapes.items():
        centre, axes = (shape[1] // 2, shape[0] // 3), (shape[1] // 6, shape[0] // 8)
        assert cv2.imwrite(str(tmp_path / name), _scan(shape, centre, axes))
        truths[name] = _ellipse_mask(shape, centre, axes)
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    masks = tmp_path / "masks"
    status, out, err = _run(
        tmp_path, "--model", lesion_model, "--format", "jsonl", "--masks", masks
    )
    assert status == 1, err  # one input failed
    records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert records["c.png"]["error"] and records["c.png"]["lesion_bbox"] is None
    assert sorted(p.name for p in masks.iterdir()) == ["a_mask.png", "b_mask.png"]
    for name, truth in truths.items():
        mask = _read_mask(masks / f"{Path(name).stem}_mask.png")
        assert mask.shape == truth.shape and _iou(mask, truth) > 0.85
        record = records[name]
        assert record["lesion_area_px"] == cv2.countNonZero(mask)
        assert record["lesion_bbox"] == list(cv2.boundingRect(mask))
        assert record["lesion_area_mm2"] is None and record["lesion_diameter_mm"] is None


def test_masks_for_a_multiframe_dicom_one_per_frame(tmp_path, lesion_model):
    pytest.importorskip("pydicom", minversion="3.0")
    from tests.test_dicom import make_dicom

    rows, columns, centre, axes = 120, 160, (60, 50), (30, 20)
    stack = np.stack(
        [_scan((rows, columns), centre, axes), np.full((rows, columns), 200, np.uint8)]
    )
    path = make_dicom(tmp_path / "cine.dcm", stack, rows=rows, columns=columns, frames=2)
    masks = tmp_path / "masks"
    status, out, err = _run(path, "--model", lesion_model, "--format", "jsonl", "--masks", masks)
    assert status == 0, err
    assert sorted(p.name for p in masks.iterdir()) == ["cine_f0_mask.png", "cine_f1_mask.png"]
    first, second = _read_mask(masks / "cine_f0_mask.png"), _read_mask(masks / "cine_f1_mask.png")
    assert _iou(first, _ellipse_mask((rows, columns), centre, axes)) > 0.85
    assert second.shape == (rows, columns) and not second.any()  # no lesion: all 0
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["lesion_area_px"] > 0 and records[1]["lesion_bbox"] is None


def test_heatmap_overlays_outline_the_lesion(tmp_path, lesion_model):
    shape, centre, axes = (200, 300), (150, 100), (50, 35)
    scan = tmp_path / "scan.png"
    cv2.imwrite(str(scan), _scan(shape, centre, axes))
    status, _, err = _run(scan, "--model", lesion_model, "--heatmaps", tmp_path / "heat")
    assert status == 0, err
    colour = cv2.imread(str(tmp_path / "heat" / "scan_overlay.png"))
    outline = np.all(colour == 255, axis=-1)
    truth = _ellipse_mask(shape, centre, axes)
    band = cv2.dilate(truth, np.ones((9, 9), np.uint8)) != cv2.erode(truth, np.ones((9, 9)))
    assert outline.sum() > 0.8 * cv2.arcLength(cv2.findContours(truth, 0, 1)[0][0], True)
    assert outline[band].sum() == outline.sum()  # all of it on the lesion's edge


def test_csv_and_table_carry_the_lesion(tmp_path, lesion_model):
    scan = tmp_path / "scan.png"
    cv2.imwrite(str(scan), _scan((200, 300), (150, 100), (50, 35)))
    status, out, _ = _run(scan, "--model", lesion_model, "--format", "csv")
    assert status == 0
    (record,) = csv.DictReader(io.StringIO(out))
    assert record["rechecked"] == "False"
    assert json.loads(record["lesion_bbox"])[2:] and int(record["lesion_area_px"]) > 0
    assert record["lesion_area_mm2"] == "" and record["lesion_diameter_mm"] == ""
    status, out, _ = _run(scan, "--model", lesion_model)
    heading, line = out.splitlines()
    assert heading.split()[2] == "lesion"
    w, h = json.loads(record["lesion_bbox"])[2:]
    assert f"{w}x{h} px" in line


def test_the_partner_must_have_the_same_lesion_output(tmp_path):
    spec = ModelSpec(class_names=CLASSES, input_size=SIZE, model_version="7")
    make_contract_model(tmp_path / "m-fp32.onnx", size=SIZE, spec=spec)
    int8 = _model(
        tmp_path / "m-int8.onnx",
        model_version="7",
        precision=Precision.INT8,
        recheck_margin=0.2,
        recheck_model="m-fp32.onnx",
    )
    with pytest.raises(ContractError, match="its lesion_stride is 0, the INT8 model's 4"):
        Classifier.from_path(int8, provider=Provider.CPU)


def test_a_lesion_of_one_pixel_is_found_not_a_crash():
    """OpenCV compares a 1 x 1 array with a scalar as two arrays of different sizes and raises;
    a lesion map hot on one pixel once stopped a whole training report that way."""
    from edge_runtime.postprocess.lesion import find_lesion

    lesion_map = np.zeros((3, 3), np.float32)
    lesion_map[1, 1] = 1.0
    lesion, mask = find_lesion(lesion_map, (3, 3), input_size=3, threshold=0.5)
    assert lesion.bbox == (1, 1, 1, 1) and lesion.area_px == 1
    assert mask[1, 1] == 255 and mask.sum() == 255
    single, _ = find_lesion(np.full((1, 1), 0.9, np.float32), (1, 1), input_size=1)
    assert single.area_px == 1


def test_a_lesion_smaller_than_the_minimum_area_is_no_lesion():
    lesion_map = np.zeros((56, 56), np.float32)
    lesion_map[10:14, 10:14] = 0.9  # 4 x 4 cells of 56 x 56: about 0.5% of the square
    share = find_lesion(lesion_map, (224, 224), input_size=224)[1].mean() / 255
    for min_area, found in ((0.5 * share, True), (2 * share, False)):
        lesion, mask = find_lesion(lesion_map, (300, 190), input_size=224, min_area=min_area)
        assert (lesion is not None) is found and bool(mask.any()) is found
    # the share is of the square, whatever the frame's own size
    lesion, _ = find_lesion(lesion_map, (900, 570), input_size=224, min_area=0.5 * share)
    assert lesion is not None


def test_the_minimum_area_in_the_metadata_drops_small_blobs(tmp_path):
    model = _model(tmp_path / "m.onnx", lesion_min_area=0.02)
    small, large = _scan((200, 330), (100, 90), (12, 8)), _scan((200, 330), (160, 100), (60, 40))
    with Classifier.from_path(model, provider=Provider.CPU) as clf:
        (a, b) = clf.classify([small, large], masks=True)
    assert a.lesion is None and not a.lesion_mask.any() and b.lesion is not None


def _bright_scans_with_a_blob() -> list[np.ndarray]:
    scans = []
    for k in range(6):
        scan = np.full((200, 260), 60 + 30 * k, np.uint8)
        cv2.circle(scan, (100, 100), 5 + 8 * k, 10, -1)
        scans.append(scan)
    return scans


def test_under_the_or_classifier_rule_a_scan_the_classifier_calls_normal_has_no_outline(tmp_path):
    """The test model (seed 2) finds the blob in every scan and calls the brighter ones normal
    by its classifier: the gated rule makes those normal without an outline, the others keep
    the classifier's call and the lesion."""
    scans = _bright_scans_with_a_blob()
    results = {}
    for rule in ("classifier", "lesion_head", "lesion_head_or_classifier"):
        spec = ModelSpec(
            class_names=CLASSES, input_size=SIZE, lesion_stride=4, normal_rule=NormalRule(rule)
        )
        path = make_contract_model(
            tmp_path / f"{rule}.onnx", size=SIZE, spec=spec, lesion_stride=4, seed=2
        )
        with Classifier.from_path(path, provider=Provider.CPU) as clf:
            results[rule] = clf.classify(scans, masks=True)
    plain, head, gated = results.values()
    assert all(r.lesion is not None for r in head) and "normal" not in [r.label for r in head]
    called_normal = [r.label == "normal" for r in plain]
    assert any(called_normal) and not all(called_normal)
    # under any rule, a scan called normal gets no outline (the classifier rule too)
    assert all(r.lesion is None and not r.lesion_mask.any() for r in plain if r.label == "normal")
    for alone, found, both in zip(plain, head, gated, strict=True):
        if alone.label == "normal":
            assert both.label == "normal" and both.lesion is None and not both.lesion_mask.any()
        else:
            assert both.label == found.label and both.lesion == found.lesion
