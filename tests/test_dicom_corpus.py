"""pydicom's own bundled test files as a corpus: what pydicom decodes at 8 or 16 bits (and is at
least 32 pixels a side) is classified; every other image file is refused with its reason."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import pytest

from edge_runtime.classifier import Classifier
from edge_runtime.io.reader import MIN_SIDE
from tests.onnx_models import make_contract_model

pydicom = pytest.importorskip("pydicom", minversion="3.0")
from pydicom.data import get_testdata_files  # noqa: E402

MIN_CLASSIFIED = 42  # with the dicom extra: 42 of the 95 files with pixel data (71 frames)


def _expected() -> dict[str, bool]:
    """Every bundled file with pixel data -> whether it should be classified."""
    expected = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            try:
                ds = pydicom.dcmread(name, force=True)
                if "PixelData" not in ds:
                    continue
            except Exception:
                continue
            try:
                ds.pixel_array  # noqa: B018 (pydicom's own verdict)
                decodes = True
            except Exception:
                decodes = False
            big = min(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) >= MIN_SIDE
            expected[name] = decodes and ds.get("BitsAllocated") in (8, 16) and big
    return expected


def test_every_file_pydicom_decodes_is_classified_and_the_rest_refused(tmp_path):
    expected = _expected()
    model = make_contract_model(tmp_path / "model.onnx")
    with Classifier.from_path(model, batch_size=8) as classifier:
        results = classifier.classify(list(expected))
    by_file = defaultdict(list)
    for result in results:
        by_file[result.source].append(result)
    assert set(by_file) == set(expected)  # every file accounted for
    wrong = {}
    for name, classify in expected.items():
        records = by_file[name]
        if classify and not all(r.ok and r.label for r in records):
            wrong[Path(name).name] = [r.error for r in records if not r.ok]
        if not classify and (any(r.ok for r in records) or not all(r.error for r in records)):
            wrong[Path(name).name] = "classified, but pydicom cannot decode it at 8/16 bits"
    assert wrong == {}
    classified = sum(expected.values())
    assert classified >= MIN_CLASSIFIED, f"only {classified} of {len(expected)} classified"
