"""Grouping duplicate scans, including shifted, cropped and rescaled copies.

Every image is decoded once and shrunk. Two cheap stages propose candidate pairs: a 64-bit DCT
perceptual hash (Hamming distance over all pairs) and the nearest neighbours of a TF-IDF bag of
ORB visual words. Each candidate is verified: ORB matches, a RANSAC similarity transform with
enough inliers and a plausible scale, and then a photometric check that the aligned images agree
(burned-in text or a scanner frame alone can give many inliers, but not matching tissue). Neither
the hash nor ORB's descriptors survive a left-right mirror, so each image's mirror is described
too and matched against the others the same way: a copy exported with the probe's orientation
reversed is still a copy. Verified pairs and samples that share a patient id are merged with
union-find.

Example:
    >>> report = group_duplicates(discover_all([root]).samples)  # doctest: +SKIP
    >>> report.conflicts  # groups whose images carry different labels  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from edge_runtime.io.decode import InputError
from training.data.datasets import Sample, read_scan

log = logging.getLogger(__name__)

_BACKGROUND = 10  # gray level below which a pixel counts as background


@dataclass(frozen=True)
class DedupOptions:
    """Thresholds of :func:`group_duplicates` (tuned on BUSI and BUS-BRA at 256 px)."""

    max_side: int = 256
    phash_max_distance: int = 10
    orb_features: int = 500
    vocabulary_size: int = 256
    neighbours: int = 8
    ratio: float = 0.8
    min_inliers: int = 12
    min_inlier_ratio: float = 0.3
    scale_range: tuple[float, float] = (0.5, 2.0)
    min_overlap: float = 0.25
    min_correlation: float = 0.85
    min_phash_correlation: float = 0.88
    workers: int = 4
    seed: int = 0
    mirrored: bool = True


@dataclass(frozen=True)
class DuplicatePair:
    """One verified duplicate pair: sample indices, how it was found, and the evidence.

    ``method`` is ``"orb"`` or ``"phash"``, with ``"-mirrored"`` when ``first``'s left-right mirror
    matched ``second``.
    """

    first: int
    second: int
    method: str
    inliers: int
    correlation: float


@dataclass(frozen=True)
class DuplicateReport:
    """Duplicate groups over a sample list.

    Attributes:
        samples: the samples, in the order given.
        groups: one group id per sample (``"g0000"``, ...), numbered by first appearance.
        conflicts: ids of groups whose members carry different labels.
        pairs: the verified image pairs behind the groups.
        timings_s: seconds per stage (decode, candidates, verify, total).
    """

    samples: tuple[Sample, ...]
    groups: tuple[str, ...]
    conflicts: frozenset[str]
    pairs: tuple[DuplicatePair, ...]
    timings_s: dict[str, float]

    def group_sizes(self) -> dict[str, int]:
        """Members per group id."""
        sizes: dict[str, int] = defaultdict(int)
        for group in self.groups:
            sizes[group] += 1
        return dict(sizes)

    def to_csv(self) -> str:
        """One row per image: group, path, label, source, patient, conflicted."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["group", "path", "label", "source", "patient", "conflicted"])
        for sample, group in sorted(
            zip(self.samples, self.groups, strict=True), key=lambda r: r[1]
        ):
            writer.writerow(
                [
                    group,
                    sample.path,
                    sample.label,
                    sample.source,
                    sample.patient or "",
                    int(group in self.conflicts),
                ]
            )
        return out.getvalue()


@dataclass(frozen=True)
class _Features:
    gray: np.ndarray | None
    phash: int
    keypoints: np.ndarray  # (K, 2) float32 point coordinates
    descriptors: np.ndarray  # (K, 32) uint8 ORB descriptors


