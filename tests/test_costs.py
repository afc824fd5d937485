"""`prism_tf.cost`: parameters, multiply-adds and activation bytes, by hand and for ResNet-18 (docs/algorithm.md §5)."""

import pytest
import tensorflow as tf

import prism_tf


def test_cost_ratios_for_resnet18_at_keep_02():
    full = prism_tf.models.resnet18(width=64)
    fm = prism_tf.factorize(full)
    sub = prism_tf.extract(fm, prism_tf.sample(fm, 0.2, seed=0))
    c_full, c_sub = prism_tf.cost(full), prism_tf.cost(sub)
    assert c_full["params"] == full.count_params()
    # docs/algorithm.md §2: flops 0.239x at width 64
    assert c_sub["flops"] / c_full["flops"] == pytest.approx(0.239, abs=0.002)
    assert c_sub["params"] / c_full["params"] <= 0.25
    # factorized layers alone: <= 0.25x in both
    names = [layer.name for layer in prism_tf.kinds.principal_layers(fm)]
    flops_f = sum(c_full["layers"][n] for n in names)
    flops_s = sum(c_sub["layers"][n] for n in names)
    assert flops_s / flops_f <= 0.25
    params_f = sum(full.get_layer(n).count_params() for n in names)
    params_s = sum(sub.get_layer(n).count_params() for n in names)
    assert params_s / params_f <= 0.25


def test_cost_counts_by_hand():
    inputs = tf.keras.Input((8, 8, 2))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="c")(inputs)  # 64 px · 3·3·2·4 = 4608
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(5, name="d")(x)  # 4·5 = 20
    model = tf.keras.Model(inputs, out)
    c = prism_tf.cost(model)
    assert c["flops"] == 4608 + 20
    assert c["params"] == 3 * 3 * 2 * 4 + 4 + 4 * 5 + 5
    assert c["activation_bytes"] == 4 * (64 * 4 + 4 + 5)
    fm = prism_tf.factorize(model, skip_first_conv=False, min_rank=1)  # rank 4: 64 · 4 · (18 + 4) = 5632
    assert prism_tf.cost(fm)["layers"]["c"] == 64 * 4 * (18 + 4)
    with pytest.raises(ValueError, match="not"):
        prism_tf.cost(model, input_shape=(4, 4, 2))
