"""Burned-in marks (calipers, measurement lines, text): finding them and painting them out.

Sonographers leave calipers around lesions they measure and type labels onto the scan; a model can
learn that a measured scan is a lesion scan. ``edge-train --paint-out-marks`` trains on scans with
their marks painted out (OpenCV's inpainting), and the marks probe
(:mod:`training.probes.marks`) compares the predictions with and without them.
"""

from __future__ import annotations

import cv2
import numpy as np

STROKE_WIDTH = 5  # marks are thinner than this (pixels): a white top-hat of this size keeps them
STROKE_CONTRAST = 100  # gray levels above the top-hat's opening
STROKE_MIN_GRAY = 200
RIM_CONTRAST = 40  # fainter stroke pixels joined to a mark are painted out with it


def _strokes(gray: np.ndarray) -> np.ndarray:
    """White top-hat: how much brighter each pixel is than anything ``STROKE_WIDTH`` wide."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_WIDTH, STROKE_WIDTH))
    return cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)


def find_marks(gray: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` mask of thin bright strokes: the pixels of calipers, dotted
    measurement lines and burned-in text (and, rarely, a fleck of bright speckle)."""
    return (_strokes(gray) > STROKE_CONTRAST) & (gray >= STROKE_MIN_GRAY)


def remove_marks(gray: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """``gray`` with its ``marks`` filled in from their surroundings (Telea inpainting).

    What is painted out is every faint stroke (top-hat above ``RIM_CONTRAST``) connected to a
    mark pixel, grown by one pixel: the parts of a caliper that cross bright tissue and the
    anti-aliased rims of text.
    """
    faint = _strokes(gray) > RIM_CONTRAST
    _, labels = cv2.connectedComponents((faint | marks).astype(np.uint8), connectivity=8)
    touched = np.unique(labels[marks])
    paint = np.isin(labels, touched[touched > 0]).astype(np.uint8)
    grown = cv2.dilate(paint, np.ones((3, 3), np.uint8))
    return cv2.inpaint(gray, grown, 3, cv2.INPAINT_TELEA)


def paint_out_marks(gray: np.ndarray) -> np.ndarray:
    """``gray`` with whatever marks :func:`find_marks` sees painted out."""
    marks = find_marks(gray)
    return remove_marks(gray, marks) if marks.any() else gray
