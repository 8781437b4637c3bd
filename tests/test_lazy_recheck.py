"""The FP32 partner: checked from its metadata at start, its session opened only when needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_runtime.classifier import Classifier
from edge_runtime.model.contract import ContractError
from edge_runtime.model.onnx_meta import MetadataError, read_metadata
from edge_runtime.model.session import Provider, open_model
from tests.test_recheck import FP32_SPEC, _images, _pair


def test_metadata_is_read_without_a_session_and_matches_onnxruntime(tmp_path):
    path = _pair(tmp_path, margin=0.3)
    session = open_model(path, provider=Provider.CPU).session
    assert read_metadata(path) == dict(session.get_modelmeta().custom_metadata_map)


def test_not_an_onnx_file_is_a_metadata_error(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(MetadataError):
        read_metadata(path)


def test_the_partner_session_opens_only_when_a_scan_needs_it(tmp_path):
    images = _images(4)
    sure = _pair(tmp_path / "sure", margin=1e-9)  # no lead is below this: nothing rechecked
    with Classifier.from_path(sure, provider=Provider.CPU) as clf:
        assert clf.recheck_model_path == tmp_path / "sure" / "m-fp32.onnx"
        clf.run_raw(images)
        assert not clf._recheck.opened
    unsure = _pair(tmp_path / "unsure", margin=1.0)  # every scan rechecked
    with Classifier.from_path(unsure, provider=Provider.CPU) as clf:
        assert not clf._recheck.opened
        probabilities, _ = clf.run_raw(images)
        assert clf._recheck.opened
    fp32 = open_model(tmp_path / "unsure" / "m-fp32.onnx", provider=Provider.CPU)
    expected = fp32.session.run(["probabilities"], {"image": images})[0]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)


def test_a_mismatched_partner_fails_at_start_before_any_scan(tmp_path):
    path = _pair(tmp_path, margin=0.3, fp32_spec=replace(FP32_SPEC, input_size=96))
    with pytest.raises(ContractError, match="input_size is 96"):
        Classifier.from_path(path, provider=Provider.CPU)


def test_a_partner_that_does_not_match_its_card_fails_at_start_whatever_the_scans(tmp_path):
    """A damaged partner was found at the first scan INT8 was unsure of: a run of confident
    scans exited 0, one with an unsure scan stopped midway. Now both fail at start."""
    import json

    from edge_runtime.model.card import card_path_for, file_sha256

    sure = _pair(tmp_path, margin=1e-9)  # no scan would be rechecked
    partner = tmp_path / "m-fp32.onnx"
    files = {sure.name: {"sha256": file_sha256(sure)}, partner.name: {"sha256": "0" * 64}}
    card_path_for(sure).write_text(json.dumps({"files": files}))
    with pytest.raises(ContractError, match=r"m-fp32.onnx: SHA-256 .* --no-recheck"):
        Classifier.from_path(sure, provider=Provider.CPU)
    files[partner.name]["sha256"] = file_sha256(partner)
    card_path_for(sure).write_text(json.dumps({"files": files}))
    with Classifier.from_path(sure, provider=Provider.CPU) as clf:
        assert clf.recheck_model_path == partner


def test_the_partner_is_checked_without_reading_its_unfamiliar_statistics():
    """The unfamiliar score is the INT8 model's: the bundled FP32 partner's statistics (tens of
    KB of JSON) are left unread at start, and read when its session opens."""
    from edge_runtime.classifier import default_model_path
    from edge_runtime.model.session import open_recheck_model

    int8 = open_model(default_model_path("int8"), provider=Provider.CPU)
    partner = open_recheck_model(int8, provider=Provider.CPU)
    assert "threshold" in int8.spec.unfamiliar and partner.spec.unfamiliar == {}
    assert "threshold" in partner.load().spec.unfamiliar
