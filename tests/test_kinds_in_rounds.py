"""The new layer kinds in real TFF rounds: a ViT's token MLPs (and its attention), a Conv1D net, a factorized
embedding, LSTM and GRU layers (two factor pairs each), a tied embedding and output projection, each trained
by the TFF process and checked against the same round done by hand with the pure functions (`prism_tf.extract`,
`prism_tf.server.Accumulator`, `prism_tf.server.finish_round`): per-entry aggregation of every kind."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
from round_models import PlusOne

import prism_tf
from prism_tf import server
from prism_tf.federated.methods import Method
from prism_tf.models.zoo import vit
from tff_pipelines.round import client_work
from tff_pipelines.round.process import build_prism_process

BATCH = 4


def _vit():
    tf.keras.utils.set_random_seed(0)
    return vit(width=16, depth=1, heads=2, mlp_ratio=2.0, patch=4, num_classes=3, input_shape=(8, 8, 1))


def _conv1d():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((12, 3))
    x = tf.keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    x = tf.keras.layers.Conv1D(8, 3, padding="causal", activation="relu", name="c2")(x)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


def _embedding():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((6,), dtype=tf.int32)
    x = tf.keras.layers.Embedding(20, 8, name="embed")(inputs)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


def _recurrent(layer):
    def build():
        tf.keras.utils.set_random_seed(0)
        inputs = tf.keras.Input((6,), dtype=tf.int32)
        x = tf.keras.layers.Embedding(20, 8, mask_zero=True, name="embed")(inputs)
        x = layer(12, return_sequences=True, name="rnn1")(x)
        x = layer(10, name="rnn2")(x)
        return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))
    return build


def _tied():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((6,), dtype=tf.int32)
    embed = prism_tf.layers.ReversibleEmbedding(20, 8, name="embed")
    x = tf.keras.layers.GRU(8, return_sequences=True, name="rnn")(embed(inputs))
    x = tf.keras.layers.GlobalAveragePooling1D()(embed(x, reverse=True))  # tied output projection
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


CASES = {
    "vit": (_vit, (8, 8, 1), np.float32, ["block1_mlp1", "block1_mlp2"], {}),
    "vit_attention": (_vit, (8, 8, 1), np.float32, ["block1_attention", "block1_mlp1", "block1_mlp2"],
                      {"attention": True}),
    "conv1d": (_conv1d, (12, 3), np.float32, ["c2"], {}),
    "embedding": (_embedding, (6,), np.int32, ["embed"], {}),
    "lstm": (_recurrent(tf.keras.layers.LSTM), (6,), np.int32, ["embed", "rnn1", "rnn2"], {}),
    "gru": (_recurrent(tf.keras.layers.GRU), (6,), np.int32, ["embed", "rnn1", "rnn2"], {}),
    "tied": (_tied, (6,), np.int32, ["embed", "rnn"], {}),
}


def _dataset(n, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 20, (n, *shape)) if dtype == np.int32 else rng.normal(size=(n, *shape))
    y = rng.integers(0, 3, n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x.astype(dtype), y=y)).batch(
        BATCH, drop_remainder=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tff_round_equals_the_round_by_hand(case):
    build, shape, dtype, factorized, options = CASES[case]
    process = build_prism_process(
        build, PlusOne(), method=Method("prism", keep_ratio=0.5), batch_size=BATCH, lr_schedule=None,
        client_training=client_work.ClientTraining(clip_norm=None, frobenius_decay=0.0, weight_decay=0.0),
        refactorize_every=0, input_shape=shape, factorize_options=options)
    assert sorted(layer.name for layer in prism_tf.kinds.principal_layers(process.server_model)) == factorized
    state = process.initialize()
    examples = (12, 8)
    datasets = [_dataset(n, shape, dtype, seed) for seed, n in enumerate(examples)]
    selections = process.selections(state, [0, 1])
    new_state, metrics = process.next(state, datasets, client_ids=[0, 1])
    assert metrics["num_examples"] == sum(examples)

    server_model = process.assign_to(state)
    plan = prism_tf.SubmodelPlan.of(server_model)
    accumulator = server.Accumulator(plan)
    for selection, n in zip(selections, examples, strict=True):
        sub = prism_tf.extract(server_model, selection)
        for variable in sub.trainable_variables:
            variable.assign_add(tf.fill(variable.shape, float(n // BATCH)))  # PlusOne, once per batch
        accumulator.add([w.numpy() for w in prism_tf.submodel.flat_weights(sub)], selection, float(n))
    before = [w.numpy() for w in prism_tf.submodel.flat_weights(server_model)]
    expected, _ = server.finish_round(plan, before, accumulator.sums, accumulator.counts, 0, refactorize_every=0)
    for want, got, tensor in zip(expected, process.flat_weights(new_state), plan.tensors, strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{tensor.layer}/{tensor.weight}")
