"""PrincipalConv2D / PrincipalDense: exact equivalence to the layers they replace, serialization."""

import numpy as np
import pytest
import tensorflow as tf

from prism_tf import spectral
from prism_tf.layers import PrincipalConv2D, PrincipalDense


@pytest.mark.parametrize(
    "options",
    [
        dict(strides=1, padding="same", dilation_rate=1),
        dict(strides=2, padding="valid", dilation_rate=1),
        dict(strides=1, padding="valid", dilation_rate=2),
        dict(strides=(2, 1), padding="same", dilation_rate=1, use_bias=False),
    ],
)
def test_conv_equals_conv2d_at_full_rank(options):
    x = np.random.default_rng(0).normal(size=(2, 11, 9, 6)).astype(np.float32)
    conv = tf.keras.layers.Conv2D(8, 3, activation="relu", **options)
    expected = conv(x).numpy()
    layer = PrincipalConv2D(8, 3, rank=8, activation="relu", **options)
    layer.build(x.shape)
    a, b, s = spectral.factorize_kernel(conv.kernel)
    layer.set_factors(a, b, s, bias=conv.bias if conv.use_bias else None)
    out = layer(x).numpy()
    assert out.shape == expected.shape == tuple(layer.compute_output_shape(x.shape))
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-4


def test_dense_equals_dense_and_scale_is_applied():
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    dense = tf.keras.layers.Dense(6, activation="tanh")
    expected = dense(x).numpy()
    layer = PrincipalDense(6, rank=6, activation="tanh")
    layer.build(x.shape)
    a, b, s = spectral.factorize_kernel(dense.kernel)
    layer.set_factors(a, b, s, bias=dense.bias)
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)
    # ω multiplies each kernel's response: doubling ω equals doubling B
    layer.set_factors(a, b / 2, s, bias=dense.bias, scale=2 * np.ones(6, np.float32))
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_trainable_and_frozen_weights():
    layer = PrincipalConv2D(4, 3, rank=3)
    layer.build((None, 8, 8, 2))
    assert [w.name.split("/")[-1] for w in layer.trainable_weights] == [
        "principal_kernels:0", "combination:0", "bias:0"]
    assert [w.name.split("/")[-1] for w in layer.non_trainable_weights] == ["singular_values:0", "kernel_scale:0"]
    assert layer.principal_kernels.shape == (3, 3, 2, 3) and layer.combination.shape == (3, 4)


def test_config_round_trip_and_save_load(tmp_path):
    inputs = tf.keras.Input((8, 8, 3))
    x = PrincipalConv2D(5, 3, rank=2, strides=2, padding="same", activation="relu", name="pc")(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = PrincipalDense(3, rank=2, name="pd")(x)
    model = tf.keras.Model(inputs, outputs)
    clone = PrincipalConv2D.from_config(model.get_layer("pc").get_config())
    assert clone.get_config() == model.get_layer("pc").get_config()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    for path in (tmp_path / "m.keras", tmp_path / "m.h5", tmp_path / "saved"):
        tf.keras.models.save_model(model, path)
        loaded = tf.keras.models.load_model(path)
        np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PrincipalDense(3, rank=0)
    with pytest.raises(ValueError, match="padding"):
        PrincipalConv2D(3, 3, rank=2, padding="causal")
