"""The scanner-held-out protocol names a scanner one way, from samples and from predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.datasets import Sample
from training.evaluation.protocol import BUSI_SCANNER, fold_scanner, scanner_name, scanner_of
from training.runfolder import HeldOutPredictions


def predictions(sources: list[str], devices: list[str]) -> HeldOutPredictions:
    n = len(sources)
    return HeldOutPredictions(
        paths=[f"s{i}.png" for i in range(n)],
        sources=sources,
        devices=devices,
        labels=["benign"] * n,
        probabilities=np.full((n, 2), 0.5),
        class_names=("benign", "malignant"),
    )


@pytest.mark.parametrize(
    ("source", "device", "expected"),
    [("busi", "", BUSI_SCANNER), ("busbra", "Toshiba", "busbra:Toshiba"), ("clinic", "", "clinic")],
)
def test_a_sample_and_its_prediction_rows_name_the_same_scanner(source, device, expected):
    sample = Sample(
        Path("a.png"), "benign", source, attributes={"device": device} if device else {}
    )
    assert scanner_of(sample) == scanner_name(source, device) == expected
    rows = predictions([source] * 2, [device] * 2)
    assert fold_scanner(rows, Path("predictions.csv")) == expected


def test_a_fold_whose_test_scans_name_two_scanners_or_none_is_refused():
    mixed = predictions(["busbra", "busbra"], ["Toshiba", "GE"])
    with pytest.raises(ValueError, match=r"predictions\.csv: .* one scanner\. Got 2 instead"):
        fold_scanner(mixed, Path("predictions.csv"))
    with pytest.raises(ValueError, match="Got 0 instead"):
        fold_scanner(predictions([], []), Path("predictions.csv"))


def test_a_fold_reports_lesion_scans_called_normal_as_a_count_and_a_rate():
    from training.evaluation.protocol import markdown_table, scanner_metrics

    labels = ["normal", "normal", "benign", "benign", "malignant", "malignant"]
    called = ["normal", "benign", "normal", "benign", "normal", "malignant"]
    names = ("normal", "benign", "malignant")
    held_out = HeldOutPredictions(
        paths=[f"s{i}.png" for i in range(6)],
        sources=["clinic"] * 6,
        devices=[""] * 6,
        labels=labels,
        probabilities=np.eye(3)[[names.index(c) for c in called]] * 0.9 + 0.1 / 3,
        class_names=names,
    )

    report = scanner_metrics(held_out, None)

    assert report["lesion_scans_called_normal"] == 2
    assert report["lesion_scans_called_normal_rate"] == pytest.approx(0.5)
    assert report["normal_recall"] == pytest.approx(0.5)
    assert "lesion scans called normal" in markdown_table({"clinic": report})
