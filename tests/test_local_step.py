"""`prism_tf.local_step`: the gradient arithmetic of one local step, by hand (docs/algorithm.md §7).

The TFF client (tests/test_client_work.py) and the TFLite train signature (tests/test_tflite_train.py) check the same
functions inside their step; here they are checked alone, on a model with every kind the registry knows."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import local_step


@pytest.fixture(scope="module")
def model():
    inputs = tf.keras.Input((6, 6, 3))
    x = tf.keras.layers.Conv2D(4, 3, name="stem")(inputs)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = tf.keras.layers.Dense(6, name="hidden")(x)
    fm = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="head")(x)), min_rank=1)
    sub = prism_tf.extract(fm, prism_tf.sample(fm, 0.5, seed=0, strategy="unbiased"))
    return sub


def test_weight_decay_reaches_plain_conv_and_dense_kernels_only(model):
    variables = model.trainable_variables
    decayed = [v.name for v, g in zip(variables, local_step.weight_decay_gradients(model, variables, 0.5),
                                      strict=True) if g is not None]
    assert sorted(n.split("/")[0] for n in decayed) == ["head", "stem"]  # not factors, depthwise, BN, biases
    for v, g in zip(variables, local_step.weight_decay_gradients(model, variables, 0.5), strict=True):
        if g is not None:
            np.testing.assert_array_equal(g, 0.5 * v.numpy())


def test_clip_lr_scales_each_kernel_by_min_1_tau_over_omega(model):
    layer = model.get_layer("conv")
    omega = np.array([0.5, 4.0, 20.0, 1.0], np.float32)[: layer.rank]
    layer.kernel_scale.assign(omega)
    factors = local_step.clip_lr_factors(model, [layer.principal_kernels, layer.combination], 2.0)
    expected = np.minimum(1.0, 2.0 / omega)
    np.testing.assert_allclose(np.asarray(factors[0]).reshape(-1), expected)
    np.testing.assert_allclose(np.asarray(factors[1]).reshape(-1), expected)
    assert np.asarray(factors[0]).shape == (1, 1, 1, layer.rank)


def test_step_gradients_order_frobenius_cliplr_clip_then_weight_decay(model):
    layer = model.get_layer("hidden")
    variables = [layer.principal_kernels, layer.combination]
    zeros = [tf.zeros_like(v) for v in variables]
    options = local_step.StepOptions(clip_norm=1e-3, clip_lr_tau=None, frobenius_decay=1.0, weight_decay=0.0)
    grads = local_step.step_gradients(model, variables, zeros, options)
    norm = float(tf.linalg.global_norm(grads))
    assert norm == pytest.approx(1e-3, rel=1e-5)  # the Frobenius term was added before the clip
    a, b = local_step.frobenius_terms(layer.principal_kernels, layer.combination, layer.kernel_scale)
    raw = np.sqrt(float(tf.reduce_sum(a * a) + tf.reduce_sum(b * b)))
    np.testing.assert_allclose(grads[0], np.asarray(a) * 1e-3 / raw, rtol=1e-5)
