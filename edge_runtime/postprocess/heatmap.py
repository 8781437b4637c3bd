"""Class activation maps -> heatmaps at the scan's own size, and colour overlays."""

from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.io.preprocess import letterbox_box
from edge_runtime.model.contract import ResizePolicy


def lesion_heatmap(
    lesion_map: np.ndarray, original_shape: tuple[int, int], input_size: int, policy: ResizePolicy
) -> np.ndarray:
    """The heatmap of a model with a ``lesion`` output: its lesion probability at every pixel of
    the original scan (``edge_runtime.postprocess.lesion.lesion_probability``), as uint8 ``[H, W]``,
    255 = probability 1. Unlike a class activation map it is not scaled to its own peak, so a
    scan without a lesion stays dark; on held-out lesion scans its hottest point lies on the
    lesion far more often than the CAM's (docs/lesion-outlines.md).
    """
    from edge_runtime.postprocess.lesion import lesion_probability

    probability = lesion_probability(lesion_map, original_shape, input_size, policy)
    return np.clip(probability * 255.0 + 0.5, 0, 255).astype(np.uint8)


def cam_to_heatmap(
    cam: np.ndarray, original_shape: tuple[int, int], input_size: int, policy: ResizePolicy
) -> np.ndarray:
    """Map one class's activation map ``[h, w]`` back onto the original scan.

    Undoes the letterbox (or stretch) so each heatmap pixel lies over the scan pixel it explains.

    Returns:
        uint8 ``[H, W]`` at the original size; 255 = most evidence for the class, 0 = none.
    """
    height, width = original_shape
    square = cv2.resize(
        cam.astype(np.float32), (input_size, input_size), interpolation=cv2.INTER_LINEAR
    )
    if policy is ResizePolicy.LETTERBOX:
        top, left, new_h, new_w = letterbox_box(height, width, input_size)
        square = square[top : top + new_h, left : left + new_w]
    heat = cv2.resize(square, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = np.maximum(heat, 0.0)
    peak = float(heat.max())
    if peak <= 0.0:
        return np.zeros((height, width), np.uint8)
    return np.clip(heat * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


OUTLINE_BGR = (255, 255, 255)  # white: stands out on every JET colour


def overlay(
    gray: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    *,
    lesion_mask: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Blend a JET-coloured heatmap over the grayscale scan; returns BGR uint8.

    Args:
        gray: uint8 ``[H, W]`` scan.
        heatmap: uint8 ``[H, W]`` from :func:`cam_to_heatmap`.
        alpha: weight of the heatmap's colour.
        lesion_mask: uint8, non-zero on the lesion the model found: its outline is drawn over
            the blend (about 1/300 of the scan's shorter side thick, at least 1 px). ``[H, W]``,
            or the mask of a larger frame of which the scan is a crop at ``origin``.
        origin: ``(x, y)`` of the scan's top-left pixel in ``lesion_mask`` (a result's
            ``origin``).
    """
    scan = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(heatmap, cv2.COLORMAP_JET)
    blend = cv2.addWeighted(colour, alpha, scan, 1.0 - alpha, 0.0)
    if lesion_mask is not None:
        x, y = origin
        lesion_mask = np.ascontiguousarray(
            lesion_mask[y : y + gray.shape[0], x : x + gray.shape[1]]
        )
        contours, _ = cv2.findContours(lesion_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(gray.shape) / 300))
        cv2.drawContours(blend, contours, -1, OUTLINE_BGR, thickness)
    return blend
