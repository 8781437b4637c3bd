"""Benchmark fixtures: the bundled models, real-size scans, and the ratio log.

Which models are measured is decided once, in :func:`model_files`, and written into the report.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.classifier import MODELS_DIR, default_model_path
from edge_runtime.io.decode import load_gray
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import Precision
from edge_runtime.model.cpu import int8_saturates
from edge_runtime.model.session import LoadedModel, Provider, batch_probabilities, open_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGE_CLASSIFY_SHARED", REPO_ROOT.parent / "shared"))
BUSI_ROOT = SHARED / "data" / "busi" / "Dataset_BUSI_with_GT"
N_SCANS = 64
PRECISIONS = (Precision.FP32, Precision.INT8)
HELDOUT = MODELS_DIR / "default.heldout.csv"
_ratios: dict[str, dict[str, float]] = {}


NO_VNNI = pytest.mark.skipif(
    int8_saturates(),
    reason="this x86 CPU has no VNNI: onnxruntime's U8S8 INT8 kernels saturate on it, so the "
    "INT8 speed gates, set on VNNI CPUs, do not apply (the runtime serves FP32 here); "
    "docs/benchmark-gates.md",
)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Optimized graphs (edge_runtime.model.session_cache) go to a folder of this run: the first
    session of each model saves its graph there, later ones (and cold starts) load it, as on a
    device host after its first run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_CLASSIFY_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(scope="session")
def model_files() -> dict[Precision, Path]:
    """The FP32 and INT8 files to benchmark: ``EDGE_CLASSIFY_BENCH_MODELS=DIR/NAME``
    (``NAME-fp32.onnx``/``NAME-int8.onnx``), else the bundled default pair. A pair that does not
    exist fails loudly."""
    chosen = os.environ.get("EDGE_CLASSIFY_BENCH_MODELS")
    if chosen:
        files = {p: Path(f"{chosen}-{p.value}.onnx") for p in PRECISIONS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            pytest.fail(f"no model to benchmark: {', '.join(missing)} missing", pytrace=False)
        return files
    try:
        return {p: default_model_path(p) for p in PRECISIONS}
    except FileNotFoundError as exc:
        pytest.fail(f"no model to benchmark: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def models(model_files) -> dict[Precision, LoadedModel]:
    """FP32 and INT8 sessions, CPU, one intra-op thread (pinned: 2-core timings are erratic)."""
    return {p: open_model(model_files[p], provider=Provider.CPU, threads=1) for p in PRECISIONS}


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> list[Path]:
    """Real-size scans: BUSI images when the shared data is beside the repo, else synthetic
    scans of BUSI's typical size (the speed of decoding depends on size, not on content)."""
    if BUSI_ROOT.is_dir():
        found = sorted(p for p in BUSI_ROOT.glob("*/*.png") if "_mask" not in p.name)
        if len(found) >= N_SCANS:
            return found[:: len(found) // N_SCANS][:N_SCANS]
    from training.synthetic import synthetic_scan

    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_SCANS):
        path = folder / f"synthetic-{i:02d}.png"
        label = ("normal", "benign", "malignant")[i % 3]
        cv2.imwrite(str(path), synthetic_scan(label, rng, size=(560, 740)))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def ratio_log():
    """Collects measured ratios; written to ``$EDGE_CLASSIFY_RATIOS_JSON`` at the end, if set."""
    yield _ratios
    target = os.environ.get("EDGE_CLASSIFY_RATIOS_JSON")
    if target and _ratios:
        Path(target).write_text(json.dumps(_ratios, indent=2) + "\n")


@pytest.fixture(scope="session")
def keras_model(models):
    """The Keras model for speed comparison: the trained one named by
    ``EDGE_CLASSIFY_KERAS_MODEL`` (a ``model.keras``), else the same architecture untrained
    (speed does not depend on the weights). Skips where TensorFlow is not installed."""
    pytest.importorskip("tensorflow", reason="TensorFlow not installed (pip install '.[train]')")
    from training.ensemble import parse_label
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier, load_classifier
    from training.model.ensemble import combine

    trained = os.environ.get("EDGE_CLASSIFY_KERAS_MODEL")
    if trained:
        return load_classifier(Path(trained))
    spec = models[Precision.FP32].spec
    members, mirror, lesion_from = parse_label(spec.backbone)
    built = [
        build_classifier(
            len(spec.class_names),
            backbone=Backbone(backbone),
            input_size=side or spec.input_size,
            weights=None,
        )
        for backbone, side in members
    ]
    if len(built) == 1 and not mirror:
        return built[0]
    return combine(built, spec.input_size, mirror=mirror, lesion_from=lesion_from)


@pytest.fixture(scope="session")
def heldout(models) -> tuple[np.ndarray, np.ndarray]:
    """The bundled model's test scans, preprocessed, and their labels (needs ../shared)."""
    if os.environ.get("EDGE_CLASSIFY_BENCH_MODELS"):
        pytest.skip("held-out list belongs to the bundled model, not to EDGE_CLASSIFY_BENCH_MODELS")
    if not HELDOUT.is_file():
        pytest.skip(f"no bundled default model with its held-out list ({HELDOUT}) to check")
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real held-out scans not found under {data} (put ../shared beside the repo)")
    with open(HELDOUT, newline="") as handle:
        rows = list(csv.DictReader(handle))
    spec = models[Precision.FP32].spec
    images = make_batch(
        [load_gray(data / r["path"]) for r in rows], spec.input_size, spec.resize_policy
    )
    labels = np.array([spec.class_names.index(r["label"]) for r in rows])
    return images, labels


def probabilities(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    """A model's probabilities for a uint8 batch, 32 images per run."""
    return batch_probabilities(model.session, images)
