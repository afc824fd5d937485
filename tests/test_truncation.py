"""Rank-truncated deployment (`prism_tf.truncation`, docs/export.md "Picking a rank"): the energy and share rules on
known spectra, the kept kernels chosen by ``s``, exactness at rank share 1, the smaller form per layer, and a
written model whose size and multiply-adds are the report's."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import truncation
from prism_tf.kinds import principal_layers, walk_layers


@pytest.mark.parametrize("energy, rank", [
    (0.5, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.84, 3), (29 / 30, 3), (0.97, 4), (1.0, 4), (1e-9, 1),
])
def test_energy_rule_on_a_known_spectrum(energy, rank):
    # s² = 16, 9, 4, 1 (Σ = 30): the smallest k with Σ_{i<k} s_i² ≥ E·30, boundaries included
    assert truncation.energy_rank([4.0, 3.0, 2.0, 1.0], energy) == rank
    assert truncation.energy_rank([1.0, 3.0, 4.0, 2.0], energy) == rank  # any order: s decides, not position


def test_share_rule_and_degenerate_spectra():
    assert [truncation.share_rank(10, f) for f in (0.01, 0.1, 0.25, 0.3, 0.5, 1.0)] == [1, 1, 3, 3, 5, 10]
    assert truncation.energy_rank([2.0, 0.0, 0.0], 1.0) == 1  # a zero tail is never needed
    assert truncation.energy_rank([0.0, 0.0], 0.5) == 1
    np.testing.assert_array_equal(truncation.kept_indices([1.0, 4.0, 2.0, 3.0], 2), [1, 3])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"), ({"rank_keep": 0.5, "energy": 0.5}, "exactly one"), ({"rank_keep": 0.0}, r"\(0, 1\]"),
    ({"rank_keep": 1.5}, r"\(0, 1\]"), ({"energy": -0.1}, r"\(0, 1\]"), ({"energy": float("nan")}, r"\(0, 1\]"),
])
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        truncation.truncation_ranks(_mlp(), **kwargs)


def test_a_model_without_principal_layers_is_refused():
    plain = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="factorize it first"):
        truncation.truncate(plain, rank_keep=0.5)


def _mlp(seed: int = 0) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((64,))
    x = tf.keras.layers.Dense(48, activation="relu", name="hidden1")(inputs)
    x = tf.keras.layers.Dense(32, activation="relu", name="hidden2")(x)
    return prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(5, name="classifier")(x)))


def test_ranks_follow_s_and_the_kept_kernels_are_those_of_largest_s():
    model = _mlp()
    layer = model.get_layer("hidden1")  # kernel [64, 48]: rank 48
    s = np.linspace(1.0, 2.0, 48).astype(np.float32)  # ascending: the largest are the *last* kernels
    layer.singular_values.assign(s)
    ranks = truncation.truncation_ranks(model, energy=0.3)
    squared = np.sort(s.astype(np.float64) ** 2)[::-1]
    k = ranks["hidden1"].rank
    assert squared[:k].sum() >= 0.3 * squared.sum() > squared[:k - 1].sum()
    assert ranks["hidden1"].energy == pytest.approx(squared[:k].sum() / squared.sum())
    truncated, _ = truncation.truncate(model, energy=0.3, form="factorized")
    kept = truncated.get_layer("hidden1")
    np.testing.assert_array_equal(kept.principal_kernels.numpy(), layer.principal_kernels.numpy()[:, 48 - k:])
    np.testing.assert_array_equal(kept.singular_values.numpy(), s[48 - k:])


def test_energy_truncation_error_is_the_dropped_energy():
    # After re-factorization (as the server leaves it), ‖W − W_k‖²_F = Σ_{i≥k} s_i²: the best rank-k kernel.
    model = prism_tf.refactorize(_mlp(1))
    truncated, report = truncation.truncate(model, energy=0.8, form="factorized")
    for entry in report.layers:
        (group,) = entry.groups
        full = model.get_layer(entry.name).dense_kernel().numpy().astype(np.float64)
        kept = truncated.get_layer(entry.name).dense_kernel().numpy().astype(np.float64)
        error = np.sum((full - kept) ** 2) / np.sum(full ** 2)
        assert error == pytest.approx(1 - group.energy, abs=1e-5)
        assert group.energy >= 0.8 - 1e-6 and group.rank < group.full_rank


def test_rank_share_one_reproduces_the_model():
    model = prism_tf.refactorize(prism_tf.factorize(prism_tf.models.resnet18(width=4, num_classes=3)))
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    expected = model(x, training=False).numpy()
    forms = {}
    for form in ("smaller", "factorized"):  # "smaller" is "plain" here: below
        truncated, report = truncation.truncate(model, rank_keep=1.0, form=form)
        np.testing.assert_allclose(truncated(x, training=False).numpy(), expected, atol=1e-5)
        assert all(g.rank == g.full_rank and g.energy == pytest.approx(1.0) for entry in report.layers
                   for g in entry.groups)
        forms[form] = ({entry.form for entry in report.layers}, len(principal_layers(truncated)))
    # at full rank every conv is smaller whole: r·(rows + out) > rows·out when r = min(rows, out)
    assert forms == {"smaller": ({"plain"}, 0), "factorized": ({"factorized"}, 16)}


def test_the_chosen_form_is_the_smaller_and_the_saved_model_costs_what_the_report_says(tmp_path):
    model = _mlp(2)
    truncated, report = truncation.truncate(model, rank_keep=0.25)
    by_name = {entry.name: entry for entry in report.layers}
    # hidden1 [64, 48] at k = 12: factorized 12·(64 + 48) + 48 bias + 2·12 (s, ω) = 1,416 < plain 64·48 + 48 = 3,120
    assert (by_name["hidden1"].factorized_params, by_name["hidden1"].plain_params) == (1416, 3120)
    assert (by_name["hidden1"].factorized_flops, by_name["hidden1"].plain_flops) == (12 * 112, 64 * 48)
    for entry in report.layers:
        assert entry.params == min(entry.factorized_params, entry.plain_params)
        expected = "factorized" if entry.factorized_params < entry.plain_params else "plain"
        assert entry.form == expected
        assert prism_tf.kinds.is_principal(truncated.get_layer(entry.name)) == (expected == "factorized")
    # at rank share 0.9 both are smaller whole (hidden2 [48, 32], k = 29: 29·80 + 58 + 32 > 48·32 + 32)
    _, high = truncation.truncate(model, rank_keep=0.9)
    assert {e.name: e.form for e in high.layers} == {"hidden1": "plain", "hidden2": "plain"}
    path = tmp_path / "t.keras"
    truncated.save(path)
    loaded = tf.keras.models.load_model(path, custom_objects=prism_tf.CUSTOM_OBJECTS)
    cost = prism_tf.cost(loaded)
    assert (cost["params"], cost["flops"]) == (report.params, report.flops)
    kept_whole = sum(int(np.prod(w.shape)) for layer in walk_layers(loaded) if layer.name not in by_name
                     for w in layer.weights)
    assert report.params == kept_whole + sum(entry.params for entry in report.layers)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), truncated(x).numpy(), atol=1e-6)
    assert report.params < report.source_params and report.flops < report.source_flops
    assert "hidden1" in str(report) and report.to_dict()["layers"][0]["params"] == by_name["hidden1"].params


def test_flops_criterion_and_a_layer_with_several_kernels():
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((6,), dtype="int32")
    x = tf.keras.layers.Embedding(200, 16, name="embedding")(inputs)
    x = tf.keras.layers.LSTM(12, name="lstm")(x)
    model = prism_tf.factorize(tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="classifier")(x)))
    _, by_params = truncation.truncate(model, rank_keep=0.25)
    _, by_flops = truncation.truncate(model, rank_keep=0.25, criterion="flops")
    forms = {e.name: e.form for e in by_params.layers}, {e.name: e.form for e in by_flops.layers}
    # an embedding's lookup is free whole: smaller factorized by parameters, whole by multiply-adds
    assert forms[0]["embedding"] == "factorized" and forms[1]["embedding"] == "plain"
    lstm = next(e for e in by_params.layers if e.name == "lstm")
    assert [g.group for g in lstm.groups] == ["lstm/input", "lstm/recurrent"]
    ids = np.random.default_rng(0).integers(0, 200, size=(2, 6)).astype(np.int32)
    full, _ = truncation.truncate(model, rank_keep=1.0, form="factorized")
    np.testing.assert_allclose(full(ids).numpy(), model(ids).numpy(), atol=1e-5)
