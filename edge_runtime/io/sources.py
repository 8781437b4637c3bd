"""Turn the CLI's PATH arguments (files, folders, glob patterns) into a list of files.

A file named explicitly is taken as given, whatever its extension: decoding reports what is wrong
with it. Folders are walked recursively in sorted order; globs are expanded sorted. Wherever files
are found (folders, globs, links to either, ``edge-classify watch``) one predicate,
:func:`is_scan_file`, says which are scans (images, DICOM and videos), and each file is taken once
however many links, globs or spellings reach it (compared by real path). An argument that yields
nothing becomes an ``(argument, reason)`` problem rather than an exception.

No file is left out without a word: a folder or pattern's file that looks like a scan or a video
but is not taken (a format edge-classify does not read, a storage node's temporary ``.part``
name, a DICOMDIR index, a hidden name, a heatmap or mask that edge-classify wrote) is logged with
the reason (:func:`skip_reason`).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_runtime.io import own_images
from edge_runtime.io.decode import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    SNIFF_BYTES,
    display_path,
    sniff,
)
from edge_runtime.io.video import VIDEO_SUFFIXES, sniff_video

SCAN_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES | VIDEO_SUFFIXES
# what storage nodes, copy tools and browsers call a file while they write it (then rename it)
TEMPORARY_SUFFIXES = frozenset(
    {".part", ".partial", ".tmp", ".temp", ".filepart", ".crdownload", ".download", ".!sync"}
)
_GLOB_CHARS = frozenset("*?[")
_SKIPPED_NAMES = frozenset({"dicomdir"})  # a DICOM media index, never an image
_SNIFFED_SCANS = frozenset({"png", "jpeg", "tiff", "dicom"})  # "BM" alone is too weak a sign
_UNREAD_SUFFIXES = {  # media that may sit beside scans, in formats edge-classify does not read
    ".gif": "GIF",
    ".webp": "WebP",
    ".jp2": "JPEG 2000",
    ".j2k": "JPEG 2000",
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".mpg": "MPEG video",
    ".mpeg": "MPEG video",
    ".3gp": "3GP video",
    ".flv": "Flash video",
    ".ts": "MPEG transport stream",
}
_UNREAD_MAGIC = (
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\xba", "MPEG video"),
)
log = logging.getLogger(__name__)


def expand_sources(items: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into scan files, in order, without duplicates.

    Args:
        items: paths as typed: files, folders (walked recursively, hidden entries skipped) or
            glob patterns (``**`` recurses).

    Returns:
        The files found, and ``(item, reason)`` for each item that yielded none, such as
        ``("scans/", "folder contains no images")``.

    Example:
        >>> files, problems = expand_sources(["scan.png", "folder/", "day*/**/*.dcm"])
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        found, reason = _expand_one(item)
        if reason:
            problems.append((item, reason))
        for path in found:
            key = real_key(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files, problems


def real_key(path: str | os.PathLike[str]) -> str:
    """What identifies a file however it is reached: its real path (links resolved)."""
    return os.path.normcase(os.path.realpath(path))


def is_scan_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file found in a folder, by a pattern or by ``watch`` is a scan.

    False for hidden names, DICOMDIR (a media index) and temporary names (``.part``, ``.tmp``...
    :data:`TEMPORARY_SUFFIXES`: a copy still being written). True for an image, DICOM or video
    suffix (any case); any other name is a scan when its first bytes are a PNG, JPEG, TIFF, DICOM
    (``DICM`` at byte 128, or a bare dataset) or video file, as storage nodes name DICOM files
    ``IMG0001``, ``1.2.840...`` or ``US.1.2.840...``. A link that leads nowhere (dangling, or a
    loop) is taken whatever its name, so that its record says so.
    """
    return skip_reason(path) is None


def skip_reason(path: str | os.PathLike[str]) -> str | None:
    """Why a file found in a folder is not taken as a scan; None when it is one.

    Example:
        >>> skip_reason("export/CINE0001.gif")
        'GIF, a format edge-classify does not read'
    """
    skipped = _skipped(path)
    return None if skipped is None else skipped[0]


def _skipped(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(reason, logging level)`` for a file not taken: a warning where it looks like a scan
    or a video, info for hidden media and DICOMDIR, debug for anything else."""
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name.lower())
    media = suffix in SCAN_SUFFIXES or suffix in _UNREAD_SUFFIXES
    if name.startswith("."):
        return "a hidden name", logging.INFO if media else logging.DEBUG
    if name.lower() in _SKIPPED_NAMES:
        return "a DICOM media index (DICOMDIR), not an image", logging.INFO
    if suffix in TEMPORARY_SUFFIXES or name.endswith("~"):
        media = os.path.splitext(stem)[1] in SCAN_SUFFIXES or _is_scan_head(_head(path))
        reason = "a temporary name: a copy still being written (it is read once renamed)"
        return reason, logging.WARNING if media else logging.DEBUG
    if suffix == ".png" and (written := own_images.written_kind(_head(path))):
        return own_images.describe(written), logging.WARNING
    if suffix in SCAN_SUFFIXES:
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return None  # a dangling link or a loop: nothing to sniff, so decoding says what it is
    head = _head(path)
    if _is_scan_head(head):
        return None
    unread = _UNREAD_SUFFIXES.get(suffix) or next(
        (kind for magic, kind in _UNREAD_MAGIC if head.startswith(magic)), None
    )
    if unread is not None:
        return f"{unread}, a format edge-classify does not read", logging.WARNING
    return "neither its name nor its first bytes are an image, DICOM or video file's", logging.DEBUG


def _log_skipped(path: Path) -> None:
    """Say why a file was left out: nothing is skipped without a word."""
    skipped = _skipped(path)
    if skipped is not None:
        reason, level = skipped
        log.log(level, "%s: not taken as a scan: %s", display_path(path), reason)


def _expand_one(item: str) -> tuple[list[Path], str | None]:
    path = Path(item)
    if path.is_dir():
        found = list(_walk(path))
        return found, None if found else "folder contains no images"
    if os.path.lexists(item):  # files, dangling links, devices: decoding reports on them
        return [path], None
    if _GLOB_CHARS & set(item):
        return _expand_pattern(item)
    return [], "no such file or folder"


def _expand_pattern(pattern: str) -> tuple[list[Path], str | None]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        return [], "pattern matched no files"
    found: list[Path] = []
    for match in map(Path, matches):
        if match.is_dir():
            found.extend(_walk(match))
        elif is_scan_file(match):
            found.append(match)
        else:
            _log_skipped(match)
    count = f"{len(matches)} path" + ("" if len(matches) == 1 else "s")
    return found, None if found else f"pattern matched {count} but no images"


def _walk(folder: Path) -> Iterator[Path]:
    """Scan files under ``folder``, sorted, following links to folders once each (no cycles)."""
    visited: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        key = real_key(root)
        if key in visited:
            dirs[:] = []
            continue
        visited.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if is_scan_file(path):
                yield path
            else:
                _log_skipped(path)


def _is_scan_head(head: bytes) -> bool:
    return sniff(head) in _SNIFFED_SCANS or sniff_video(head) is not None


def _head(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(SNIFF_BYTES)
    except OSError:
        return b""
