"""Quantization-aware fine-tuning of a trained model by distillation from itself (`prism_tf.compression`).

`quantization_aware_finetune` wraps the model with tfmot's fake quantization (`quantize_model`: our configs for the
principal layers, tfmot's defaults for the rest) and trains the quantized copy for a number of steps to reproduce
the float model's outputs: the loss is the Kullback-Leibler divergence ``KL(softmax(teacher) ‖ softmax(student))``
between the float model's logits (the teacher, fixed) and the quantized model's, on unlabeled images. No labels are
needed, so the images can be any inputs of the task's kind: the exporter uses the run's calibration images (training
data); a deployment would use a small public or synthetic set. Distilling rather than fitting labels also keeps the
measurement honest: the fine-tuning recovers what quantization lost and does not train the model further.

BatchNorm layers are frozen (``trainable=False``: they normalize with their moving statistics, which the fine-tuning
leaves alone), as tfmot recommends for QAT of a trained model, and every other trainable weight (the factors ``A``,
``B``, biases, the plain kernels) is updated by Adam.

Activation ranges: tfmot starts every activation quantizer's range at [−6, 6] and moves it towards each training
batch's min and max by 0.1% per step (an exponential moving average of decay 0.999), which suits a training run of
many thousands of steps; after a short fine-tuning the ranges would still be mostly ±6, far wider (or narrower)
than the activations, and the quantized model worse than a post-training one. `calibrate_ranges` therefore first
sets every range to the mean of the batches' minima and maxima (one forward pass over ``batches``, the same images a
post-training conversion calibrates on), and the fine-tuning then moves them as tfmot does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from prism_tf.compression.quantization import quantize_model
from prism_tf.kinds import walk_layers


@dataclasses.dataclass
class FinetuneResult:
    """What `quantization_aware_finetune` trained: the quantized model and its distillation losses."""

    model: tf.keras.Model  # the quantization-aware model (tfmot wrappers); converts with the TFLite converter
    steps: int
    losses: list[float]  # KL divergence of each step, before its update
    seconds: float

    @property
    def first_loss(self) -> float:
        """Distillation loss of the quantized model before any update (the quantization error to recover)."""
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        """Mean loss of the last tenth of the steps (at least one step)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(np.mean(tail))


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor) -> tf.Tensor:
    """Mean ``KL(softmax(teacher) ‖ softmax(student))`` over the batch (0 when the two predict alike)."""
    log_teacher = tf.nn.log_softmax(teacher_logits, axis=-1)
    log_student = tf.nn.log_softmax(student_logits, axis=-1)
    return tf.reduce_mean(tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - log_student), axis=-1))


def calibrate_ranges(quantized: tf.keras.Model, batches: Sequence[np.ndarray]) -> None:
    """Set every moving-average activation range of a tfmot-quantized model to the mean, over ``batches``, of each
    batch's minimum and maximum (a training-mode forward pass per batch; weights and BatchNorm statistics are not
    changed when BatchNorm is frozen).

    tfmot's quantizers call ``quant_ops.MovingAvgQuantize`` with a fixed decay of 0.999; while this function traces
    its forward pass that decay is replaced by ``(k−1)/k`` at the ``k``-th batch, which makes each range the running
    mean of the batch ranges (the first batch's range replaces the initial ±6 outright).
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    decay = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    original = quant_ops.MovingAvgQuantize

    def running_mean(*args: object, ema_decay: float = 0.999, **kwargs: object) -> tf.Tensor:
        return original(*args, ema_decay=decay, **kwargs)

    forward = tf.function(lambda x: quantized(x, training=True))
    quant_ops.MovingAvgQuantize = running_mean  # read by the quantizers at trace time (first call below)
    try:
        for k, batch in enumerate(batches, 1):
            decay.assign((k - 1) / k)
            forward(tf.constant(np.asarray(batch, np.float32)))
    finally:
        quant_ops.MovingAvgQuantize = original


def quantization_aware_finetune(
    model: tf.keras.Model,
    batches: Sequence[np.ndarray],
    steps: int,
    *,
    learning_rate: float = 1e-4,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """``model`` (float, outputs logits) quantized by `quantize_model` and fine-tuned ``steps`` steps to match it.

    Args:
      model: a trained functional or Sequential model that takes the inputs of ``batches`` (preprocessed) and
        returns logits; it is not changed.
      batches: input batches (no labels), visited in a seeded random order, again and again if ``steps`` exceeds
        their number.
      steps: optimizer steps (at least 1).
      learning_rate: Adam's.
      seed: the batch order's.
      log: called with a progress line about ten times over the run (and after the last step).

    Raises:
      ValueError: ``steps`` < 1, no batches, or a layer tfmot cannot quantize (named, `quantize_model`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"quantization-aware fine-tuning needs at least 1 step, got {steps!r}")
    if not len(batches):
        raise ValueError("quantization-aware fine-tuning needs at least one batch of images")
    frozen = [layer for layer in walk_layers(model)
              if isinstance(layer, tf.keras.layers.BatchNormalization) and layer.trainable]
    for layer in frozen:  # quantize_model clones from each layer's config, which carries ``trainable``
        layer.trainable = False
    try:
        quantized = quantize_model(model)
    finally:
        for layer in frozen:
            layer.trainable = True
    calibrate_ranges(quantized, batches)
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor) -> tf.Tensor:
        target = model(x, training=False)
        with tf.GradientTape() as tape:
            loss = distillation_loss(target, quantized(x, training=True))
        gradients = tape.gradient(loss, quantized.trainable_variables)
        optimizer.apply_gradients(zip(gradients, quantized.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng([seed, 17])
    order: list[int] = []
    losses = []
    every = max(1, steps // 10)
    began = time.perf_counter()
    for i in range(1, int(steps) + 1):
        if not order:
            order = list(rng.permutation(len(batches)))
        losses.append(float(step(tf.constant(np.asarray(batches[order.pop()], np.float32)))))
        if log is not None and (i % every == 0 or i == steps):
            log(f"quantization-aware fine-tuning: step {i}/{steps}, distillation loss {losses[-1]:.5f} "
                f"(first {losses[0]:.5f}), {time.perf_counter() - began:.0f} s")
    return FinetuneResult(quantized, int(steps), losses, time.perf_counter() - began)


__all__ = ["FinetuneResult", "calibrate_ranges", "distillation_loss", "quantization_aware_finetune"]
