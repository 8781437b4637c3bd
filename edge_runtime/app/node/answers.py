"""Answers in DICOM: a Comprehensive SR (TID 1500) per instance, and a binary SEG of the lesion.

The SR holds one measurement group: the label, abstained and unfamiliar as qualitative
evaluations (coded values), each class's calibrated probability as a numeric measurement (unit
``1``: a qualitative evaluation holds a code, never a number), the lesion's area in mm² and its
largest diameter in mm where the image states its spacing, the model's name, version and SHA-256
as the algorithm identification, and the comment "not a diagnosis". It references the source
instance (its frame, for a cine) and, on a single-frame image with a lesion, the SEG's segment.

One SR answers one instance, so where the runtime gives several results for it (a cine's frames,
a dual view's tissue regions) the node passes the one that decides the instance (the worker
chooses it as :func:`~edge_runtime.postprocess.summary.summarize` does: the most severe call
that did not abstain). On an image with several tissue regions the SR names that result's
region in a text item, "Ultrasound region reported" (its number among the tissue regions of the
Sequence of Ultrasound Regions, and its bounds in pixels), beside the frame it names for a cine.

The SEG (highdicom, binary, one segment) outlines the lesion of the result the SR reports, at
the source's Rows x Columns (a tissue region's mask placed where the region lies), on
single-frame images only: highdicom refuses a multi-frame ultrasound SEG, so a cine gets an SR
naming its most suspicious frame and no SEG. One segment, because the SR has one finding that
references it: the SEG is the outline of what the SR reports (another region's lesion is in the
JSON lines, with its size). ``ReferencedSegmentationFrame`` is built directly (its
``from_segmentation`` has been seen to fail on a one-segment 2-D SEG).

Both answers get UIDs derived from the source's SOP Instance UID and the model's SHA-256, so
processing an instance again (after a crash) gives the very same instances, which a PACS stores
once.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from edge_runtime.classifier import Classification
from edge_runtime.io.regions import tissue_regions

log = logging.getLogger(__name__)

NOT_A_DIAGNOSIS = (
    "Research software output, not a diagnosis: every result needs review by a qualified "
    "clinician. edge-classify is not a medical device."
)
SCHEME = "99EDGECLS"  # private coding scheme for what no public code names
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9901, 9902
_LABEL_CODES = {  # SNOMED CT where a finding has a code; our scheme otherwise
    "normal": ("17621005", "SCT", "Normal"),
    "benign": ("3898006", "SCT", "Neoplasm, benign"),
    "malignant": ("363346000", "SCT", "Malignant neoplastic disease"),
}


@dataclass(frozen=True)
class ModelIdentity:
    """The model named in every answer.

    Attributes:
        name: the model file's name, e.g. ``default-int8.onnx``.
        version: the model's version from its metadata.
        sha256: hex SHA-256 of the model (its file's; with external-data files, one over
            every file's: :func:`~edge_runtime.model.card.model_sha256`).
    """

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Answers:
    """The DICOM answers to one source instance.

    Attributes:
        sr: the Comprehensive SR (a pydicom ``Dataset`` with file meta).
        seg: the binary Segmentation, or None (no lesion, or a multi-frame source).
    """

    sr: Any
    seg: Any | None


@dataclass(frozen=True)
class EncodedAnswers:
    """An instance's answer files and the UIDs of its header that its JSON records carry.

    Attributes:
        files: the answers, SEG first.
        header: ``sop_instance_uid``, ``sop_class_uid``, ``study_instance_uid`` and
            ``series_instance_uid`` of the source ("" where it has none).
    """

    files: tuple[AnswerFile, ...]
    header: dict[str, str]


def header_uids(source: Any, sop_instance_uid: str = "") -> dict[str, str]:
    """The source's UIDs that the node's JSON records carry (``sop_instance_uid``: the one to
    give where the source has none)."""
    return {
        "sop_instance_uid": str(source.get("SOPInstanceUID", "") or sop_instance_uid),
        "sop_class_uid": str(source.get("SOPClassUID", "")),
        "study_instance_uid": str(source.get("StudyInstanceUID", "")),
        "series_instance_uid": str(source.get("SeriesInstanceUID", "")),
    }


@dataclass(frozen=True)
class AnswerFile:
    """One answer encoded as a Part 10 file, ready to write.

    Attributes:
        prefix: ``SR`` or ``SEG`` (its file is ``<prefix>_<uid>.dcm``).
        sop_instance_uid: the answer's SOP Instance UID.
        data: the file's bytes.
    """

    prefix: str
    sop_instance_uid: str
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.sop_instance_uid}.dcm"


def answer_uids(source_uid: str, study_uid: str, model: ModelIdentity) -> tuple[str, str, str, str]:
    """Deterministic (SR instance, SR series, SEG instance, SEG series) UIDs for one source: one
    SR series and one SEG series per study and model."""

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=[source_uid, model.sha256, kind]))

    series = [
        str(generate_uid(entropy_srcs=[model.sha256, study_uid, kind])) for kind in ("srs", "segs")
    ]
    return uid("sr"), series[0], uid("seg"), series[1]


@dataclass(frozen=True)
class AnswerInputs:
    """What one instance's answers are built from, beside its header and the model.

    The fields that shape the answers (:meth:`layout`) and the values that only fill them in
    (probabilities, area, diameter, frame number, mask).

    Attributes:
        label, abstained, unfamiliar: the call and its flags.
        probabilities: (class name, calibrated probability), in the model's order.
        lesion: the model found a lesion.
        area_mm2, diameter_mm: the lesion's size where the image states its spacing, else None.
        frame_number: the 1-based frame the SR names (a cine's most suspicious), else None.
        mask: the lesion at the source's Rows x Columns (bool), None when no SEG is written (no
            lesion, an empty mask, or a multi-frame source).
        region: the tissue region the SR names (:func:`region_name`), for a source with several;
            else None.
    """

    label: str
    abstained: bool
    unfamiliar: bool
    probabilities: tuple[tuple[str, float], ...]
    lesion: bool
    area_mm2: float | None
    diameter_mm: float | None
    frame_number: int | None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    region: str | None = None

    def layout(self) -> tuple[Any, ...]:
        """What decides the answers' structure (their elements, sequences and codes)."""
        return (
            self.label,
            self.abstained,
            self.unfamiliar,
            tuple(name for name, _ in self.probabilities),
            self.lesion,
            self.area_mm2 is None,
            self.diameter_mm is None,
            self.frame_number is None,
            self.mask is None,
            self.region,  # a text of the SR: a template holds one region's
        )


def answer_inputs(source: Any, answer: Classification, frames: int = 1) -> AnswerInputs:
    """The inputs of :func:`build_answers` for ``answer`` to ``source``."""
    mask = _full_mask(source, answer) if frames == 1 else None
    lesion = answer.lesion
    return AnswerInputs(
        label=answer.label,
        abstained=bool(answer.abstained),
        unfamiliar=bool(answer.unfamiliar),
        probabilities=tuple((name, float(p)) for name, p in answer.probabilities.items()),
        lesion=lesion is not None,
        area_mm2=None if lesion is None or lesion.area_mm2 is None else float(lesion.area_mm2),
        diameter_mm=(
            None if lesion is None or lesion.diameter_mm is None else float(lesion.diameter_mm)
        ),
        frame_number=None if frames == 1 or answer.frame is None else answer.frame + 1,
        mask=mask if mask is not None and mask.any() else None,
        region=region_name(source, answer),
    )


def region_name(source: Any, answer: Classification) -> str | None:
    """The tissue region ``answer`` is of, as the SR names it, e.g. ``"2 of 2 tissue regions
    (columns 400-799, rows 0-299)"``; None where the source has one region (``answer.region``
    is None)."""
    if answer.region is None:
        return None
    number = answer.region + 1
    rows, columns = int(source.Rows), int(source.Columns)
    regions = tissue_regions(source, rows, columns, source=str(source.SOPInstanceUID))
    if not 0 <= answer.region < len(regions):
        return f"tissue region {number}"
    region = regions[answer.region]
    return (
        f"{number} of {len(regions)} tissue regions (columns {region.x0}-{region.x1}, "
        f"rows {region.y0}-{region.y1})"
    )


def build_answers(
    source: Any,
    answer: Classification,
    model: ModelIdentity,
    *,
    frames: int = 1,
) -> Answers:
    """The SR (and, for a single-frame image with a lesion, the SEG) answering ``source``, built
    by highdicom (the node encodes later instances of a layout from a template of these:
    :mod:`.templates`).

    Args:
        source: the received pydicom dataset (pixel data may stay unread).
        answer: the instance's classification: its only result, or for a cine its most
            suspicious frame's (``answer.frame`` is then 0-based), or for a dual view its most
            severe tissue region's (``answer.region``, 0-based, named in the SR).
        model: the model named in the answers.
        frames: how many frames the source has (1: a single image).

    Returns:
        The answers.

    Raises:
        ValueError: the source lacks an attribute that highdicom needs (named in the message).
    """
    fill_type2(source)
    return build_from_inputs(source, answer_inputs(source, answer, frames), model)


def build_from_inputs(source: Any, inputs: AnswerInputs, model: ModelIdentity) -> Answers:
    """:func:`build_answers` from its inputs (``source`` with its Type 2 attributes filled)."""
    import highdicom as hd

    sr_uid, sr_series, seg_uid, seg_series = answer_uids(
        str(source.SOPInstanceUID), str(source.get("StudyInstanceUID", "")), model
    )
    seg = None
    if inputs.mask is not None:
        seg = _segmentation(source, inputs.mask, model, seg_uid, seg_series)
    group = _measurement_group(source, inputs, model, seg)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(generate_uid(entropy_srcs=[model.sha256, "device"])),
            name="edge-classify",
            manufacturer_name="edge-classify",
            model_name=model.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("P5-B8500", "SRT", "Ultrasound of breast"),
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    evidence = [source] + ([seg] if seg is not None else [])
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid,
        instance_number=1,
        manufacturer="edge-classify",
        is_complete=True,
        series_description="edge-classify: not a diagnosis",
    )
    return Answers(sr=sr, seg=seg)


