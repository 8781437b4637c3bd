"""``edge-classify serve`` and a dual view: an image whose Sequence of Ultrasound Regions has two
tissue regions, each classified on its own (records ``region`` 0 and 1).

A device integrator's trial: a dual view of a normal and a malignant scan got an SR saying
Normal, abstained, P(malignant) 0.002 (the first region's answer) and no SEG, though the JSON
lines had region 1 malignant with a 12.6 mm lesion: a silent wrong answer at the PACS. The SR
now reports the most severe region, as a cine's SR reports its most severe frame, names it, and
the SEG outlines that region's lesion. Real peers on loopback, as in ``test_node``: dcmtk's
``storescu`` as the scanner and ``storescp`` as the PACS.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason="the node extra is missing: pip install -e '.[dev]'")
pytest.importorskip("highdicom", reason="the node extra is missing: pip install -e '.[dev]'")

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge_runtime.classifier import Classification, Failure, Timing
from tests.test_node import (
    SEG_CLASS,
    SR_CLASS,
    classifier,  # noqa: F401  (a fixture)
    free_port,
    records,
    running_node,
    storescp,
    storescu,
    us_dataset,
    wait_for,
    write_scans,
)
from training.synthetic import synthetic_scan

BUSI_NORMAL = "normal/normal (10).png"  # the integrator's files
BUSI_MALIGNANT = "malignant/malignant (2).png"


def dual_view(left: np.ndarray, right: np.ndarray, seed: int) -> Dataset:
    """A US Image of two tissue regions side by side, left and right (each ``rows x columns``),
    0.1 mm pixels in each region's physical deltas (0.01 cm), as the integrator built them."""
    rows, columns = left.shape
    ds = us_dataset("normal", seed, size=(rows, 2 * columns), spacing_mm=None)
    ds.PixelData = np.hstack([left, right]).astype(np.uint8).tobytes()
    regions = []
    for index in range(2):
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = index * columns, 0
        region.RegionLocationMaxX1 = (index + 1) * columns - 1
        region.RegionLocationMaxY1 = rows - 1
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
        region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
        region.ReferencePixelX0 = region.ReferencePixelY0 = 0
        regions.append(region)
    ds.SequenceOfUltrasoundRegions = regions
    return ds


def severity(record: dict) -> tuple[int, int, float]:
    """How a region's record ranks for the SR: not abstained first, then malignant > benign >
    normal, then P(malignant) (a cine's frames rank so)."""
    rank = {"malignant": 2, "benign": 1, "normal": 0}[record["label"]]
    return (not record["abstained"], rank, record["probabilities"]["malignant"])


def sr_finding(path: Path) -> tuple[dict, dict, dict, object]:
    """The SR's qualitative evaluations, measurements and texts (meaning -> value), and its
    measurement group."""
    sr = hd.sr.srread(path)
    groups = sr.content.get_planar_roi_measurement_groups() or (
        sr.content.get_image_measurement_groups()
    )
    (group,) = groups
    evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
    measures = {m.name.meaning: m.value for m in group.get_measurements()}
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    return evaluations, measures, texts, group


LABEL_MEANINGS = {
    "malignant": "Malignant neoplastic disease",
    "benign": "Neoplasm, benign",
    "normal": "Normal",
}


def check_answers(output: Path, source: Dataset, reported_region: int, columns: int) -> dict:
    """The SR and SEG of a two-region ``source`` report ``reported_region`` (0-based), of
    ``columns`` columns each: asserted. Returns that region's record."""
    mine = [r for r in records(output) if r["sop_instance_uid"] == source.SOPInstanceUID]
    assert sorted(r["region"] for r in mine) == [0, 1]  # the JSON lines: one per region
    (reported,) = [r for r in mine if r["region"] == reported_region]
    (other,) = [r for r in mine if r["region"] != reported_region]
    assert severity(reported) > severity(other)  # the most severe region, by the cine's rule
    assert reported["label"] != other["label"]  # else the test could not tell the regions apart
    assert len({r["sr_sop_instance_uid"] for r in mine}) == 1  # one SR answers the instance

    evaluations, measures, texts, group = sr_finding(
        output / f"SR_{reported['sr_sop_instance_uid']}.dcm"
    )
    assert evaluations["edge-classify label"] == LABEL_MEANINGS[reported["label"]]
    assert evaluations["Abstained"] == ("Yes" if reported["abstained"] else "No")
    for name, p in reported["probabilities"].items():
        assert measures[f"Probability of {name}"] == pytest.approx(p, abs=1e-6)
    if reported["lesion_diameter_mm"] is not None:
        assert measures["Diameter"] == pytest.approx(reported["lesion_diameter_mm"], abs=1e-3)
        assert measures["Area"] == pytest.approx(reported["lesion_area_mm2"], abs=1e-3)
    x0 = reported_region * columns
    assert texts["Ultrasound region reported"] == (
        f"{reported_region + 1} of 2 tissue regions (columns {x0}-{x0 + columns - 1}, "
        f"rows 0-{source.Rows - 1})"
    )

    seg_uid = reported["seg_sop_instance_uid"]
    assert seg_uid is not None and reported["lesion_bbox"] is not None
    assert group.referenced_segmentation_frame.referenced_sop_instance_uid == seg_uid
    seg = hd.seg.segread(output / f"SEG_{seg_uid}.dcm")
    assert seg.get_source_image_uids()[0][2] == source.SOPInstanceUID
    mask = seg.pixel_array.reshape(source.Rows, source.Columns) > 0
    assert int(np.count_nonzero(mask)) == reported["lesion_area_px"]
    assert not mask[:, :x0].any() and not mask[:, x0 + columns :].any()  # inside its region
    return reported


