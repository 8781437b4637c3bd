"""Reading a site's labelled files into the model's squares, as ``edge-classify`` reads them
(:class:`~edge_runtime.io.reader.ScanReader`, its "is this a scan" check included), and leaving
out, each with its reason, what cannot stand for the one scan its label describes:

- a file that cannot be read;
- a file none of whose frames is an ultrasound scan (:mod:`edge_runtime.io.scan_check`: black,
  white, flat or noise frames, which ``edge-classify`` abstains on);
- a file of several images that are not one cine: the pages of a TIFF, or the tissue regions of
  a dual view (as edge-train refuses them): its label cannot say which image it describes.

A DICOM or video cine is one scan: the frames that are scans stand for it (their features
averaged), and the frames that are not are left out of it, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.io.decode import is_dicom, sniff
from edge_runtime.io.frames import InputError, read_head
from edge_runtime.io.reader import DecodedItem, ScanReader
from edge_runtime.io.video import is_video
from edge_runtime.model.contract import ResizePolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSquares:
    """The squares of a site's files (:func:`read_squares`)."""

    squares: list[np.ndarray]  # every frame used, [S, S] uint8, file after file
    by_source: dict[str, list[int]]  # each file kept: the indices of its frames in ``squares``
    left_out: dict[str, str]  # each file left out: why


def read_squares(
    paths: Sequence[Path],
    input_size: int,
    resize_policy: ResizePolicy,
    *,
    batch_size: int = 8,
    workers: int = 1,
) -> SiteSquares:
    """The squares of ``paths`` that stand for their labelled scans, and the files left out,
    each named on standard error with its reason (module docstring)."""
    decoded: dict[str, list[DecodedItem]] = {}
    with ScanReader(
        input_size, resize_policy, batch_size=batch_size, decode_workers=workers
    ) as reader:
        for items in reader.items(paths, keep_original=False):
            for item in items:
                decoded.setdefault(item.source, []).append(item)
    squares: list[np.ndarray] = []
    by_source: dict[str, list[int]] = {}
    left_out: dict[str, str] = {}
    for path in paths:
        source = str(path)
        items = decoded.get(source, [])
        why = _why_left_out(source, items)
        if why is not None:
            left_out[source] = why
            log.warning("%s: %s (left out)", source, why)
            continue
        used = [item for item in items if _usable(item)]
        _warn_frames_left_out(source, items, used)
        by_source[source] = list(range(len(squares), len(squares) + len(used)))
        squares += [item.square for item in used]
    return SiteSquares(squares, by_source, left_out)


def _usable(item: DecodedItem) -> bool:
    return item.square is not None and item.error is None and item.not_a_scan is None


def _why_left_out(source: str, items: list[DecodedItem]) -> str | None:
    """Why a file cannot stand for its labelled scan, or None when it can."""
    regions = {item.region for item in items if item.region is not None}
    if len(regions) > 1:
        return (
            f"holds {len(regions)} tissue regions (a dual view); its label cannot say which one "
            "it describes: save that region as a file of its own"
        )
    pages = {item.frame for item in items if item.frame is not None}
    if len(pages) > 1 and not _is_cine(source):
        return (
            f"holds {len(pages)} pages; its label cannot say which one it describes: save that "
            "page as a file of its own"
        )
    if any(_usable(item) for item in items):
        return None
    errors = [item.error for item in items if item.error is not None]
    not_scans = [item.not_a_scan for item in items if item.not_a_scan is not None]
    return (errors or not_scans or ["no frame could be read"])[0]


def _is_cine(path: str) -> bool:
    """Whether a file's frames are a cine's (DICOM, video), not the pages of an image file."""
    try:
        head = read_head(path)
    except InputError:
        return False
    return is_dicom(path, head) or is_video(path, head, sniff(head))


def _warn_frames_left_out(source: str, items: list[DecodedItem], used: list[DecodedItem]) -> None:
    """Name the frames of a kept cine that are not used, with the first one's reason."""
    dropped = [item for item in items if not _usable(item)]
    if not dropped:
        return
    first = dropped[0]
    where = "" if first.frame is None else f", the first frame {first.frame}"
    reason = first.error or first.not_a_scan
    log.warning(
        "%s: frames left out of its average (%d%s): %s", source, len(dropped), where, reason
    )
