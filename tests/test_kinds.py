"""The layer-kind registry (`prism_tf.kinds`): lookups, each kind's factorization, axes and cost, and what adding a
kind takes (one `LayerKind` subclass, registered: factorize, plan, extract, merge, cost and the local step then
serve the new layer with no other change)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import kinds
from prism_tf.kinds.dense import DenseKind


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lookups_by_exact_type_and_by_instance():
    conv, dense = tf.keras.layers.Conv2D(4, 3), tf.keras.layers.Dense(3)
    transpose, depthwise = tf.keras.layers.Conv2DTranspose(4, 3), tf.keras.layers.DepthwiseConv2D(3)
    assert kinds.kind_of(conv).name == "conv2d" and kinds.kind_of(dense).name == "dense"
    assert kinds.kind_of(prism_tf.PrincipalConv2D(4, 3, rank=2)).name == "conv2d"
    # A Conv2D subclass is not factorized (exact type), but its cost and weight decay go by Conv2D's rules.
    assert kinds.kind_of(transpose) is None and kinds.covering_kind(transpose).name == "conv2d"
    assert kinds.kind_of(depthwise) is None and kinds.covering_kind(depthwise).name == "depthwise_conv2d"
    assert kinds.covering_kind(tf.keras.layers.BatchNormalization()) is None
    assert kinds.CUSTOM_OBJECTS == {"PrincipalConv2D": prism_tf.PrincipalConv2D,
                                    "PrincipalDense": prism_tf.PrincipalDense,
                                    "PrincipalConv1D": prism_tf.layers.PrincipalConv1D,
                                    "PrincipalEmbedding": prism_tf.layers.PrincipalEmbedding,
                                    "PrincipalReversibleEmbedding": prism_tf.layers.PrincipalReversibleEmbedding,
                                    "PrincipalLSTM": prism_tf.layers.PrincipalLSTM,
                                    "PrincipalGRU": prism_tf.layers.PrincipalGRU,
                                    "PrincipalMultiHeadAttention": prism_tf.layers.PrincipalMultiHeadAttention}
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(DenseKind())


@pytest.mark.parametrize("layer, shape", [
    (tf.keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu"), (9, 9, 5)),
    (tf.keras.layers.Dense(7, activation="relu"), (11,)),
    (tf.keras.layers.Dense(7), (5, 11)),  # tokens
    (tf.keras.layers.Conv1D(6, 5, padding="same", activation="relu"), (20, 4)),
    (tf.keras.layers.Conv1D(6, 3, strides=2, dilation_rate=1), (21, 4)),
    (tf.keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2), (16, 4)),
])
def test_every_kind_is_exact_at_full_rank_and_back(layer, shape):
    inputs = tf.keras.Input(shape)
    model = tf.keras.Model(inputs, layer(inputs))
    kind = kinds.kind_of(layer)
    principal = kind.to_principal(layer.get_config(), kind.full_ranks(layer))
    principal.build((None, *shape))
    kind.load_factors(principal, layer)
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    assert _rel(principal(x), model(x)) < 1e-5
    plain = kind.to_plain(principal)
    plain.build((None, *shape))
    plain.set_weights(kind.plain_weights(principal))
    assert type(plain) is type(layer) and _rel(plain(x), model(x)) < 1e-5
    # A principal layer's axes: A by (input channels, kernels), B by (kernels, output channels), s and ω by kernels.
    ndim = len(principal.principal_kernels.shape)
    assert kind.weight_axes(principal, "principal_kernels", "in", "out", ndim) == [(ndim - 2, "in"),
                                                                                   (ndim - 1, principal.name)]
    assert kind.weight_axes(principal, "combination", "in", "out", 2) == [(0, principal.name), (1, "out")]
    assert kind.weight_axes(layer, "kernel", "in", "out", ndim) == [(ndim - 2, "in"), (ndim - 1, "out")]


def test_costs_are_the_analytic_counts():
    conv = kinds.kind_of(tf.keras.layers.Conv2D(6, 3))
    layer = tf.keras.layers.Conv2D(6, 3, padding="same")
    layer.build((None, 8, 8, 5))
    assert conv.flops(layer, (None, 8, 8, 5), (None, 8, 8, 6)) == (64 * 9 * 5 * 6, 0)
    principal = prism_tf.PrincipalConv2D(6, 3, rank=2, padding="same")
    principal.build((None, 8, 8, 5))
    assert conv.flops(principal, (None, 8, 8, 5), (None, 8, 8, 6)) == (64 * 2 * (9 * 5 + 6), 64 * 2)
    dense = prism_tf.PrincipalDense(7, rank=3)
    dense.build((None, 4, 11))  # a token axis multiplies the count
    assert kinds.kind_of(dense).flops(dense, (None, 4, 11), (None, 4, 7)) == (4 * 3 * (11 + 7), 4 * 3)
    separable = tf.keras.layers.SeparableConv2D(6, 3, depth_multiplier=2)
    assert kinds.covering_kind(separable).flops(separable, (None, 8, 8, 5), (None, 6, 6, 6)) == (
        36 * (9 * 10 + 10 * 6), 36 * 10)


class MyDense(tf.keras.layers.Dense):
    """A user's own Dense subclass: no kind serves it until one is registered."""


class MyDenseKind(DenseKind):
    """The whole of what a new kind needs: its types and what differs from a kind it resembles."""

    name = "my_dense"
    source = MyDense


