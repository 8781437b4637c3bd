"""Synthetic screen clutter: the marks a scanner burns into its screen, drawn on any scan.

Scans carry caliper crosses (+ and x), dotted measurement lines, text, body-marker pictograms,
depth rulers and logos, and which of them appear depends on the scanner and on whether a lesion
was measured: a model reads them as lesion cues unless training makes them uninformative. Drawn
on training scans of every class alike (``AugmentConfig.clutter``), they say nothing about the
label. A bank of overlays is drawn once with OpenCV; training composites a random one per scan
in the tf.data graph.
"""

from __future__ import annotations

import cv2
import numpy as np

_WORDS = (
    "L 1.24cm",
    "D 0.83cm",
    "GAIN 52",
    "12L-RS",
    "Lt BREAST",
    "RT 10:00",
    "DR 60",
    "FR 24",
    "3.5cm",
    "MI 0.9",
    "TIs 0.3",
    "B",
    "1",
    "2",
    "ML12-5",
    "RADIAL",
    "ANTI-RAD",
)
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX)


def clutter_bank(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` overlays for a ``size`` x ``size`` scan.

    Returns:
        ``(values, alpha)``: uint8 ``[count, size, size, 1]`` gray levels and uint8
        ``[count, size, size, 1]`` coverage (1 where the overlay paints, 0 elsewhere).
    """
    rng = np.random.default_rng(seed)
    values = np.zeros((count, size, size, 1), np.uint8)
    alpha = np.zeros((count, size, size, 1), np.uint8)
    for i in range(count):
        canvas = np.zeros((size, size), np.uint8)
        cover = np.zeros((size, size), np.uint8)
        for draw in _DRAWERS:
            if rng.random() < draw[1]:
                draw[0](canvas, cover, rng, size)
        values[i, :, :, 0], alpha[i, :, :, 0] = canvas, cover
    return values, alpha


def composite(images: np.ndarray, values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``images`` uint8 ``[N, S, S, 1]`` with one overlay each painted on (NumPy; the training
    graph does the same with TensorFlow ops)."""
    return np.where(alpha > 0, values, images)


def _gray(rng: np.random.Generator) -> int:
    return int(rng.integers(170, 256)) if rng.random() < 0.85 else int(rng.integers(60, 170))


def _between(rng: np.random.Generator, low: int, high: int) -> int:
    """``rng.integers(low, high)``, or ``low`` where a small input leaves no room (the same draw
    as ``rng.integers`` wherever ``high > low``)."""
    return int(rng.integers(low, max(high, low + 1)))


def _point(rng: np.random.Generator, size: int, margin: float = 0.1) -> tuple[int, int]:
    lo, hi = int(size * margin), int(size * (1 - margin))
    return _between(rng, lo, hi), _between(rng, lo, hi)


def _calipers(canvas, cover, rng, size) -> None:
    """Two to four caliper crosses, pairs joined by a dotted measurement line."""
    marker = cv2.MARKER_CROSS if rng.random() < 0.5 else cv2.MARKER_TILTED_CROSS
    length = max(3, int(size * rng.uniform(0.02, 0.045)))
    gray = _gray(rng)
    for _ in range(int(rng.integers(1, 3))):
        a = _point(rng, size, 0.15)
        span = size * rng.uniform(0.08, 0.35)
        angle = rng.uniform(0, np.pi)
        b = (int(a[0] + span * np.cos(angle)), int(a[1] + span * np.sin(angle)))
        for p in (a, b):
            for target, value in ((canvas, gray), (cover, 1)):
                cv2.drawMarker(target, p, value, marker, length, 1)
        if rng.random() < 0.6:
            steps = max(2, int(span // max(3, size // 60)))
            for t in np.linspace(0.15, 0.85, steps):
                p = (int(a[0] + t * (b[0] - a[0])), int(a[1] + t * (b[1] - a[1])))
                canvas[p[1] % size, p[0] % size] = gray
                cover[p[1] % size, p[0] % size] = 1


def _text(canvas, cover, rng, size) -> None:
    """One to three short labels, mostly near the edges."""
    for _ in range(int(rng.integers(1, 4))):
        word = _WORDS[int(rng.integers(len(_WORDS)))]
        font = _FONTS[int(rng.integers(len(_FONTS)))]
        scale = size / 224 * rng.uniform(0.25, 0.45)
        edge = rng.random() < 0.75
        x = _between(rng, 0, size // 2)
        y = int(rng.choice([_between(rng, 8, size // 6), _between(rng, size * 5 // 6, size)]))
        if not edge:
            x, y = _point(rng, size, 0.2)
        for target, value in ((canvas, _gray(rng)), (cover, 1)):
            cv2.putText(target, word, (x, y), font, scale, value, 1, cv2.LINE_AA)


def _body_marker(canvas, cover, rng, size) -> None:
    """A body-marker pictogram in a bottom corner: a breast outline with a probe bar."""
    radius = max(4, int(size * rng.uniform(0.04, 0.07)))
    x = int(rng.choice([radius + 4, size - radius - 4]))
    y = size - radius - 4 - _between(rng, 0, size // 10)
    angle = rng.uniform(0, np.pi)
    dx, dy = int(radius * 0.8 * np.cos(angle)), int(radius * 0.8 * np.sin(angle))
    gray = _gray(rng)
    for target, value in ((canvas, gray), (cover, 1)):
        cv2.circle(target, (x, y), radius, value, 1)
        cv2.circle(target, (x, y), max(1, radius // 5), value, -1)
        cv2.line(target, (x - dx, y - dy), (x + dx, y + dy), value, 2)


def _ruler(canvas, cover, rng, size) -> None:
    """A depth ruler: tick marks down one side."""
    x = int(rng.choice([_between(rng, 1, size // 12), size - 1 - int(rng.integers(1, 12))]))
    step = max(4, int(size * rng.uniform(0.04, 0.1)))
    gray = _gray(rng)
    for y in range(int(rng.integers(0, step)), size, step):
        tick = 4 if (y // step) % 5 == 0 else 2
        for target, value in ((canvas, gray), (cover, 1)):
            cv2.line(target, (x, y), (min(size - 1, x + tick), y), value, 1)


def _logo(canvas, cover, rng, size) -> None:
    """A small filled logo block in a top corner."""
    w, h = int(size * rng.uniform(0.08, 0.18)), int(size * rng.uniform(0.03, 0.06))
    x = int(rng.choice([2, size - w - 2]))
    gray = _gray(rng)
    for target, value in ((canvas, gray), (cover, 1)):
        cv2.rectangle(target, (x, 2), (x + w, 2 + h), value, -1 if rng.random() < 0.5 else 1)


# (draw, chance that an overlay has it)
_DRAWERS = (
    (_calipers, 0.6),
    (_text, 0.7),
    (_body_marker, 0.5),
    (_ruler, 0.4),
    (_logo, 0.3),
)