def group_duplicates(
    samples: Sequence[Sample], options: DedupOptions | None = None
) -> DuplicateReport:
    """Group duplicate and near-duplicate images, and samples sharing a patient id.

    Args:
        samples: the samples to compare, all pairs.
        options: thresholds; the defaults suit ultrasound scans.

    Returns:
        The groups, the label conflicts and the verified pairs. An image that cannot be decoded
        is logged and left in a group of its own (or its patient's).
    """
    options = options or DedupOptions()
    samples = tuple(samples)
    start = time.perf_counter()
    with ThreadPoolExecutor(options.workers) as pool:
        features = list(pool.map(lambda s: _features(s, options), samples))
        mirrors = (
            list(pool.map(lambda f: _mirror(f, options), features)) if options.mirrored else []
        )
        decoded = time.perf_counter()
        candidates = _candidates(features, options)
        mirror_candidates = _mirror_candidates(features, mirrors, options) if mirrors else set()
        found = time.perf_counter()
        plain = pool.map(
            lambda p: _verify(features[p[0]], features[p[1]], *p, options, ""), sorted(candidates)
        )
        pairs = tuple(p for p in plain if p is not None)
        matched = {(p.first, p.second) for p in pairs}
        mirrored = pool.map(
            lambda p: _verify(mirrors[p[0]], features[p[1]], *p, options, "-mirrored"),
            sorted(mirror_candidates - matched),
        )
        pairs += tuple(p for p in mirrored if p is not None)
    end = time.perf_counter()

    parent = list(range(len(samples)))
    for pair in pairs:
        _union(parent, pair.first, pair.second)
    by_patient: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.patient is not None:
            _union(parent, by_patient.setdefault(sample.patient, index), index)
    names: dict[int, str] = {}
    groups = tuple(
        names.setdefault(_find(parent, i), f"g{len(names):04d}") for i in range(len(parent))
    )
    labels: dict[str, set[str]] = defaultdict(set)
    for sample, group in zip(samples, groups, strict=True):
        labels[group].add(sample.label)
    report = DuplicateReport(
        samples=samples,
        groups=groups,
        conflicts=frozenset(g for g, found_labels in labels.items() if len(found_labels) > 1),
        pairs=pairs,
        timings_s={
            "decode": decoded - start,
            "candidates": found - decoded,
            "verify": end - found,
            "total": end - start,
        },
    )
    sizes = report.group_sizes()
    log.info(
        "duplicates: %d images in %d groups (largest %d), %d verified pairs of %d candidates, "
        "%d conflicted groups, %.1f s",
        len(samples),
        len(sizes),
        max(sizes.values(), default=0),
        len(pairs),
        len(candidates | mirror_candidates),
        len(report.conflicts),
        end - start,
    )
    return report


