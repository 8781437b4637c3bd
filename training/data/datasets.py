"""Finding labelled scans on disk: BUSI, BUS-BRA, class-folder trees and manifest CSVs.

Each root is inspected and its layout detected (:class:`Layout`); the result is a flat list of
:class:`Sample` records. A class folder's files, sub-folders included, are taken as
``edge-classify`` takes a folder's (:mod:`edge_runtime.io.sources`: images, DICOM and videos), and
each file left out is logged with the reason. Only existence is checked here: undecodable files
are reported when the images are loaded, each by :func:`read_scan` as ``edge-classify`` decodes
it (PNG, JPEG, BMP, TIFF, DICOM: the tissue region where the file has one), one image a file: a
cine, a multi-page TIFF or a dual view is refused. No TensorFlow.

Example:
    >>> discovery = discover_all([Path("data/busi/Dataset_BUSI_with_GT")])  # doctest: +SKIP
    >>> print(discovery.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import difflib
import enum
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.io.csv_delimiter import csv_delimiter
from edge_runtime.io.decode import InputError, open_scan
from edge_runtime.io.sources import is_scan_file, log_skipped, unlisted_reason, walk_entries
from edge_runtime.model.card import file_sha256

log = logging.getLogger(__name__)

LABELS = ("normal", "benign", "malignant")
BUSBRA_CSV = "bus_data.csv"
BUSBRA_COLUMNS = ("ID", "Case", "Pathology")
BUSBRA_ATTRIBUTES = {
    "Device": "device",
    "BIRADS": "birads",
    "Histology": "histology",
    "Side": "side",
}
MANIFEST_COLUMNS = ("path", "label")
_MASK = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$", re.IGNORECASE)
_BUSI_NAME = re.compile(r"^(normal|benign|malignant) \(\d+\)$", re.IGNORECASE)


class DatasetError(ValueError):
    """A data root is missing, empty or malformed; the message names the path, problem and fix."""


class Layout(enum.Enum):
    """How a data root is organised."""

    BUSI = "busi"  # <root>/<class>/<name>.png with <name>_mask[_k].png
    BUSBRA = "busbra"  # Images/, Masks/, bus_data.csv
    FOLDERS = "folders"  # <root>/<class>/[<sub-folders>/]<any scan file>
    MANIFEST = "manifest"  # a CSV file with path,label[,group,patient,source,masks,device,...]


@dataclass(frozen=True)
class Sample:
    """One labelled scan.

    Attributes:
        path: the image file.
        label: one of :data:`LABELS`.
        source: the data set it came from (``"busi"``, ``"busbra"`` or the folder name).
        patient: a source-prefixed patient or group id (``"busbra:123"``), or None when unknown.
        masks: lesion mask files paired with the image (never samples themselves).
        attributes: extra metadata, e.g. ``{"device": ...}`` for BUS-BRA.
    """

    path: Path
    label: str
    source: str
    patient: str | None = None
    masks: tuple[Path, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover_all` found: the samples and the layout detected for each root."""

    samples: tuple[Sample, ...]
    layouts: tuple[tuple[Path, Layout], ...]

    def summary(self) -> str:
        """A text table of image counts per source (rows) and class (columns)."""
        counts = Counter((s.source, s.label) for s in self.samples)
        sources = sorted({s.source for s in self.samples})
        labels = [c for c in LABELS if any(lab == c for _, lab in counts)]
        width = max([len("source"), len("total"), *map(len, sources)])
        head = f"{'source':<{width}}" + "".join(f" {c:>9}" for c in [*labels, "total"])
        lines = [head, "-" * len(head)]
        for source in [*sources, "total"]:
            row = [
                sum(n for (s, lab), n in counts.items() if lab == c and source in (s, "total"))
                for c in labels
            ]
            lines.append(f"{source:<{width}}" + "".join(f" {n:>9}" for n in [*row, sum(row)]))
        return "\n".join(lines)


