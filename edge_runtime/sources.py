"""Turn the CLI's PATH arguments (files, folders, glob patterns) into a list of files.

A file named explicitly is taken as given, whatever its extension: decoding reports what is wrong
with it. Folders are walked recursively in sorted order for image and DICOM files; an argument
that yields nothing becomes a ``(argument, reason)`` problem rather than an exception.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_runtime.decode import DICOM_MAGIC, DICOM_SUFFIXES, IMAGE_SUFFIXES

SCAN_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES
_GLOB_CHARS = frozenset("*?[")
_SKIPPED_NAMES = frozenset({"dicomdir"})  # a DICOM media index, never an image


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
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files, problems


def is_scan_file(path: Path) -> bool:
    """Whether a file found in a folder or by a pattern looks like a scan.

    True for an image or DICOM suffix (any case), and for a file with no suffix (or an all-digit
    one, as in UID-named DICOM files) that has ``DICM`` at byte 128.
    """
    if path.name.startswith(".") or path.name.lower() in _SKIPPED_NAMES:
        return False
    suffix = path.suffix.lower()
    if suffix in SCAN_SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():
        return False
    return _has_dicom_magic(path)


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
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if is_scan_file(path):
                yield path


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == DICOM_MAGIC
    except OSError:
        return False
