"""Tiny models the tests of a round's parts share (tests/test_{layout,distributor,aggregator,finalizer,client_work}):
small enough that every expected number can be written by hand."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_federated as tff

import prism_tf


def dense_model() -> tf.keras.Model:
    """Dense 5 → 4 ("hidden", factorized at rank 4 with ``min_rank=1``: A [5, 4], B [4, 4]) → Dense 3 ("head")."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((5,))
    hidden = tf.keras.layers.Dense(4, name="hidden")(inputs)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(hidden))


def dense_layout():
    """The round layout of `dense_model` factorized, for clients holding 2 of its 4 kernels."""
    from tff_pipelines.round.layout import RoundLayout

    return RoundLayout.build(prism_tf.factorize(dense_model(), min_rank=1), {"hidden": 2})


def conv_model() -> tf.keras.Model:
    """Stem Conv2D 2 → 4 (kept whole), BatchNorm, Conv2D 4 → 5 ("conv", factorizable at rank 5), pooling, Dense 3:
    two free channel groups for the width methods."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((6, 6, 2))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = tf.keras.layers.ReLU()(tf.keras.layers.BatchNormalization(name="bn")(x))
    x = tf.keras.layers.Conv2D(5, 3, padding="same", name="conv")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


class PlusOne(tff.learning.optimizers.Optimizer):
    """A client 'optimizer' that adds 1 to every trainable weight per batch: updates we can compute by hand."""

    def initialize(self, specs):
        return ()

    def next(self, state, weights, gradients):
        return state, tf.nest.map_structure(lambda w: w + 1.0, weights)
