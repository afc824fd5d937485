"""Evaluation is right by construction: storage order does not matter, each BatchNorm mode is what it says."""

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf.evaluation import calibration_batches, evaluate, recalibrate_batchnorm


def _separable(n_per_class=40, classes=4, seed=0):
    """Class-sorted images whose class is a mean pattern plus noise (stored class by class, like CIFAR here)."""
    patterns = np.random.default_rng(99).uniform(0, 1, (classes, 8, 8, 3))
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.clip(p + rng.normal(0, 0.6, (n_per_class, 8, 8, 3)), 0, 1) for p in patterns])
    y = np.repeat(np.arange(classes), n_per_class).astype(np.int32)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def trained():
    tf.keras.utils.set_random_seed(0)
    x, y = _separable(150)
    model = prism_tf.models.resnet18(width=4, num_classes=4, input_shape=(8, 8, 3))
    model.compile(optimizer=tf.keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    order = np.random.default_rng(1).permutation(len(x))
    model.fit(x[order], y[order], batch_size=16, epochs=4, verbose=0)
    xt, yt = _separable(250, seed=5)
    return model, x, y, xt, yt


def test_sorted_and_shuffled_test_sets_score_the_same(trained):
    model, x, y, xt, yt = trained
    order = np.random.default_rng(3).permutation(len(xt))
    calibration = calibration_batches(x, 100, 400, seed=0)
    for norm in ("batch", "moving", "recalibrate"):
        sorted_acc = evaluate(model, xt, yt, batch_size=200, norm=norm, calibration=calibration)[1]
        shuffled_acc = evaluate(model, xt[order], yt[order], batch_size=200, norm=norm, calibration=calibration)[1]
        assert sorted_acc == shuffled_acc, norm  # exactly: batches are formed by content, not storage
        assert sorted_acc > 0.5, norm  # the model learned (chance is 0.25): the comparison is not vacuous


def test_per_batch_statistics_of_one_class_batches_would_be_wrong(trained):
    """The old default: sorted, unshuffled per-batch statistics. Shuffling inside `evaluate` removes the error."""
    model, _, _, xt, yt = trained
    one_class_batches = np.mean([np.argmax(model(xt[i:i + 40], training=True).numpy(), -1) == yt[i:i + 40]
                                 for i in range(0, len(xt), 40)])
    assert evaluate(model, xt, yt, batch_size=40, norm="batch")[1] > one_class_batches + 0.1


def test_moving_mode_is_keras_evaluate(trained):
    model, _, _, xt, yt = trained
    keras_loss, keras_acc = model.evaluate(xt, yt, batch_size=32, verbose=0)
    loss, acc = evaluate(model, xt, yt, batch_size=40, norm="moving")
    assert acc == pytest.approx(keras_acc, abs=1e-6) and loss == pytest.approx(keras_loss, rel=1e-4)


def test_recalibration_repairs_wrong_moving_statistics_and_restores_them(trained):
    model, x, _, xt, yt = trained
    good = evaluate(model, xt, yt, norm="moving")[1]
    saved = [w.numpy().copy() for w in model.non_trainable_weights]
    try:
        for layer in prism_tf.evaluation.batch_norm_layers(model):  # what sub-model statistics do: too small
            layer.moving_variance.assign(layer.moving_variance * 0.1)
        broken = evaluate(model, xt, yt, norm="moving")[1]
        before = [w.numpy().copy() for w in model.non_trainable_weights]
        repaired = evaluate(model, xt, yt, norm="recalibrate", calibration=calibration_batches(x, 40, 160, 0))[1]
        for old, new in zip(before, model.non_trainable_weights, strict=True):  # evaluation changes nothing
            np.testing.assert_array_equal(old, new.numpy())
    finally:
        for w, value in zip(model.non_trainable_weights, saved, strict=True):
            w.assign(value)
    assert broken < good - 0.1
    assert repaired >= good - 0.05


def test_recalibrated_statistics_are_the_mean_of_batch_statistics():
    inputs = tf.keras.Input((3,))
    bn = tf.keras.layers.BatchNormalization(momentum=0.99)
    model = tf.keras.Model(inputs, bn(inputs))
    rng = np.random.default_rng(0)
    batches = [rng.normal(i, 1 + i, (10, 3)).astype(np.float32) for i in range(3)]
    assert recalibrate_batchnorm(model, batches) == 3
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    # Keras's batch variance here is the biased one (divide by n)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([b.var(0) for b in batches], 0), rtol=1e-4)
    assert bn.momentum == 0.99


def test_bad_arguments(trained):
    model, _, _, xt, yt = trained
    with pytest.raises(ValueError, match="norm must be one of"):
        evaluate(model, xt, yt, norm="running")
    with pytest.raises(ValueError, match="needs calibration batches"):
        evaluate(model, xt, yt, norm="recalibrate")
    with pytest.raises(ValueError, match="inputs but"):
        evaluate(model, xt, yt[:-1])