def _features(sample: Sample, options: DedupOptions) -> _Features:
    try:
        gray = read_scan(sample.path)
    except InputError as exc:
        log.warning("%s; left out of duplicate matching", exc)
        return _Features(None, 0, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    scale = options.max_side / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return _describe(gray, options.orb_features)


def _mirror(features: _Features, options: DedupOptions) -> _Features:
    """The features of the image's left-right mirror."""
    if features.gray is None:
        return features
    return _describe(np.ascontiguousarray(features.gray[:, ::-1]), options.orb_features)


def _describe(gray: np.ndarray, orb_features: int) -> _Features:
    orb = cv2.ORB_create(nfeatures=orb_features)
    keypoints, descriptors = orb.detectAndCompute(gray, None)
    if descriptors is None:
        return _Features(
            gray, _phash(gray), np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        )
    points = np.array([k.pt for k in keypoints], np.float32)
    return _Features(gray, _phash(gray), points, descriptors)


def _phash(gray: np.ndarray) -> int:
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _candidates(features: list[_Features], options: DedupOptions) -> set[tuple[int, int]]:
    """Pairs (i < j) worth verifying: close perceptual hashes or similar bags of ORB words."""
    valid = np.array([f.gray is not None for f in features])
    hashes = np.array([f.phash for f in features], np.uint64)
    pairs: set[tuple[int, int]] = set()
    for i in range(len(features)):
        distance = np.bitwise_count(hashes[i + 1 :] ^ hashes[i])
        close = np.flatnonzero(distance <= options.phash_max_distance) + i + 1
        pairs.update((i, int(j)) for j in close if valid[i] and valid[j])
    words = _bag_of_words(features, options)
    similarity = words @ words.T
    np.fill_diagonal(similarity, -1.0)
    k = min(options.neighbours, len(features) - 1)
    if k > 0:
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        for i, row in enumerate(nearest):
            pairs.update((min(i, int(j)), max(i, int(j))) for j in row if valid[i] and valid[j])
    return pairs


def _mirror_candidates(
    features: list[_Features], mirrors: list[_Features], options: DedupOptions
) -> set[tuple[int, int]]:
    """Pairs (i < j) worth verifying as mirror copies: ``i``'s mirror close to ``j``.

    Mirroring both images of a pair changes nothing, so ``i``'s mirror against ``j`` stands for
    ``j``'s mirror against ``i`` as well.
    """
    count = len(features)
    valid = np.array([f.gray is not None for f in features])
    hashes = np.array([f.phash for f in features], np.uint64)
    pairs: set[tuple[int, int]] = set()
    for i, mirror in enumerate(mirrors):
        distance = np.bitwise_count(hashes ^ np.uint64(mirror.phash))
        close = np.flatnonzero((distance <= options.phash_max_distance) & valid)
        pairs.update((min(i, int(j)), max(i, int(j))) for j in close if valid[i] and j != i)
    words = _bag_of_words([*features, *mirrors], options)
    similarity = words[count:] @ words[:count].T
    np.fill_diagonal(similarity, -1.0)
    k = min(options.neighbours, count - 1)
    if k > 0:
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        for i, row in enumerate(nearest):
            pairs.update((min(i, int(j)), max(i, int(j))) for j in row if valid[i] and valid[j])
    return pairs


def _bag_of_words(features: list[_Features], options: DedupOptions) -> np.ndarray:
    """L2-normalised TF-IDF histograms of ORB descriptors over a k-means vocabulary."""
    rng = np.random.default_rng(options.seed)
    owners = np.concatenate([np.full(len(f.descriptors), i) for i, f in enumerate(features)])
    bits = np.unpackbits(np.concatenate([f.descriptors for f in features]), axis=1)
    histograms = np.zeros((len(features), options.vocabulary_size), np.float32)
    if len(bits) < options.vocabulary_size:
        return histograms
    sample = bits[rng.choice(len(bits), min(len(bits), 20_000), replace=False)].astype(np.float32)
    centres = sample[rng.choice(len(sample), options.vocabulary_size, replace=False)]
    for _ in range(8):
        nearest = _nearest_centre(sample, centres)
        for c in range(len(centres)):
            members = sample[nearest == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    words = np.concatenate(
        [
            _nearest_centre(bits[i : i + 50_000].astype(np.float32), centres)
            for i in range(0, len(bits), 50_000)
        ]
    )
    np.add.at(histograms, (owners, words), 1.0)
    idf = np.log(len(features) / (1.0 + (histograms > 0).sum(axis=0)))
    histograms *= np.maximum(idf, 0.0)
    norms = np.linalg.norm(histograms, axis=1, keepdims=True)
    return histograms / np.maximum(norms, 1e-9)


def _nearest_centre(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distance = (centres**2).sum(axis=1) - 2.0 * points @ centres.T
    return distance.argmin(axis=1)


def _verify(
    a: _Features, b: _Features, i: int, j: int, options: DedupOptions, kind: str
) -> DuplicatePair | None:
    """``a`` (image ``i``, or its mirror) against ``b`` (image ``j``); ``kind`` tags the method."""
    if a.gray is None or b.gray is None:
        return None
    if len(a.descriptors) >= 2 and len(b.descriptors) >= 2:
        pair = _verify_geometric(a, b, i, j, options, kind)
        if pair is not None:
            return pair
    distance = bin(a.phash ^ b.phash).count("1")
    if distance > options.phash_max_distance:
        return None
    size = (64, 64)
    correlation = _correlation(
        cv2.resize(a.gray, size, interpolation=cv2.INTER_AREA),
        cv2.resize(b.gray, size, interpolation=cv2.INTER_AREA),
        np.ones(size, bool),
    )
    if correlation < options.min_phash_correlation:
        return None
    return DuplicatePair(i, j, "phash" + kind, 0, correlation)


def _verify_geometric(
    a: _Features, b: _Features, i: int, j: int, options: DedupOptions, kind: str
) -> DuplicatePair | None:
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [
        m[0]
        for m in matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        if len(m) == 2 and m[0].distance < options.ratio * m[1].distance
    ]
    if len(good) < options.min_inliers:
        return None
    src = a.keypoints[[m.queryIdx for m in good]]
    dst = b.keypoints[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0
    )
    if transform is None:
        return None
    inliers = int(mask.sum())
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    low, high = options.scale_range
    if (
        inliers < options.min_inliers
        or inliers < options.min_inlier_ratio * len(good)
        or not low <= scale <= high
    ):
        return None
    height, width = b.gray.shape
    warped = cv2.warpAffine(a.gray, transform, (width, height), flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(a.gray.shape, 255, np.uint8), transform, (width, height)) == 255
    smaller = min(a.gray.size * scale * scale, b.gray.size)
    if inside.sum() < options.min_overlap * smaller:
        return None
    correlation = _correlation(warped, b.gray, inside)
    if correlation < options.min_correlation:
        return None
    return DuplicatePair(i, j, "orb" + kind, inliers, correlation)


def _correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two aligned images over ``mask`` where both show tissue.

    Black background is left out, so a shared scanner frame alone does not correlate.
    """
    a, b = cv2.GaussianBlur(a, (5, 5), 0), cv2.GaussianBlur(b, (5, 5), 0)
    mask = mask & (a > _BACKGROUND) & (b > _BACKGROUND)
    if mask.sum() < 64:
        return 0.0
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], i: int, j: int) -> None:
    a, b = _find(parent, i), _find(parent, j)
    if a != b:
        parent[max(a, b)] = min(a, b)
