"""Preprocessing shared by training and the device: grayscale uint8 -> model's square input.

Training calls these very functions, so what the model learned on is what the device feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edge_runtime.model.contract import ResizePolicy


def fit_to_square(
    gray: np.ndarray, size: int, policy: ResizePolicy = ResizePolicy.LETTERBOX
) -> np.ndarray:
    """Resize one 2-D uint8 image into a ``size`` x ``size`` uint8 square.

    ``LETTERBOX`` keeps the aspect ratio (lesion shape and orientation are diagnostic), centres the
    image and pads with black; ``STRETCH`` resizes both sides to ``size``.

    Args:
        gray: 2-D uint8 array (H, W).
        size: side of the output square in pixels.
        policy: how to fit a non-square image.

    Returns:
        A C-contiguous uint8 array of shape (size, size).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if policy is ResizePolicy.STRETCH:
        return _resize(gray, size, size)
    top, left, new_h, new_w = letterbox_box(*gray.shape, size)
    out = np.zeros((size, size), np.uint8)
    out[top : top + new_h, left : left + new_w] = _resize(gray, new_w, new_h)
    return out


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where a ``height`` x ``width`` image lands inside the letterboxed square.

    Returns:
        ``(top, left, new_height, new_width)`` in input-square pixels.
    """
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def make_batch(
    images: Sequence[np.ndarray], size: int, policy: ResizePolicy = ResizePolicy.LETTERBOX
) -> np.ndarray:
    """Fit each 2-D uint8 image to the square and stack them into a ``[N, size, size, 1]`` batch."""
    batch = np.empty((len(images), size, size, 1), np.uint8)
    for i, image in enumerate(images):
        batch[i, :, :, 0] = fit_to_square(image, size, policy)
    return batch


def _resize(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    if gray.shape == (height, width):
        return np.ascontiguousarray(gray)
    shrinking = width < gray.shape[1] or height < gray.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)
