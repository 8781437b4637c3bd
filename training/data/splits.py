"""Group-aware, stratified train/val/test splits and k folds, and the split manifest CSV.

Whole groups (duplicates, patients) are assigned, so no group ever crosses a split or fold. The
train/val/test split stratifies each group by its majority label; the folds are scikit-learn's
``StratifiedGroupKFold``. Class proportions stay close to the whole set; deterministic for a
given seed.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.datasets import DatasetError, Sample, check_label

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "group", "source", "patient", "masks")


@dataclass(frozen=True)
class Manifest:
    """A split manifest read back: samples with their split and group, in file order."""

    samples: tuple[Sample, ...]
    splits: tuple[str, ...]
    groups: tuple[str, ...]


def stratified_group_split(
    labels: np.ndarray | Sequence[Hashable],
    groups: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Assign each sample to ``"train"``, ``"val"`` or ``"test"``, whole groups at a time.

    Args:
        labels: one class label per sample.
        groups: one group id per sample; members of a group always share a split.
        val_fraction: target share of images in ``"val"``, in [0, 1).
        test_fraction: target share in ``"test"``, in [0, 1); 0.0 gives train/val only.
        seed: shuffles groups of equal size.

    Returns:
        One split name per sample.

    Raises:
        ValueError: fractions out of range or summing to 1 or more, or mismatched lengths.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"The '{name}' parameter of stratified_group_split must be in [0, 1). "
                f"Got {value!r} instead."
            )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must leave images for training (sum < 1). "
            f"Got {val_fraction} + {test_fraction} instead."
        )
    shares = {"test": test_fraction, "val": val_fraction}
    shares["train"] = 1.0 - val_fraction - test_fraction
    names = [s for s in ("test", "val", "train") if shares[s] > 0]
    bins = _assign(labels, groups, [shares[s] for s in names], seed, "stratified_group_split")
    return [names[b] for b in bins]


def stratified_group_kfold(
    labels: np.ndarray | Sequence[Hashable],
    groups: Sequence[str],
    *,
    n_splits: int,
    seed: int,
) -> list[int]:
    """Assign each sample a fold index in ``range(n_splits)``, whole groups at a time, with
    scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``): each fold's test part is
    the fold.

    Raises:
        ValueError: ``n_splits`` below 2 or above the number of groups, or mismatched lengths.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    if len(labels) != len(groups):
        raise ValueError(
            f"stratified_group_kfold needs one group per label. Got {len(labels)} labels and "
            f"{len(groups)} groups instead."
        )
    count = len(set(groups))
    if not 2 <= n_splits <= count:
        raise ValueError(
            "The 'n_splits' parameter of stratified_group_kfold must be between 2 and the number "
            f"of groups ({count}). Got {n_splits!r} instead."
        )
    folds = np.zeros(len(labels), int)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, list(groups))):
        folds[test] = k
    return folds.tolist()


def write_manifest(
    path: str | os.PathLike[str],
    samples: Sequence[Sample],
    splits: Sequence[str],
    groups: Sequence[str],
) -> None:
    """Write one CSV row per sample: path (absolute), label, split, group, source, patient, masks,
    then one column per attribute key.

    Raises:
        ValueError: the three sequences differ in length.
    """
    if not len(samples) == len(splits) == len(groups):
        raise ValueError(
            f"samples, splits and groups must have the same length. Got {len(samples)}, "
            f"{len(splits)} and {len(groups)} instead."
        )
    extra = sorted({k for s in samples for k in s.attributes} - set(MANIFEST_COLUMNS))
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*MANIFEST_COLUMNS, *extra])
        for sample, split, group in zip(samples, splits, groups, strict=True):
            masks = ";".join(str(m.resolve()) for m in sample.masks)
            fixed = [sample.path.resolve(), sample.label, split, group, sample.source]
            writer.writerow(
                [
                    *fixed,
                    sample.patient or "",
                    masks,
                    *(sample.attributes.get(k, "") for k in extra),
                ]
            )


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest written by :func:`write_manifest`; relative paths are resolved against
    the CSV's folder.

    Raises:
        DatasetError: the file is missing, lacks a column, or holds an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found; check the path")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [
            c for c in ("path", "label", "split", "group") if c not in (reader.fieldnames or ())
        ]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)}; a split manifest needs "
                "path, label, split and group (write it with write_manifest)"
            )
        rows = list(reader)
    samples, splits, groups = [], [], []
    for line, row in enumerate(rows, start=2):
        samples.append(
            Sample(
                path=path.parent / row["path"],
                label=check_label(row["label"], f"{path}, line {line}"),
                source=row.get("source") or path.parent.name,
                patient=row.get("patient") or None,
                masks=tuple(path.parent / m for m in (row.get("masks") or "").split(";") if m),
                attributes={k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and k and v},
            )
        )
        splits.append(row["split"])
        groups.append(row["group"])
    return Manifest(samples=tuple(samples), splits=tuple(splits), groups=tuple(groups))


def _assign(
    labels: np.ndarray | Sequence[Hashable],
    groups: Sequence[str],
    shares: Sequence[float],
    seed: int,
    caller: str,
) -> list[int]:
    """Greedy: per majority label, largest groups first, each into the bin furthest below its
    target share of that label's images."""
    labels = list(np.asarray(labels).tolist())
    if len(labels) != len(groups):
        raise ValueError(
            f"{caller} needs one group per label. Got {len(labels)} labels and {len(groups)} "
            "groups instead."
        )
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    rng = np.random.default_rng(seed)
    order = sorted(members)
    order = [order[i] for i in rng.permutation(len(order))]
    strata: dict[Hashable, list[str]] = defaultdict(list)
    for group in order:
        votes = Counter(labels[i] for i in members[group]).most_common()
        strata[min(lab for lab, n in votes if n == votes[0][1])].append(group)
    assigned = np.zeros(len(labels), int)
    for label in sorted(strata, key=str):
        stratum = sorted(strata[label], key=lambda g: -len(members[g]))  # stable: keeps shuffle
        if len(stratum) < len(shares):
            log.warning(
                "class %r has only %d group(s) for %d splits: some splits will lack it",
                label,
                len(stratum),
                len(shares),
            )
        total = sum(len(members[g]) for g in stratum)
        filled = np.zeros(len(shares))
        for group in stratum:
            deficit = np.asarray(shares) * total - filled
            target = int(np.argmax(deficit))
            filled[target] += len(members[group])
            assigned[members[group]] = target
    return assigned.tolist()
