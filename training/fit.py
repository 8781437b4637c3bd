"""Two-stage transfer learning: a short learning-rate search, frozen backbone, then fine-tuning;
the classifier and, where the model has one, the lesion segmentation head trained jointly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from edge_runtime.model.contract import LESION, PROBABILITIES
from training import distributed
from training.augmentation.augment import AugmentConfig
from training.data.pipeline import make_dataset
from training.model.classifier import has_lesion_output, nested_layers, training_model
from training.model.segmentation import DiceBCELoss, WeightedCategoricalCrossentropy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Training schedule. ``learning_rate`` None means: pick it with a short search.

    ``min_steps_per_epoch``: an epoch passes over the training images as often as it takes to
    make this many optimizer steps (a few hundred images at batch 32 are 4 steps otherwise, and
    early stopping's patience and the from-scratch batch-norm statistics are counted in epochs).
    """

    epochs_frozen: int = 4
    epochs_finetune: int = 20
    batch_size: int = 32
    learning_rate: float | None = None
    lr_candidates: tuple[float, ...] = (3e-3, 1e-3, 3e-4)
    finetune_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    patience: int = 6
    min_steps_per_epoch: int = 20
    freeze_batch_norm: bool = True
    seed: int = 0
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seg_weight: float = 1.0  # weight of the lesion mask loss beside the classification loss
    # stage name -> extra callbacks for that stage's fit (training.distributed.stage_callbacks)
    extra_callbacks: Callable[[str], list[keras.callbacks.Callback]] | None = field(
        default=None, compare=False, repr=False
    )


@dataclass(frozen=True)
class TrainingArrays:
    """One split in memory: uint8 scans ``[N, S, S, 1]``, integer labels ``[N]``, and
    optionally their lesion masks (uint8 ``[N, S, S, 1]``) with bool ``mask_known`` ``[N]``, and
    the scans with their burned-in marks painted out (``unmarked``, like ``images``)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    mask_known: np.ndarray | None = None
    unmarked: np.ndarray | None = None


@dataclass
class _Fitting:
    """What every stage of one :func:`fit` shares."""

    model: keras.Model
    train: tf.data.Dataset
    val: tf.data.Dataset
    class_weights: list[float]
    config: FitConfig
    rows: list[dict]


def class_weights(labels: np.ndarray, num_classes: int, power: float = 0.5) -> dict[int, float]:
    """Inverse-frequency weights tempered by ``power``: ``(n / (K * count_k)) ** power``,
    rescaled so that the average weight per training image is 1. Classes without samples get 0.

    ``power=1`` is fully balanced. With BUS-BRA added, normals are 4% of the images and full
    balancing (weight ~8) made the model call too many scans normal; the square root keeps
    minority classes heard without drowning the others.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    weights *= counts.sum() / float(np.dot(weights, counts))
    return {k: float(w) for k, w in enumerate(weights)}


class _EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch (stage, loss, metrics, seconds) and records it in ``rows``."""

    def __init__(self, stage: str, rows: list[dict]) -> None:
        super().__init__()
        self.stage, self.rows = stage, rows

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        row = {
            "epoch": len(self.rows) + 1,
            "stage": self.stage,
            "seconds": round(time.perf_counter() - self._start, 2),
        }
        row.update(
            {_metric_name(k): float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        )
        self.rows.append(row)
        metrics = "  ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "seconds"
        )
        log.info("epoch %d (%s)  %s  %.1fs", row["epoch"], self.stage, metrics, row["seconds"])


def _metric_name(key: str) -> str:
    """Keras prefixes the metrics of a model with dict outputs by the output's name: the
    classifier's accuracy keeps its plain name (``accuracy``, ``val_accuracy``)."""
    return key.replace(f"{PROBABILITIES}_accuracy", "accuracy")


