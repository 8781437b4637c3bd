"""The dataset-identity probe of training.probes.identity."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.model.contract import ResizePolicy
from training.data.datasets import Sample
from training.probes.identity import SourceGuess, measure, probe_guesses, summarize

CLASSES = ("normal", "benign", "malignant")


def test_the_probe_reads_a_source_that_is_in_the_features_and_not_one_that_is_not():
    rng = np.random.default_rng(0)
    sources = np.repeat(np.array(["a", "b"]), 60)
    noise = rng.normal(size=(120, 20))
    marked = noise + (sources == "b")[:, None] * 1.5
    assert (probe_guesses(marked, sources) == sources).mean() > 0.9
    assert 0.3 < (probe_guesses(noise, sources) == sources).mean() < 0.7


def test_the_probe_needs_two_sources():
    with pytest.raises(ValueError, match="two sources"):
        probe_guesses(np.zeros((6, 2)), np.array(["a"] * 6))


def test_summary_is_balanced_over_sources_overall_and_per_class():
    rows = [SourceGuess(str(i), "a", "benign", "benign", "a", "a") for i in range(9)]
    rows.append(SourceGuess("x", "b", "malignant", "benign", "a", "b"))
    summary = summarize(rows)
    assert summary["all"]["n"] == 10
    assert summary["all"]["features_balanced_accuracy"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert summary["all"]["pixels_balanced_accuracy"] == pytest.approx(1.0)
    assert summary["benign"]["n"] == 9


def test_measure_keeps_the_shared_classes_and_skips_bad_files(tmp_path):
    keras = pytest.importorskip("keras")
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier

    rng = np.random.default_rng(0)
    samples = []
    for source, level in (("dark", 60), ("bright", 180)):
        for i in range(12):
            label = ("benign", "malignant")[i % 2]
            path = tmp_path / f"{source}{i}.png"
            cv2.imwrite(str(path), rng.normal(level, 20, (48, 48)).clip(0, 255).astype(np.uint8))
            samples.append(Sample(path, label, source))
    cv2.imwrite(str(tmp_path / "n.png"), np.zeros((48, 48), np.uint8))
    samples.append(Sample(tmp_path / "n.png", "normal", "dark"))  # normal: one source only
    (tmp_path / "broken.png").write_bytes(b"not an image")
    samples.append(Sample(tmp_path / "broken.png", "benign", "dark"))
    keras.utils.set_random_seed(0)
    model = build_classifier(3, backbone=Backbone.SMALL_CNN, input_size=32, weights=None)
    rows = measure(model, samples, CLASSES, 32, ResizePolicy.LETTERBOX)
    assert len(rows) == 24 and {r.label for r in rows} == {"benign", "malignant"}
    summary = summarize(rows)
    assert summary["all"]["pixels_balanced_accuracy"] == pytest.approx(1.0)
    assert summary["all"]["features_balanced_accuracy"] > 0.8


@pytest.mark.slow
def test_cli_refuses_a_run_without_two_sources_and_a_missing_run(tmp_path, capsys):
    from tests.run_folders import make_run_folder
    from training.probes.identity import main

    run = make_run_folder(tmp_path / "run", size=64, per_class=12, epochs=2)
    assert main([str(run)]) == 2
    assert "identity: error" in capsys.readouterr().err
    assert not (run / "identity.json").exists()
    assert main([str(tmp_path / "nope")]) == 2
    assert "identity: error" in capsys.readouterr().err
