"""extract / merge / aggregate: real small models, bit-exact identity, hand-computed per-kernel averages."""

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf.sampling import LayerSelection, Selection


@pytest.fixture(scope="module")
def resnet():
    return prism_tf.factorize(prism_tf.models.resnet18(width=8))


def _snapshot(model):
    return [w.numpy().copy() for w in model.weights]


def test_extract_builds_a_real_smaller_model(resnet):
    sel = prism_tf.sample(resnet, 0.25, seed=3)
    sub = prism_tf.extract(resnet, sel)
    for layer in prism_tf.kinds.principal_layers(sub):
        k = sel.layers[layer.name].size
        assert layer.rank == k and layer.principal_kernels.shape[-1] == k and layer.combination.shape[0] == k
        full = resnet.get_layer(layer.name)
        np.testing.assert_array_equal(layer.principal_kernels.numpy(),
                                      full.principal_kernels.numpy()[..., sel.layers[layer.name].indices])
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    assert sub(x).shape == (2, 10)
    assert sub.count_params() < 0.5 * resnet.count_params()


def test_full_keep_ratio_submodel_equals_full_model(resnet):
    sel = prism_tf.sample(resnet, 1.0, seed=0)
    sub = prism_tf.extract(resnet, sel)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(sub(x, training=False), resnet(x, training=False), atol=1e-5)


def test_extract_then_merge_is_bit_exact_identity(resnet):
    before = _snapshot(resnet)
    for strategy in ("prism", "unbiased"):
        sel = prism_tf.sample(resnet, 0.2, seed=5, strategy=strategy)
        prism_tf.merge(resnet, prism_tf.extract(resnet, sel), sel)
        for old, new in zip(before, resnet.weights, strict=True):
            np.testing.assert_array_equal(old, new.numpy())


def test_merge_writes_back_only_sampled_kernels(resnet):
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=8))
    sel = prism_tf.sample(fm, 0.25, seed=9)
    sub = prism_tf.extract(fm, sel)
    for w in sub.trainable_weights:
        w.assign_add(tf.ones_like(w))
    before = {w.name: w.numpy().copy() for w in fm.weights}
    prism_tf.merge(fm, sub, sel)
    for layer in prism_tf.kinds.principal_layers(fm):
        idx = sel.layers[layer.name].indices
        mask = np.zeros(layer.rank, bool)
        mask[idx] = True
        a_old = before[layer.principal_kernels.name]
        a_new = layer.principal_kernels.numpy()
        np.testing.assert_array_equal(a_new[..., ~mask], a_old[..., ~mask])
        np.testing.assert_allclose(a_new[..., mask], a_old[..., mask] + 1, rtol=1e-6)
        b_old, b_new = before[layer.combination.name], layer.combination.numpy()
        np.testing.assert_array_equal(b_new[~mask], b_old[~mask])
        np.testing.assert_array_equal(layer.singular_values.numpy(), before[layer.singular_values.name])
    stem = fm.get_layer("stem_conv").kernel
    np.testing.assert_allclose(stem.numpy(), before[stem.name] + 1, rtol=1e-6)


def _tiny_model():
    inputs = tf.keras.Input((3,))
    hidden = tf.keras.layers.Dense(2, name="hidden")(inputs)
    out = tf.keras.layers.Dense(2, name="head")(hidden)
    model = tf.keras.Model(inputs, out)
    return prism_tf.factorize(model, min_rank=1)


def test_aggregate_per_kernel_by_hand():
    """Two clients, overlapping kernels, different example counts: every number computed by hand."""
    fm = _tiny_model()
    layer = fm.get_layer("hidden")  # A [3, 2], B [2, 2]
    a0 = np.arange(6, dtype=np.float32).reshape(3, 2)
    b0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    layer.set_factors(a0, b0, np.array([2.0, 1.0], np.float32), bias=np.zeros(2, np.float32))
    sel_1 = Selection({"hidden": LayerSelection([0, 1], [1, 1], 2)}, 1.0, "top")  # client 1 trains both kernels
    sel_2 = Selection({"hidden": LayerSelection([1], [1], 2)}, 0.5, "top")  # client 2 trains kernel 1 only
    sub_1, sub_2 = prism_tf.extract(fm, sel_1), prism_tf.extract(fm, sel_2)
    l1, l2 = sub_1.get_layer("hidden"), sub_2.get_layer("hidden")
    l1.principal_kernels.assign(np.full((3, 2), 10.0)), l1.combination.assign(np.full((2, 2), 10.0))
    l2.principal_kernels.assign(np.full((3, 1), 40.0)), l2.combination.assign(np.full((1, 2), 40.0))
    l1.bias.assign([1.0, 1.0]), l2.bias.assign([5.0, 5.0])
    sub_1.get_layer("head").kernel.assign(np.full((2, 2), 2.0))
    sub_2.get_layer("head").kernel.assign(np.full((2, 2), 6.0))
    prism_tf.aggregate(fm, [(sub_1, sel_1, 30.0), (sub_2, sel_2, 10.0)])
    # kernel 0: only client 1 -> 10; kernel 1: (30·10 + 10·40) / 40 = 17.5
    np.testing.assert_allclose(layer.principal_kernels.numpy(), [[10, 17.5]] * 3)
    np.testing.assert_allclose(layer.combination.numpy(), [[10, 10], [17.5, 17.5]])
    # non-factorized weights: FedAvg over all clients, (30·1 + 10·5)/40 = 2 and (30·2 + 10·6)/40 = 3
    np.testing.assert_allclose(layer.bias.numpy(), [2.0, 2.0])
    np.testing.assert_allclose(fm.get_layer("head").kernel.numpy(), np.full((2, 2), 3.0))
    # equal weighting (the authors' choice) is weight 1 per client: kernel 1 -> 25
    prism_tf.aggregate(fm, [(sub_1, sel_1, 1.0), (sub_2, sel_2, 1.0)])
    np.testing.assert_allclose(layer.combination.numpy()[1], [25.0, 25.0])


def test_untrained_kernel_keeps_its_value():
    fm = _tiny_model()
    layer = fm.get_layer("hidden")
    before = layer.principal_kernels.numpy().copy()
    sel = Selection({"hidden": LayerSelection([1], [1], 2)}, 0.5, "top")
    sub = prism_tf.extract(fm, sel)
    sub.get_layer("hidden").principal_kernels.assign(np.zeros((3, 1)))
    prism_tf.aggregate(fm, [(sub, sel, 4.0)])
    np.testing.assert_array_equal(layer.principal_kernels.numpy()[:, 0], before[:, 0])
    np.testing.assert_array_equal(layer.principal_kernels.numpy()[:, 1], np.zeros(3))


def test_errors_name_the_layer(resnet):
    other = prism_tf.factorize(prism_tf.models.resnet18(width=16))
    sel_other = prism_tf.sample(other, 0.2, seed=0)
    with pytest.raises(ValueError, match="stage1_block1_1_conv.*another model"):
        prism_tf.extract(resnet, sel_other)
    sel = prism_tf.sample(resnet, 0.2, seed=0)
    wrong = prism_tf.extract(resnet, prism_tf.sample(resnet, 0.5, seed=0))
    with pytest.raises(ValueError, match="layer 'stage1_block1_1_conv' weight 'principal_kernels' has shape"):
        prism_tf.merge(resnet, wrong, sel)
    missing = Selection({k: v for k, v in sel.layers.items() if k != "stage2_block1_1_conv"}, 0.2, "prism")
    with pytest.raises(ValueError, match="stage2_block1_1_conv"):
        prism_tf.extract(resnet, missing)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        prism_tf.sample(resnet, 1.5)


