"""PriSM's peers as selection rules on the same harness (PRISM.md §6)."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from tff_pipelines.driver import TrainConfig, parse_keep_mix, small_width
from tff_pipelines.methods import METHODS, Method
from tff_pipelines.process import build_prism_process


@pytest.fixture(scope="module")
def plain():
    return prism_tf.models.resnet18(width=8)


def test_width_methods_slice_every_free_channel_group(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    heterofl = Method("heterofl", keep_ratio=0.5).select(plan, {}, (0, 0, 0))
    dropout_a = Method("fed_dropout", keep_ratio=0.5).select(plan, {}, (0, 0, 0))
    dropout_b = Method("fed_dropout", keep_ratio=0.5).select(plan, {}, (0, 0, 1))
    assert set(heterofl.channels) == set(plan.free_channel_groups())
    for group, idx in heterofl.channels.items():
        np.testing.assert_array_equal(idx, np.arange(plan.groups[group].size // 2))  # nested: the first channels
    assert any(not np.array_equal(dropout_a.channels[g], dropout_b.channels[g]) for g in dropout_a.channels)
    sub = prism_tf.extract(plain, heterofl)
    assert prism_tf.cost(sub)["flops"] / prism_tf.cost(plain)["flops"] == pytest.approx(0.25, abs=0.03)


def test_fjord_draws_nested_widths_per_client(plain):
    plan = prism_tf.SubmodelPlan.of(plain)
    method = Method("fjord", keep_ratio=1.0)
    widths = set()
    for client in range(12):
        keep = method.client_keep_ratio(np.random.default_rng(client))
        sel = method.select(plan, {}, (0, 0, client), keep_ratio=keep)
        stem = sel.channels["stage1_block2_2_conv:out"]
        np.testing.assert_array_equal(stem, np.arange(len(stem)))
        widths.add(len(stem))
    assert widths == {2, 4, 6, 8}


def test_spectral_methods_and_fedavg(plain):
    fm = prism_tf.factorize(plain)
    plan = prism_tf.SubmodelPlan.of(fm)
    s = {layer.name: layer.singular_values.numpy() for layer in prism_tf.principal_layers(fm)}
    fedhm = Method("fedhm", keep_ratio=0.25)
    assert fedhm.strategy == "top" and fedhm.spectral
    sel = fedhm.select(plan, s, (0, 1, 2))
    for name, layer_sel in sel.layers.items():
        np.testing.assert_array_equal(layer_sel.indices, np.sort(np.argsort(-s[name], kind="stable")[:layer_sel.size]))
    assert Method("fedavg").select(plan, s, (0, 0, 0)).indices() == {}
    assert Method("fedavg").sizes(plan) == {}
    assert set(METHODS) == {"prism", "fedavg", "small", "heterofl", "fjord", "fed_dropout", "fedhm"}


def test_small_model_is_as_cheap_as_a_submodel():
    config = TrainConfig(model="resnet18", width=16, keep_ratio=0.2)
    width = small_width(config, (32, 32, 3), 10)
    fm = prism_tf.factorize(prism_tf.models.resnet18(width=16))
    plan = prism_tf.SubmodelPlan.of(fm)
    target = prism_tf.cost(prism_tf.submodel_architecture(fm, plan, plan.sizes_with(Method("prism").sizes(plan))))
    assert prism_tf.cost(prism_tf.models.resnet18(width=width))["flops"] <= target["flops"]
    assert prism_tf.cost(prism_tf.models.resnet18(width=width + 1))["flops"] > target["flops"]


def test_keep_mix_parsing():
    assert parse_keep_mix("0.2:0.6,0.4:0.4") == ((0.2, 0.6), (0.4, 0.4))
    with pytest.raises(ValueError, match="keep-mix"):
        parse_keep_mix("0.2-0.6")
    with pytest.raises(ValueError, match="keep-mix ratio"):
        parse_keep_mix("1.2:1")


@pytest.mark.parametrize("method", ["heterofl", "fed_dropout", "fedhm"])
def test_baselines_run_real_rounds(method):
    shape = (8, 8, 3)
    rng = np.random.default_rng(0)
    data = [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.random((8, *shape), dtype=np.float32), y=rng.integers(0, 10, 8).astype(np.int32)))
        for _ in range(2)]
    process = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape), method=method,
                                  keep_ratio=0.5, batch_size=4, distribution="broadcast")
    state = process.initialize()
    with pytest.raises(ValueError, match="drop_remainder=True"):
        process.next(state, [ds.batch(4) for ds in data])
    before = process.get_model_weights(state)
    state, metrics = process.next(state, [ds.batch(4, drop_remainder=True) for ds in data])
    after = process.get_model_weights(state)
    assert metrics["num_examples"] == 16 and np.isfinite(metrics["loss"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    assert metrics["client_flops_per_example"] < process.full_cost["flops"]


@pytest.mark.parametrize("strategy,output_keep", [("unbiased", None), ("collective", 0.5), ("uniform", 0.5)])
def test_strategies_and_memory_efficient_variant_run_real_rounds(strategy, output_keep):
    shape = (8, 8, 1)
    rng = np.random.default_rng(1)
    data = [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.random((8, *shape), dtype=np.float32), y=rng.integers(0, 10, 8).astype(np.int32)))
        .batch(4, drop_remainder=True) for _ in range(3)]
    process = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape), keep_ratio=0.5,
                                  strategy=strategy, output_keep=output_keep, batch_size=4)
    state = process.initialize()
    selections = process.selections(state, 3)
    if strategy != "uniform":
        assert any(np.any(sel.scale > 1) for s in selections for sel in s.layers.values())  # ω = 1/π or C/(1+...)
    if output_keep:
        assert all(s.channels for s in selections)
    state, metrics = process.next(state, data)
    assert metrics["num_examples"] == 24 and np.isfinite(metrics["loss"])
    fm = process.assign_to(state)
    for layer in prism_tf.principal_layers(fm):
        np.testing.assert_array_equal(layer.kernel_scale.numpy(), np.ones(layer.rank))  # ω is a client-side factor
