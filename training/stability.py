"""Stability training: the loss also asks for the same answer on a slightly noisier copy.

Zheng et al., "Improving the Robustness of Deep Neural Networks via Stability Training" (CVPR
2016). Each training batch is run twice, as given and with Gaussian pixel noise of a few gray
levels, and ``weight * KL(p(clean) || p(noisy))`` is added to the classification loss (the clean
prediction is the fixed target). A model that keeps its answer under such noise also keeps it
under INT8 rounding, which is what the export's agreement gate measures.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class StabilityTrainer(keras.Model):
    """Wraps a probabilities model for ``fit``; its weights are the wrapped model's own."""

    def __init__(self, inner: keras.Model, weight: float, noise_std: float, seed: int = 0):
        super().__init__(name=f"{inner.name}_stability")
        self.inner = inner
        self.weight = float(weight)
        self.noise_std = float(noise_std)  # in gray levels of the uint8 input
        self._generator = tf.random.Generator.from_seed(seed)

    @property
    def output(self):
        return self.inner.output

    def call(self, images, training=False):
        return self.inner(images, training=training)

    def _noisy(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        x = x + self.noise_std * self._generator.normal(tf.shape(x))
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), images.dtype)

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            clean = self(images, training=True)
            noisy = self(self._noisy(images), training=True)
            loss = self.compute_loss(x=images, y=labels, y_pred=clean, sample_weight=sample_weight)
            divergence = keras.losses.kl_divergence(tf.stop_gradient(clean), noisy)
            loss = loss + self.weight * tf.reduce_mean(divergence)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(labels, clean, sample_weight)
        return {m.name: m.result() for m in self.metrics}
