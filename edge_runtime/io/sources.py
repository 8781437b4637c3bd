"""Turn the CLI's PATH arguments (files, folders, glob patterns) into a list of files.

A file named explicitly is taken as given, whatever its extension: decoding reports what is wrong
with it. Folders are walked recursively in sorted order; globs are expanded sorted. Wherever files
are found (folders, globs, links to either, ``edge-classify watch``) one predicate,
:func:`is_scan_file`, says which are scans (images, DICOM and videos), and each file is taken once
however many links, globs or spellings reach it (compared by real path). An argument that yields
nothing becomes an ``(argument, reason)`` problem rather than an exception.

No file is left out without a word: a folder or pattern's file that looks like a scan or a video
but is not taken (a format edge-classify does not read, a storage node's temporary ``.part``
name, a DICOMDIR index, a hidden name, a heatmap or mask that edge-classify wrote, a named pipe
or device) is logged with the reason (:func:`skip_reason`); a file reached again under another
name is logged once (``b.png: the same file as a.png; classified once``, :class:`Taken`); a
folder that cannot be listed (permission denied) is a problem of its own. A link that leads
nowhere (dangling, or one of a loop) is taken, each under its own name, so that its record says
so. Folders are listed by one walker, :func:`walk_entries`, here and in ``watch``.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
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
        ``("scans/", "folder contains no images")``, and for each folder found that could not be
        listed, such as ``("scans/locked", "folder cannot be listed: permission denied")``.

    Example:
        >>> files, problems = expand_sources(["scan.png", "folder/", "day*/**/*.dcm"])
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    taken = Taken()
    for item in items:
        found, item_problems = _expand_one(item)
        problems += item_problems
        files += [path for path in found if taken.add(path)]
    return files, problems


class Taken:
    """The files taken so far, each once however it is reached (links, globs, spellings:
    compared by :func:`real_key`).

    A file reached again under another name is said once on standard error (a warning:
    ``link.png: the same file as a.png; classified once``); the same name again (``a.png a.png``,
    a folder and a glob over it) is not.

    Example:
        >>> taken = Taken()
        >>> [p for p in [Path("a.png"), Path("link.png")] if taken.add(p)]  # doctest: +SKIP
        [PosixPath('a.png')]
    """

    def __init__(self, said: set[str] | None = None) -> None:
        """``said``: names already reported as duplicates (``watch`` keeps them across polls)."""
        self._first: dict[str, Path] = {}
        self._said = set() if said is None else said

    def add(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is new (then it is taken); False, with a word, for one already taken."""
        key = real_key(path)
        first = self._first.get(key)
        if first is None:
            self._first[key] = Path(path)
            return True
        name = os.path.normcase(os.path.abspath(path))
        if name != os.path.normcase(os.path.abspath(first)) and name not in self._said:
            self._said.add(name)
            log.warning(
                "%s: the same file as %s; classified once", display_path(path), display_path(first)
            )
        return False


def real_key(path: str | os.PathLike[str]) -> str:
    """What identifies a file however it is reached: its real path (links resolved).

    A link that leads nowhere (dangling, or one of a loop) has no real file: it is identified
    by where it lies itself (its folder's real path and its name), so that two such links are
    two entries, each with its own record.
    """
    if os.path.exists(path) or not os.path.lexists(path):
        return os.path.normcase(os.path.realpath(path))
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.normcase(os.path.join(os.path.realpath(folder), name))


def is_scan_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file found in a folder, by a pattern or by ``watch`` is a scan.

    False for hidden names, DICOMDIR (a media index) and temporary names (``.part``, ``.tmp``...
    :data:`TEMPORARY_SUFFIXES`: a copy still being written). True for an image, DICOM or video
    suffix (any case); any other name is a scan when its first bytes are a PNG, JPEG, TIFF, DICOM
    (``DICM`` at byte 128, or a bare dataset) or video file, as storage nodes name DICOM files
    ``IMG0001``, ``1.2.840...`` or ``US.1.2.840...``. A link that leads nowhere (dangling, or a
    loop) is taken whatever its name, so that its record says so. False for a named pipe, socket
    or device (reading one could block forever).
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
    special = _special_kind(path)
    if special is not None:
        return f"not a regular file ({special})", logging.WARNING if media else logging.DEBUG
    if suffix in TEMPORARY_SUFFIXES or name.endswith("~"):
        media = os.path.splitext(stem)[1] in SCAN_SUFFIXES or _is_scan_head(file_head(path))
        reason = "a temporary name: a copy still being written (it is read once renamed)"
        return reason, logging.WARNING if media else logging.DEBUG
    if suffix == ".png" and (written := own_images.written_kind(file_head(path))):
        return own_images.describe(written), logging.WARNING
    if suffix in SCAN_SUFFIXES:
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return None  # a dangling link or a loop: nothing to sniff, so decoding says what it is
    head = file_head(path)
    if _is_scan_head(head):
        return None
    unread = _UNREAD_SUFFIXES.get(suffix) or next(
        (kind for magic, kind in _UNREAD_MAGIC if head.startswith(magic)), None
    )
    if unread is not None:
        return f"{unread}, a format edge-classify does not read", logging.WARNING
    return "neither its name nor its first bytes are an image, DICOM or video file's", logging.DEBUG


