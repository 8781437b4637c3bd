"""The lesion head: mask targets, the loss, augmentation that moves masks, clutter, measures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.model.contract import ResizePolicy
from training.augmentation.clutter import clutter_bank, composite
from training.data.datasets import Sample
from training.evaluation.lesion_metrics import (
    LesionRule,
    choose_lesion_rule,
    dice,
    predicted_mask,
    rule_masks,
    score_scans,
    summarize,
)

CLASSES = ("normal", "benign", "malignant")
ALL_BENIGN = np.array([[0.0, 1.0, 0.0]] * 4)  # the classifier calls no scan normal


def _called_normal_where(normal: np.ndarray) -> np.ndarray:
    """Calibrated probabilities calling exactly the ``normal`` rows normal."""
    return np.where(normal[:, None], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])


def _disc(size: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    return mask


def test_masks_are_known_for_normal_and_masked_lesion_scans_only(tmp_path, caplog):
    pytest.importorskip("keras")
    from training.model.segmentation import load_masks

    scan = np.full((40, 80), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "scan.png"), scan)
    mask = np.zeros((40, 80), np.uint8)
    mask[10:20, 20:40] = 255
    cv2.imwrite(str(tmp_path / "scan_mask.png"), mask)
    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    samples = [
        Sample(tmp_path / "scan.png", "normal", "s"),
        Sample(tmp_path / "scan.png", "benign", "s", masks=(tmp_path / "scan_mask.png",)),
        Sample(tmp_path / "scan.png", "malignant", "s"),
        Sample(tmp_path / "scan.png", "malignant", "s", masks=(tmp_path / "bad_mask.png",)),
    ]
    masks, known = load_masks(samples, 32, ResizePolicy.LETTERBOX)
    assert known.tolist() == [True, True, False, False]
    assert masks.shape == (4, 32, 32, 1) and masks[0].max() == 0
    # letterboxed like the scan: 80 x 40 -> 32 x 16, centred rows 8..23; lesion rows 12..15
    rows = np.flatnonzero(masks[1, :, :, 0].max(axis=1) > 127)
    assert rows.min() >= 12 and rows.max() <= 16
    assert "bad_mask.png: mask skipped" in caplog.text


def test_a_0_1_mask_is_read_as_its_lesion_and_an_empty_or_reshaped_one_is_named(tmp_path, caplog):
    """Masks stored 0/1 were read as empty: every lesion scan's target 'no lesion', and a model
    that called every scan normal."""
    pytest.importorskip("keras")
    from training.data.masks import load_lesion_mask
    from training.model.segmentation import load_masks

    cv2.imwrite(str(tmp_path / "scan.png"), np.full((40, 80), 90, np.uint8))
    ones = np.zeros((40, 80), np.uint8)
    ones[10:20, 20:40] = 1
    cv2.imwrite(str(tmp_path / "ones_mask.png"), ones)
    cv2.imwrite(str(tmp_path / "empty_mask.png"), np.zeros((40, 80), np.uint8))
    cv2.imwrite(str(tmp_path / "turned_mask.png"), np.ascontiguousarray(ones.T) * 255)
    assert load_lesion_mask([tmp_path / "ones_mask.png"], (40, 80)).sum() == 200
    samples = [
        Sample(tmp_path / "scan.png", "benign", "s", masks=(tmp_path / "ones_mask.png",)),
        Sample(tmp_path / "scan.png", "malignant", "s", masks=(tmp_path / "empty_mask.png",)),
        Sample(tmp_path / "scan.png", "benign", "s", masks=(tmp_path / "turned_mask.png",)),
    ]
    masks, known = load_masks(samples, 32, ResizePolicy.LETTERBOX)
    assert known.tolist() == [True, False, True] and masks[0].max() == 255
    assert "empty_mask.png: mask skipped: it marks no lesion pixel" in caplog.text
    assert "turned_mask.png: mask of 40 x 80 pixels stretched onto a scan of 80 x 40" in (
        caplog.text
    )


def test_dice_bce_ignores_scans_of_weight_zero_and_prefers_the_true_mask():
    pytest.importorskip("keras")
    from training.model.segmentation import DiceBCELoss

    target = np.zeros((2, 8, 8, 1), np.float32)
    target[:, 2:6, 2:6] = 1.0
    weight = np.array([1.0, 0.0], np.float32).reshape(2, 1, 1, 1) * np.ones_like(target)
    y_true = np.concatenate([target, weight], axis=-1)
    loss = DiceBCELoss()
    right = np.clip(target, 0.02, 0.98)
    wrong = 1.0 - right
    assert float(loss(y_true, right)) < 0.2 < float(loss(y_true, wrong))
    mixed = np.concatenate([right[:1], wrong[1:]])  # the weight-0 scan is wrong: no matter
    np.testing.assert_allclose(float(loss(y_true, mixed)), float(loss(y_true, right)), rtol=1e-5)


def test_weighted_cross_entropy_weights_each_sample_by_its_true_class():
    pytest.importorskip("keras")
    from training.model.segmentation import WeightedCategoricalCrossentropy

    y = np.eye(3, dtype=np.float32)
    p = np.full((3, 3), 1 / 3, np.float32)
    plain = np.asarray(WeightedCategoricalCrossentropy([1, 1, 1]).call(y, p))
    weighted = np.asarray(WeightedCategoricalCrossentropy([0, 1, 2]).call(y, p))
    np.testing.assert_allclose(weighted, plain * np.array([0, 1, 2]), rtol=1e-6)


def test_augmentation_moves_each_mask_with_its_scan():
    pytest.importorskip("tensorflow")
    from training.augmentation.augment import AugmentConfig, make_augmenter

    images = np.zeros((8, 48, 48, 1), np.uint8)
    masks = np.zeros_like(images)
    for i in range(8):
        disc = _disc(48, (12 + 3 * i, 20), 6)
        images[i, :, :, 0], masks[i, :, :, 0] = disc, disc
    config = AugmentConfig(gain=0, contrast=0, gamma=1e-6, noise=0.0, rotation_deg=20, zoom=0.2)
    moved_images, moved_masks = make_augmenter(config, seed=3)(images, masks)
    moved_images, moved_masks = np.asarray(moved_images), np.asarray(moved_masks)
    assert not np.array_equal(moved_masks, masks)  # the geometry did move them
    np.testing.assert_array_equal(moved_images > 127, moved_masks > 127)


def test_clutter_is_painted_on_any_scan_with_its_own_coverage():
    values, alpha = clutter_bank(16, 64, seed=1)
    assert values.shape == alpha.shape == (16, 64, 64, 1)
    covered = alpha.reshape(16, -1).mean(axis=1)
    assert (covered > 0).mean() > 0.8 and covered.max() < 0.2  # marks, not a curtain
    scans = np.full((16, 64, 64, 1), 40, np.uint8)
    painted = composite(scans, values, alpha)
    np.testing.assert_array_equal(painted[alpha == 0], 40)
    np.testing.assert_array_equal(painted[alpha > 0], values[alpha > 0])


def test_augmentation_paints_clutter_only_when_asked():
    pytest.importorskip("tensorflow")
    from training.augmentation.augment import AugmentConfig, make_augmenter

    scans = np.full((16, 64, 64, 1), 40, np.uint8)
    quiet = AugmentConfig(gain=0, contrast=0, gamma=1e-6, noise=0, rotation_deg=0, zoom=0)
    plain, _ = make_augmenter(quiet, seed=0, size=64)(scans)
    assert np.asarray(plain).max() <= 41
    cluttered, _ = make_augmenter(
        AugmentConfig(**{**quiet.__dict__, "clutter": 1.0}), seed=0, size=64
    )(scans)
    assert (np.asarray(cluttered).reshape(16, -1).max(axis=1) > 100).mean() > 0.8


def test_a_predicted_outline_keeps_only_its_largest_component():
    lesion_map = np.zeros((16, 16), np.float32)
    lesion_map[2:8, 2:8] = 0.9
    lesion_map[12:14, 12:14] = 0.9
    mask = predicted_mask(lesion_map, 64, 0.5)
    assert mask.shape == (64, 64)
    assert mask[20, 20] and not mask[52, 52]


def test_dice_is_one_for_the_same_mask_and_counts_the_overlap_twice():
    truth = np.zeros((4, 4), bool)
    truth[:2] = True
    guess = np.zeros((4, 4), bool)
    guess[1:3] = True
    assert dice(truth, truth) == 1.0
    assert dice(truth, guess) == 2 * 4 / (8 + 8)
    assert dice(truth, ~truth) == 0.0


def test_scores_give_dice_pointing_and_empty_normals():
    size = 64
    truth = np.stack([_disc(size, (20, 20), 8), np.zeros((size, size), np.uint8)])[..., None]
    maps = np.zeros((2, 16, 16, 1), np.float32)
    maps[0, :, :, 0] = cv2.resize(truth[0, :, :, 0], (16, 16)) / 255.0  # the lesion itself
    cams = np.zeros((2, 8, 8), np.float32)
    cams[0, 7, 7] = 1.0  # the CAM points at the far corner: a miss
    scores = score_scans(
        truth,
        np.array([True, True]),
        maps,
        cams,
        ["benign", "normal"],
        ["s", "s"],
        ["d", "d"],
        LesionRule(0.5),
        np.array([[0.0, 1.0, 0.0]] * 2),  # the classifier calls both benign
        CLASSES,
    )
    assert scores[0].dice > 0.85 and scores[0].lesion_map_hit and scores[0].cam_hit is False
    assert scores[1].dice is None and scores[1].predicted_area == 0.0
    report = summarize(scores)
    assert report["all"]["normal_with_lesion"]["mean"] == 0.0
    assert report["by_device"]["s:d"]["dice"]["n"] == 1


def _rule_case(normal_blob: np.ndarray) -> tuple:
    """Two lesion scans whose map is 0.45 on the lesion and 0.35 on a ring around it (a low
    threshold draws the ring too: a worse Dice), and two normal scans whose map is
    ``normal_blob`` (``[16, 16]``)."""
    size = 64
    disc = _disc(size, (32, 32), 10)
    ring = _disc(size, (32, 32), 16)
    lesion_map = cv2.resize(np.where(disc > 0, 0.45, np.where(ring > 0, 0.35, 0.0)), (16, 16))
    maps = np.stack([lesion_map, lesion_map, normal_blob, normal_blob]).astype(np.float32)
    truth = np.stack([disc, disc, disc * 0, disc * 0])[..., None]
    return truth, np.ones(4, bool), maps[..., None], np.array([False, False, True, True])


def _blob(peak: float, side: int) -> np.ndarray:
    blob = np.zeros((16, 16), np.float32)
    blob[3 : 3 + side, 3 : 3 + side] = peak
    return blob


def _chosen(trials, rule):
    return next(
        t
        for t in trials
        if (t.threshold, t.min_area, t.classifier_gate, t.normal_gate)
        == (rule.threshold, rule.min_area, rule.classifier_gate, rule.normal_gate)
    )


def test_the_lesion_rule_is_the_best_validation_dice_when_no_normal_scan_is_drawn():
    truth, known, maps, normal = _rule_case(_blob(0.2, 3))
    rule, trials = choose_lesion_rule(truth, known, maps, normal, ALL_BENIGN, CLASSES, LesionRule())
    assert 0.35 < rule.threshold <= 0.45  # above the ring, at or below the lesion
    assert (rule.min_area, rule.classifier_gate) == (0.0, False)  # ties: the plainest rule
    best = _chosen(trials, rule)
    assert best.dice == max(t.dice for t in trials) and best.normal_with_lesion == 0.0


def test_a_minimum_area_spares_normal_scans_with_a_small_false_lesion():
    truth, known, maps, normal = _rule_case(_blob(0.9, 1))  # one hot cell: < 0.5% of the square
    rule, trials = choose_lesion_rule(truth, known, maps, normal, ALL_BENIGN, CLASSES, LesionRule())
    assert rule.min_area > 0 and not rule.classifier_gate
    assert 0.35 < rule.threshold <= 0.45
    assert _chosen(trials, rule).normal_with_lesion == 0.0
    plain = next(t for t in trials if t.threshold == rule.threshold and t.min_area == 0.0)
    assert plain.normal_with_lesion == 1.0


def test_the_classifier_gate_spares_normal_scans_the_classifier_calls_normal():
    truth, known, maps, normal = _rule_case(_blob(0.5, 3))  # a large blob, as hot as the lesion
    rule, trials = choose_lesion_rule(
        truth, known, maps, normal, _called_normal_where(normal), CLASSES, LesionRule()
    )
    assert rule.classifier_gate and rule.normal_gate == 0.0 and 0.35 < rule.threshold <= 0.45
    assert _chosen(trials, rule).normal_with_lesion == 0.0
    masks = rule_masks(maps, 64, rule, _called_normal_where(normal), CLASSES)
    assert masks[:2].any(axis=(1, 2)).all() and not masks[2:].any()


def test_no_rule_gives_up_more_dice_than_the_budget_to_spare_normal_scans():
    # only thresholds above the lesion (Dice 0) spare these normals, and nothing else does
    truth, known, maps, normal = _rule_case(_blob(0.5, 3))
    rule, trials = choose_lesion_rule(truth, known, maps, normal, ALL_BENIGN, CLASSES, LesionRule())
    assert 0.35 < rule.threshold <= 0.45 and _chosen(trials, rule).normal_with_lesion == 1.0
    spared = [t for t in trials if t.normal_with_lesion == 0.0]
    assert spared and max(t.dice for t in spared) == 0.0


def test_without_validation_lesion_scans_the_lesion_rule_is_the_default():
    truth, known, maps, normal = _rule_case(_blob(0.2, 3))
    default = LesionRule(0.5)
    got = choose_lesion_rule(truth, ~known, maps, normal, ALL_BENIGN, CLASSES, default)
    assert got == (default, [])


@pytest.mark.slow
def test_a_short_multitask_training_learns_the_lesion_of_fresh_synthetic_scans(tmp_path):
    """The synthetic scans come with masks: the lesion head finds them on scans it never saw."""
    pytest.importorskip("keras")
    from training.data.datasets import discover_all
    from training.data.pipeline import load_images
    from training.fit import FitConfig, TrainingArrays, fit
    from training.model.backbones import Backbone
    from training.model.classifier import build_classifier
    from training.model.segmentation import load_masks
    from training.synthetic import write_synthetic_dataset

    def arrays(root, per_class, seed) -> TrainingArrays:
        samples = list(
            discover_all([write_synthetic_dataset(root, per_class, seed=seed, masks=True)]).samples
        )
        images, _ = load_images([s.path for s in samples], 64)
        masks, known = load_masks(samples, 64, ResizePolicy.LETTERBOX)
        labels = np.array([("normal", "benign", "malignant").index(s.label) for s in samples])
        return TrainingArrays(images, labels, masks, known)

    train, val = arrays(tmp_path / "train", 50, 1), arrays(tmp_path / "val", 8, 2)
    fresh = arrays(tmp_path / "fresh", 10, 3)
    model = build_classifier(
        3, backbone=Backbone.SMALL_CNN, input_size=64, weights=None, lesion=True
    )
    config = FitConfig(epochs_frozen=0, epochs_finetune=25, batch_size=16, learning_rate=3e-3)
    fit(model, train, val, config, pretrained=False)
    maps = model.predict(fresh.images, verbose=0)["lesion"]
    overlaps = [
        dice(truth[:, :, 0] > 127, predicted_mask(lesion_map[:, :, 0], 64, 0.5))
        for truth, lesion_map, label in zip(fresh.masks, maps, fresh.labels, strict=True)
        if label != 0
    ]
    assert np.mean(overlaps) > 0.7


def test_the_normal_gate_spares_normal_scans_the_classifier_half_believes_normal():
    # the classifier calls no scan normal, but gives the normal scans P(normal) 0.2
    truth, known, maps, normal = _rule_case(_blob(0.5, 3))
    p = np.where(normal[:, None], [0.2, 0.7, 0.1], [0.05, 0.9, 0.05])
    rule, trials = choose_lesion_rule(truth, known, maps, normal, p, CLASSES, LesionRule())
    assert rule.classifier_gate and rule.normal_gate == 0.15  # the first level at or under 0.2
    assert _chosen(trials, rule).normal_with_lesion == 0.0


def test_a_rule_that_spares_normal_scans_by_missing_lesion_scans_is_not_chosen():
    # a third lesion scan (no mask known) whose map (0.41) is weaker than the normals' false
    # blob (0.43): the thresholds above the blob spare the normals and call that scan normal
    truth, known, maps, normal = _rule_case(_blob(0.43, 3))
    truth = np.concatenate([truth, truth[:1] * 0])
    maps = np.concatenate([maps, _blob(0.41, 3)[None, ..., None]])
    known, normal = np.append(known, False), np.append(normal, False)
    benign = np.array([[0.0, 1.0, 0.0]] * 5)

    # a Dice budget wide enough that only the cap on missed lesions can stop the sparing rule
    rule, trials = choose_lesion_rule(
        truth, known, maps, normal, benign, CLASSES, LesionRule(), dice_budget=0.5
    )

    chosen = _chosen(trials, rule)
    assert chosen.lesion_called_normal == 0.0 and rule.threshold <= 0.41
    assert chosen.normal_with_lesion == 1.0  # the price, paid on the normal scans
    free, _ = choose_lesion_rule(
        truth,
        known,
        maps,
        normal,
        benign,
        CLASSES,
        LesionRule(),
        dice_budget=0.5,
        max_lesion_called_normal=1.0,
    )
    assert _chosen(trials, free).lesion_called_normal == pytest.approx(1 / 3)
    assert _chosen(trials, free).normal_with_lesion == 0.0


@pytest.mark.parametrize(("backbone", "side"), [("small-cnn", 48), ("efficientnet-lite0", 96)])
def test_the_lesion_head_builds_at_a_multiple_of_the_declared_stride_and_at_no_other_side(
    backbone, side
):
    pytest.importorskip("keras")
    from edge_runtime.model.contract import LESION
    from training.model.backbones import Backbone, output_stride
    from training.model.classifier import build_classifier

    backbone, stride = Backbone(backbone), output_stride(Backbone(backbone))
    model = build_classifier(3, backbone=backbone, input_size=side, weights=None, lesion=True)

    assert model.get_layer("backbone").outputs[-1].shape[1] == side // stride
    assert model.get_layer(LESION).output.shape[1:] == (side // 4, side // 4, 1)
    with pytest.raises(ValueError, match=f"must be a multiple of {stride}"):
        build_classifier(3, backbone=backbone, input_size=side + 4, weights=None, lesion=True)
