"""The whole path on synthetic scans: edge-train -> edge-export -> edge-classify."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.synthetic import CLASSES, write_synthetic_dataset

pytestmark = pytest.mark.slow


README = Path(__file__).resolve().parents[1] / "README.md"
TESTED_MARK = (
    "<!-- tests/test_end_to_end.py runs the commands of the next block exactly as written -->"
)


def readme_commands() -> list[list[str]]:
    """The README's synthetic train -> export -> classify block, one argv per line."""
    text = README.read_text()
    assert TESTED_MARK in text, f"{README}: the marked synthetic-path block is gone"
    block = text.split(TESTED_MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _run_readme_line(argv: list[str], stderr: io.StringIO) -> int:
    from edge_runtime.app.cli import main as classify_main
    from export.cli import main as export_main
    from training.cli import main as train_main
    from training.synthetic import main as synthetic_main

    streams = {"stdout": io.StringIO(), "stderr": stderr}
    if argv[:3] == ["python", "-m", "training.synthetic"]:
        return synthetic_main(argv[3:])
    commands = {"edge-train": train_main, "edge-export": export_main}
    commands["edge-classify"] = classify_main
    assert argv[0] in commands, f"README command not covered by this test: {argv}"
    return commands[argv[0]](argv[1:], **streams)


@pytest.fixture(scope="module")
def readme_path(tmp_path_factory):
    """Runs the README's synthetic path as written, in a fresh folder; returns (folder, stderr)."""
    root = tmp_path_factory.mktemp("readme")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for argv in readme_commands():
            if argv[:2] == ["pip", "install"]:
                continue  # the environment running this test is that install
            if _run_readme_line(argv, stderr) != 0:
                pytest.fail(f"{shlex.join(argv)} failed:\n{stderr.getvalue()[-4000:]}")
    return root, stderr.getvalue()


def test_the_readme_path_trains_exports_and_classifies_without_a_traceback_or_a_warning(
    readme_path,
):
    root, stderr = readme_path
    run = root / "runs" / "synthetic"
    for name in (
        "model.keras",
        "run.json",
        "split.csv",
        "history.csv",
        "metrics.json",
        "duplicates.csv",
        "train.log",
        "plots/history.png",
        "plots/confusion.png",
        "plots/roc.png",
        "plots/reliability.png",
        "export/model-int8.onnx",
        "export/model-fp32.onnx",
        "export/model.card.md",
    ):
        assert (run / name).is_file(), name
    assert "Traceback" not in stderr
    assert "has not learned" not in stderr and "is at chance" not in stderr
    assert json.loads((run / "metrics.json").read_text())["accuracy"] >= 0.9


def test_report_only_reports_the_saved_model_again_with_the_same_numbers(readme_path):
    """The README trains with relative data paths; split.csv holds resolved ones."""
    root, _ = readme_path
    train = next(argv for argv in readme_commands() if argv[0] == "edge-train")
    metrics = root / "runs" / "synthetic" / "metrics.json"
    before = json.loads(metrics.read_text())
    run_json = root / "runs" / "synthetic" / "run.json"
    recorded = json.loads(run_json.read_text())
    # as if trained on lesion-free views: report-only builds none, and keeps the record
    run_json.write_text(json.dumps({**recorded, "lesion_free_normals": True}))
    stderr = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            assert _run_readme_line([*train, "--report-only"], stderr) == 0, stderr.getvalue()
        assert json.loads(metrics.read_text()) == before
        assert json.loads(run_json.read_text()) == {**recorded, "lesion_free_normals": True}
    finally:
        run_json.write_text(json.dumps(recorded))


def test_report_only_with_other_data_or_no_run_is_a_usage_error(readme_path, tmp_path, capsys):
    from training.cli import main as train_main

    root, _ = readme_path
    run = root / "runs" / "synthetic"
    metrics = (run / "metrics.json").read_text()
    other = write_synthetic_dataset(tmp_path / "other", per_class=4, seed=9)

    assert train_main([str(other), "--output", str(run), "--report-only"]) == 2
    assert f"{run / 'split.csv'}: " in (err := capsys.readouterr().err)
    assert "scans are not in DATA (the first: " in err and "internal error" not in err
    assert (run / "metrics.json").read_text() == metrics

    for missing in (tmp_path / "no-run", tmp_path):  # nothing there; a folder without a model
        assert train_main([str(other), "--output", str(missing), "--report-only"]) == 2
        assert f"{missing}: no saved model to report on" in capsys.readouterr().err
    assert not (tmp_path / "no-run").exists() and not (tmp_path / "train.log").exists()


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_readme_model_classifies_fresh_synthetic_scans_of_another_seed(readme_path, precision):
    from edge_runtime.app.cli import main

    root, _ = readme_path
    fresh = write_synthetic_dataset(root / f"fresh-{precision}", per_class=30, seed=1)
    out = io.StringIO()
    model = root / "runs" / "synthetic" / "export" / f"model-{precision}.onnx"
    status = main(
        [str(fresh), "--model", str(model), "--format", "jsonl", "--quiet"],
        stdout=out,
        stderr=io.StringIO(),
    )
    assert status == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 90
    accuracy = np.mean([Path(r["path"]).parent.name == r["label"] for r in records])
    assert accuracy >= 0.9, f"{precision} accuracy on fresh synthetic scans {accuracy:.3f}"
    assert {r["label"] for r in records} <= set(CLASSES)


@pytest.fixture(scope="module")
def exported(readme_path):
    root, _ = readme_path
    run = root / "runs" / "synthetic"
    return root / "synthetic", run, run / "export"


def test_export_writes_a_card_that_the_runtime_verifies(exported):
    from edge_runtime.model.card import verify_against_card

    _, _, export = exported
    card = json.loads((export / "model.card.json").read_text())
    assert card["not_a_medical_device"] is True
    assert all(p["passed"] for p in card["parity"])
    assert verify_against_card(export / "model-int8.onnx")


def test_cross_validation_only_reports_folds_per_source_and_trains_no_final_model(tmp_path):
    """Also trains with unmarked copies (--unmark), which loads every scan a second time."""
    from training.cli import main as train_main

    data = write_synthetic_dataset(tmp_path / "data", per_class=20, seed=2)
    run = tmp_path / "cv"
    args = [str(data), "--output", str(run), "--backbone", "small-cnn", "--weights", "none"]
    args += ["--image-size", "32", "--frozen-epochs", "0", "--epochs", "1", "--batch-size", "16"]
    args += ["--learning-rate", "0.003", "--folds", "2", "--cv-only", "--unmark", "0.5"]
    assert train_main(args) == 0
    report = json.loads((run / "cv_metrics.json").read_text())
    assert report["folds"] == 2 and len(report["per_fold"]) == 2
    assert report["summary"]["n"] == 60  # every image is tested exactly once
    assert report["summary"]["metrics"]["accuracy"]["n"] == 2
    assert report["by_source"][data.name]["n"] == 60
    assert not (run / "model.keras").exists(), "--cv-only must not train the final model"
    for k in (0, 1):
        assert (run / "cv" / f"fold{k}" / "split.csv").is_file()
    from training.runfolder import HeldOutPredictions

    pooled = HeldOutPredictions.read([run / "cv" / f"fold{k}" / "predictions.csv" for k in (0, 1)])
    assert sorted(pooled.paths) == sorted(str(p) for p in data.glob("*/*.png"))  # each once
    np.testing.assert_allclose(pooled.probabilities.sum(1), 1.0, atol=1e-4)
    assert report["benign_vs_malignant_auc_by_device_pooled"] == {}  # no scanner names here


def test_cv_only_without_folds_is_a_usage_error(tmp_path, capsys):
    from training.cli import main as train_main

    assert train_main([str(tmp_path), "--output", str(tmp_path / "o"), "--cv-only"]) == 2
    assert "--cv-only needs --folds" in capsys.readouterr().err


def test_unmark_outside_zero_to_one_is_a_usage_error(tmp_path, capsys):
    from training.cli import main as train_main

    assert train_main([str(tmp_path), "--output", str(tmp_path / "o"), "--unmark", "1.5"]) == 2
    assert "--unmark is a probability" in capsys.readouterr().err


def test_a_side_the_lesion_decoder_cannot_take_is_a_usage_error_naming_the_sides_it_takes(
    tmp_path, capsys
):
    from training.cli import main as train_main

    argv = [str(tmp_path), "--output", str(tmp_path / "o"), "--seg", "--image-size", "260"]
    assert train_main([*argv, "--backbone", "efficientnet-lite2"]) == 2
    err = capsys.readouterr().err
    assert "input side 260 cannot carry the lesion head" in err
    assert "--image-size 256 or 288" in err and "--no-seg" in err
    assert not (tmp_path / "o").exists()


def test_masks_found_at_a_side_the_lesion_decoder_cannot_take_end_the_run_with_a_usage_error(
    tmp_path, capsys
):
    """The lesion head is on by default when masks exist; small-cnn's deepest stride is 16."""
    from training.cli import main as train_main

    data = write_synthetic_dataset(tmp_path / "data", per_class=4, seed=4, masks=True)
    args = [str(data), "--output", str(tmp_path / "run"), "--backbone", "small-cnn"]
    args += ["--weights", "none", "--image-size", "40"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "input side 40 cannot carry the lesion head on small-cnn" in err
    assert "--image-size 32 or 48" in err
    assert "nothing was trained" in err


def test_lesion_free_normals_train_on_views_of_masked_training_scans_only(tmp_path, caplog):
    from training.cli import main as train_main
    from training.runfolder import RunInfo

    data = write_synthetic_dataset(tmp_path / "data", per_class=12, seed=4, masks=True)
    run = tmp_path / "run"
    args = [str(data), "--output", str(run), "--backbone", "small-cnn", "--weights", "none"]
    args += ["--image-size", "32", "--frozen-epochs", "0", "--epochs", "1", "--batch-size", "8"]
    args += ["--learning-rate", "0.003", "--lesion-free-normals"]
    with caplog.at_level("INFO"):
        assert train_main(args) == 0
    made = int(re.search(r"(\d+) mirrored views of lesion scans for training", caplog.text)[1])
    used = re.search(r"training on (\d+) scans and (\d+) mirrored views", caplog.text)
    assert made > 0 and 0 < int(used[2]) < made  # views of held-out scans stay out
    assert int(used[1]) == 36 - len(_held_out(run))
    info = RunInfo.read(run)
    assert info.lesion_free_normals
    # the lesion threshold was chosen on the validation split, and metrics.json says how
    chosen = json.loads((run / "metrics.json").read_text())["lesion"]["threshold"]
    assert info.lesion_threshold == chosen["value"]
    assert chosen["value"] in [t["threshold"] for t in chosen["validation"]]


def test_lesion_free_normals_are_on_by_default_when_one_source_has_no_normal_scans(tmp_path):
    from training.cli import main as train_main
    from training.runfolder import RunInfo

    with_normals = write_synthetic_dataset(tmp_path / "a", per_class=8, seed=5, masks=True)
    other = write_synthetic_dataset(tmp_path / "other", per_class=8, seed=6, masks=True)
    scans = [p.relative_to(other) for p in sorted(other.glob("[bm]*/*).png"))]
    rows = ["path,label,masks"] + [  # a second source, listed without its normal scans
        f"{p},{p.parent.name},{p.with_name(p.stem + '_mask.png')}" for p in scans
    ]
    (other / "lesions.csv").write_text("\n".join(rows) + "\n")
    args = ["--backbone", "small-cnn", "--weights", "none", "--image-size", "32"]
    args += ["--frozen-epochs", "0", "--epochs", "1", "--batch-size", "8"]
    args += ["--learning-rate", "0.003"]
    two_sources = [str(with_normals), str(other / "lesions.csv")]
    assert train_main([*two_sources, "--output", str(tmp_path / "r1"), *args]) == 0
    assert RunInfo.read(tmp_path / "r1").lesion_free_normals
    assert train_main([str(with_normals), "--output", str(tmp_path / "r2"), *args]) == 0
    assert not RunInfo.read(tmp_path / "r2").lesion_free_normals  # one source: nothing to fix
    off = [*two_sources, "--no-lesion-free-normals", "--output", str(tmp_path / "r3"), *args]
    assert train_main(off) == 0
    assert not RunInfo.read(tmp_path / "r3").lesion_free_normals  # asked off


def test_wanted_lesion_free_views_without_usable_masks_are_a_warning(tmp_path, caplog):
    from training.cli import main as train_main
    from training.runfolder import RunInfo

    with_normals = write_synthetic_dataset(tmp_path / "a", per_class=6, seed=7)  # no masks
    other = write_synthetic_dataset(tmp_path / "other", per_class=6, seed=8)
    scans = sorted(other.glob("[bm]*/*.png"))
    rows = ["path,label"] + [f"{p.relative_to(other)},{p.parent.name}" for p in scans]
    (other / "lesions.csv").write_text("\n".join(rows) + "\n")
    args = [str(with_normals), str(other / "lesions.csv"), "--output", str(tmp_path / "r")]
    args += ["--backbone", "small-cnn", "--weights", "none", "--image-size", "32"]
    args += ["--frozen-epochs", "0", "--epochs", "1", "--batch-size", "8"]
    with caplog.at_level("WARNING"):
        assert train_main([*args, "--learning-rate", "0.003"]) == 0
    assert "no lesion-free views" in caplog.text
    assert not RunInfo.read(tmp_path / "r").lesion_free_normals


def _held_out(run) -> list[str]:
    with open(run / "split.csv", newline="") as handle:
        return [r["path"] for r in csv.DictReader(handle) if r["split"] != "train"]


def test_lesion_free_normals_without_a_normal_class_is_an_error_naming_the_classes(
    tmp_path, capsys
):
    import shutil

    from training.cli import main as train_main

    data = write_synthetic_dataset(tmp_path / "data", per_class=2, seed=3)
    shutil.rmtree(data / "normal")
    args = [str(data), "--output", str(tmp_path / "o"), "--lesion-free-normals"]
    assert train_main(args) == 2
    assert "no normal class (classes: ['benign', 'malignant'])" in capsys.readouterr().err


def test_the_readme_run_with_itself_reports_the_same_numbers(readme_path, tmp_path):
    """Two copies of one model average to that model: the ensemble's report must equal it."""
    from training.ensemble import build_ensemble_run
    from training.run import TrainConfig

    root, _ = readme_path
    run = root / "runs" / "synthetic"
    output = tmp_path / "twice"

    config = TrainConfig(data=(root / "synthetic",), output=output, input_size=64)
    written = build_ensemble_run(config, [run, run], mirror=False)

    assert [w.backbone for w in written] == ["small-cnn@64 + small-cnn@64"]
    member = json.loads((run / "metrics.json").read_text())
    ensemble = json.loads((output / "metrics.json").read_text())
    assert ensemble["accuracy"] == pytest.approx(member["accuracy"])
    assert ensemble["macro_f1"] == pytest.approx(member["macro_f1"])
    with open(run / "predictions.csv") as a, open(output / "predictions.csv") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    # the README trained with a relative data path, the ensemble was given an absolute one
    assert [Path(r["path"]).parts[-2:] for r in rows_a] == [
        Path(r["path"]).parts[-2:] for r in rows_b
    ]
    assert [r["label"] for r in rows_a] == [r["label"] for r in rows_b]


def test_the_readme_run_mirrored_exports_through_every_gate(readme_path, tmp_path):
    from edge_runtime.app.cli import main as classify_main
    from export.cli import main as export_main
    from training.ensemble import main

    root, _ = readme_path
    run = root / "runs" / "synthetic"
    output = tmp_path / "mirrored"
    argv = [str(root / "synthetic"), "--member", str(run), "--output", str(output)]
    assert main([*argv, "--image-size", "64", "--mirror"]) == 0

    assert (
        export_main(
            [str(output), "--output", str(output / "export")],
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
        == 0
    )
    out = io.StringIO()
    model = output / "export" / "model-int8.onnx"
    scans = root / "synthetic"
    assert (
        classify_main(
            [str(scans), "--model", str(model), "--format", "jsonl", "--quiet"],
            stdout=out,
            stderr=io.StringIO(),
        )
        == 0
    )
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records and all(r["label"] in ("normal", "benign", "malignant") for r in records)
    card = json.loads((output / "export" / "model.card.json").read_text())
    assert card["backbone"] == "small-cnn@64, mirrored"


LITE0_LITE2 = ["--backbone", "efficientnet-lite0", "efficientnet-lite1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--backbone", "small-cnn", "small-cnn"], "--backbone names a backbone twice at one "
         "--image-size: members 1 and 2 are both small-cnn at 160 px, so they would be the same"),
        (["--backbone", "small-cnn", "small-cnn", "small-cnn", "--image-size", "32", "64", "32"],
         "members 1 and 3 are both small-cnn at 32 px"),
        ([*LITE0_LITE2, "--image-size", "160", "160", "256"], "--image-size takes one side for "
         "every member or one per --backbone (2 named). Got 3 sides instead."),
        ([*LITE0_LITE2, "--image-size", "160", "8"], "--image-size must be 16 to 4096: the "
         "sides a model edge-classify runs may have. Got 8 instead."),
        ([*LITE0_LITE2, "--seg", "--image-size", "160", "260"], "--image-size 256 or 288"),
        ([*LITE0_LITE2, "--lesion-from", "3"], "members 1 to 2 at most once"),
        ([*LITE0_LITE2, "--lesion-from", "1", "1"], "members 1 to 2 at most once"),
        (["--folds", "3"], "--folds works on one model: name one --backbone (the default trains 2"),
        ([*LITE0_LITE2, "--weights", "w.h5"], "--weights FILE works on one model: name one "
         "--backbone (--backbone names 2: efficientnet-lite0 and efficientnet-lite1)"),
        (["--backbone", "small-cnn", "efficientnet-lite0"], "small-cnn has no ImageNet weights: "
         "add --weights none"),
        (["--backbone", "small-cnn", "--lesion-from", "2"], "--lesion-from picks among an "
         "ensemble's members; one --backbone has none to pick"),
    ],
)  # fmt: skip
def test_what_an_ensemble_cannot_do_is_a_usage_error_before_anything_loads(
    tmp_path, capsys, options, message
):
    from training.cli import main as train_main

    assert train_main([str(tmp_path), "--output", str(tmp_path / "o"), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "did you mean" not in err, err
    assert not (tmp_path / "o").exists()


def _described(folder: Path, backbone: str, size: int = 64, seed: int = 0) -> None:
    """A model folder as far as recorded_options reads it: run.json and a model.keras file."""
    from training.runfolder import RunInfo

    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    RunInfo(("normal", "benign", "malignant"), size, "letterbox", backbone, seed, "f").write(folder)


def test_a_run_s_records_give_the_options_report_only_uses(tmp_path):
    from training.ensemble import recorded_options

    graph = tmp_path / "graph"
    label = "efficientnet-lite0@160 + efficientnet-lite2@160, lesion from member 1"
    _described(graph, label, size=160, seed=3)
    assert recorded_options(graph) == {
        "backbone": ("efficientnet-lite0", "efficientnet-lite2"),
        "image_size": 160,
        "seed": 3,
        "lesion_from": (1,),
    }
    every = tmp_path / "every"  # no "lesion from": every member's map
    _described(every, "small-cnn@64 + efficientnet-lite0@64")
    assert recorded_options(every)["lesion_from"] == (1, 2)
    unwritten = tmp_path / "unwritten"  # the members trained, the graph not written yet
    _described(unwritten / "members" / "2-efficientnet-lite0", "efficientnet-lite0", seed=1)
    _described(unwritten / "members" / "1-small-cnn", "small-cnn", seed=1)
    assert recorded_options(unwritten) == {
        "backbone": ("small-cnn", "efficientnet-lite0"),
        "image_size": 64,
        "seed": 1,
    }
    sides = tmp_path / "sides"  # members at their own input sides: the graph at the largest
    label = "efficientnet-lite0@160 + efficientnet-lite2@160 + efficientnet-lite2@256"
    _described(sides, label + ", lesion from member 1", size=256)
    assert recorded_options(sides)["image_size"] == (160, 160, 256)
    unwritten_sides = tmp_path / "unwritten_sides"
    _described(unwritten_sides / "members" / "1-small-cnn", "small-cnn", size=32)
    _described(unwritten_sides / "members" / "2-small-cnn", "small-cnn", size=64)
    assert recorded_options(unwritten_sides)["image_size"] == (32, 64)
    folds = tmp_path / "folds"  # --cv-only --leave-scanner-out: fold models only
    _described(folds / "scanners" / "busi_GE_LOGIQ_E9", "efficientnet-lite2", size=224)
    assert recorded_options(folds) == {
        "backbone": ("efficientnet-lite2",),
        "image_size": 224,
        "seed": 0,
    }
    assert recorded_options(tmp_path / "nothing") == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--image-size", "160"], "with --image-size 64: leave --image-size out"),
        (["--seed", "1"], "with --seed 0: leave --seed out"),
        (["--backbone", "efficientnet-lite0"], "with --backbone small-cnn: leave --backbone out"),
    ],
)
def test_report_only_refuses_options_other_than_the_run_s_before_anything_loads(
    tmp_path, capsys, options, message
):
    from training.cli import main as train_main

    _described(tmp_path / "run", "small-cnn")
    argv = [str(tmp_path), "--output", str(tmp_path / "run"), "--report-only", *options]

    assert train_main(argv) == 2
    assert f"--report-only reports {tmp_path / 'run'} as it was trained, {message}" in (
        capsys.readouterr().err
    )