def log_skipped(path: str | os.PathLike[str]) -> None:
    """Say why a file found in a folder was left out: nothing is skipped without a word."""
    skipped = _skipped(path)
    if skipped is not None:
        reason, level = skipped
        log.log(level, "%s: not taken as a scan: %s", display_path(path), reason)


def unlisted_reason(exc: OSError) -> str:
    """Why a folder could not be listed, as a record's error: ``folder cannot be listed:
    permission denied``."""
    why = exc.strerror or str(exc) or type(exc).__name__
    return f"folder cannot be listed: {why[:1].lower()}{why[1:]}"


def walk_entries(
    folder: str | os.PathLike[str], unlisted: Callable[[str, OSError], None]
) -> Iterator[os.DirEntry]:
    """Every entry under ``folder`` that is not a folder (files, links that lead nowhere, pipes),
    depth first, sorted by name (a folder's own entries, then its sub-folders'), hidden
    sub-folders skipped, links to folders followed once each (no cycles).

    The one walker of folders, for ``edge-classify PATH...`` and ``watch`` alike.

    Args:
        folder: where to start.
        unlisted: called with ``(folder, error)`` for each folder that cannot be listed
            (permission denied...); not for one that vanished meanwhile (it is gone).
    """
    visited: set[str] = set()
    stack = [os.fspath(folder)]
    while stack:
        current = stack.pop()
        key = real_key(current)
        if key in visited:
            continue
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):  # gone meanwhile
            continue
        except OSError as exc:
            unlisted(current, exc)
            continue
        visited.add(key)
        below = []
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:  # a link loop: an entry of its own
                is_folder = False
            if not is_folder:
                yield entry
            elif not entry.name.startswith("."):
                below.append(entry.path)
        stack.extend(reversed(below))


def _special_kind(path: str | os.PathLike[str]) -> str | None:
    """What a file that is neither a regular file nor a folder is (a named pipe, a socket, a
    device); None for regular files, folders and paths that lead nowhere."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


def _expand_one(item: str) -> tuple[list[Path], list[tuple[str, str]]]:
    path = Path(item)
    if path.is_dir():
        found, problems = _walk(path)
        return found, problems if found or problems else [(item, "folder contains no images")]
    if os.path.lexists(item):  # files, dangling links, devices: decoding reports on them
        return [path], []
    if _GLOB_CHARS & set(item):
        return _expand_pattern(item)
    try:
        os.lstat(item)
    except PermissionError:  # a folder above it cannot be searched
        return [], [(item, "permission denied")]
    except (OSError, ValueError):
        pass
    return [], [(item, "no such file or folder")]


def _expand_pattern(pattern: str) -> tuple[list[Path], list[tuple[str, str]]]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        return [], [(pattern, "pattern matched no files")]
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    for match in map(Path, matches):
        if match.is_dir():
            files, unlisted = _walk(match)
            found += files
            problems += unlisted
        elif is_scan_file(match):
            found.append(match)
        else:
            log_skipped(match)
    if found or problems:
        return found, problems
    count = f"{len(matches)} path" + ("" if len(matches) == 1 else "s")
    return found, [(pattern, f"pattern matched {count} but no images")]


def _walk(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Scan files under ``folder`` (:func:`walk_entries`), and ``(folder, reason)`` for each
    folder under it, itself included, that cannot be listed."""
    problems: list[tuple[str, str]] = []

    def unlisted(where: str, exc: OSError) -> None:
        problems.append((str(Path(where)), unlisted_reason(exc)))

    found = []
    for entry in walk_entries(folder, unlisted):
        path = Path(entry.path)
        if is_scan_file(path):
            found.append(path)
        else:
            log_skipped(path)
    return found, problems


def _is_scan_head(head: bytes) -> bool:
    return sniff(head) in _SNIFFED_SCANS or sniff_video(head) is not None


def file_head(path: str | os.PathLike[str], size: int = SNIFF_BYTES) -> bytes:
    """A regular file's first ``size`` bytes; empty for anything else or an unreadable file (a
    pipe is never opened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return b""
        with open(path, "rb") as handle:
            return handle.read(size)
    except (OSError, ValueError):
        return b""
