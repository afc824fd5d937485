"""Evaluation of the server model: every example counted once, fixed even batches, BatchNorm modes."""

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from tff_pipelines.program.driver import evaluate


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32)


def test_every_example_counts_once_whatever_the_batch_size():
    model = prism_tf.models.small_cnn(width=4, input_shape=(8, 8, 3))
    x, y = _data(37)
    logits = model(x.astype(np.float32) / 255.0).numpy()
    expected_acc = float(np.mean(logits.argmax(-1) == y))
    expected_loss = float(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy().mean())
    for batch_size in (4, 10, 36, 500):
        loss, acc = evaluate(model, x, y, batch_size=batch_size)
        assert acc == pytest.approx(expected_acc) and loss == pytest.approx(expected_loss, rel=1e-5)


def test_batch_norm_modes_leave_moving_statistics_untouched():
    model = prism_tf.models.resnet18(width=4, input_shape=(8, 8, 3))
    x, y = _data(40)
    bn = model.get_layer("stem_norm")
    bn.moving_mean.assign(np.full(4, 3.0, np.float32))
    before = [w.numpy().copy() for w in model.non_trainable_weights]
    moving = evaluate(model, x, y, batch_size=20, norm="moving")
    batch = evaluate(model, x, y, batch_size=20, norm="batch")
    for old, new in zip(before, model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())
    assert moving[0] != pytest.approx(batch[0])  # a shifted moving mean only matters in moving mode
    with pytest.raises(ValueError, match="norm must be one of"):
        evaluate(model, x, y, norm="running")