def test_several_backbones_train_one_member_each_and_one_graph_kept_on_a_rerun(
    tmp_path, capsys, monkeypatch
):
    """The recipe's shape (two members, the lesion map from the first) on small models: each
    member is a whole run in RUN/members/, the graph a run in RUN that edge-export reads; the
    same command again keeps the finished members, however their paths are spelled, and
    retrains a member whose model is gone. Members trained side by side (--jobs 2, the default)
    and one after the other give the same numbers."""
    from training.cli import main as train_main

    data = write_synthetic_dataset(tmp_path / "data", per_class=12, seed=5)
    run = tmp_path / "run"
    options = ["--backbone", "small-cnn", "efficientnet-lite0", "--weights", "none"]
    options += ["--image-size", "64", "--frozen-epochs", "0", "--epochs", "1"]
    argv = [str(data), "--output", str(run), *options]

    assert train_main(argv) == 0

    members = [run / "members" / "1-small-cnn", run / "members" / "2-efficientnet-lite0"]
    for member in members:
        assert (member / "model.keras").is_file() and (member / "member.json").is_file()
        assert json.loads((member / "run.json").read_text())["input_size"] == 64
    info = json.loads((run / "run.json").read_text())
    assert info["backbone"] == "small-cnn@64 + efficientnet-lite0@64"  # no masks: no lesion head
    assert (run / "split.csv").read_bytes() == (members[0] / "split.csv").read_bytes()
    # the graph was not trained: no training curves of a member passed off as its own
    assert not (run / "history.csv").exists() and not (run / "plots" / "history.png").exists()
    assert f"Next: edge-export {run}" in capsys.readouterr().out
    assert all((m / "train.log").is_file() for m in members)  # --jobs 2: a process each

    sequential = tmp_path / "sequential"  # one after the other, in this process
    assert train_main([str(data), "--output", str(sequential), *options, "--jobs", "1"]) == 0

    for folder in (Path("."), *(m.relative_to(run) for m in members)):
        for name in ("metrics.json", "predictions.csv"):
            side_by_side = (run / folder / name).read_bytes()
            assert (sequential / folder / name).read_bytes() == side_by_side, folder / name
    trained = {m: (m / "model.keras").stat().st_mtime_ns for m in members}
    metrics = (run / "metrics.json").read_text()

    monkeypatch.chdir(tmp_path)  # the same folders, named relatively
    assert train_main(["data", "--output", "run", *options]) == 0

    assert {m: (m / "model.keras").stat().st_mtime_ns for m in members} == trained
    assert "trained with these options already; kept" in (run / "train.log").read_text()
    assert (run / "metrics.json").read_text() == metrics

    assert train_main([*argv, "--epochs", "2", "--report-only"]) == 0  # reports, trains nothing

    assert {m: (m / "model.keras").stat().st_mtime_ns for m in members} == trained
    assert (run / "metrics.json").read_text() == metrics

    (members[0] / "model.keras").unlink()
    reported = (members[1] / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert train_main([str(data), "--output", str(run), "--report-only"]) == 2
    assert (
        f"{run}: member 1-small-cnn has no trained model (its training did not finish)"
    ) in capsys.readouterr().err
    assert (members[1] / "metrics.json").stat().st_mtime_ns == reported  # nothing rewritten

    assert train_main(argv) == 0

    assert "1-small-cnn: training it (model.keras is missing)" in (run / "train.log").read_text()
    assert (members[1] / "model.keras").stat().st_mtime_ns == trained[members[1]]
    assert (run / "metrics.json").read_text() == metrics  # the same seed trains the same model

    capsys.readouterr()
    report = [str(data), "--output", str(run), "--report-only"]
    assert train_main([*report, "--backbone", "efficientnet-lite0", "efficientnet-lite2"]) == 2
    assert (
        f"--report-only reports {run} as it was trained, with --backbone small-cnn "
        "efficientnet-lite0: leave --backbone out"
    ) in capsys.readouterr().err
    assert train_main(report) == 0  # the members, their size and seed come from the run

    assert (members[1] / "model.keras").stat().st_mtime_ns == trained[members[1]]
    assert (run / "metrics.json").read_text() == metrics


def test_one_backbone_at_two_input_sides_trains_two_members_and_a_graph_at_the_larger(
    tmp_path, capsys
):
    """ABB256's shape (a backbone twice, at its own side each) on small models: each member
    trains at its side, the graph takes the larger, and --report-only reads the sides back."""
    from training.cli import main as train_main

    data = write_synthetic_dataset(tmp_path / "data", per_class=12, seed=5)
    run = tmp_path / "run"
    options = ["--backbone", "small-cnn", "small-cnn", "--weights", "none", "--jobs", "1"]
    options += ["--image-size", "32", "64", "--frozen-epochs", "0", "--epochs", "1"]

    assert train_main([str(data), "--output", str(run), *options]) == 0

    for name, side in (("1-small-cnn", 32), ("2-small-cnn", 64)):
        assert json.loads((run / "members" / name / "run.json").read_text())["input_size"] == side
    info = json.loads((run / "run.json").read_text())
    assert (info["backbone"], info["input_size"]) == ("small-cnn@32 + small-cnn@64", 64)

    capsys.readouterr()
    report = [str(data), "--output", str(run), "--report-only"]
    assert train_main([*report, "--image-size", "64"]) == 2
    assert "trained, with --image-size 32 64: leave --image-size out" in capsys.readouterr().err
    assert train_main([*report, "--image-size", "32", "64"]) == 0


def test_a_member_side_the_lesion_head_cannot_take_is_refused_before_any_member_trains(
    tmp_path, capsys, monkeypatch
):
    """With masks in DATA the lesion head is on: a member at a side it cannot take is named
    before the first member trains (it was found when that member's turn came)."""
    from training import ensemble
    from training.cli import main as train_main

    def started(*args, **kwargs):
        raise AssertionError("a member's training started")

    monkeypatch.setattr(ensemble, "_train_members", started)
    data = write_synthetic_dataset(tmp_path / "data", per_class=4, seed=5, masks=True)
    argv = [str(data), "--output", str(tmp_path / "run"), "--backbone", "small-cnn", "small-cnn"]
    argv += ["--weights", "none", "--image-size", "32", "40"]

    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "member 2 (small-cnn at 40 px): input side 40 cannot carry the lesion head" in err
    assert "one side per member" in err


def test_data_that_is_no_dataset_is_named_once_before_any_member_starts(
    tmp_path, capsys, monkeypatch
):
    from training import ensemble
    from training.cli import main as train_main

    def started(*args, **kwargs):
        raise AssertionError("a member's training started")

    monkeypatch.setattr(ensemble, "_train_members", started)
    flat = tmp_path / "clinic"  # scans, but no class folders
    flat.mkdir()
    cv2.imwrite(str(flat / "scan.png"), np.zeros((64, 64), np.uint8))
    argv = [str(flat), "--output", str(tmp_path / "run"), "--backbone", "small-cnn"]
    argv += ["efficientnet-lite0", "--weights", "none", "--image-size", "64"]

    assert train_main(argv) == 2
    assert capsys.readouterr().err.count(f"{flat}: no class folders") == 1
    assert not (tmp_path / "run").exists()


def test_a_member_that_fails_beside_another_loses_nothing_of_the_other_s_training(tmp_path):
    """At 80 px the lesion head fits small-cnn (stride 16) and not EfficientNet-Lite0 (32):
    trained side by side, the first finishes and is recorded, then the second's error is
    raised. (edge-train and train_ensemble refuse that side before any member starts; this
    calls the members' training itself.)"""
    import dataclasses

    from training.ensemble import _train_members
    from training.fit import FitConfig
    from training.model.backbones import Backbone
    from training.run import TrainConfig

    data = write_synthetic_dataset(tmp_path / "data", per_class=12, seed=5, masks=True)
    config = TrainConfig(
        data=(data,),
        output=tmp_path / "run",
        weights=None,
        input_size=80,
        segmentation=True,
        fit=FitConfig(epochs_frozen=0, epochs_finetune=1),
    )
    members = [
        dataclasses.replace(config, output=config.output / "members" / f"{k}-{b.value}", backbone=b)
        for k, b in enumerate([Backbone.SMALL_CNN, Backbone.EFFICIENTNET_LITE0], start=1)
    ]

    with pytest.raises(ValueError, match="input side 80 cannot carry the lesion head on "):
        _train_members(members, jobs=2, quiet=True)

    assert (tmp_path / "run" / "members" / "1-small-cnn" / "member.json").is_file()
    assert not (tmp_path / "run" / "members" / "2-efficientnet-lite0" / "member.json").exists()


def test_ctrl_c_while_members_train_side_by_side_says_so_and_keeps_the_finished_member(tmp_path):
    """Ctrl-C reaches the whole process group: edge-train and both members' processes."""
    data = write_synthetic_dataset(tmp_path / "data", per_class=12, seed=5)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "training.cli", str(data), "--output", str(run)]
    argv += ["--backbone", "small-cnn", "efficientnet-lite0", "--weights", "none"]
    argv += ["--image-size", "64", "--frozen-epochs", "0", "--epochs", "6"]  # Lite0: minutes
    finished = run / "members" / "1-small-cnn" / "member.json"
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not finished.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert finished.exists() and process.poll() is None, "small-cnn did not finish first"
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err.rstrip().endswith("edge-train: interrupted") and "Traceback" not in err, err
    assert finished.is_file() and (finished.parent / "model.keras").is_file()