def tracking_uid(source_uid: str) -> str:
    """The Tracking Unique Identifier of the SR's finding (derived from the source's UID)."""
    return str(generate_uid(entropy_srcs=[source_uid, "tracking"]))


# Patient and General Study attributes of Type 2 (present, possibly empty) that highdicom copies
# from the source into the SR and SEG; scanners often leave them out. PS3.3 C.7.1.1, C.7.2.1.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def fill_type2(source: Any) -> None:
    """Add the :data:`TYPE2_COPIED` attributes ``source`` leaves out, empty, as DICOM allows
    (in memory: the stored instance is unchanged)."""
    for keyword in TYPE2_COPIED:
        if keyword not in source:
            setattr(source, keyword, "")


def _code(value: str, scheme: str, meaning: str) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value, scheme, meaning)


def _label_code(label: str) -> Any:
    value, scheme, meaning = _LABEL_CODES.get(label, (label, SCHEME, label))
    return _code(value, scheme, meaning)


def _yes_no(flag: bool) -> Any:

    return codes.SCT.Yes if flag else codes.SCT.No


def _measurement_group(
    source: Any, inputs: AnswerInputs, model: ModelIdentity, seg: Any | None
) -> Any:
    """TID 1501 (or 1410 with the SEG): label, flags, probabilities, lesion size, comment."""
    import highdicom as hd

    algorithm = hd.sr.AlgorithmIdentification(
        name=f"edge-classify {model.name}", version=model.version, parameters=[model.sha256]
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            _code("label", SCHEME, "edge-classify label"), _label_code(inputs.label)
        ),
        hd.sr.QualitativeEvaluation(
            _code("abstained", SCHEME, "Abstained"), _yes_no(inputs.abstained)
        ),
        hd.sr.QualitativeEvaluation(
            _code("unfamiliar", SCHEME, "Unfamiliar scan"), _yes_no(inputs.unfamiliar)
        ),
    ]
    unit_one = _code("1", "UCUM", "no units")
    measurements = [
        hd.sr.Measurement(
            name=_code(f"p-{name}", SCHEME, f"Probability of {name}"),
            value=float(p),
            unit=unit_one,
            algorithm_id=algorithm,
        )
        for name, p in inputs.probabilities
    ]
    if inputs.area_mm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=inputs.area_mm2,
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=algorithm,
            )
        )
    if inputs.diameter_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Diameter,
                value=inputs.diameter_mm,
                unit=codes.UCUM.Millimeter,
                algorithm_id=algorithm,
            )
        )
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(str(source.SOPInstanceUID)),
        identifier="edge-classify finding",
    )
    if seg is not None:
        reference = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            frame_number=1,
            segment_number=1,
            source_image=hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            ),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=reference,
            finding_type=codes.SCT.Lesion,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    else:
        frame_numbers = None if inputs.frame_number is None else [inputs.frame_number]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=codes.SCT.Lesion if inputs.lesion else codes.SCT.Finding,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=source.SOPClassUID,
                    referenced_sop_instance_uid=source.SOPInstanceUID,
                    referenced_frame_numbers=frame_numbers,
                )
            ],
        )
    if inputs.region is not None:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=_code("region", SCHEME, "Ultrasound region reported"),
                value=inputs.region,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=NOT_A_DIAGNOSIS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _full_mask(source: Any, answer: Classification) -> np.ndarray | None:
    """The lesion mask at the source's Rows x Columns (the runtime classifies the tissue region
    of the Sequence of Ultrasound Regions: the mask is placed back where that region lies)."""
    mask = answer.lesion_mask
    if mask is None:
        return None
    rows, columns = int(source.Rows), int(source.Columns)
    if mask.shape == (rows, columns):
        return mask > 0
    regions = tissue_regions(source, rows, columns)
    region = regions[answer.region or 0] if regions else None
    if region is None or mask.shape != (region.y1 - region.y0 + 1, region.x1 - region.x0 + 1):
        log.warning(
            "%s: the lesion mask (%s) fits neither the image (%d x %d) nor a tissue region: "
            "no SEG written",
            source.SOPInstanceUID,
            mask.shape,
            rows,
            columns,
        )
        return None
    full = np.zeros((rows, columns), dtype=bool)
    full[region.y0 : region.y1 + 1, region.x0 : region.x1 + 1] = mask > 0
    return full


