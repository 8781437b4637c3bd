"""Lesion masks on disk: BUSI's ``<name>_mask.png`` (and ``_mask_1``...), BUS-BRA's masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.io.decode import load_gray


def load_lesion_mask(paths: Sequence[Path], shape: tuple[int, int]) -> np.ndarray:
    """Union of a scan's mask files as a boolean ``[H, W]`` at the scan's own size.

    Raises:
        InputError: a mask file cannot be decoded.
    """
    union = np.zeros(shape, bool)
    for path in paths:
        mask = load_gray(path)
        if mask.shape != shape:
            mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        union |= mask > 127
    return union