def test_several_backbones_with_the_scanner_protocol_alone_combine_every_fold(tmp_path, capsys):
    from training.cli import main as train_main

    sites = [write_synthetic_dataset(tmp_path / s, per_class=8, seed=k) for k, s in enumerate("ab")]
    run = tmp_path / "run"
    argv = [*map(str, sites), "--output", str(run), "--backbone", "small-cnn", "mobilenet-v3-small"]
    argv += ["--weights", "none", "--image-size", "64", "--frozen-epochs", "0", "--epochs", "1"]

    assert train_main([*argv, "--leave-scanner-out", "--cv-only"]) == 0

    protocol = json.loads((run / "protocol.json").read_text())
    assert len(protocol) == 2, protocol.keys()
    assert not (run / "model.keras").exists()
    folds = sorted(p.name for p in (run / "scanners").iterdir() if (p / "model.keras").is_file())
    assert len(folds) == 2
    assert "Scanner-held-out protocol" in capsys.readouterr().out


def test_a_rerun_keeps_the_folds_a_stopped_run_finished_and_trains_the_rest_alike(tmp_path, caplog):
    """A 3-4 h protocol run on 2 cores stopped in its last fold lost every fold before it: the
    rerun started over. Now a fold finished with the same options, data and split is kept; the
    folds and the final model trained again equal those of the uninterrupted run; other options
    train every fold again."""
    from training.cli import main as train_main

    sites = [write_synthetic_dataset(tmp_path / s, per_class=8, seed=k) for k, s in enumerate("ab")]
    run = tmp_path / "run"
    argv = [*map(str, sites), "--output", str(run), "--backbone", "small-cnn", "--weights", "none"]
    argv += ["--image-size", "32", "--frozen-epochs", "0", "--epochs", "1", "--leave-scanner-out"]

    assert train_main(argv) == 0

    first, last = sorted(p for p in (run / "scanners").iterdir())
    stages = [first, last, run]
    predicted = {p: (p / "predictions.csv").read_text() for p in stages}
    protocol = (run / "protocol.json").read_text()
    first_model = (first / "model.keras").stat().st_mtime_ns
    (last / "fold.json").unlink()  # stopped while the last fold trained: no record yet
    (last / "model.keras").unlink()
    (run / "run.json").unlink()  # nor a final model
    with caplog.at_level("INFO", logger="training.run"):
        assert train_main(argv) == 0

    assert f"{first}: kept, finished by an earlier run" in caplog.text
    assert f"{last}: kept" not in caplog.text
    assert (first / "model.keras").stat().st_mtime_ns == first_model
    assert {p: (p / "predictions.csv").read_text() for p in stages} == predicted
    assert (run / "protocol.json").read_text() == protocol

    caplog.clear()
    with caplog.at_level("INFO", logger="training.run"):
        assert train_main([*argv, "--seed", "1", "--cv-only"]) == 0
    assert "kept, finished by an earlier run" not in caplog.text
    for fold in (first, last):
        assert json.loads((fold / "fold.json").read_text())["options"]["seed"] == 1