def _segmentation(
    source: Any, mask: np.ndarray, model: ModelIdentity, uid: str, series_uid: str
) -> Any:
    """A binary SEG with one segment, the lesion, on the single-frame ``source``."""
    import highdicom as hd

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion (edge-classify, not a diagnosis)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=f"edge-classify {model.name}",
            version=model.version,
            family=codes.cid7162.ArtificialIntelligence,
            parameters={"sha256": model.sha256},
        ),
    )
    header = source
    spacing_alone = "PixelSpacing" in source and "SliceThickness" not in source
    if spacing_alone or "Modality" not in source:
        header = copy.copy(source)  # shares the elements dict: give it its own
        header._dict = source._dict.copy()
    if spacing_alone:
        # highdicom writes Pixel Measures without Slice Thickness from such an image and then
        # refuses to read its own SEG back: the SEG leaves the spacing out (the SR has the mm)
        del header.PixelSpacing
    if "Modality" not in source:
        # Type 1, but missing from some converted files (img2dcm's Secondary Capture);
        # highdicom names the SEG's series after it. "OT" (other) is what such a file is.
        header.Modality = "OT"
    return hd.seg.Segmentation(
        source_images=[header],
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer="edge-classify",
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.sha256[:16],
        series_description="edge-classify lesion: not a diagnosis",
    )
