"""`prism_tf.server`: the server half of a round as pure functions, checked by hand (docs/algorithm.md §3)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import server
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import LayerSelection, Selection


@pytest.fixture(scope="module")
def mlp():
    inputs = tf.keras.Input((6,))
    hidden = tf.keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="head")(hidden))
    fm = prism_tf.factorize(model, min_rank=1)  # hidden: rank 5
    return fm, SubmodelPlan.of(fm)


def _selection(kernels) -> Selection:
    k = np.asarray(kernels, np.int32)
    return Selection({"hidden": LayerSelection(k, np.ones(len(k), np.float32), 5)}, 0.4, "prism")


def test_accumulator_averages_each_kernel_over_the_clients_that_trained_it(mlp):
    fm, plan = mlp
    weights = [w.numpy() for w in prism_tf.submodel.flat_weights(fm)]
    pos = server.principal_positions(plan)["hidden"]
    acc = server.Accumulator(plan)
    uploads = {}
    for name, kernels, weight, fill in (("a", [0, 2], 3.0, 1.0), ("b", [2, 4], 1.0, 5.0)):
        sub = prism_tf.extract(fm, _selection(kernels))
        values = [np.full(w.shape, fill, np.float32) for w in prism_tf.submodel.flat_weights(sub)]
        uploads[name] = values
        acc.add(values, _selection(kernels), weight, name=name)
    new = acc.average(weights)
    b = new[pos["combination"]]  # rows: kernels
    np.testing.assert_allclose(b[0], 1.0)  # only a
    np.testing.assert_allclose(b[2], (3 * 1.0 + 1 * 5.0) / 4)  # both, weighted
    np.testing.assert_allclose(b[4], 5.0)  # only b
    np.testing.assert_array_equal(b[[1, 3]], weights[pos["combination"]][[1, 3]])  # nobody: unchanged
    assert acc.clients == 2
    # finish_round from the same sums: the same average, re-factorized (the product A·B is what is kept), ω = 1.
    finished, coverage = server.finish_round(plan, weights, acc.sums, acc.counts, 0)
    assert float(coverage) == pytest.approx(3 / 5)
    a_new = np.asarray(new[pos["principal_kernels"]], np.float64)
    product = a_new @ np.asarray(new[pos["combination"]], np.float64)
    again = np.asarray(finished[pos["principal_kernels"]]) @ np.asarray(finished[pos["combination"]])
    np.testing.assert_allclose(again, product, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(finished[pos["kernel_scale"]]), np.ones(5, np.float32))
    s = np.asarray(finished[pos["singular_values"]])
    np.testing.assert_allclose(s, np.linalg.svd(product, compute_uv=False), rtol=1e-5, atol=1e-4)


def test_bad_uploads_are_refused_whole_and_named(mlp):
    fm, plan = mlp
    acc = server.Accumulator(plan)
    sub = prism_tf.extract(fm, _selection([0, 1]))
    values = [w.numpy() for w in prism_tf.submodel.flat_weights(sub)]
    bad = [v.copy() for v in values]
    bad[-1][0] = np.nan
    with pytest.raises(ValueError, match="phone 7: layer 'head' weight 'bias' has non-finite"):
        acc.add(bad, _selection([0, 1]), 2.0, name="phone 7")
    with pytest.raises(ValueError, match="positive finite"):
        acc.add(values, _selection([0, 1]), 0.0)
    with pytest.raises(ValueError, match="selection expects"):
        acc.add(values, _selection([0, 1, 2]), 1.0)
    assert acc.clients == 0 and all(not c.any() for c in acc.counts)


def test_drop_if_not_finite_zeroes_values_and_weight():
    values, weight, metrics, ok = server.drop_if_not_finite([tf.constant([1.0, np.inf])], 3.0, [tf.constant(2.0)])
    assert not bool(ok) and float(weight) == 0 and float(metrics[0]) == 0
    np.testing.assert_array_equal(values[0], [0.0, 0.0])  # not 0·Inf = NaN
    values, weight, _, ok = server.drop_if_not_finite([tf.constant([1.0, 2.0])], 3.0)
    assert bool(ok) and float(weight) == 3 and values[0].numpy().tolist() == [1.0, 2.0]
