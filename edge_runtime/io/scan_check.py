"""Is this image an ultrasound scan at all? A cheap check of its pixels, before any answer is given.

A classifier trained on breast ultrasound gives one of its classes to anything: a black frame (the
probe lifted), a flat grey frame, random noise, a screenshot of a text report or a CT slice were
all called *normal*. This check looks at the decoded frame itself (on a copy at most
:data:`WORK_SIDE` pixels a side, about a millisecond) and names what is wrong with it; the
classifier then abstains with that reason (``abstain_reason``), whatever the model says.

What B-mode ultrasound looks like, measured on all 2,499 BUSI and BUS-BRA images (four scanners)
and 30 scans of a Siemens scanner no bundled model saw: grey levels spread over at least 70
levels (p99 - p1); grey (neither black nor white) on at least 29% of the image and at most 21%
near white; at most 31% at any one grey level above black; lit (not background) on at least 32%;
speckle, the granular texture of coherent echoes, on at least 45% of the lit area; speckle
correlated between neighbouring pixels (lag-1 correlation of the fine detail at least 0.59;
white noise has 0), usually longer across the beam than along it (lag-2 correlation across minus
down: median 0.83, under 0.3 in size on 1.8% of them); and an image that reaches the frame's
edges (some 4% border strip lit on 63% of it or more); and a shape no further from square than
2.1 : 1 (median 1.28). Texture is read inside the lit area,
where it shows best: on the frame shrunk to :data:`WORK_SIDE` or on a patch at full size. Each
rule below sits outside those ranges (rule 6 at 0.5 against the scans' lowest correlation,
0.594), so none of those 2,529 scans fails the check; on the default model's 373 held-out scans
it abstains on none (``tests/test_field_round3_pipeline.py`` measures half of them when the real
scans are present). It costs about 1.3 ms a frame (median, one core), in the decode threads.

The rules, in order (the first that holds is the reason):

0. **sliver**: one side more than 4 times the other: a strip cut from a scan, or one squashed
   flat, which the model's square would shrink to a few rows of pixels (seen called normal, at a
   P(malignant) above the operating point).
1. **blank**: 98% of the pixels lie within fewer than 20 grey levels (p99 - p1): a black, grey or
   white frame, a mask or a DICOM image whose stored range maps to a few grey levels.
2. **dark**: less than 10% of the image is lit (7 x 7 mean >= 16): a black frame with a few
   overlays, the probe lifted.
3. **no grey**: less than 10% of pixels are grey (16..235): a black-and-white drawing, pattern
   or text.
4. **white**: more than 40% of pixels are near white (> 235): a document or screenshot.
5. **flat**: more than 50% of the image is one grey level of 16 or more: a program's screen
   with a dark theme (65-83%). The scans' most is 31%: a BUS-BRA scan whose large anechoic area
   sits at grey level 16, exactly the lit level.
6. **noise**: the fine detail is weakly correlated between neighbouring pixels (lag-1
   correlation < 0.5 both across and down): pixel noise (0), or the grain of a photograph
   (1/f noise, about 0.46), not speckle.
7. **smooth**: less than 30% of the lit area has speckle (local detail >= 3 grey levels): a
   drawing, a flat phantom.
8. **isolated body, isotropic texture**: the lit area touches no edge of the frame (at most
   50% of each 4% border strip) *and* its texture is the same across and down
   (``|h2 - v2|`` < 0.3): a body outline on air, as in CT or MR.

Known limits: a full-screen scanner export (the image in a black window) whose speckle happens to
be isotropic can meet rule 7 (1.8% of those scans have ``|h2 - v2|`` < 0.3, none of them
isolated: their images reach the frame's edges); an MR or CT slice cropped to the body passes
rules 1-7 and is left to the model's unfamiliar-scan score
(:mod:`edge_runtime.postprocess.decision`). A negative (a MONOCHROME1 image exported without its
inversion) passes unless its background turns white (rule 4): the grey levels of every scan above
are skewed towards dark (skewness at least -0.55), and of their negatives only 67% lie below
-0.6, so no rule on them would catch most negatives without coming within a hair of a real scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NOT_A_SCAN = "not an ultrasound scan"
WORK_SIDE = 256  # the check reads a copy at most this many pixels a side

MAX_ASPECT = 4.0  # the longer side over the shorter
MIN_RANGE = 20  # grey levels between the 1st and 99th percentile
MIN_LIT = 0.10  # fraction of the image whose 7 x 7 mean is >= LIT_LEVEL
MAX_WHITE = 0.40  # fraction of pixels > WHITE_LEVEL
MAX_FLAT = 0.50  # fraction of pixels at the commonest grey level >= LIT_LEVEL
MIN_GREY = 0.10  # fraction of pixels in [LIT_LEVEL, WHITE_LEVEL]
MIN_CORRELATION = 0.50  # lag-1 correlation of the fine detail, across or down
MIN_SPECKLE = 0.30  # fraction of the lit area with local detail >= SPECKLE_LEVEL
MAX_EDGE_LIT = 0.50  # "isolated": no 4% border strip is lit on more than this fraction
MIN_ANISOTROPY = 0.30  # |h2 - v2| below this: texture the same across and down

LIT_LEVEL = 16
WHITE_LEVEL = 235
SPECKLE_LEVEL = 3.0
_WINDOW = (7, 7)
_DETAIL_SIGMA = 2.0
_MIN_PAIRS = 100
_INSIDE = np.ones((9, 9), np.uint8)  # texture is read this far inside the lit area's edge


@dataclass(frozen=True)
class ScanStatistics:
    """What :func:`check_scan` measures on one frame (at most :data:`WORK_SIDE` pixels a side).

    Attributes:
        grey_range: grey levels between the 1st and the 99th percentile.
        lit: fraction of the image whose 7 x 7 mean is at least 16 (not background).
        white: fraction of pixels above 235.
        grey: fraction of pixels in 16..235.
        speckle: fraction of the lit area whose local detail (7 x 7 RMS of the image minus its
            Gaussian blur, sigma 2) is at least 3 grey levels.
        correlation: lag-1 correlation of that detail between neighbours in the lit area, the
            larger of across and down (1.0 where there is too little detail to tell).
        anisotropy: lag-2 correlation of the detail across minus down.
        edge_lit: the largest lit fraction of the four border strips (4% of the shorter side).
        flat: fraction of pixels at the commonest grey level of 16 or more (a flat background
            that is not black).

    The texture (``speckle``, ``correlation``, ``anisotropy``) is read at two scales, the frame
    shrunk to :data:`WORK_SIDE` and a patch that size at its own resolution, and each value is
    the more ultrasound-like of the two (speckle spans a few pixels at one scale or the other,
    depending on the scanner and the export's resolution); the rest on the shrunk frame.
    """

    grey_range: float
    lit: float
    white: float
    grey: float
    speckle: float
    correlation: float
    anisotropy: float
    edge_lit: float
    flat: float


def check_scan(gray: np.ndarray) -> str | None:
    """Why a decoded frame is not an ultrasound scan, or None when it may be one.

    Args:
        gray: the frame as decoded: 2-D uint8.

    Returns:
        ``"not an ultrasound scan: <what it looks like>"`` or None.

    Example:
        >>> check_scan(np.zeros((480, 640), np.uint8))
        'not an ultrasound scan: a blank frame (98% of its pixels within 0 grey levels)'
    """
    height, width = gray.shape[:2]
    if max(height, width) > MAX_ASPECT * min(height, width):
        return (
            f"{NOT_A_SCAN}: a sliver of {width} x {height} pixels, one side "
            f"{max(height, width) / min(height, width):.1f} times the other"
        )
    why = _first_failed_rule(scan_statistics(gray, both_scales=False))
    if why is not None and gray.shape != _shrunk(gray).shape:  # speckle may show at full size
        why = _first_failed_rule(scan_statistics(gray))
    return None if why is None else f"{NOT_A_SCAN}: {why}"


def scan_statistics(gray: np.ndarray, *, both_scales: bool = True) -> ScanStatistics:
    """The statistics the rules of :func:`check_scan` read.

    Args:
        gray: the frame, 2-D uint8.
        both_scales: read the texture at full size too (a frame larger than
            :data:`WORK_SIDE`); False: on the shrunk frame only (what passes there passes).

    Raises:
        ValueError: ``gray`` is not a 2-D uint8 array.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(
            f"check_scan needs a 2-D uint8 frame. Got {gray.dtype} of shape {gray.shape} instead."
        )
    image = _shrunk(gray)
    counts = np.bincount(image.ravel(), minlength=256)
    cumulative = np.cumsum(counts) / image.size
    low, high = np.searchsorted(cumulative, [0.01, 0.99])
    lit = _lit(image.astype(np.float32))
    textures = [_texture(image)]
    if both_scales and image.shape != gray.shape:
        textures.append(_texture(_texture_patch(gray, lit, image.shape)))
    return ScanStatistics(
        grey_range=float(high - low),
        lit=float(lit.mean()),
        white=float(counts[WHITE_LEVEL + 1 :].sum() / image.size),
        grey=float(counts[LIT_LEVEL : WHITE_LEVEL + 1].sum() / image.size),
        speckle=max(t[0] for t in textures),
        correlation=max(t[1] for t in textures),
        anisotropy=max((t[2] for t in textures), key=abs),
        edge_lit=_edge_lit(lit),
        flat=float(counts[LIT_LEVEL:].max() / image.size),
    )


def _first_failed_rule(s: ScanStatistics) -> str | None:
    if s.grey_range < MIN_RANGE:
        return f"a blank frame (98% of its pixels within {s.grey_range:.0f} grey levels)"
    if s.lit < MIN_LIT:
        return f"almost entirely dark ({s.lit:.0%} of it lit): no tissue in view"
    if s.grey < MIN_GREY:
        return f"almost no grey levels ({s.grey:.0%} of it): a drawing, pattern or text"
    if s.white > MAX_WHITE:
        return f"mostly white ({s.white:.0%} of it), like a document or screenshot"
    if s.flat > MAX_FLAT:
        return f"one flat grey covers {s.flat:.0%} of it, like a program's screen, not tissue"
    if s.correlation < MIN_CORRELATION:
        return (
            f"pixel noise or a photograph's grain: the fine detail of neighbouring pixels "
            f"correlates {s.correlation:.2f}, less than ultrasound speckle's"
        )
    if s.speckle < MIN_SPECKLE:
        return f"smooth, without ultrasound speckle (speckle on {s.speckle:.0%} of it)"
    if s.edge_lit <= MAX_EDGE_LIT and abs(s.anisotropy) < MIN_ANISOTROPY:
        return (
            "a body outline on a dark background with texture alike in every direction "
            "(CT or MR?), not ultrasound speckle"
        )
    return None


def _shrunk(gray: np.ndarray) -> np.ndarray:
    height, width = gray.shape
    scale = WORK_SIDE / max(height, width)
    if scale >= 1.0:
        return np.ascontiguousarray(gray)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _lit(pixels: np.ndarray) -> np.ndarray:
    return cv2.blur(pixels, _WINDOW) >= LIT_LEVEL


def _texture(image: np.ndarray) -> tuple[float, float, float]:
    """(speckle, correlation, anisotropy) of one view (:class:`ScanStatistics`)."""
    pixels = image.astype(np.float32)
    lit = cv2.erode(_lit(pixels).view(np.uint8), _INSIDE).view(bool)  # not the lit area's rim
    detail = pixels - cv2.GaussianBlur(pixels, (0, 0), _DETAIL_SIGMA)
    local = np.sqrt(np.maximum(cv2.blur(detail * detail, _WINDOW), 0.0))
    speckle = float(np.mean(local[lit] >= SPECKLE_LEVEL)) if lit.any() else 0.0
    correlation = max(_lag_correlation(detail, lit, 1, 1), _lag_correlation(detail, lit, 1, 0))
    anisotropy = _lag_correlation(detail, lit, 2, 1) - _lag_correlation(detail, lit, 2, 0)
    return speckle, correlation, anisotropy


def _texture_patch(gray: np.ndarray, lit: np.ndarray, shrunk_shape: tuple[int, int]) -> np.ndarray:
    """Up to :data:`WORK_SIDE` pixels a side of the frame at its own resolution, centred on its
    lit area: speckle is a few pixels wide there, and shrinking a large frame averages it away."""
    height, width = gray.shape
    if max(height, width) <= WORK_SIDE:
        return gray
    rows, columns = np.nonzero(lit)
    scale_y, scale_x = height / shrunk_shape[0], width / shrunk_shape[1]
    if rows.size:
        centre_y = (rows.min() + rows.max() + 1) / 2 * scale_y
        centre_x = (columns.min() + columns.max() + 1) / 2 * scale_x
    else:
        centre_y, centre_x = height / 2, width / 2
    top = int(np.clip(round(centre_y - WORK_SIDE / 2), 0, max(0, height - WORK_SIDE)))
    left = int(np.clip(round(centre_x - WORK_SIDE / 2), 0, max(0, width - WORK_SIDE)))
    return gray[top : top + WORK_SIDE, left : left + WORK_SIDE]


def _lag_correlation(detail: np.ndarray, lit: np.ndarray, lag: int, axis: int) -> float:
    """Correlation of ``detail`` with itself ``lag`` pixels along ``axis`` (1: across), where
    both pixels are lit; 1.0 where too few pairs or no variation (nothing to call noise)."""
    if detail.shape[axis] <= lag:
        return 1.0
    first = (slice(None), slice(None, -lag)) if axis else (slice(None, -lag), slice(None))
    second = (slice(None), slice(lag, None)) if axis else (slice(lag, None), slice(None))
    pairs = (lit[first] & lit[second]).astype(np.float32)
    count = float(pairs.sum())
    if count < _MIN_PAIRS:
        return 1.0
    a, b = detail[first] * pairs, detail[second] * pairs
    mean_a, mean_b = float(a.sum()) / count, float(b.sum()) / count
    covariance = float((a * b).sum()) / count - mean_a * mean_b
    spread = (float((a * a).sum()) / count - mean_a**2) * (float((b * b).sum()) / count - mean_b**2)
    return covariance / np.sqrt(spread) if spread > 1e-12 else 1.0


def _edge_lit(lit: np.ndarray) -> float:
    strip = max(1, round(0.04 * min(lit.shape)))
    return float(
        max(
            lit[:strip].mean(),
            lit[-strip:].mean(),
            lit[:, :strip].mean(),
            lit[:, -strip:].mean(),
        )
    )
