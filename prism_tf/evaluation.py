"""Test accuracy of a (server or deployed) model, right whatever order the test set is stored in.

No TFF: the driver, the exporter and the notebooks evaluate with the same function.

BatchNorm is the hard part of evaluating a model that nobody trained whole (docs/algorithm.md, "Evaluation"):

- ``batch``: each test batch is normalized with its own statistics, as the PriSM authors evaluate. The examples
  are put in a seeded random order first, so that a test set stored class by class does not give one-class
  batches (which normalize each class away: measured 0.147 against 0.362 on the same model). Needs large
  batches (500 by default); the result depends slightly on the batch composition (within a few tenths of a pp).
- ``moving``: Keras inference with the moving statistics the clients sent back. They describe the *sub-models'*
  activations, not the full model's, and mislead it (measured: 0.10–0.15 where ``batch`` gives 0.36).
- ``recalibrate``: HeteroFL's "static BN": before evaluation the full model's statistics are re-estimated on a
  few training batches (cumulative average of per-batch statistics in training mode), then the model is
  evaluated in inference mode. Deterministic and independent of the test batches; in a deployment the server
  would obtain these statistics by a federated query of a few clients' batch statistics.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf

from prism_tf.kinds import walk_layers

EVAL_NORMS = ("batch", "moving", "recalibrate")
Preprocess = Callable[[np.ndarray], np.ndarray]


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)


def batch_norm_layers(model: tf.keras.Model) -> list[tf.keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, nested models included."""
    return [layer for layer in walk_layers(model) if isinstance(layer, tf.keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model: tf.keras.Model, batches: Iterable[np.ndarray]) -> int:
    """Re-estimate every BatchNorm layer's moving statistics of ``model`` on ``batches`` (in place).

    The new mean and variance are the averages over the batches of the per-batch statistics that each layer sees
    in training mode (PyTorch's cumulative ``momentum=None``, as HeteroFL's static BN). Returns the number of
    batches used. Inputs are already preprocessed float batches.
    """
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [[np.zeros(layer.moving_mean.shape, np.float64), np.zeros(layer.moving_variance.shape, np.float64)]
            for layer in layers]
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # a training-mode call then writes exactly the batch statistics

        forward = _compiled(model, "calibrate")
        for xb in batches:
            forward(tf.constant(xb, tf.float32) if np.issubdtype(np.asarray(xb).dtype, np.floating)
                    else tf.constant(xb))  # token ids stay integers
            for layer, acc in zip(layers, sums, strict=True):
                acc[0] += layer.moving_mean.numpy()
                acc[1] += layer.moving_variance.numpy()
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("recalibrate_batchnorm: no calibration batches")
    for layer, (mean, var) in zip(layers, sums, strict=True):
        layer.moving_mean.assign((mean / count).astype(np.float32))
        layer.moving_variance.assign((var / count).astype(np.float32))
    return count


def calibration_batches(
    x: np.ndarray, batch_size: int, num_examples: int, seed: int, preprocess: Preprocess | None = None
) -> list[np.ndarray]:
    """A seeded random subset of ``num_examples`` training inputs in even batches of ``batch_size``."""
    preprocess = preprocess or _as_float
    n = min(num_examples, len(x))
    batch_size = max(2, min(batch_size, n) - min(batch_size, n) % 2)
    order = np.random.default_rng([seed, 7]).permutation(len(x))[: n - n % batch_size]
    return [preprocess(x[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


# Per model, its traced evaluation functions: a driver evaluates the same server model every round, and a new
# tf.function per call would trace again each time (TensorFlow then warns of frequent retracing).
_COMPILED: weakref.WeakKeyDictionary[tf.keras.Model, dict[str, Callable]] = weakref.WeakKeyDictionary()


def _compiled(model: tf.keras.Model, mode: str) -> Callable:
    """``model``'s traced function for ``mode``: ``calibrate`` (a training-mode forward pass), ``batch`` or
    ``inference`` (summed loss and hits of a masked batch, BatchNorm in training or inference mode)."""
    functions = _COMPILED.setdefault(model, {})
    if mode not in functions:
        functions[mode] = _trace(weakref.ref(model), mode)
    return functions[mode]


def _trace(model_ref: weakref.ref, mode: str) -> Callable:
    # Holds the model weakly: the cache must not keep alive the models it is keyed by.
    if mode == "calibrate":
        @tf.function
        def forward(xb):
            model_ref()(xb, training=True)

        return forward
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def step(xb, yb, mask):
        logits = model_ref()(xb, training=mode == "batch")
        losses = loss_fn(yb, logits)
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), yb), tf.float32)
        if yb.shape.rank > 1:  # a label per step ([B, T] next tokens): each example's mean over its steps
            axes = list(range(1, yb.shape.rank))
            losses, hits = tf.reduce_mean(losses, axes), tf.reduce_mean(hits, axes)
        return tf.reduce_sum(losses * mask), tf.reduce_sum(hits * mask)

    return step


def canonical_order(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded random order of the examples that depends on their contents only, not on how they are stored.

    Each example gets a key from a fixed random projection of its pixels (and its label); sorting by key gives
    the same sequence for any permutation of the same test set, which a seeded shuffle then scatters. Per-batch
    statistics then see the same batches however the data were stored: the result is exactly order-invariant.
    """
    flat = np.asarray(x).reshape(len(x), -1).astype(np.float64)
    projection = np.random.default_rng(12345).standard_normal(flat.shape[1])
    y = np.asarray(y)
    if y.ndim > 1:  # a label per step: its own projection as the key
        labels = y.reshape(len(y), -1).astype(np.float64)
        y = labels @ np.random.default_rng(54321).standard_normal(labels.shape[1])
    keys = np.lexsort((y, flat @ projection))
    return keys[np.random.default_rng([seed, 11]).permutation(len(keys))]


def evaluate(
    model: tf.keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
    norm: str = "batch",
    preprocess: Preprocess | None = None,
    calibration: Iterable[np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` on ``(x, y)``; the model's weights are unchanged afterwards.

    Args:
      model: a Keras classifier returning logits.
      x, y: inputs (uint8 pixels, floats, or integer token ids with a ``preprocess`` that keeps them) and integer
        labels ``[N]``, or ``[N, T]`` for a label per step (loss and accuracy: the mean over all ``N·T`` labels),
        in any order.
      batch_size: evaluation batch size (rounded down to even: odd batch sizes crash TF 2.14's oneDNN kernels
        on these CPUs, docs/pitfalls.md, "oneDNN and batch shapes"). Every example counts once; nothing is padded.
      norm: BatchNorm mode, one of `EVAL_NORMS` (module docstring).
      preprocess: maps a batch of ``x`` to model inputs (default: uint8 / 255).
      calibration: preprocessed training batches for ``norm="recalibrate"`` (`calibration_batches`).
      seed: the order of the test examples for ``norm="batch"``.
    """
    if norm not in EVAL_NORMS:
        raise ValueError(f"norm must be one of {', '.join(EVAL_NORMS)}, got {norm!r}")
    if len(x) != len(y):
        raise ValueError(f"evaluate: {len(x)} inputs but {len(y)} labels")
    if len(x) < 2:
        raise ValueError("evaluate needs at least 2 examples")
    if norm == "recalibrate" and calibration is None:
        raise ValueError("norm='recalibrate' needs calibration batches (prism_tf.evaluation.calibration_batches)")
    preprocess = preprocess or _as_float
    if norm == "batch":  # class-sorted storage must not make one-class batches
        order = canonical_order(x, y, seed)
        x, y = x[order], y[order]
    batch_size = min(batch_size, len(x))
    batch_size -= batch_size % 2
    saved = [(v, v.numpy()) for layer in batch_norm_layers(model) for v in layer.non_trainable_weights]
    try:
        if norm == "recalibrate":
            recalibrate_batchnorm(model, calibration)
        step = _compiled(model, "batch" if norm == "batch" else "inference")
        total_loss = total_hits = 0.0
        for start in range(0, len(x), batch_size):
            begin = min(start, len(x) - batch_size)  # the last batch re-uses seen examples, masked out
            xb, yb = x[begin:begin + batch_size], y[begin:begin + batch_size]
            mask = (np.arange(begin, begin + batch_size) >= start).astype(np.float32)
            loss, hits = step(tf.constant(preprocess(xb)), tf.constant(np.asarray(yb, np.int32)), tf.constant(mask))
            total_loss += float(loss)
            total_hits += float(hits)
    finally:
        for variable, value in saved:  # training-mode calls and recalibration changed them
            variable.assign(value)
    return total_loss / len(x), total_hits / len(x)
