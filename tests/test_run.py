"""Pieces of one training run (training.run) that need no training."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from training.data.datasets import Sample
from training.run import _Prepared, _training_arrays, segmentation_wanted

CLASSES = ("normal", "benign", "malignant")


def _prepared(views, unmarked: bool, masks: bool = False) -> _Prepared:
    images = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1)
    return _Prepared(
        class_names=CLASSES,
        paths=[],
        labels=np.array([1, 2, 1, 0]),
        groups=["a", "b", "c", "d"],
        excluded=np.zeros(4, bool),
        images=images,
        samples=[],
        unmarked=images + 100 if unmarked else None,
        views=views,
        lesion_free_normals=bool(views),
        masks=images + 200 if masks else None,
        mask_known=np.array([True, False, True, True]) if masks else None,
        fingerprint="",
        sources=("s",),
    )


def _view(value: int) -> np.ndarray:
    return np.full((1, 1, 1), value, np.uint8)


def test_views_join_training_only_from_training_scans_and_stand_in_for_their_unmarked_copy():
    views = [
        (0, _view(50), "normal", _view(0)),
        (0, _view(51), "benign", _view(255)),
        (2, _view(52), "normal", _view(0)),
    ]
    train = np.array([True, True, False, False])  # scan 2 is validation or test
    arrays = _training_arrays(_prepared(views, unmarked=True), train)
    assert arrays.images.ravel().tolist() == [0, 1, 50, 51]
    assert arrays.labels.tolist() == [1, 2, 0, 1]
    assert arrays.unmarked.ravel().tolist() == [100, 101, 50, 51]
    assert arrays.masks is None  # no lesion head


def test_views_bring_their_masks_and_count_as_known():
    views = [(0, _view(50), "normal", _view(0)), (1, _view(51), "malignant", _view(255))]
    arrays = _training_arrays(_prepared(views, unmarked=False, masks=True), np.ones(4, bool))
    assert arrays.masks.ravel().tolist() == [200, 201, 202, 203, 0, 255]
    assert arrays.mask_known.tolist() == [True, False, True, True, True, True]


def test_without_views_the_training_split_is_unchanged():
    arrays = _training_arrays(_prepared([], unmarked=False), np.ones(4, bool))
    assert arrays.images.ravel().tolist() == [0, 1, 2, 3] and arrays.labels.tolist() == [1, 2, 1, 0]
    assert arrays.unmarked is None


def test_the_lesion_head_is_on_by_default_exactly_when_a_lesion_scan_has_a_mask(tmp_path):
    masked = Sample(tmp_path / "a.png", "benign", "s", masks=(tmp_path / "a_mask.png",))
    plain = Sample(tmp_path / "b.png", "malignant", "s")
    normal = Sample(tmp_path / "c.png", "normal", "s", masks=(tmp_path / "c_mask.png",))
    assert segmentation_wanted(None, [masked, plain])
    assert not segmentation_wanted(None, [plain, normal])  # a normal scan's empty mask: no lesion
    assert not segmentation_wanted(False, [masked])
    with pytest.raises(ValueError, match="no benign or malignant scan has a mask"):
        segmentation_wanted(True, [plain, normal])


def test_a_new_run_starts_without_the_last_run_s_results_and_keeps_everything_else(tmp_path):
    """An interrupted rerun left the old model.keras and run.json beside a new split.csv, and
    edge-export published the mix; a run without --folds kept another's cv/ in its card."""
    from training.run import PREVIOUS_RESULTS, _clear_previous_results

    for name in PREVIOUS_RESULTS:
        if name in ("cv", "scanners", "plots"):
            (tmp_path / name / "fold0").mkdir(parents=True)
            (tmp_path / name / "fold0" / "model.keras").write_text("old")
        else:
            (tmp_path / name).write_text("old")
    kept = ["train.log", "member.json", "notes.txt", "members/1-small-cnn/model.keras"]
    for name in kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("mine")
    _clear_previous_results(tmp_path)
    assert sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    ) == (sorted(kept))


def test_a_new_run_warns_of_an_earlier_models_export_in_its_folder(tmp_path, caplog):
    """edge-export's suggested RUN/export outlived the model it exported, unannounced."""
    from training.run import _clear_previous_results

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.card.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="training.run"):
        _clear_previous_results(tmp_path)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message.startswith(f"{tmp_path / 'export'}: holds an export of an earlier model")
    assert (tmp_path / "export" / "model.card.json").is_file()  # left as it is


def test_the_holdout_split_names_excluded_scans_in_full():
    from training.run import TrainConfig, _holdout_split

    data = _prepared([], unmarked=False)
    data.excluded[2] = True
    data.groups[:] = ["a", "b", "c", "d"]
    splits = _holdout_split(TrainConfig(data=(), output=None), data)
    assert splits[2] == "excluded"  # a str array had cut it to "exclu"


