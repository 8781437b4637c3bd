"""The training data pipeline: cached arrays, an optional transform, and unmarked copies."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from training.augmentation.augment import AugmentConfig
from training.data.pipeline import load_images, make_dataset

NO_CHANGE = AugmentConfig(rotation_deg=0, zoom=0, gain=0, contrast=0, gamma=0, noise=0, flip=False)


def test_load_images_applies_the_transform_before_fitting(tmp_path):
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), np.full((40, 60), 100, np.uint8))
    plain, _ = load_images([path], 32)
    inverted, failures = load_images([path], 32, transform=lambda gray: 255 - gray)
    assert not failures
    assert plain[0, 16, 16, 0] == 100 and inverted[0, 16, 16, 0] == 155


def _batches(unmark: float, training: bool = True) -> np.ndarray:
    images = np.zeros((64, 8, 8, 1), np.uint8)
    unmarked = np.full((64, 8, 8, 1), 255, np.uint8)
    ds = make_dataset(
        images,
        np.zeros(64, np.int64),
        num_classes=3,
        batch_size=16,
        training=training,
        seed=0,
        augment=replace(NO_CHANGE, unmark=unmark),
        unmarked=unmarked,
    )
    return np.concatenate([x.numpy() for x, _ in ds])


@pytest.mark.parametrize("unmark, expected", [(0.0, 0.0), (1.0, 1.0)])
def test_unmarked_copies_are_drawn_with_the_given_chance(unmark, expected):
    assert (_batches(unmark)[:, 0, 0, 0] == 255).mean() == expected


def test_about_half_the_scans_come_unmarked_at_one_half_and_none_outside_training():
    share = (_batches(0.5)[:, 0, 0, 0] == 255).mean()
    assert 0.25 < share < 0.75
    assert (_batches(1.0, training=False) == 0).all()


def test_a_small_training_set_is_passed_over_until_an_epoch_has_the_minimum_of_batches():
    """126 images at batch 32 are 4 steps; the README's synthetic run needs 20 an epoch."""
    images = np.arange(126, dtype=np.uint8).reshape(126, 1, 1, 1)

    def dataset(training: bool):
        return make_dataset(
            images,
            np.zeros(126, np.int64),
            num_classes=3,
            batch_size=32,
            training=training,
            seed=0,
            min_batches=20,
        )

    ds = dataset(training=True)
    seen = np.concatenate([x.numpy().ravel() for x, _ in ds])
    assert int(ds.cardinality()) == len(list(ds)) == 20  # 5 passes: the fewest that give 20
    assert len(seen) == 5 * 126 and np.array_equal(np.bincount(seen), np.full(126, 5))
    assert not np.array_equal(seen[:126], seen[126:252])  # each pass in a new order
    evaluation = dataset(training=False)
    assert int(evaluation.cardinality()) == 4  # validation is never repeated


def test_training_reads_a_dicom_scan_as_edge_classify_does_and_refuses_a_cine(tmp_path):
    pytest.importorskip("pydicom", minversion="3.0")
    from edge_runtime.io.decode import load_frames
    from edge_runtime.io.preprocess import fit_to_square
    from tests.test_dicom import make_dicom

    image = (np.arange(48 * 64) % 251).astype(np.uint8).reshape(48, 64)
    one = make_dicom(tmp_path / "one.dcm", image, rows=48, columns=64)
    cine = make_dicom(tmp_path / "cine.dcm", np.stack([image] * 3), rows=48, columns=64, frames=3)
    images, failures = load_images([one, cine], 32)
    np.testing.assert_array_equal(images[0, :, :, 0], fit_to_square(load_frames(one)[0], 32))
    assert failures == [(str(cine), failures[0][1])]
    assert failures[0][1].startswith("holds 3 images (frames, pages or tissue regions)")


def test_an_unreadable_scan_is_named_once_with_what_its_decoder_said_then_counted(
    tmp_path, caplog, capfd
):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8))
    half = tmp_path / "half.png"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        _, failures = load_images([half, good], 32)
    assert [path for path, _ in failures] == [str(half)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{half}: libpng error: PNG input buffer is incomplete",
        f"{half}: left out: image data corrupt or truncated and could not be decoded",
        "1 of 2 scans left out (not readable as one image): see the warnings above",
    ]
    assert "libpng" not in capfd.readouterr().err  # not raw on standard error
