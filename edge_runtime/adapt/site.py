"""A site's labelled scans for ``edge-classify adapt``: class folders or a CSV manifest."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.io.sources import expand_sources

log = logging.getLogger(__name__)

_MASK = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)  # BUSI-style lesion masks beside the scans


@dataclass(frozen=True)
class SiteScan:
    """One labelled scan file: its class index and the group (patient) it belongs to."""

    path: Path
    label: int
    group: str


def read_site(site: Path, class_names: Sequence[str]) -> list[SiteScan]:
    """The scans of ``site``: a folder ``<class>/<files>`` (searched recursively; files named
    ``*_mask.png`` are skipped) or a CSV manifest ``path,label[,group]`` (paths relative to the
    manifest; an optional header row). Without groups, each file is its own group.

    Raises:
        FileNotFoundError: ``site`` does not exist.
        ValueError: a class folder or label is not one of ``class_names``, a manifest row is
            malformed, or no scans were found.
    """
    if site.is_dir():
        scans = _from_folders(site, class_names)
    elif site.is_file():
        scans = _from_manifest(site, class_names)
    else:
        raise FileNotFoundError(
            f"{site}: no such folder or manifest. Pass a folder with one sub-folder per class "
            f"({', '.join(class_names)}) or a CSV file with rows path,label[,group]."
        )
    if not scans:
        if site.is_dir():
            raise ValueError(f"{site}: holds no scans. Put scans under <class>/ sub-folders.")
        raise ValueError(
            f"{site}: holds no rows of scans. Give one row per scan: path,label,group."
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
    lookup = {name.lower(): index for index, name in enumerate(class_names)}
    try:
        rows = list(csv.reader(manifest.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{manifest}: cannot be read as a CSV manifest: {exc}") from exc
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
        start = 2
    else:
        start = 1
    scans, problems = [], []
    for number, row in enumerate(rows, start):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if len(cells) not in (2, 3) or not cells[0]:
            problems.append(f"line {number}: expected path,label[,group], got {row!r}")
            continue
        label = lookup.get(cells[1].lower())
        if label is None:
            problems.append(f"line {number}: label {cells[1]!r} is not one of {list(class_names)}")
            continue
        path = Path(cells[0])
        path = path if path.is_absolute() else manifest.parent / path
        group = cells[2] if len(cells) == 3 and cells[2] else str(path)
        scans.append(SiteScan(path, label, group))
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        rows = "1 bad row" if len(problems) == 1 else f"{len(problems)} bad rows"
        raise ValueError(f"{manifest}: {rows}: {shown}")
    return scans
