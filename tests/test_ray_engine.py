"""``edge-classify --engine ray`` on a local (loopback) Ray cluster shared by the module."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import main
from edge_runtime.app.output import LESION_FIELDS
from tests.onnx_models import make_contract_model
from training.synthetic import CLASSES, synthetic_scan

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'edge-classify[ray]' to test --engine ray"
)
ACTOR_TITLE = "ray::MapWorker(MapBatches(_ClassifyWorker))"


@pytest.fixture(scope="module")
def cluster():
    """One two-CPU local cluster for the module (starting Ray takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder of 40 full-size (606 x 856 BGR) synthetic scans, one corrupt and one empty file."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(3)
    for i in range(40):
        label = CLASSES[i % 3]
        gray = cv2.resize(synthetic_scan(label, rng), (856, 606))
        folder = root / label
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    (root / "benign" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "benign" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def many_scans(scans, tmp_path_factory) -> Path:
    """160 readable scans: four hard-linked copies of each synthetic one (no corrupt files)."""
    root = tmp_path_factory.mktemp("many")
    for copy in range(4):
        for path in sorted(scans.glob("*/[0-9]*.png")):
            os.link(path, root / f"{copy}-{path.parent.name}-{path.name}")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "m.onnx")


def _records(argv: list[str]) -> tuple[int, list[dict]]:
    out = io.StringIO()
    status = main([*argv, "--format", "jsonl", "--quiet"], stdout=out, stderr=io.StringIO())
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def _actor_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(ACTOR_TITLE.encode()):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def test_two_ray_workers_give_the_local_engines_records_in_input_order(cluster, scans, model):
    local_status, local = _records([str(scans), "--model", str(model)])
    ray_status, on_ray = _records(
        [str(scans), "--model", str(model), "--engine", "ray", "--workers", "2"]
    )
    assert local_status == ray_status == 1  # the corrupt and the empty file
    assert len(on_ray) == 42
    assert [r["path"] for r in on_ray] == [r["path"] for r in local]
    assert [r["label"] for r in on_ray] == [r["label"] for r in local]
    assert [r["probabilities"] for r in on_ray] == [r["probabilities"] for r in local]
    errors = {Path(r["path"]).name: r["error"] for r in on_ray if r["error"]}
    assert set(errors) == {"corrupt.png", "empty.png"}
    assert [r["error"] for r in on_ray] == [r["error"] for r in local]


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("lesion") / "m.onnx", lesion_stride=4)


def _png_files(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.iterdir())}


def test_heatmaps_and_masks_on_ray_are_the_local_engines_files(
    cluster, scans, lesion_model, tmp_path
):
    written = {}
    for engine in ("local", "ray"):
        heatmaps, masks = tmp_path / engine / "heatmaps", tmp_path / engine / "masks"
        status, records = _records(
            [
                *(str(scans), "--model", str(lesion_model), "--engine", engine),
                *(["--workers", "2"] if engine == "ray" else []),
                *("--heatmaps", str(heatmaps), "--masks", str(masks)),
            ]
        )
        written[engine] = status, records, _png_files(heatmaps), _png_files(masks)
    (local_status, local, local_heatmaps, local_masks) = written["local"]
    (ray_status, on_ray, ray_heatmaps, ray_masks) = written["ray"]
    assert local_status == ray_status == 1  # the corrupt and the empty file
    keys = ("path", "label", "probabilities", "error", *LESION_FIELDS)
    assert [[r[k] for k in keys] for r in on_ray] == [[r[k] for k in keys] for r in local]
    assert any(r["lesion_bbox"] for r in local)  # some scans outline a lesion
    stems = sorted(Path(r["path"]).stem for r in local if not r["error"])
    assert sorted(name.removesuffix("_mask.png") for name in ray_masks) == stems
    assert sorted(ray_heatmaps) == sorted(
        f"{stem}_{kind}.png" for stem in stems for kind in ("heatmap", "overlay")
    )
    for ours, theirs in ((ray_heatmaps, local_heatmaps), (ray_masks, local_masks)):
        assert list(ours) == list(theirs)
        for name, image in ours.items():
            np.testing.assert_array_equal(image, theirs[name], err_msg=name)
    assert any(mask.any() for mask in ray_masks.values())


def test_masks_on_ray_with_a_model_without_a_lesion_output_exit_2_before_classifying(
    cluster, scans, model, tmp_path
):
    masks = tmp_path / "masks"
    out, err = io.StringIO(), io.StringIO()
    argv = [str(scans), "--model", str(model), "--engine", "ray", "--masks", str(masks)]
    assert main([*argv, "--format", "jsonl"], stdout=out, stderr=err) == 2
    assert f"{model}: this model has no lesion output" in err.getvalue()
    assert "leave out --masks" in err.getvalue()
    assert out.getvalue() == "" and not masks.exists()


def test_killing_a_worker_mid_run_still_gives_each_scan_exactly_one_record(
    cluster, many_scans, model
):
    from edge_runtime.app.ray_engine import RayOptions, classify_on_ray
    from edge_runtime.classifier import Classifier, ClassifierOptions
    from edge_runtime.io.sources import expand_sources

    files, _ = expand_sources([str(many_scans)])
    options = ClassifierOptions(model_path=model)
    ray_options = RayOptions(files_per_call=2)
    killed = None
    sources = []
    earlier = _actor_pids()  # an earlier test's actors may still be shutting down
    with Classifier.from_options(options) as classifier:
        stream = classify_on_ray(classifier, files, options, ray_options, workers=2, heatmaps=True)
        for result in stream:
            assert result.ok, result.error
            sources.append(result.source)
            if killed is None:  # the first record is back: the rest is in flight or queued
                pids = _actor_pids() - earlier
                assert len(pids) == 2, f"expected two classifying actors of this run, found {pids}"
                killed = min(pids)
                os.kill(killed, signal.SIGKILL)
                remaining = len(files) - len(sources)
    assert killed is not None and remaining > len(files) // 2
    assert not Path(f"/proc/{killed}").exists() or _is_zombie(killed)
    assert sources == [str(f) for f in files]  # every scan once, in input order


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_ctrl_c_stops_the_run_with_130_and_shuts_its_local_cluster_down(
    many_scans, model, tmp_path
):
    output = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_runtime.app.cli",
            str(many_scans),
            "--model",
            str(model),
            "--engine",
            "ray",
            "--workers",
            "1",
            "--format",
            "jsonl",
            "--output",
            str(output),
            "--quiet",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while not _actor_pids_of_session(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    time.sleep(2)
    assert not _actor_pids_of_session(process.pid), "the local cluster's workers are still running"


def _actor_pids_of_session(session: int) -> set[int]:
    found = set()
    for pid in _actor_pids():
        try:
            if os.getsid(pid) == session:
                found.add(pid)
        except OSError:
            continue
    return found


def test_quiet_keeps_rays_warnings_off_the_terminal(scans, model, tmp_path):
    """``--quiet`` on Ray: Ray logs errors only and its workers' output is not forwarded (its
    warnings and "Progress bars disabled" reached the terminal before)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "edge_runtime.app.cli", str(scans), "--model", str(model)]
    command += ["--engine", "ray", "--workers", "1", "--format", "jsonl", "--quiet"]
    command += ["--output", str(tmp_path / "out.jsonl")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr  # the corrupt and the empty file
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 42
    assert "WARNING" not in done.stderr and "Progress bars" not in done.stderr, done.stderr