def test_a_new_kind_is_one_registered_class(monkeypatch):
    def build():
        inputs = tf.keras.Input((12,))
        hidden = MyDense(10, activation="relu", name="mine")(inputs)
        return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(hidden))

    model = build()
    with pytest.raises(ValueError, match="no factorizable layer"):
        prism_tf.factorize(model)
    monkeypatch.setattr(kinds, "KINDS", [*kinds.KINDS, MyDenseKind()])
    fm = prism_tf.factorize(model)
    assert [f.name for f in fm.prism_report.factorized] == ["mine"]
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    assert _rel(fm(x), model(x)) < 1e-5
    sub = prism_tf.extract(fm, prism_tf.sample(fm, keep_ratio=0.3, seed=2))
    assert sub.get_layer("mine").rank == 3  # ceil(0.3 · 10)
    assert prism_tf.cost(sub)["layers"]["mine"] == 3 * (12 + 10)
    prism_tf.merge(fm, sub, prism_tf.sample(fm, keep_ratio=0.3, seed=2))
    plain = prism_tf.unfactorize(fm)  # a principal class shared by two kinds comes back as the first one's layer
    assert isinstance(plain.get_layer("mine"), tf.keras.layers.Dense)
    assert _rel(plain(x), fm(x)) < 1e-5


def test_a_conv1d_model_factorizes_samples_trains_and_merges():
    """A keyword-spotting style Conv1D net: every step of a round on the registry's Conv1D kind."""
    inputs = tf.keras.Input((49, 10))  # 49 frames of 10 MFCCs
    x = tf.keras.layers.Conv1D(16, 5, padding="same", activation="relu", name="c1")(inputs)
    x = tf.keras.layers.Conv1D(32, 3, padding="same", activation="relu", name="c2")(x)
    x = tf.keras.layers.Conv1D(32, 3, padding="causal", activation="relu", name="c3")(x)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4, name="head")(x))
    fm = prism_tf.factorize(model)
    assert [f.name for f in fm.prism_report.factorized] == ["c2", "c3"]  # c1 sees the raw features
    x = np.random.default_rng(3).normal(size=(6, 49, 10)).astype(np.float32)
    assert _rel(fm(x), model(x)) < 1e-5
    selection = prism_tf.sample(fm, keep_ratio=0.2, seed=4)
    sub = prism_tf.extract(fm, selection)
    assert [sub.get_layer(n).rank for n in ("c2", "c3")] == [7, 7]  # ceil(0.2 · 32)
    # The analytic count of the factorized part: 49 positions · k · (kernel·Cin + Cout).
    assert prism_tf.cost(sub)["layers"]["c2"] == 49 * 7 * (3 * 16 + 32)
    assert prism_tf.cost(model)["layers"]["c2"] == 49 * 3 * 16 * 32
    sub.compile(optimizer=tf.keras.optimizers.SGD(0.1),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sub.fit(x, np.arange(6) % 4, epochs=1, verbose=0)
    before = fm.get_layer("c2").combination.numpy()
    prism_tf.merge(fm, sub, selection)
    kept = selection.layers["c2"].indices
    np.testing.assert_array_equal(fm.get_layer("c2").combination.numpy()[kept], sub.get_layer("c2").combination.numpy())
    untouched = np.setdiff1d(np.arange(32), kept)
    np.testing.assert_array_equal(fm.get_layer("c2").combination.numpy()[untouched], before[untouched])
    restored = tf.keras.models.clone_model(fm)  # get_config / from_config of PrincipalConv1D
    assert restored.get_layer("c3").get_config() == fm.get_layer("c3").get_config()


def test_an_embedding_is_a_factorized_table():
    """``E = A·B``: exact at full rank, masks kept, a client holds ``vocabulary × k`` of ``A``."""
    inputs = tf.keras.Input((12,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(1000, 64, mask_zero=True, name="embed")(inputs)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)  # honours the mask
    x = tf.keras.layers.Dense(32, activation="relu", name="hidden")(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="head")(x))
    tokens = np.random.default_rng(5).integers(0, 1000, (8, 12)).astype(np.int32)
    tokens[:, 9:] = 0  # padding
    fm = prism_tf.factorize(model)
    assert sorted(f.name for f in fm.prism_report.factorized) == ["embed", "hidden"]
    assert _rel(fm(tokens), model(tokens)) < 1e-5
    selection = prism_tf.sample(fm, keep_ratio=0.2, seed=6)
    sub = prism_tf.extract(fm, selection)
    layer = sub.get_layer("embed")
    assert layer.rank == 13 and tuple(layer.principal_kernels.shape) == (1000, 13)  # ceil(0.2 · 64)
    assert prism_tf.cost(sub)["layers"]["embed"] == 12 * 13 * 64 and "embed" not in prism_tf.cost(model)["layers"]
    kept = selection.layers["embed"].indices
    full = fm.get_layer("embed")
    expected = (full.principal_kernels.numpy()[:, kept] @ full.combination.numpy()[kept])[tokens]
    np.testing.assert_allclose(layer(tokens), expected, rtol=1e-5, atol=1e-6)
    plain = prism_tf.unfactorize(fm)
    assert type(plain.get_layer("embed")) is tf.keras.layers.Embedding and _rel(plain(tokens), model(tokens)) < 1e-5