def fit(
    model: keras.Model,
    train: TrainingArrays,
    val: TrainingArrays,
    config: FitConfig,
    *,
    pretrained: bool = True,
) -> list[dict]:
    """Train ``model`` in place; returns per-epoch rows.

    The loss is class-weighted cross-entropy on ``probabilities`` plus, when the model has a
    ``lesion`` output and ``train`` has masks, ``config.seg_weight`` times Dice + binary
    cross-entropy on the masks (:class:`training.model.segmentation.DiceBCELoss`).

    With a pretrained backbone, stage 1 trains the heads on the frozen backbone and stage 2
    fine-tunes everything at a lower rate; a backbone trained from scratch gets one stage of the
    same total length at the searched rate. Stages use cosine decay, stop early on validation loss
    and restore the best weights.

    Deterministic: TensorFlow's op determinism is switched on, so the same weights, data and
    config give the same model bit for bit (on the same machine and library versions).

    Raises:
        ValueError: the model has a lesion output but ``train`` or ``val`` has no masks.
    """
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    num_classes = model.get_layer(PROBABILITIES).output.shape[-1]
    segment = has_lesion_output(model)
    if segment and (train.masks is None or val.masks is None):
        raise ValueError("The model has a lesion output: pass masks for training and validation.")

    def dataset(arrays: TrainingArrays, training: bool) -> tf.data.Dataset:
        return make_dataset(
            arrays.images,
            arrays.labels,
            num_classes=num_classes,
            batch_size=config.batch_size,
            training=training,
            seed=config.seed,
            augment=config.augment if training else None,
            masks=arrays.masks if segment else None,
            mask_known=arrays.mask_known if segment else None,
            unmarked=arrays.unmarked if training else None,
            min_batches=config.min_steps_per_epoch if training else 0,
        )

    distributed.synchronize_batch_norm(model)  # edge-train --distributed: global-batch moments
    weights = class_weights(train.labels, num_classes)
    run = _Fitting(
        model=training_model(model),
        train=dataset(train, True),
        val=dataset(val, False),
        class_weights=[weights[k] for k in range(num_classes)],
        config=config,
        rows=[],
    )
    backbone = model.get_layer("backbone")
    backbone.trainable = not pretrained
    rate = config.learning_rate or _search_learning_rate(run)
    if not pretrained:
        log.info(
            "trained from scratch, nothing frozen: one stage of %d + %d epochs (frozen + "
            "fine-tuning)",
            config.epochs_frozen,
            config.epochs_finetune,
        )
        _run_stage(run, "full", rate, config.epochs_frozen + config.epochs_finetune)
        return run.rows
    _run_stage(run, "frozen", rate, config.epochs_frozen)
    backbone.trainable = True
    if config.freeze_batch_norm:
        _freeze_batch_norm(backbone)
    _run_stage(run, "finetune", rate * config.finetune_lr_factor, config.epochs_finetune)
    return run.rows


def _freeze_batch_norm(model: keras.Model) -> None:
    """Keep every batch norm of ``model`` in inference mode with its statistics fixed.

    Fine-tuning on a few thousand gray scans re-estimates them from small batches; with them
    fixed, the ImageNet statistics stay and only the weights adapt (Keras' transfer-learning
    guide does the same).
    """
    for layer in nested_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _compile(run: _Fitting, rate) -> None:
    config = run.config
    losses = {
        PROBABILITIES: WeightedCategoricalCrossentropy(
            run.class_weights, label_smoothing=config.label_smoothing
        )
    }
    weights = {PROBABILITIES: 1.0}
    if LESION in run.model.output:
        losses[LESION] = DiceBCELoss()
        weights[LESION] = config.seg_weight
    run.model.compile(
        optimizer=keras.optimizers.AdamW(rate, weight_decay=config.weight_decay),
        loss=losses,
        loss_weights=weights,
        metrics={PROBABILITIES: ["accuracy"]},
    )


def _run_stage(run: _Fitting, stage: str, rate: float, epochs: int) -> None:
    if epochs <= 0:
        return
    steps = epochs * int(run.train.cardinality())
    schedule = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, steps), alpha=0.05)
    _compile(run, schedule)
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=run.config.patience, restore_best_weights=True
        ),
        _EpochLog(stage, run.rows),
    ]
    if run.config.extra_callbacks is not None:
        callbacks += run.config.extra_callbacks(stage)
    log.info("stage %s: %d epochs at learning rate %.2g", stage, epochs, rate)
    run.model.fit(
        run.train,
        validation_data=run.val,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )


def _search_learning_rate(run: _Fitting) -> float:
    """One frozen-backbone epoch per candidate from the same start; lowest validation loss wins."""
    start = run.model.get_weights()
    losses = {}
    for rate in run.config.lr_candidates:
        run.model.set_weights(start)
        _compile(run, rate)
        run.model.fit(run.train, epochs=1, shuffle=False, verbose=0)
        losses[rate] = float(run.model.evaluate(run.val, verbose=0, return_dict=True)["loss"])
        log.info("learning-rate search: %.2g -> val loss %.4f", rate, losses[rate])
    run.model.set_weights(start)
    return min(losses, key=losses.get)