def discover_all(roots: Iterable[str | Path]) -> Discovery:
    """Discover the samples under every root, detecting each root's layout.

    Raises:
        DatasetError: no roots, a root missing or empty, an unknown class, a malformed CSV, or
            the same file listed under two roots.
    """
    samples: list[Sample] = []
    layouts: list[tuple[Path, Layout]] = []
    owner: dict[Path, Path] = {}
    for root in map(Path, roots):
        layout = detect_layout(root)
        layouts.append((root, layout))
        for sample in discover(root, layout):
            key = sample.path.resolve()
            if key in owner:
                raise DatasetError(
                    f"{sample.path}: listed under both {owner[key]} and {root}; "
                    "pass each data set only once"
                )
            owner[key] = root
            samples.append(sample)
    if not layouts:
        raise DatasetError("no data roots given: pass at least one data folder or manifest CSV")
    return Discovery(samples=tuple(samples), layouts=tuple(layouts))


def detect_layout(root: str | Path) -> Layout:
    """Tell how ``root`` is organised.

    Raises:
        DatasetError: the root does not exist, or is a file that is not a CSV.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return Layout.MANIFEST
        raise DatasetError(
            f"{root}: a data root must be a folder or a manifest CSV (path,label), not a "
            f"{root.suffix or 'suffix-less'} file"
        )
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found; check the path")
    if (root / BUSBRA_CSV).is_file() and (root / "Images").is_dir():
        return Layout.BUSBRA
    names = [p.stem for d in _class_dirs(root) for p in _scan_files(d)[0]]
    scans = [n for n in names if not _MASK.match(n)]
    has_masks = len(scans) < len(names)
    # BUSI's own names, every one: a clinic's "benign (3).png" beside its own is not BUSI
    busi_names = bool(scans) and all(_BUSI_NAME.match(n) for n in scans)
    if has_masks and ("busi" in root.name.lower() or busi_names):
        return Layout.BUSI
    return Layout.FOLDERS


def discover(root: str | Path, layout: Layout | None = None) -> list[Sample]:
    """The samples under one root, in sorted path order.

    Args:
        root: a data folder or a manifest CSV.
        layout: how it is organised; detected when None.

    Raises:
        DatasetError: see :func:`discover_all`.
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout is Layout.BUSBRA:
        samples = _discover_busbra(root)
    elif layout is Layout.MANIFEST:
        samples = _discover_manifest(root)
    else:
        source = "busi" if layout is Layout.BUSI else root.name
        samples = _discover_class_tree(root, source)
    if not samples:
        raise DatasetError(f"{root}: no images found; expected {_LAYOUT_HELP[layout]}")
    return samples


