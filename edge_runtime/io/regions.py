"""Where the tissue is in an ultrasound DICOM frame, and how large its pixels are.

Ultrasound screens carry text, rulers, body markers and colour bars around the image. A file with
a Sequence of Ultrasound Regions (0018,6011) says where each region lies and what it shows; the
runtime classifies the tissue regions (Region Spatial Format 1, a 2-D image, of Region Data Type 1,
tissue, where the type is given) and takes each one's pixel size from Physical Delta X/Y, which
are in centimetres when Physical Units X/Y Direction is 3. A dual view (two B-mode images side by
side) has two tissue regions: each is classified, one record per region with its ``region``
index (0, 1, ... in the order the file lists them). A 2-D region inside another one (a colour box
over the B-mode image, say) is part of it, not a region of its own. A region whose Max X1 or Max
Y1 is the frame's Columns or Rows (one past the last pixel, as some writers put it) is clamped to
the last pixel, with a warning; one that lies further outside is ignored, with a warning.
Without regions, Pixel Spacing (0028,0030) gives the spacing, or in an enhanced multi-frame
file (Enhanced US Volume) its Pixel Measures functional group, and the whole frame is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SPATIAL_FORMAT_2D = 1
DATA_TYPE_TISSUE = 1
UNITS_CM = 3


@dataclass(frozen=True)
class Region:
    """A crop of the frame, in pixels, inclusive bounds as DICOM states them.

    Attributes:
        x0, y0, x1, y1: Region Location Min X0 / Min Y0 / Max X1 / Max Y1.
        pixel_spacing_mm: (row, column) spacing in mm, or None when the region's units are not
            centimetres (a Doppler or M-mode axis in seconds, for instance).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    pixel_spacing_mm: tuple[float, float] | None

    @property
    def area(self) -> int:
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)


def tissue_regions(ds: Any, rows: int, columns: int, *, source: str = "<dataset>") -> list[Region]:
    """The tissue regions of the Sequence of Ultrasound Regions that lie inside the frame, in
    the file's order, leaving out those inside another.

    A Max X1 (Max Y1) equal to ``columns`` (``rows``), one past the last pixel, is clamped to the
    last pixel; a region further outside the frame is left out. Both are logged as warnings
    that start with ``source``.

    Args:
        ds: a pydicom dataset (header only is enough).
        rows, columns: the frame's size, to drop regions that do not fit it.
        source: the file's name, for the warnings.

    Returns:
        The regions; empty when the file has no usable 2-D tissue region.
    """
    regions = []
    for number, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        try:
            if int(item.get("RegionSpatialFormat") or 0) != SPATIAL_FORMAT_2D:
                continue
            if int(item.get("RegionDataType") or DATA_TYPE_TISSUE) != DATA_TYPE_TISSUE:
                continue
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        clamped = []
        if x1 == columns:
            clamped.append(f"Max X1 {x1} to {columns - 1}")
            x1 = columns - 1
        if y1 == rows:
            clamped.append(f"Max Y1 {y1} to {rows - 1}")
            y1 = rows - 1
        if not (0 <= x0 < x1 < columns and 0 <= y0 < y1 < rows):
            log.warning(
                "%s: ultrasound region %d, (%d, %d)-(%d, %d), does not fit in the %d x %d "
                "frame: ignored (its pixel spacing too)",
                source,
                number,
                x0,
                y0,
                x1,
                y1,
                columns,
                rows,
            )
            continue
        if clamped:
            log.warning(
                "%s: ultrasound region %d ends one past the last pixel of the %d x %d frame "
                "(Region Location %s): clamped to it",
                source,
                number,
                columns,
                rows,
                " and ".join(clamped),
            )
        regions.append(Region(x0, y0, x1, y1, _region_spacing(item)))
    return [r for i, r in enumerate(regions) if not _inside_another(r, i, regions)]


def _inside_another(region: Region, index: int, regions: list[Region]) -> bool:
    """Whether ``region`` lies within another of ``regions`` (the first of equal ones stays)."""
    for other_index, other in enumerate(regions):
        if other_index == index:
            continue
        within = (
            other.x0 <= region.x0
            and other.y0 <= region.y0
            and region.x1 <= other.x1
            and region.y1 <= other.y1
        )
        same = (region.x0, region.y0, region.x1, region.y1) == (
            other.x0,
            other.y0,
            other.x1,
            other.y1,
        )
        if within and (not same or other_index < index):
            return True
    return False


def pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """Pixel Spacing (0028,0030) as (row, column) mm, or None when absent or not positive.

    An enhanced multi-frame file (Enhanced US Volume, say) states it in the Pixel Measures
    Sequence of its functional groups: the shared group's is taken, else the per-frame groups'
    when every frame states the same (frames of different spacings: None).
    """
    spacing = _spacing(ds.get("PixelSpacing"))
    if spacing is not None:
        return spacing
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    spacing = _group_spacing(shared[0]) if len(shared) else None
    if spacing is not None:
        return spacing
    per_frame = {
        _group_spacing(group) for group in ds.get("PerFrameFunctionalGroupsSequence") or []
    }
    return per_frame.pop() if len(per_frame) == 1 else None


def _group_spacing(group: Any) -> tuple[float, float] | None:
    """Pixel Spacing of a functional group's Pixel Measures Sequence, or None."""
    try:
        measures = group.get("PixelMeasuresSequence") or []
        return _spacing(measures[0].get("PixelSpacing")) if len(measures) else None
    except (AttributeError, TypeError):
        return None


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def _region_spacing(item: Any) -> tuple[float, float] | None:
    try:
        units = int(item.PhysicalUnitsXDirection), int(item.PhysicalUnitsYDirection)
        delta_x, delta_y = abs(float(item.PhysicalDeltaX)), abs(float(item.PhysicalDeltaY))
    except (AttributeError, TypeError, ValueError):
        return None
    if units != (UNITS_CM, UNITS_CM) or delta_x <= 0 or delta_y <= 0:
        return None
    return delta_y * 10.0, delta_x * 10.0
