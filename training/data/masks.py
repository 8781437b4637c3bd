"""Lesion masks on disk: BUSI's ``<name>_mask.png`` (and ``_mask_1``...), BUS-BRA's masks.

A mask is a grey image of the scan's shape, lesion bright: 0/255 as BUSI and BUS-BRA store them
(lesion above 127), or 0/1 (a mask whose brightest pixel is 1: lesion where it is 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.io.decode import load_gray

log = logging.getLogger(__name__)
ASPECT_TOLERANCE = 0.02  # a mask of another shape than its scan: stretched, with a warning


def load_lesion_mask(paths: Sequence[Path], shape: tuple[int, int]) -> np.ndarray:
    """Union of a scan's mask files as a boolean ``[H, W]`` at the scan's own size.

    Raises:
        InputError: a mask file cannot be decoded.
    """
    union = np.zeros(shape, bool)
    for path in paths:
        mask = load_gray(path)
        if mask.shape != shape:
            aspects = (mask.shape[1] / mask.shape[0], shape[1] / shape[0])
            if abs(aspects[0] / aspects[1] - 1.0) > ASPECT_TOLERANCE:
                log.warning(
                    "%s: mask of %d x %d pixels stretched onto a scan of %d x %d: another shape "
                    "(is it this scan's mask?)",
                    path,
                    mask.shape[1],
                    mask.shape[0],
                    shape[1],
                    shape[0],
                )
            mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        union |= mask > (0 if mask.max() == 1 else 127)  # 0/1 masks, else 0/255
    return union
