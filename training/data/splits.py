"""Group-aware, stratified train/val/test splits and k folds, and the split manifest CSV.

Whole groups (duplicates, patients) are assigned, so no group ever crosses a split or fold. The
train/val/test split stratifies each group by its majority label; the folds are scikit-learn's
``StratifiedGroupKFold``. Class proportions stay close to the whole set; deterministic for a
given seed. A split too small for every part to get a scan is refused by
:func:`check_every_split`, which says how many groups a class needs (:func:`groups_to_reach`).
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

from training.data.datasets import LABELS, DatasetError, Sample, check_label

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
    splits = [names[b] for b in bins]
    _warn_missing_classes(labels, splits, names)
    return splits


def groups_to_reach(*, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many groups of one scan a class needs before :func:`stratified_group_split` deals one
    of them to each split it makes (``{"test": 3, "val": 5, "train": 1}`` at 15% and 15%).

    Every class is dealt out on its own, so a split gets a scan when one class reaches it.
    Groups of several scans are dealt largest first, and may reach a split from fewer groups.
    """
    shares = {"test": test_fraction, "val": val_fraction}
    shares["train"] = 1.0 - val_fraction - test_fraction
    names = [s for s in ("test", "val", "train") if shares[s] > 0]
    needed: dict[str, int] = {}
    count = 0
    while len(needed) < len(names):
        count += 1
        for b in _deal([1] * count, [shares[s] for s in names]):
            needed.setdefault(names[b], count)
    return needed


def check_every_split(
    labels: Sequence[str],
    groups: Sequence[str],
    splits: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
    what: str,
    advice: str | None = None,
) -> None:
    """Refuse a :func:`stratified_group_split` that left a split it makes without a scan.

    Args:
        labels: the class name of each scan that was split.
        groups: their groups.
        splits: their splits; a scan kept out (``"excluded"``) is in none.
        val_fraction: as the split was made.
        test_fraction: as the split was made.
        what: the scans that were split, the message's first words (``"DATA"``).
        advice: the message's last sentence, what to do (default: add scans, as many of each
            class as :func:`groups_to_reach` says).

    Raises:
        DatasetError: a split without a scan, with how many groups a class needs to reach every
            split and how many each class has.
    """
    shares = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction}
    shares["test"] = test_fraction
    made = [s for s in SPLITS if shares[s] > 0]
    empty = [s for s in made if s not in set(splits)]
    if not empty:
        return
    needed = max(groups_to_reach(val_fraction=val_fraction, test_fraction=test_fraction).values())
    scans = Counter(labels)
    in_groups = Counter(label for label, _ in set(zip(labels, groups, strict=True)))
    order = [c for c in LABELS if c in scans] + sorted(set(scans) - set(LABELS))
    found = ", ".join(
        f"{c} {_count(scans[c], 'scan')} in {_count(in_groups[c], 'group')}" for c in order
    )
    kept_out = sum(s == "excluded" for s in splits)
    if kept_out:
        found += f" ({kept_out} of them in conflicted duplicate groups, kept out)"
    raise DatasetError(
        f"{what}: too few scans to split into {'/'.join(made)}: the {' and '.join(empty)} "
        f"split{'s' if len(empty) > 1 else ''} would get none. Each class's groups of scans (a "
        "scan with its near-copies and its patient's other scans) are dealt out whole, "
        f"{'/'.join(str(round(100 * shares[s])) for s in made)}% to {'/'.join(made)}, and a "
        f"class of one-scan groups reaches every split from {needed} groups on; by class: "
        f"{found}. {advice or f'Add scans: {needed} or more of each class.'}"
    )


def scans_for_folds(n_splits: int, *, val_fraction: float, classes: int) -> int:
    """How many one-scan groups of each of ``classes`` classes :func:`stratified_group_kfold`
    needs before every one of its ``n_splits`` folds leaves a validation split in the other
    folds' scans (:func:`stratified_group_split` with ``val_fraction`` and no test split).

    Raises:
        ValueError: ``val_fraction`` not in (0, 1), or fewer than 2 folds or classes.
    """
    if not (0.0 < val_fraction < 1.0 and n_splits >= 2 and classes >= 2):
        raise ValueError(
            "scans_for_folds needs val_fraction in (0, 1), n_splits >= 2 and classes >= 2. Got "
            f"{val_fraction!r}, {n_splits!r} and {classes!r} instead."
        )
    shares = [val_fraction, 1.0 - val_fraction]  # as stratified_group_split orders them
    count = n_splits  # fewer scans than folds in every class: scikit-learn refuses
    while True:
        labels = np.repeat(np.arange(classes), count)
        groups = [str(i) for i in range(len(labels))]
        folds = np.array(stratified_group_kfold(labels, groups, n_splits=n_splits, seed=0))
        if all(
            0 in _assign(labels[rest], [groups[i] for i in rest], shares, 0, "scans_for_folds")
            for rest in (np.flatnonzero(folds != k) for k in range(n_splits))
        ):
            return count
        count += 1


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


def _warn_missing_classes(
    labels: np.ndarray | Sequence[Hashable], splits: Sequence[str], names: Sequence[str]
) -> None:
    """Warn of each class that a split got no scan of, while other classes' scans are in it:
    that split's metrics leave the class out. (A split without any scan is
    :func:`check_every_split`'s to refuse.)"""
    labels = np.asarray(labels).tolist()
    present = set(splits)
    for label in sorted(set(labels), key=str):
        got = {s for lab, s in zip(labels, splits, strict=True) if lab == label}
        lacking = [s for s in SPLITS if s in names and s in present and s not in got]
        if lacking:
            log.warning(
                "class %r has no scan in the %s split: too few of its scans (or groups of them) "
                "to deal one to every split",
                label,
                " and ".join(lacking),
            )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


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
        bins = _deal([len(members[g]) for g in stratum], shares)
        for group, target in zip(stratum, bins, strict=True):
            assigned[members[group]] = target
    return assigned.tolist()


def _deal(sizes: Sequence[int], shares: Sequence[float]) -> list[int]:
    """The bin of each group of ``sizes`` scans, dealt in order: the bin furthest below its
    target share of all the scans."""
    total = sum(sizes)
    filled = np.zeros(len(shares))
    bins = []
    for size in sizes:
        deficit = np.asarray(shares) * total - filled
        target = int(np.argmax(deficit))
        filled[target] += size
        bins.append(target)
    return bins