def test_a_dual_view_sr_reports_its_most_severe_region_names_it_and_its_seg_outlines_it(
    classifier,  # noqa: F811
    tmp_path,
):
    """A normal and a malignant scan side by side, in both orders: each instance's SR reports
    the malignant region (not the first), names it, and has a SEG of that region's lesion,
    forwarded to the PACS with the SR. Before, the normal-first instance got a Normal SR and no
    SEG."""
    rows, columns = 150, 200
    rng = np.random.default_rng(7)
    normal = synthetic_scan("normal", rng, (rows, columns))
    malignant = synthetic_scan("malignant", rng, (rows, columns))
    datasets = [dual_view(normal, malignant, 71), dual_view(malignant, normal, 72)]
    paths = write_scans(tmp_path / "in", datasets)
    output, pacs = tmp_path / "out", tmp_path / "pacs"
    pacs_port = free_port()
    options = {"forward": f"PACS@127.0.0.1:{pacs_port}", "retry_min_s": 0.2, "retry_max_s": 1.0}
    with storescp(pacs, pacs_port), running_node(classifier, output, **options) as node:
        sent = storescu(node.scp.port, paths)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(records(output)) == 4, 60, "both instances answered")
        wait_for(lambda: node.worker.stats.answered == 2, 30, "both released to the queue")
        outbox = output / ".spool" / "outbox"
        wait_for(lambda: not list(outbox.glob("*.dcm")), 30, "the answers forwarded")
    malignant_second = check_answers(output, datasets[0], 1, columns)
    malignant_first = check_answers(output, datasets[1], 0, columns)
    assert malignant_first["label"] == malignant_second["label"] == "malignant"
    received = {}
    for path in pacs.iterdir():
        ds = dcmread(path)
        received[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    for record in (malignant_first, malignant_second):
        assert received[record["sr_sop_instance_uid"]] == SR_CLASS
        assert received[record["seg_sop_instance_uid"]] == SEG_CLASS


def test_the_integrators_busi_dual_view_gets_the_malignant_regions_sr_and_seg(
    classifier,  # noqa: F811
    busi_root,
    tmp_path,
):
    """The trial's files, rebuilt: BUSI ``normal (10)`` left and ``malignant (2)`` right, each
    400 x 300. The SR reported region 0 (Normal, abstained, P(malignant) 0.0019) and no SEG was
    written; now it reports region 1 (malignant, its P(malignant) and lesion size) with a SEG."""
    halves = []
    for name in (BUSI_NORMAL, BUSI_MALIGNANT):
        image = cv2.imread(str(busi_root / name), cv2.IMREAD_GRAYSCALE)
        assert image is not None, busi_root / name
        halves.append(cv2.resize(image, (400, 300)))
    datasets = [dual_view(*halves, 81), dual_view(*reversed(halves), 82)]
    paths = write_scans(tmp_path / "in", datasets)
    output = tmp_path / "out"
    with running_node(classifier, output) as node:
        sent = storescu(node.scp.port, paths)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(records(output)) == 4, 60, "both instances answered")
    normal_first = check_answers(output, datasets[0], 1, 400)
    malignant_first = check_answers(output, datasets[1], 0, 400)
    for record in (normal_first, malignant_first):
        assert record["label"] == "malignant" and not record["abstained"]
        assert record["lesion_diameter_mm"] is not None


# ---------------------------------------------------------------- which region the SR reports


def _region(region: int, label: str, malignant: float, *, abstained: bool = False):
    rest = (1.0 - malignant) / 2
    probabilities = {"normal": rest, "benign": rest, "malignant": malignant}
    return Classification(
        source="dual.dcm",
        label=label,
        probabilities=probabilities,
        confidence=probabilities[label],
        abstained=abstained,
        timing=Timing(),
        region=region,
    )


@pytest.mark.parametrize(
    ("regions", "reported"),
    [
        # the trial: an abstained normal region never hides the other's finding
        ([("normal", 0.002, True), ("malignant", 0.44, False)], 1),
        ([("malignant", 0.44, False), ("normal", 0.002, True)], 0),
        ([("benign", 0.2, False), ("malignant", 0.3, False)], 1),  # malignant over benign
        ([("benign", 0.3, False), ("normal", 0.1, False)], 0),  # benign over normal
        ([("normal", 0.2, True), ("benign", 0.1, True)], 1),  # all abstained: most severe
        # a normal region never reassures beside an unsure one, which may hold the lesion
        ([("normal", 0.01, False), ("benign", 0.2, True)], 1),
        ([("normal", 0.3, True), ("normal", 0.01, False)], 0),
        ([("benign", 0.2, False), ("malignant", 0.6, True)], 1),  # nor benign beside malignant
        ([("benign", 0.2, False), ("benign", 0.1, True)], 0),  # a milder unsure one: no doubt
        ([None, ("benign", 0.1, False)], 1),  # a failed region hides nothing
    ],
)
def test_the_region_the_sr_reports_is_chosen_as_a_cines_frame_is(regions, reported):
    from edge_runtime.app.node.worker import _Job

    results = [
        Failure(source="dual.dcm", error="cannot decode", region=index)
        if spec is None
        else _region(index, spec[0], spec[1], abstained=spec[2])
        for index, spec in enumerate(regions)
    ]
    job = _Job(item=None, results=results, summary=None, files=None)  # type: ignore[arg-type]
    assert job.answer is results[reported]
    alone = _Job(item=None, results=results[:1], summary=None, files=None)  # type: ignore[arg-type]
    assert alone.answer is results[0]  # one result: the image's own
