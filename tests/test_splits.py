"""Group-aware stratified splits and folds, and the manifest round trip."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data.datasets import DatasetError, Sample
from training.data.splits import (
    check_every_split,
    groups_to_reach,
    read_manifest,
    scans_for_folds,
    stratified_group_kfold,
    stratified_group_split,
    write_manifest,
)


def _data(seed: int, n: int = 600) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.2, 0.5, 0.3])
    groups = [f"g{i}" for i in rng.integers(0, n // 2, n)]
    return labels, groups


def _crossing(groups: list[str], assigned: list) -> set[str]:
    seen: dict[str, set] = {}
    for group, part in zip(groups, assigned, strict=True):
        seen.setdefault(group, set()).add(part)
    return {g for g, parts in seen.items() if len(parts) > 1}


@pytest.mark.parametrize("seed", range(6))
def test_split_never_crosses_groups_and_keeps_class_proportions(seed: int) -> None:
    labels, groups = _data(seed)
    splits = stratified_group_split(
        labels, groups, val_fraction=0.15, test_fraction=0.15, seed=seed
    )
    assert not _crossing(groups, splits)
    counts = Counter(splits)
    assert abs(counts["test"] / len(labels) - 0.15) < 0.03
    for split in ("train", "val", "test"):
        part = labels[np.array(splits) == split]
        share = np.bincount(part, minlength=3) / len(part)
        assert np.allclose(share, np.bincount(labels, minlength=3) / len(labels), atol=0.06)


@pytest.mark.parametrize("seed", range(6))
def test_kfold_never_crosses_groups_and_balances_folds(seed: int) -> None:
    labels, groups = _data(seed)
    folds = stratified_group_kfold(labels, groups, n_splits=5, seed=seed)
    assert not _crossing(groups, folds)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.min() > 0.8 * len(labels) / 5


def test_split_is_deterministic_and_zero_test_fraction_gives_no_test() -> None:
    labels, groups = _data(0)
    first = stratified_group_split(labels, groups, val_fraction=0.2, test_fraction=0.0, seed=3)
    again = stratified_group_split(labels, groups, val_fraction=0.2, test_fraction=0.0, seed=3)
    assert first == again
    assert set(first) == {"train", "val"}


def test_bad_arguments_are_refused_with_the_value() -> None:
    labels, groups = _data(0, 20)
    with pytest.raises(ValueError, match=r"'val_fraction'.*Got 1\.5"):
        stratified_group_split(labels, groups, val_fraction=1.5, test_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="sum < 1"):
        stratified_group_split(labels, groups, val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="'n_splits'"):
        stratified_group_kfold(labels, groups, n_splits=1, seed=0)
    with pytest.raises(ValueError, match="one group per label"):
        stratified_group_kfold(labels, groups[:-1], n_splits=2, seed=0)


def test_manifest_round_trips_and_export_reads_path_label_split(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    samples = [
        Sample(image, "benign", "busbra", "busbra:1", attributes={"device": "GE"}),
        Sample(image, "normal", "busi"),
    ]
    table = tmp_path / "split.csv"
    write_manifest(table, samples, ["train", "excluded"], ["g0", "g1"])
    manifest = read_manifest(table)
    assert manifest.samples == tuple(samples)
    assert manifest.samples[0].attributes == {"device": "GE"}
    assert manifest.splits == ("train", "excluded") and manifest.groups == ("g0", "g1")
    with table.open() as handle:
        row = next(csv.DictReader(handle))
    assert Path(row["path"]).is_absolute() and row["label"] == "benign" and row["split"] == "train"


def _one_scan_groups(per_class: int) -> tuple[list[str], list[str]]:
    labels = [c for c in ("normal", "benign", "malignant") for _ in range(per_class)]
    return labels, [f"g{i}" for i in range(len(labels))]


@pytest.mark.parametrize("per_class", range(1, 9))
def test_a_split_left_without_a_scan_is_refused_exactly_when_the_split_made_leaves_one_empty(
    per_class: int,
) -> None:
    """At 15% val and 15% test, one-scan groups reach test from 3 a class and val from 5."""
    assert groups_to_reach(val_fraction=0.15, test_fraction=0.15) == {
        "train": 1,
        "test": 3,
        "val": 5,
    }
    labels, groups = _one_scan_groups(per_class)
    fractions = {"val_fraction": 0.15, "test_fraction": 0.15}
    splits = stratified_group_split(labels, groups, **fractions, seed=0)
    if per_class >= 5:
        assert set(splits) == {"train", "val", "test"}
        check_every_split(labels, groups, splits, **fractions, what="DATA")
        return
    empty = "val" if per_class >= 3 else "val and test"
    with pytest.raises(DatasetError) as info:
        check_every_split(labels, groups, splits, **fractions, what="DATA")
    assert str(info.value) == (
        f"DATA: too few scans to split into train/val/test: the {empty} split"
        f"{'s' if per_class < 3 else ''} would get none. Each class's groups of scans (a scan "
        "with its near-copies and its patient's other scans) are dealt out whole, 70/15/15% to "
        "train/val/test, and a class of one-scan groups reaches every split from 5 groups on; "
        f"by class: normal {per_class} scan{'s' * (per_class > 1)} in {per_class} "
        f"group{'s' * (per_class > 1)}, benign {per_class} scan{'s' * (per_class > 1)} in "
        f"{per_class} group{'s' * (per_class > 1)}, malignant {per_class} "
        f"scan{'s' * (per_class > 1)} in {per_class} group{'s' * (per_class > 1)}. Add scans: "
        "5 or more of each class."
    )


def test_one_class_that_reaches_every_split_is_enough_and_the_others_are_warned_of(
    caplog,
) -> None:
    labels = ["benign"] * 5 + ["malignant"] * 2
    groups = [f"g{i}" for i in range(7)]
    splits = stratified_group_split(labels, groups, val_fraction=0.15, test_fraction=0.15, seed=0)
    check_every_split(labels, groups, splits, val_fraction=0.15, test_fraction=0.15, what="DATA")
    assert "class 'malignant' has no scan in the val and test split" in caplog.text
    assert "'benign'" not in caplog.text


def test_a_train_val_split_needs_4_groups_and_folds_need_more_scans_the_fewer_they_are() -> None:
    assert groups_to_reach(val_fraction=0.15, test_fraction=0.0) == {"train": 1, "val": 4}
    needed = {k: scans_for_folds(k, val_fraction=0.15, classes=3) for k in (2, 3, 5)}
    assert needed == {2: 7, 3: 5, 5: 5}
    for folds, per_class in needed.items():  # one scan fewer: some fold has no validation scan
        fewer = [(per_class - 1, False)] if per_class > folds else []  # else scikit-learn refuses
        for count, reached in [(per_class, True), *fewer]:
            labels, groups = _one_scan_groups(count)
            assigned = np.array(stratified_group_kfold(labels, groups, n_splits=folds, seed=0))
            inner = [
                stratified_group_split(
                    [labels[i] for i in rest],
                    [groups[i] for i in rest],
                    val_fraction=0.15,
                    test_fraction=0.0,
                    seed=0,
                )
                for rest in (np.flatnonzero(assigned != k) for k in range(folds))
            ]
            assert all("val" in split for split in inner) is reached