def check_label(label: str, where: str, fix: str = "Fix the label.") -> str:
    """Normalise a class name (case, spaces) and check it is one of :data:`LABELS`.

    Args:
        label: the class name as found.
        where: what the message names first (the folder, or the CSV and its line).
        fix: the message's last sentence, what to do (``"Rename the folder."``).

    Raises:
        DatasetError: an empty or unknown class name, with a did-you-mean suggestion.
    """
    clean = label.strip().lower()
    if clean in LABELS:
        return clean
    close = difflib.get_close_matches(clean, LABELS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    found = f"unknown class {label!r}" if clean else "no class given"
    raise DatasetError(f"{where}: {found}; classes must be one of {', '.join(LABELS)}.{hint} {fix}")


def read_scan(path: str | os.PathLike[str]) -> np.ndarray:
    """A sample's scan as 2-D uint8 gray, decoded as ``edge-classify`` decodes it
    (:func:`edge_runtime.io.decode.open_scan`).

    Raises:
        InputError: the file cannot be read, or holds several images (frames, pages or tissue
            regions): its label cannot say which one it describes.
    """
    scan = open_scan(path)
    if scan.count > 1:
        raise InputError(
            path,
            f"holds {scan.count} images (frames, pages or tissue regions); a training scan is "
            "one image, the one its label describes: save that one as a file of its own",
        )
    return scan.read(0, 1)[0]


def fingerprint(samples: Sequence[Sample]) -> str:
    """A SHA-256 over the sorted (file name, label, content hash) of every sample.

    Content-based, so it does not depend on where the data lives, nor on the sample order.
    """
    rows = sorted(f"{s.path.name}\t{s.label}\t{file_sha256(s.path)}" for s in samples)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


_LAYOUT_HELP = {
    Layout.BUSI: "<root>/<class>/<name>.png with <name>_mask.png masks",
    Layout.BUSBRA: "Images/<ID>.png listed in bus_data.csv",
    Layout.FOLDERS: "<root>/<class>/<scan> with class folders named normal, benign, malignant "
    "(scans: PNG, JPEG, BMP, TIFF or DICOM files, also in sub-folders)",
    Layout.MANIFEST: "rows of path,label with image paths relative to the CSV",
}


def _scan_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The scan files under a class folder, sub-folders included, as ``edge-classify`` finds
    them (:func:`edge_runtime.io.sources.is_scan_file`), and the files it would leave out.

    Raises:
        DatasetError: a folder under it cannot be listed.
    """

    def unlisted(where: str, exc: OSError) -> None:
        raise DatasetError(f"{where}: {unlisted_reason(exc)}")

    scans: list[Path] = []
    others: list[Path] = []
    for entry in walk_entries(folder, unlisted):
        path = Path(entry.path)
        (scans if is_scan_file(path) else others).append(path)
    return scans, others


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _discover_class_tree(root: Path, source: str) -> list[Sample]:
    dirs = _class_dirs(root)
    if not dirs:
        raise DatasetError(f"{root}: no class folders; expected {_LAYOUT_HELP[Layout.FOLDERS]}")
    samples: list[Sample] = []
    for folder in dirs:
        label = check_label(folder.name, str(folder), "Rename the folder.")
        files, others = _scan_files(folder)
        for path in others:
            log_skipped(path)
        # keyed by the path without its suffix: <name>_mask.png pairs with <name> beside it
        images = {p.with_suffix(""): p for p in files if not _MASK.match(p.stem)}
        masks: dict[Path, list[Path]] = {}
        for p in files:
            match = _MASK.match(p.stem)
            if match:
                masks.setdefault(p.parent / match["base"], []).append(p)
        orphans = sorted(set(masks) - set(images))
        if orphans:
            log.warning(
                "%s: %d masks without an image, ignored (e.g. %s)",
                folder,
                len(orphans),
                masks[orphans[0]][0].relative_to(folder),
            )
        if not images:
            raise DatasetError(f"{folder}: class folder holds no images; add images or remove it")
        samples.extend(
            Sample(path=p, label=label, source=source, masks=tuple(masks.get(stem, ())))
            for stem, p in sorted(images.items())
        )
    return samples


def _read_csv(
    path: Path, required: Sequence[str], *, any_case: bool = False
) -> list[tuple[int, dict[str, str]]]:
    """Each row of a UTF-8 CSV file with its line number, keyed by the header's names (in lower
    case with ``any_case``, so that ``Path,Label`` reads as ``path,label``), delimited as its
    header line says (:func:`~edge_runtime.io.csv_delimiter.csv_delimiter`).

    Raises:
        DatasetError: the file is not UTF-8, or its header lacks a ``required`` name.
    """

    def name(column: str) -> str:
        return column.strip().lower() if any_case else column.strip()

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            delimiter = csv_delimiter(handle.readline())
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = [name(c) for c in reader.fieldnames or ()]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetError(
                    f"{path}: missing column(s) {', '.join(missing)}; found {columns or 'none'}. "
                    f"The header must include {', '.join(required)}."
                )
            return [
                (reader.line_num, {name(k): (v or "").strip() for k, v in row.items() if k})
                for row in reader
            ]
    except UnicodeDecodeError:
        utf16 = path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
        what = "UTF-16 text (Excel's 'Unicode text', tab-separated)" if utf16 else "not UTF-8"
        raise DatasetError(
            f"{path}: the file is {what}; a CSV must be UTF-8 text with commas: save it as "
            "'CSV UTF-8 (Comma delimited)'"
        ) from None


def _discover_busbra(root: Path) -> list[Sample]:
    table = root / BUSBRA_CSV
    samples: list[Sample] = []
    missing: list[str] = []
    for line, row in _read_csv(table, BUSBRA_COLUMNS):
        path = root / "Images" / f"{row['ID']}.png"
        if not path.is_file():
            missing.append(path.name)
            continue
        mask = root / "Masks" / f"mask_{row['ID'].removeprefix('bus_')}.png"
        samples.append(
            Sample(
                path=path,
                label=check_label(
                    row["Pathology"], f"{table}, line {line}", f"Fix its Pathology on line {line}."
                ),
                source="busbra",
                patient=f"busbra:{row['Case']}",
                masks=(mask,) if mask.is_file() else (),
                attributes={v: row[k] for k, v in BUSBRA_ATTRIBUTES.items() if row.get(k)},
            )
        )
    if missing:
        raise DatasetError(
            f"{root / 'Images'}: {len(missing)} image(s) listed in {BUSBRA_CSV} not found "
            f"(e.g. {', '.join(missing[:3])}); restore them or remove their rows"
        )
    return samples


def _discover_manifest(table: Path) -> list[Sample]:
    rows = _read_csv(table, MANIFEST_COLUMNS, any_case=True)
    default_source = table.parent.name or table.stem
    reserved = {"path", "label", "split", "group", "source", "patient", "masks"}
    samples: list[Sample] = []
    listed: dict[Path, tuple[int, str, str]] = {}  # file -> (line, path as written, label)
    missing: list[str] = []
    missing_masks: list[str] = []
    for line, row in rows:
        if not row["path"]:
            raise DatasetError(
                f"{table}, line {line}: the path is empty; name the image or remove the row"
            )
        path = _listed_path(table, row["path"])
        if not path.is_file():
            missing.append(f"line {line}: {row['path']}")
            continue
        label = check_label(row["label"], f"{table}, line {line}", f"Fix the label on line {line}.")
        _check_listed_once(table, listed, path, line, row["path"], label)
        masks = [m.strip() for m in row.get("masks", "").split(";") if m.strip()]
        mask_paths = [_listed_path(table, m) for m in masks]
        missing_masks += [
            f"line {line}: {m}" for m, p in zip(masks, mask_paths, strict=True) if not p.is_file()
        ]
        source = row.get("source") or default_source
        patient = row.get("patient") or (f"{source}:{row['group']}" if row.get("group") else None)
        samples.append(
            Sample(
                path=path,
                label=label,
                source=source,
                patient=patient,
                masks=tuple(mask_paths),
                attributes={k: v for k, v in row.items() if k not in reserved and v},
            )
        )
    if missing:
        raise DatasetError(
            f"{table}: {len(missing)} listed image(s) not found (e.g. {'; '.join(missing[:3])}); "
            "paths are relative to the CSV's folder: fix them or remove the rows"
        )
    if missing_masks:
        raise DatasetError(
            f"{table}: {len(missing_masks)} listed mask(s) not found "
            f"(e.g. {'; '.join(missing_masks[:3])}); paths are relative to the CSV's folder: fix "
            "them, or empty the masks cell of a scan that has no mask"
        )
    return samples


def _listed_path(table: Path, written: str) -> Path:
    """A path as a manifest lists it: absolute, or relative to the manifest's folder."""
    path = Path(written)
    return path if path.is_absolute() else table.parent / path


def _check_listed_once(
    table: Path,
    listed: dict[Path, tuple[int, str, str]],
    path: Path,
    line: int,
    written: str,
    label: str,
) -> None:
    """Record that ``table``'s ``line`` lists ``path`` with ``label``; refuse a second row for
    the same file (however its path is written), naming both lines.

    Raises:
        DatasetError: an earlier line lists the same file, with the same label or another.
    """
    key = path.resolve()
    if key not in listed:
        listed[key] = (line, written, label)
        return
    first, first_written, first_label = listed[key]
    scan = written if written == first_written else f"{first_written} and {written}, one file,"
    if label == first_label:
        raise DatasetError(
            f"{table}, lines {first} and {line}: {scan} listed twice, as {label} both times; "
            f"list each scan once: remove line {line}"
        )
    raise DatasetError(
        f"{table}, lines {first} and {line}: {scan} labelled {first_label} on line {first} and "
        f"{label} on line {line}; a scan has one label: remove the row with the wrong one"
    )
