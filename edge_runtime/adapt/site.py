"""A site's labelled scans for ``edge-classify adapt``: class folders or a CSV manifest.

A manifest is read as edge-train reads its own (training/data/datasets.py): by the header's
column names, in any case and order, extra columns ignored: ``path`` and ``label`` are needed,
and the scan's patient is taken from ``patient``, else ``group``. Paths are relative to the
CSV's folder. A manifest without a header is read as ``path,label[,group]`` rows. Each scan is
listed once: a file listed twice (with the same label or two) is refused, naming both lines, as
edge-train refuses it.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.io.csv_delimiter import csv_delimiter
from edge_runtime.io.sources import expand_sources

log = logging.getLogger(__name__)

_MASK = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)  # BUSI-style lesion masks beside the scans
PATH, LABEL = "path", "label"
GROUP_COLUMNS = ("patient", "group")  # the first with a value names the scan's patient
_HEADERLESS = {PATH: 0, LABEL: 1, "group": 2}  # a manifest without a header: path,label[,group]
_SHOWN = 5  # bad rows named in one message


@dataclass(frozen=True)
class SiteScan:
    """One labelled scan file: its class index and the group (patient) it belongs to."""

    path: Path
    label: int
    group: str  # the patient given, else the file's own path (its own group)
    grouped: bool = False  # whether the site gave the group (a manifest's patient or group)
    line: int = 0  # its manifest line (0: found in a class folder)


def read_site(site: Path, class_names: Sequence[str]) -> list[SiteScan]:
    """The scans of ``site``: a folder ``<class>/<files>`` (searched recursively; files named
    ``*_mask.png`` are skipped) or a CSV manifest (module docstring). Without groups, each file
    is its own group. Files listed that do not exist are kept: they are left out when read.

    Raises:
        FileNotFoundError: ``site`` does not exist.
        ValueError: a class folder or label is not one of ``class_names``, a manifest row is
            malformed, a file is listed twice, none of the listed files exist, or no scans were
            found.
    """
    if site.is_dir():
        scans = _from_folders(site, class_names)
    elif site.is_file():
        scans = _from_manifest(site, class_names)
    else:
        raise FileNotFoundError(
            f"{site}: no such folder or manifest. Pass a folder with one sub-folder per class "
            f"({', '.join(class_names)}) or a CSV file with columns path,label[,patient]."
        )
    if not scans:
        if site.is_dir():
            raise ValueError(f"{site}: holds no scans. Put scans under <class>/ sub-folders.")
        raise ValueError(
            f"{site}: holds no rows of scans. Give one row per scan under a header "
            "path,label,patient."
        )
    return scans


def _from_folders(site: Path, class_names: Sequence[str]) -> list[SiteScan]:
    lookup = {name.lower(): index for index, name in enumerate(class_names)}
    folders = sorted(p for p in site.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name.lower() not in lookup]
    if unknown:
        raise ValueError(
            f"{site}: sub-folders {unknown} are not classes of the model. Name each sub-folder "
            f"after a class: {list(class_names)}."
        )
    loose = [p.name for p in site.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%s: %d files outside the class folders are ignored", site, len(loose))
    scans, masks = [], 0
    for folder in folders:
        files, _ = expand_sources([str(folder)])
        for path in files:
            if _MASK.search(path.stem):
                masks += 1
                continue
            scans.append(SiteScan(path, lookup[folder.name.lower()], str(path)))
    if masks:
        log.info("%s: skipped %d lesion-mask files (*_mask.png)", site, masks)
    return scans


def _from_manifest(manifest: Path, class_names: Sequence[str]) -> list[SiteScan]:
    """The scans a CSV manifest lists (module docstring).

    Raises:
        ValueError: the file is not a UTF-8 CSV, rows are malformed or list a file twice, or
            none of the listed files exist.
    """
    rows = _read_rows(manifest)
    columns, header = _columns(manifest, rows[0][1]) if rows else (_HEADERLESS, False)
    scans, problems = [], []
    for line, cells in rows[1:] if header else rows:
        scan = _scan(manifest, line, cells, columns, header, class_names)
        if isinstance(scan, str):
            if not header and line == rows[0][0]:
                scan += " (a header row must name the columns path and label)"
            problems.append((line, scan))
        else:
            scans.append(scan)
    problems += _listed_twice(scans, class_names)
    if problems:
        problems.sort()
        shown = "; ".join(f"line {line}: {text}" for line, text in problems[:_SHOWN])
        shown += "; ..." if len(problems) > _SHOWN else ""
        count = "1 bad row" if len(problems) == 1 else f"{len(problems)} bad rows"
        raise ValueError(f"{manifest}: {count}: {shown}")
    _check_some_exist(manifest, scans)
    return scans


def _read_rows(manifest: Path) -> list[tuple[int, list[str]]]:
    """Each row of a CSV file that holds a value, with its line number, its cells stripped. Its
    delimiter is a comma, or, in a first line without one, a semicolon (what Excel saves as
    'CSV' where a comma is the decimal separator) or a tab, as edge-train reads its manifests.

    Raises:
        ValueError: the file cannot be read, or is not UTF-8 CSV text.
    """
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            delimiter = csv_delimiter(handle.readline())
            handle.seek(0)
            reader = csv.reader(handle, delimiter=delimiter)
            rows = []
            for row in reader:
                cells = [cell.strip() for cell in row]
                if any(cells):
                    rows.append((reader.line_num, cells))
            return rows
    except UnicodeDecodeError:
        raise ValueError(
            f"{manifest}: is not UTF-8 text; a site manifest must be a UTF-8 CSV with commas: "
            "save it as 'CSV UTF-8 (Comma delimited)'"
        ) from None
    except (OSError, csv.Error) as exc:
        raise ValueError(f"{manifest}: cannot be read as a CSV manifest: {exc}") from exc


def _columns(manifest: Path, first: list[str]) -> tuple[dict[str, int], bool]:
    """Where each column is, and whether ``first`` is a header row: one naming ``path`` and
    ``label`` (any case and order); else the rows are ``path,label[,group]``."""
    names = [cell.lower() for cell in first]
    if PATH not in names or LABEL not in names:
        return _HEADERLESS, False
    columns: dict[str, int] = {}
    for index, name in enumerate(names):
        columns.setdefault(name, index)
    ignored = [
        first[i] for i, n in enumerate(names) if n and n not in (PATH, LABEL, *GROUP_COLUMNS)
    ]
    if ignored:
        log.info("%s: columns %s are not used by adapt", manifest, ", ".join(ignored))
    return columns, True


def _scan(
    manifest: Path,
    line: int,
    cells: list[str],
    columns: dict[str, int],
    header: bool,
    class_names: Sequence[str],
) -> SiteScan | str:
    """The scan a row lists, or what is wrong with the row."""
    if not header and len(cells) not in (2, 3):
        return (
            f"expected path,label[,group] (or a header row naming its columns: path, label, "
            f"patient), got {len(cells)} cells {cells!r}"
        )

    def cell(name: str) -> str:
        index = columns.get(name)
        return cells[index] if index is not None and index < len(cells) else ""

    if not cell(PATH):
        return "the path is empty; name the scan or remove the row"
    lookup = {name.lower(): index for index, name in enumerate(class_names)}
    label = lookup.get(cell(LABEL).lower())
    if label is None:
        return f"label {cell(LABEL)!r} is not one of {list(class_names)}"
    path = Path(cell(PATH))
    path = path if path.is_absolute() else manifest.parent / path
    group = next((cell(name) for name in GROUP_COLUMNS if cell(name)), "")
    return SiteScan(path, label, group or str(path), grouped=bool(group), line=line)


def _listed_twice(scans: list[SiteScan], class_names: Sequence[str]) -> list[tuple[int, str]]:
    """``(line, problem)`` for each row that lists a file an earlier row lists (the same file by
    its resolved path, however it is written), naming both lines and both labels."""
    first: dict[Path, SiteScan] = {}
    problems = []
    for scan in scans:
        earlier = first.setdefault(scan.path.resolve(), scan)
        if earlier is not scan:
            problems.append((scan.line, _twice(earlier, scan, class_names)))
    return problems


def _twice(earlier: SiteScan, scan: SiteScan, class_names: Sequence[str]) -> str:
    was, now = class_names[earlier.label], class_names[scan.label]
    if was == now:
        return (
            f"{scan.path} listed twice, on lines {earlier.line} and {scan.line}, as {now} both "
            f"times; list each scan once: remove line {scan.line}"
        )
    return (
        f"{scan.path} labelled {was} on line {earlier.line} and {now} on line {scan.line}; a "
        "scan has one label: remove the row with the wrong one"
    )


def _check_some_exist(manifest: Path, scans: list[SiteScan]) -> None:
    """Refuse a manifest none of whose files exist: its paths are wrong, not its files.

    Raises:
        ValueError: none of the listed files exist; the message says what paths are relative to.
    """
    if not scans or any(scan.path.exists() for scan in scans):
        return
    folder = manifest.parent.resolve()
    example = scans[0]
    raise ValueError(
        f"{manifest}: none of the {len(scans)} listed files exist (paths are relative to the "
        f"CSV's folder, {folder}): line {example.line} names {example.path}. Write each path "
        "relative to that folder, or absolute."
    )
