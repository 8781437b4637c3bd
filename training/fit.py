"""Two-stage transfer learning: a short learning-rate search, frozen backbone, then fine-tuning."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from training.augment import AugmentConfig
from training.data import make_dataset
from training.model import nested_layers, probabilities_model

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
        row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
        self.rows.append(row)
        metrics = "  ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "seconds"
        )
        log.info("epoch %d (%s)  %s  %.1fs", row["epoch"], self.stage, metrics, row["seconds"])


def fit(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: FitConfig,
    *,
    pretrained: bool = True,
    train_unmarked: np.ndarray | None = None,
) -> list[dict]:
    """Train ``model`` in place on uint8 images and integer labels; returns per-epoch rows.

    ``train_unmarked``: the training scans with their marks painted out, drawn from with
    probability ``config.augment.unmark`` (see ``make_dataset``).

    With a pretrained backbone, stage 1 trains the head on the frozen backbone and stage 2
    fine-tunes everything at a lower rate; a backbone trained from scratch gets one stage of the
    same total length at the searched rate. Stages use cosine decay, stop early on validation loss
    and restore the best weights.

    Deterministic: TensorFlow's op determinism is switched on, so the same weights, data and
    config give the same model bit for bit (on the same machine and library versions).
    """
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    num_classes = model.get_layer("probabilities").output.shape[-1]
    trainer = probabilities_model(model)
    weights = class_weights(train[1], num_classes)
    train_ds = make_dataset(
        *train,
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        augment=config.augment,
        unmarked=train_unmarked,
        min_batches=config.min_steps_per_epoch,
    )
    val_ds = make_dataset(*val, batch_size=config.batch_size, training=False, seed=config.seed)
    backbone = model.get_layer("backbone")
    rows: list[dict] = []

    backbone.trainable = not pretrained
    rate = config.learning_rate or _search_learning_rate(trainer, train_ds, val_ds, weights, config)
    if not pretrained:
        _run_stage(
            trainer,
            "full",
            rate,
            config.epochs_frozen + config.epochs_finetune,
            train_ds,
            val_ds,
            weights,
            config,
            rows,
        )
        return rows
    _run_stage(
        trainer, "frozen", rate, config.epochs_frozen, train_ds, val_ds, weights, config, rows
    )
    backbone.trainable = True
    if config.freeze_batch_norm:
        _freeze_batch_norm(backbone)
    _run_stage(
        trainer,
        "finetune",
        rate * config.finetune_lr_factor,
        config.epochs_finetune,
        train_ds,
        val_ds,
        weights,
        config,
        rows,
    )
    return rows


def _freeze_batch_norm(model: keras.Model) -> None:
    """Keep every batch norm of ``model`` in inference mode with its statistics fixed.

    Fine-tuning on a few thousand gray scans re-estimates them from small batches; with them
    fixed, the ImageNet statistics stay and only the weights adapt (Keras' transfer-learning
    guide does the same).
    """
    for layer in nested_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _compile(model: keras.Model, rate, config: FitConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.AdamW(rate, weight_decay=config.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )


def _run_stage(model, stage, rate, epochs, train_ds, val_ds, weights, config, rows) -> None:
    if epochs <= 0:
        return
    steps = epochs * int(train_ds.cardinality())
    schedule = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, steps), alpha=0.05)
    _compile(model, schedule, config)
    num_classes = model.output.shape[-1]
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.patience, restore_best_weights=True
        ),
        _EpochLog(stage, rows),
    ]
    log.info("stage %s: %d epochs at learning rate %.2g", stage, epochs, rate)
    model.fit(
        _one_hot(train_ds, num_classes),
        validation_data=_one_hot(val_ds, num_classes),
        epochs=epochs,
        class_weight=weights,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )


def _search_learning_rate(model, train_ds, val_ds, weights, config: FitConfig) -> float:
    """One frozen-backbone epoch per candidate from the same start; lowest validation loss wins."""
    start = model.get_weights()
    num_classes = model.output.shape[-1]
    losses = {}
    for rate in config.lr_candidates:
        model.set_weights(start)
        _compile(model, rate, config)
        model.fit(
            _one_hot(train_ds, num_classes),
            epochs=1,
            class_weight=weights,
            shuffle=False,
            verbose=0,
        )
        losses[rate] = float(model.evaluate(_one_hot(val_ds, num_classes), verbose=0)[0])
        log.info("learning-rate search: %.2g -> val loss %.4f", rate, losses[rate])
    model.set_weights(start)
    return min(losses, key=losses.get)


def _one_hot(ds, num_classes: int):
    return ds.map(lambda x, y, *rest: (x, keras.ops.one_hot(y, num_classes), *rest))
