"""Turn the CLI's PATH arguments (files, folders, glob patterns) into a list of files.

A file named explicitly is taken as given, whatever its extension: decoding reports what is wrong
with it. Folders are walked recursively in sorted order; globs are expanded sorted. Wherever files
are found (folders, globs, links to either, ``edge-classify watch``) one predicate,
:func:`is_scan_file`, says which are scans, and each file is taken once however many links,
globs or spellings reach it (compared by real path). An argument that yields nothing becomes an
``(argument, reason)`` problem rather than an exception.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_runtime.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, SNIFF_BYTES, sniff

SCAN_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES
_GLOB_CHARS = frozenset("*?[")
_SKIPPED_NAMES = frozenset({"dicomdir"})  # a DICOM media index, never an image
_SNIFFED_SCANS = frozenset({"png", "jpeg", "tiff", "dicom"})  # "BM" alone is too weak a sign


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

    False for hidden names and DICOMDIR (a media index). True for an image or DICOM suffix (any
    case); any other name is a scan when its first bytes are a PNG, JPEG, TIFF or DICOM file
    (``DICM`` at byte 128, or a bare dataset), as storage nodes name DICOM files ``IMG0001``,
    ``1.2.840...`` or ``US.1.2.840...``.
    """
    name = os.path.basename(path)
    if name.startswith(".") or name.lower() in _SKIPPED_NAMES:
        return False
    if os.path.splitext(name)[1].lower() in SCAN_SUFFIXES:
        return True
    return _sniffed_kind(path) in _SNIFFED_SCANS


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


def _sniffed_kind(path: str | os.PathLike[str]) -> str | None:
    try:
        with open(path, "rb") as handle:
            return sniff(handle.read(SNIFF_BYTES))
    except OSError:
        return None
