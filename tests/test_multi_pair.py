"""Layers with several kernels (docs/algorithm.md §1): `PrincipalLSTM`, `PrincipalGRU` and
`PrincipalMultiHeadAttention` are exact at full rank against the Keras layers they replace, every strategy samples
each factor pair on its own, an extracted sub-model's cell is genuinely smaller and equals the Keras layer built from
its rank-k kernels, costs are the analytic counts, and the kinds kept whole say why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import prism_tf
from prism_tf import kinds
from prism_tf.layers.pairs import pair_weight_name
from prism_tf.local_step import frobenius_gradients


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _tokens(n=5, steps=9, vocabulary=30, seed=0):
    x = np.random.default_rng(seed).integers(1, vocabulary, (n, steps)).astype(np.int32)
    x[:2, :3] = 0  # padded fronts: masking
    return x


def _recurrent_model(layer_type, **options):
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((9,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(30, 8, mask_zero=True, name="embed")(inputs)
    x = layer_type(12, return_sequences=True, name="rnn1", **options)(x)
    x = layer_type(10, name="rnn2")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("layer_type, options", [
    (tf.keras.layers.LSTM, {}),
    (tf.keras.layers.LSTM, {"go_backwards": True}),
    (tf.keras.layers.LSTM, {"activation": "relu", "use_bias": False}),
    (tf.keras.layers.GRU, {}),
    (tf.keras.layers.GRU, {"go_backwards": True}),
])
def test_recurrent_layers_are_exact_at_full_rank_and_back(layer_type, options):
    model = _recurrent_model(layer_type, **options)
    # Non-zero biases so that the bias layout (LSTM [4H], GRU [2, 3H]) is checked too.
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.RNN) and layer.cell.use_bias:
            layer.cell.bias.assign(np.random.default_rng(1).normal(size=layer.cell.bias.shape))
    factorized = prism_tf.factorize(model)
    assert [f.name for f in factorized.prism_report.factorized] == [
        "embed", "rnn1/input", "rnn1/recurrent", "rnn2/input", "rnn2/recurrent"]
    x = _tokens()
    assert _rel(factorized(x), model(x)) < 1e-5
    plain = prism_tf.unfactorize(factorized)
    assert type(plain.get_layer("rnn1")) is layer_type
    assert _rel(plain(x), model(x)) < 1e-5


def test_return_state_and_sequences_match_keras():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((7, 5))
    outputs, h, c = tf.keras.layers.LSTM(6, return_sequences=True, return_state=True, name="lstm")(inputs)
    model = tf.keras.Model(inputs, [outputs, h, c])
    factorized = prism_tf.factorize(model)
    x = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)
    for got, want in zip(factorized(x), model(x), strict=True):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("call", ["self", "cross", "causal", "mask"])
def test_attention_is_exact_at_full_rank_and_back(call):
    tf.keras.utils.set_random_seed(0)
    query, other, mask = tf.keras.Input((6, 8)), tf.keras.Input((4, 5)), tf.keras.Input((6, 4), dtype=tf.bool)
    attention = tf.keras.layers.MultiHeadAttention(2, 3, value_dim=4, name="mha")
    if call == "self":
        out = attention(query, query)
    elif call == "cross":
        out = attention(query, other)
    elif call == "causal":
        out = attention(query, query, use_causal_mask=True)
    else:
        out = attention(query, other, attention_mask=mask)
    model = tf.keras.Model([query, other, mask], tf.keras.layers.Dense(2, name="head")(out))
    for w in attention.weights:
        if "bias" in w.name:
            w.assign(np.random.default_rng(2).normal(size=w.shape))
    with pytest.raises(ValueError, match="attention=True"):  # kept whole by default, and the report says how
        prism_tf.factorize(model)
    factorized = prism_tf.factorize(model, attention=True)
    assert {f.name for f in factorized.prism_report.factorized} == {"mha/query", "mha/key", "mha/value", "mha/output"}
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 6, 8)).astype(np.float32), rng.normal(size=(3, 4, 5)).astype(np.float32),
         rng.random((3, 6, 4)) < 0.7]
    assert _rel(factorized(x), model(x)) < 1e-5
    plain = prism_tf.unfactorize(factorized)
    assert type(plain.get_layer("mha")) is tf.keras.layers.MultiHeadAttention
    assert _rel(plain(x), model(x)) < 1e-5


@pytest.mark.parametrize("strategy", prism_tf.STRATEGIES)
def test_every_strategy_samples_each_pair_on_its_own(strategy):
    factorized = prism_tf.factorize(_recurrent_model(tf.keras.layers.LSTM))
    selection = prism_tf.sample(factorized, 0.3, seed=(0, 1, 2), strategy=strategy, clients_per_round=4)
    ranks = {"embed": 8, "rnn1/input": 8, "rnn1/recurrent": 12, "rnn2/input": 12, "rnn2/recurrent": 10}
    assert {g: s.rank for g, s in selection.layers.items()} == ranks
    assert selection.sizes() == {g: math.ceil(0.3 * r) for g, r in ranks.items()}
    # Pairs draw from their own streams: another layer's or pair's draw is not a copy of this one.
    draws = [tuple(prism_tf.sample(factorized, 0.3, seed=s, strategy="uniform").layers["rnn1/recurrent"].indices)
             for s in range(8)]
    assert len(set(draws)) > 1


def test_a_sub_model_cell_is_the_keras_cell_of_its_rank_k_kernels():
    model = _recurrent_model(tf.keras.layers.LSTM)
    factorized = prism_tf.factorize(model)
    selection = prism_tf.sample(factorized, 0.25, seed=3)
    sub = prism_tf.extract(factorized, selection)
    cell = sub.get_layer("rnn1")
    k_in, k_rec = selection.layers["rnn1/input"].size, selection.layers["rnn1/recurrent"].size
    assert cell.factors("input").principal.shape == (8, k_in) and cell.factors("input").combination.shape == (k_in, 48)
    assert cell.factors("recurrent").principal.shape == (12, k_rec)
    assert prism_tf.SubmodelPlan.of(sub).groups["rnn1/recurrent"].size == k_rec
    # The same sub-model as plain Keras layers whose kernels are the kept terms A[:, idx]·B[idx]: equal outputs.
    full = factorized.get_layer("rnn1")
    for pair in ("input", "recurrent"):
        idx = selection.layers[f"rnn1/{pair}"].indices
        want = full.factors(pair).principal.numpy()[:, idx] @ full.factors(pair).combination.numpy()[idx]
        np.testing.assert_allclose(cell.pair_kernel(pair).numpy(), want, rtol=1e-5, atol=1e-6)
    x = _tokens(seed=4)
    assert _rel(prism_tf.unfactorize(sub)(x), sub(x)) < 1e-5


def test_merge_writes_back_only_the_sampled_kernels_of_each_pair():
    factorized = prism_tf.factorize(_recurrent_model(tf.keras.layers.GRU))
    selection = prism_tf.sample(factorized, 0.25, seed=5)
    sub = prism_tf.extract(factorized, selection)
    for variable in sub.trainable_variables:
        variable.assign(variable + 1.0)
    before = {w.name: w.numpy() for w in factorized.get_layer("rnn2").weights}
    merged = prism_tf.merge(factorized, sub, selection)
    layer = merged.get_layer("rnn2")
    for pair in ("input", "recurrent"):
        idx = selection.layers[f"rnn2/{pair}"].indices
        name = next(n for n in before if pair_weight_name(pair, "combination") in n)
        b = layer.factors(pair).combination.numpy()
        untouched = np.setdiff1d(np.arange(b.shape[0]), idx)
        np.testing.assert_array_equal(b[untouched], before[name][untouched])
        np.testing.assert_allclose(b[idx], before[name][idx] + 1.0, rtol=1e-6)


def test_lstm_cost_is_the_analytic_count_and_the_authors_shape_costs_a_quarter():
    steps, embed, hidden = 200, 64, 256
    inputs = tf.keras.Input((steps,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(10000, embed, name="embed")(inputs)
    x = tf.keras.layers.LSTM(hidden, return_sequences=True, name="lstm1")(x)
    x = tf.keras.layers.LSTM(hidden, name="lstm2")(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="head")(x))
    full = prism_tf.cost(model)["flops"]
    assert full == steps * 4 * hidden * (embed + hidden) + steps * 4 * hidden * (2 * hidden) + hidden * 2
    factorized = prism_tf.factorize(model)
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, 0.2, seed=0))
    r_embed, r_in1, r_rec, r_in2 = 13, 13, 52, 52  # ceil(0.2 · r)
    want = (steps * r_embed * embed
            + steps * (r_in1 * (embed + 4 * hidden) + r_rec * (hidden + 4 * hidden))
            + steps * (r_in2 * (hidden + 4 * hidden) + r_rec * (hidden + 4 * hidden)) + hidden * 2)
    assert prism_tf.cost(sub)["flops"] == want
    assert want / full <= 0.30  # per token, a keep-0.2 client trains a quarter of the flops


def test_attention_cost_is_the_analytic_count():
    tokens, dim, heads, key = 16, 32, 4, 8
    inputs = tf.keras.Input((tokens, dim))
    out = tf.keras.layers.MultiHeadAttention(heads, key, name="mha")(inputs, inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(out))
    projections = tokens * dim * heads * key * 3 + tokens * heads * key * dim
    scores = tokens * tokens * heads * 2 * key
    head = tokens * dim * 3
    assert prism_tf.cost(model)["flops"] == projections + scores + head
    factorized = prism_tf.factorize(model, attention=True)
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, 0.25, seed=0))
    k = 8  # ceil(0.25 · 32) for each of q, k, v, o
    assert prism_tf.cost(sub)["flops"] == 4 * tokens * k * (dim + heads * key) + scores + head


def test_frobenius_decay_reaches_every_pair():
    factorized = prism_tf.factorize(_recurrent_model(tf.keras.layers.LSTM))
    variables = factorized.trainable_variables
    grads = frobenius_gradients(factorized, variables, 1e-3)
    decayed = {v.name.split("/")[-1].split(":")[0] for v, g in zip(variables, grads, strict=True) if g is not None}
    assert decayed == {"principal_kernels", "combination", "input_principal_kernels", "input_combination",
                       "recurrent_principal_kernels", "recurrent_combination"}


def test_saved_and_loaded_with_the_custom_objects(tmp_path):
    factorized = prism_tf.factorize(_recurrent_model(tf.keras.layers.LSTM))
    sub = prism_tf.extract(factorized, prism_tf.sample(factorized, 0.5, seed=1))
    path = tmp_path / "sub.keras"
    sub.save(path)
    loaded = tf.keras.models.load_model(path, custom_objects=prism_tf.CUSTOM_OBJECTS)
    x = _tokens(seed=6)
    np.testing.assert_allclose(loaded(x), sub(x), rtol=1e-6, atol=1e-6)
    assert loaded.get_layer("rnn1").ranks == sub.get_layer("rnn1").ranks


def test_kept_whole_kinds_say_why_and_what_would_change_it():
    inputs = tf.keras.Input((12, 12, 8))
    x = tf.keras.layers.Conv2D(8, 3, name="stem")(inputs)
    x = tf.keras.layers.Conv2D(8, 3, groups=4, name="grouped")(x)
    x = tf.keras.layers.SeparableConv2D(8, 3, name="separable")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    report = prism_tf.plan_factorization(tf.keras.Model(inputs, tf.keras.layers.Dense(2)(x)))
    reasons = {k.name: k.reason for k in report.kept}
    assert "groups=1" in reasons["grouped"]
    assert "skip_pointwise=False" in reasons["separable"]
    seq = tf.keras.Input((5, 3))
    rnn = tf.keras.layers.LSTM(4, dropout=0.2, name="dropped")(seq)
    gru = tf.keras.layers.GRU(4, reset_after=False, name="old_gru")(seq)
    report = prism_tf.plan_factorization(tf.keras.Model(seq, [rnn, gru]))
    reasons = {k.name: k.reason for k in report.kept}
    assert "dropout" in reasons["dropped"] and "Dropout layer" in reasons["dropped"]
    assert "reset_after=False" in reasons["old_gru"]


def test_pair_groups_and_roles_in_the_plan():
    factorized = prism_tf.factorize(_recurrent_model(tf.keras.layers.LSTM))
    plan = prism_tf.SubmodelPlan.of(factorized)
    assert plan.kernel_groups() == ["embed", "rnn1/input", "rnn1/recurrent", "rnn2/input", "rnn2/recurrent"]
    roles = {(t.weight, t.group, t.role) for t in plan.tensors if t.layer == "rnn1"}
    assert ("recurrent_kernel_scale", "rnn1/recurrent", "kernel_scale") in roles
    assert ("bias", None, None) in roles
    assert kinds.factor_role(factorized.get_layer("rnn1"), "input_principal_kernels") == ("rnn1/input",
                                                                                         "principal_kernels")


def _tied_model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((7,), dtype=tf.int32)
    embed = prism_tf.layers.ReversibleEmbedding(40, 16, name="embed")
    x = tf.keras.layers.LSTM(16, return_sequences=True, name="lstm")(embed(inputs))
    return tf.keras.Model(inputs, embed(x, reverse=True))


def test_a_tied_embedding_and_output_projection_share_one_factor_pair():
    model = _tied_model()
    x = np.random.default_rng(0).integers(0, 40, (3, 7)).astype(np.int32)
    assert prism_tf.cost(model)["layers"]["embed"] == 7 * 16 * 40  # the lookup is free, the projection is not
    factorized = prism_tf.factorize(model)
    assert [f.name for f in factorized.prism_report.factorized] == ["embed", "lstm/input", "lstm/recurrent"]
    assert _rel(factorized(x), model(x)) < 1e-5
    plain = prism_tf.unfactorize(factorized)
    assert type(plain.get_layer("embed")) is prism_tf.layers.ReversibleEmbedding and _rel(plain(x), model(x)) < 1e-5
    selection = prism_tf.sample(factorized, 0.25, seed=0)
    sub = prism_tf.extract(factorized, selection)
    k = selection.layers["embed"].size
    assert k == 4 and sub.get_layer("embed").principal_kernels.shape == (40, 4)
    # Both calls go through the same rank-k factors: lookup k·dim, tied projection k·(dim + vocabulary) per step.
    assert prism_tf.cost(sub)["layers"]["embed"] == 7 * k * 16 + 7 * k * (16 + 40)
    # The sub-model equals the plain tied model built from its kernels A[:, idx]·B[idx].
    assert _rel(prism_tf.unfactorize(sub)(x), sub(x)) < 1e-5
