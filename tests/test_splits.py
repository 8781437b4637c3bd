"""Group-aware stratified splits and folds, and the manifest round trip."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data.datasets import Sample
from training.data.splits import (
    read_manifest,
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