def test_one_class_one_scanner_or_more_folds_than_groups_is_a_data_error_before_training(
    tmp_path, capsys
):
    pytest.importorskip("keras")
    import cv2

    from training.cli import main as train_main
    from training.synthetic import synthetic_scan

    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(tmp_path / "data" / label / f"{i}.png"), synthetic_scan(label, rng))
    options = ["--backbone", "small-cnn", "--weights", "none", "--image-size", "64"]
    argv = [str(tmp_path / "data"), "--output", str(tmp_path / "run"), *options]
    assert train_main([*argv, "--leave-scanner-out"]) == 2
    assert "--leave-scanner-out trains on the other scanners, and the data has one" in (
        capsys.readouterr().err
    )
    assert train_main([*argv, "--folds", "100"]) == 2
    assert "--folds 100: the data hold 12 groups of scans" in capsys.readouterr().err
    (tmp_path / "data" / "malignant").rename(tmp_path / "malignant")
    assert train_main(argv) == 2
    assert "DATA has one class (benign): a classifier needs scans of at least two" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "model.keras").exists()


def test_too_few_scans_for_every_split_is_a_data_error_before_training(tmp_path, capsys):
    """3 or 4 scans a class once trained, then crashed predicting on an empty validation split
    (exit 70, a run folder without run.json); --folds and --leave-scanner-out split too."""
    pytest.importorskip("keras")
    from training.cli import main as train_main
    from training.synthetic import write_synthetic_dataset

    options = ["--backbone", "small-cnn", "--weights", "none", "--image-size", "64"]
    for per_class in (3, 4):
        data = write_synthetic_dataset(tmp_path / f"{per_class}", per_class, size=(64, 80))
        run = tmp_path / f"run{per_class}"
        assert train_main([str(data), "--output", str(run), *options, "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert "edge-train: error: DATA: too few scans to split into train/val/test: the val " in (
            err
        )
        assert f"by class: normal {per_class} scans in {per_class} groups, benign " in err
        assert "from 5 groups on" in err and "Add scans: 5 or more of each class." in err
        assert not run.exists()
    six = write_synthetic_dataset(tmp_path / "a", 6, seed=1, size=(64, 80))
    run = tmp_path / "run"
    assert train_main([str(six), "--output", str(run), *options, "--folds", "2"]) == 2
    err = capsys.readouterr().err
    assert "--folds 2, cv/fold0 (trained on the other folds' scans): too few scans to split " in (
        err
    )
    assert "With --folds 2, every fold keeps validation scans from 7 one-scan groups" in err
    argv = [str(six), str(tmp_path / "3"), "--output", str(run), *options]
    assert train_main([*argv, "--leave-scanner-out", "a"]) == 2  # trained on 3's 3 a class
    err = capsys.readouterr().err
    assert "--leave-scanner-out a (trained on the other scanners' scans): too few scans to " in err
    assert "Add scans of the other scanners: 4 or more of each class." in err
    assert not run.exists()


def test_a_thin_split_s_advice_depends_on_whether_the_model_is_already_a_fold(tmp_path):
    from training.evaluation.diagnostics import Evaluation, check_run
    from training.run import TrainConfig, _evaluation_of

    config = TrainConfig(data=(), output=tmp_path)
    assert _evaluation_of(config, tmp_path) is Evaluation.HOLDOUT
    assert _evaluation_of(config, tmp_path / "cv" / "fold1") is Evaluation.CROSS_VALIDATION
    assert _evaluation_of(config, tmp_path / "scanners" / "busi_GE") is (
        Evaluation.SCANNER_HELD_OUT
    )
    labels = np.tile(np.arange(3), 6)  # 2 of each class in each split
    splits = np.repeat(["train", "val", "test"], 6)
    metrics = {"temperature": 1.0}

    def advice(evaluation: Evaluation) -> str:
        test = check_run([], metrics, labels, splits, CLASSES, evaluation=evaluation)[-1]
        assert test.startswith("the test split has only 2 normal, 2 benign, 2 malignant")
        return test.split("says little. ")[1]

    assert "cross-validation (one --backbone with --folds K) tests every image once" in advice(
        Evaluation.HOLDOUT
    )
    fold = advice(Evaluation.CROSS_VALIDATION)
    assert "this is one fold of a cross-validation: read its cv_metrics.json" in fold
    assert "--folds K" not in fold
    scanner = advice(Evaluation.SCANNER_HELD_OUT)
    assert "one fold of the scanner-held-out protocol" in scanner and "--folds" not in scanner
