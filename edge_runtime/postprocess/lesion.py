"""The model's ``lesion`` output -> the lesion in the original frame: mask, box, area, diameter.

The ``lesion`` output (contract v2) is a probability per pixel of the model's square input, at a
stride. :func:`find_lesion` maps it back onto the frame exactly as :func:`fit_to_square` fitted
the frame into the square (letterbox or stretch), in one affine warp with bilinear interpolation,
thresholds it at the model's decision threshold, keeps the largest 8-connected component and
measures it. Everything is OpenCV on whole arrays; the cost is a few passes over the frame.
Where the classified image is a crop of a larger frame (a DICOM tissue region), :func:`in_frame`
moves the lesion into that frame's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from edge_runtime.io.preprocess import letterbox_box
from edge_runtime.model.contract import ModelSpec, ResizePolicy


@dataclass(frozen=True)
class Lesion:
    """The largest lesion a model found in one frame.

    Attributes:
        bbox: ``(x, y, width, height)`` of its bounding box in the original frame's pixels.
        area_px: its area in the original frame's pixels.
        area_mm2: its area in mm^2, where the frame's pixel spacing is known, else None.
        diameter_mm: its largest diameter in mm (maximum Feret diameter: the longest distance
            between two of its pixel centres), where the pixel spacing is known, else None.
    """

    bbox: tuple[int, int, int, int]
    area_px: int
    area_mm2: float | None
    diameter_mm: float | None


def require_lesion_output(spec: ModelSpec, source: str, fix: str) -> None:
    """Refuse to draw lesions with a model that has no ``lesion`` output.

    Args:
        spec: the model's contract.
        source: the model file, for the message.
        fix: how to do without, e.g. ``"leave out --masks"``.

    Raises:
        ValueError: the model has no lesion output.
    """
    if not spec.has_lesion:
        raise ValueError(
            f"{source}: this model has no lesion output, so it cannot outline lesions (only "
            "models whose contract has the optional 'lesion' output can). Use a model exported "
            f"with a lesion output, or {fix}."
        )


def lesion_probability(
    lesion_map: np.ndarray,
    original_shape: tuple[int, int],
    input_size: int,
    policy: ResizePolicy = ResizePolicy.LETTERBOX,
) -> np.ndarray:
    """The lesion probability at every pixel of the original frame.

    Each frame pixel centre is mapped to where :func:`~edge_runtime.io.preprocess.fit_to_square`
    put it in the square input, then into the ``[h, w]`` map (whose pixels cover
    ``input_size / h`` x ``input_size / w`` input pixels each) and read there by bilinear
    interpolation; the letterbox's padding is read only where a map pixel straddles the frame's
    edge.

    Args:
        lesion_map: float ``[h, w]``, the model's ``lesion`` output for one image.
        original_shape: ``(H, W)`` of the frame as handed to ``fit_to_square``.
        input_size: side of the model's square input.
        policy: how the frame was fitted into the square.

    Returns:
        float32 ``[H, W]``.
    """
    grid = _Grid.of(original_shape, lesion_map.shape, input_size, policy)
    return grid.warp(lesion_map, 0, 0, original_shape[1], original_shape[0])


def find_lesion(
    lesion_map: np.ndarray,
    original_shape: tuple[int, int],
    *,
    input_size: int,
    policy: ResizePolicy = ResizePolicy.LETTERBOX,
    threshold: float = 0.5,
    min_area: float = 0.0,
    pixel_spacing_mm: tuple[float, float] | None = None,
    with_mask: bool = True,
) -> tuple[Lesion | None, np.ndarray | None]:
    """The largest lesion in one frame, and its mask.

    The same as thresholding :func:`lesion_probability` and keeping its largest 8-connected
    region, but the probability is computed only over the frame pixels that can reach the
    threshold: bilinear interpolation never exceeds the map pixels it reads, so only pixels
    next to a map pixel at or above the threshold can.

    Args:
        lesion_map: float ``[h, w]``, the model's ``lesion`` output for one image.
        original_shape: ``(H, W)`` of the frame as handed to ``fit_to_square``.
        input_size: side of the model's square input.
        policy: how the frame was fitted into the square.
        threshold: a pixel is lesion where its probability is >= this (``spec.lesion_threshold``).
        min_area: a largest region covering less than this share of the square input (its area
            in the frame scaled by the fit) is no lesion (``spec.lesion_min_area``).
        pixel_spacing_mm: ``(row, column)`` spacing of the frame's pixels in mm, or None.
        with_mask: also return the mask (False: None in its place, a little faster).

    Returns:
        ``(lesion, mask)``: the :class:`Lesion` (None when no pixel reaches the threshold) and a
        uint8 ``[H, W]`` mask, 255 on the largest connected lesion region, 0 elsewhere.
    """
    height, width = original_shape
    mask = np.zeros(original_shape, np.uint8) if with_mask else None
    grid = _Grid.of(original_shape, lesion_map.shape, input_size, policy)
    # the map pixels the frame reads (not the letterbox's padding beyond them)
    r0, r1 = _read(grid.ay, grid.by, height, lesion_map.shape[0])
    c0, c1 = _read(grid.ax, grid.bx, width, lesion_map.shape[1])
    hot = lesion_map[r0:r1, c0:c1] >= threshold
    rows = _reach(hot.any(axis=1), r0, grid.ay, grid.by, height)
    cols = _reach(hot.any(axis=0), c0, grid.ax, grid.bx, width)
    if rows is None or cols is None:
        return None, mask
    (y0, y1), (x0, x1) = rows, cols
    probability = grid.warp(lesion_map, x0, y0, x1 - x0, y1 - y0)
    # NumPy, not cv2.compare: OpenCV reads an array of 4 or fewer values beside a scalar as a
    # second array of another size and raises (a lesion map that is hot on one cell does this)
    binary = (probability >= threshold).astype(np.uint8)
    count, labels = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    if count <= 1:
        return None, mask
    # (connectedComponentsWithStats costs 3x as much as labels + bincount + one boundingRect)
    sizes = np.bincount(labels.ravel(), minlength=count)
    best = 1 + int(np.argmax(sizes[1:]))
    area = int(sizes[best])
    if area * grid.square_pixels_per_pixel(lesion_map.shape, input_size) < min_area * input_size**2:
        return None, mask
    x, y, w, h = cv2.boundingRect((labels == best).astype(np.uint8))
    inside = (labels[y : y + h, x : x + w] == best).astype(np.uint8) * 255
    if mask is not None:
        mask[y0 + y : y0 + y + h, x0 + x : x0 + x + w] = inside
    area_mm2 = diameter_mm = None
    if pixel_spacing_mm is not None:
        row_mm, column_mm = (float(v) for v in pixel_spacing_mm)
        area_mm2 = area * row_mm * column_mm
        diameter_mm = feret_diameter(inside, (row_mm, column_mm))
    return Lesion((x0 + x, y0 + y, w, h), area, area_mm2, diameter_mm), mask


def lesion_peak(
    lesion_map: np.ndarray,
    original_shape: tuple[int, int],
    input_size: int,
    policy: ResizePolicy = ResizePolicy.LETTERBOX,
) -> float:
    """The largest value of ``lesion_map`` ``[h, w]`` among the map pixels the frame of
    ``original_shape`` reads (not the letterbox's padding beyond them): :func:`find_lesion` finds
    no lesion where it is below the threshold, since bilinear interpolation never exceeds it."""
    grid = _Grid.of(original_shape, lesion_map.shape, input_size, policy)
    r0, r1 = _read(grid.ay, grid.by, original_shape[0], lesion_map.shape[0])
    c0, c1 = _read(grid.ax, grid.bx, original_shape[1], lesion_map.shape[1])
    return float(lesion_map[r0:r1, c0:c1].max())


def in_frame(
    lesion: Lesion | None,
    mask: np.ndarray | None,
    origin: tuple[int, int],
    frame_shape: tuple[int, int] | None,
) -> tuple[Lesion | None, np.ndarray | None]:
    """A lesion found in a crop of a frame, moved into the frame's pixels.

    Args:
        lesion: as :func:`find_lesion` returns it for the crop.
        mask: the crop's mask, as :func:`find_lesion` returns it (or None).
        origin: ``(x, y)`` of the crop's top-left pixel in the frame.
        frame_shape: ``(rows, columns)`` of the frame; None: the crop is the whole frame.

    Returns:
        ``(lesion, mask)``: the box shifted by ``origin`` (area and mm unchanged), and the mask
        placed at ``origin`` in a frame-sized uint8 mask, 0 outside the crop.
    """
    x, y = origin
    if lesion is not None and (x, y) != (0, 0):
        left, top, width, height = lesion.bbox
        lesion = replace(lesion, bbox=(left + x, top + y, width, height))
    if mask is not None and frame_shape is not None and mask.shape != tuple(frame_shape):
        whole = np.zeros(frame_shape, np.uint8)
        whole[y : y + mask.shape[0], x : x + mask.shape[1]] = mask
        mask = whole
    return lesion, mask


@dataclass(frozen=True)
class _Grid:
    """Frame pixel index -> map pixel index: ``u = ax * X + bx``, ``v = ay * Y + by``."""

    ax: float
    bx: float
    ay: float
    by: float

    @classmethod
    def of(
        cls,
        original_shape: tuple[int, int],
        map_shape: tuple[int, int],
        input_size: int,
        policy: ResizePolicy,
    ) -> _Grid:
        height, width = original_shape
        if policy is ResizePolicy.LETTERBOX:
            top, left, new_h, new_w = letterbox_box(height, width, input_size)
        else:
            top, left, new_h, new_w = 0, 0, input_size, input_size
        # frame pixel X (centre X + 0.5) lands on square coordinate left + (X + 0.5) * new_w / W,
        # map coordinate (that) * map_w / input_size, map pixel index (that) - 0.5
        sy, sx = map_shape[0] / input_size, map_shape[1] / input_size
        return cls(
            ax=new_w / width * sx,
            bx=(left + 0.5 * new_w / width) * sx - 0.5,
            ay=new_h / height * sy,
            by=(top + 0.5 * new_h / height) * sy - 0.5,
        )

    def square_pixels_per_pixel(self, map_shape: tuple[int, int], input_size: int) -> float:
        """The area in square-input pixels of one frame pixel."""
        return (self.ay * input_size / map_shape[0]) * (self.ax * input_size / map_shape[1])

    def warp(self, lesion_map: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Bilinear samples of the map at frame pixels ``[y0:y0+height, x0:x0+width]``."""
        matrix = np.array(
            [[self.ax, 0.0, self.bx + self.ax * x0], [0.0, self.ay, self.by + self.ay * y0]]
        )
        return cv2.warpAffine(
            np.ascontiguousarray(lesion_map, dtype=np.float32),
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )


def _read(scale: float, offset: float, size: int, map_size: int) -> tuple[int, int]:
    """Map pixels ``[start, stop)`` that bilinear samples at frame pixels ``0..size-1`` read."""
    start = int(np.floor(offset))
    stop = int(np.floor(scale * (size - 1) + offset)) + 2
    return min(max(start, 0), map_size - 1), min(max(stop, 1), map_size)


def _reach(
    hot: np.ndarray, first_index: int, scale: float, offset: float, size: int
) -> tuple[int, int] | None:
    """Frame pixels ``[start, stop)`` along one axis whose map coordinate ``scale * X + offset``
    lies within one map pixel of a ``hot`` one (``hot[i]`` is map pixel ``first_index + i``):
    only those can interpolate to the threshold."""
    if not hot.any():
        return None
    first = first_index + int(np.argmax(hot))
    last = first_index + len(hot) - 1 - int(np.argmax(hot[::-1]))
    start = max(0, int(np.floor((first - 1 - offset) / scale)))
    stop = min(size, int(np.floor((last + 1 - offset) / scale)) + 2)
    return (start, stop) if start < stop else None


def feret_diameter(mask: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """The longest distance between two pixel centres of a mask's regions.

    Computed on the convex hull of the outer contours (the farthest pair always lies on it), with
    each axis scaled by its own spacing, so non-square pixels are measured correctly.

    Args:
        mask: uint8 ``[H, W]``, non-zero on the region.
        pixel_spacing: ``(row, column)`` size of a pixel, in the unit wanted.

    Returns:
        The diameter in that unit; 0.0 for an empty or one-pixel mask.
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    hull = cv2.convexHull(np.concatenate(contours)).reshape(-1, 2).astype(np.float64)
    hull *= np.array([pixel_spacing[1], pixel_spacing[0]])  # points are (x, y)
    gaps = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((gaps**2).sum(axis=-1).max()))
