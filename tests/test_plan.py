"""Index groups and slicing: PriSM's memory-efficient variant and width-sliced sub-models (docs/algorithm.md §2, §4)."""

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import LayerSelection, Selection


@pytest.fixture(scope="module")
def fm():
    return prism_tf.factorize(prism_tf.models.resnet18(width=8))


def test_groups_follow_the_residual_stream(fm):
    plan = SubmodelPlan.of(fm)
    stream = plan.groups["stage1_block2_2_conv:out"]
    assert set(stream.producers) == {"stem_conv", "stage1_block1_2_conv", "stage1_block2_2_conv"} and stream.free
    assert not plan.groups["classifier:out"].free
    owned = plan.owned_channel_groups()
    assert sorted(owned) == sorted(f"stage{s}_block{b}_1_conv" for s in range(1, 5) for b in (1, 2))
    assert len(plan.kernel_groups()) == 16


def test_output_keep_shrinks_activations_and_round_trips(fm):
    sel = prism_tf.sample(fm, 0.25, seed=1, output_keep=0.5)
    assert set(sel.channels) == set(SubmodelPlan.of(fm).owned_channel_groups().values())
    sub = prism_tf.extract(fm, sel)
    plain = prism_tf.extract(fm, prism_tf.sample(fm, 0.25, seed=1))
    layer = sub.get_layer("stage2_block1_1_conv")
    assert layer.filters == 8 and sub.get_layer("stage2_block1_2_conv").principal_kernels.shape[2] == 8
    assert sub.get_layer("stage2_block1_1_norm").gamma.shape == (8,)
    c_sub, c_plain = prism_tf.cost(sub), prism_tf.cost(plain)
    assert c_sub["activation_bytes"] < 0.85 * c_plain["activation_bytes"]
    assert c_sub["flops"] < c_plain["flops"]
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    assert sub(x).shape == (2, 10)
    before = [w.numpy().copy() for w in fm.weights]
    prism_tf.merge(fm, sub, sel)
    for old, new in zip(before, fm.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())
    first = prism_tf.sample(fm, 0.25, seed=1, output_keep=0.4, output_rule="first")
    np.testing.assert_array_equal(first.channels["stage4_block1_1_conv:out"], np.arange(26))


def test_output_keep_aggregates_b_per_entry():
    """B is averaged per entry (o, i) over the clients that had both kernel i and output o."""
    inputs = tf.keras.Input((3,))
    h = tf.keras.layers.Dense(2, name="h1")(inputs)
    h = tf.keras.layers.Dense(2, name="h2")(h)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="head")(h))
    fm = prism_tf.factorize(model, min_rank=1)
    b = fm.get_layer("h1").combination
    b.assign([[1.0, 2.0], [3.0, 4.0]])
    plan = SubmodelPlan.of(fm)
    assert plan.owned_channel_groups() == {"h1": "h1:out", "h2": "h2:out"}
    full = {n: LayerSelection([0, 1], [1, 1], 2) for n in ("h1", "h2")}
    sel_a = Selection(full, 1.0, "top", channels={"h1:out": np.array([0])})
    sel_b = Selection(full, 1.0, "top", channels={"h1:out": np.array([0, 1])})
    sub_a, sub_b = prism_tf.extract(fm, sel_a), prism_tf.extract(fm, sel_b)
    assert sub_a.get_layer("h1").combination.shape == (2, 1) and sub_a.get_layer("h2").principal_kernels.shape == (1, 2)
    sub_a.get_layer("h1").combination.assign([[10.0], [10.0]])
    sub_b.get_layer("h1").combination.assign([[20.0, 20.0], [20.0, 20.0]])
    prism_tf.aggregate(fm, [(sub_a, sel_a, 1.0), (sub_b, sel_b, 3.0)])
    # column 0: both clients -> (10 + 3·20)/4 = 17.5; column 1: only client b -> 20
    np.testing.assert_allclose(b.numpy(), [[17.5, 20.0], [17.5, 20.0]])


def test_width_slices_of_a_plain_model_make_a_narrower_resnet():
    """HeteroFL's sub-model: the first half of every free channel group is exactly ResNet-18 at half width."""
    model = prism_tf.models.resnet18(width=8)
    plan = SubmodelPlan.of(model)
    channels = {g: np.arange(plan.groups[g].size // 2) for g in plan.free_channel_groups()}
    sel = Selection({}, 0.5, "heterofl", channels=channels)
    sub = prism_tf.extract(model, sel)
    narrow = prism_tf.models.resnet18(width=4)
    assert [w.shape for w in sub.weights] == [w.shape for w in narrow.weights]
    np.testing.assert_array_equal(sub.get_layer("stem_conv").kernel.numpy(),
                                  model.get_layer("stem_conv").kernel.numpy()[..., :4])
    np.testing.assert_array_equal(sub.get_layer("classifier").kernel.numpy(),
                                  model.get_layer("classifier").kernel.numpy()[:32])
    before = [w.numpy().copy() for w in model.weights]
    prism_tf.merge(model, sub, sel)
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_bad_channel_selection_is_named(fm):
    sel = prism_tf.sample(fm, 0.2, seed=0)
    bad = Selection(sel.layers, 0.2, "prism", channels={"classifier:out": np.arange(3)})
    with pytest.raises(ValueError, match="classifier:out"):
        prism_tf.extract(fm, bad)
    with pytest.raises(ValueError, match="output_keep must be in"):
        prism_tf.sample(fm, 0.2, output_keep=0)
