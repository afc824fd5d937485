"""Tied input embedding and output projection (docs/algorithm.md §1): `ReversibleEmbedding` and its principal form.

A language model often ties its output projection to its input embedding: logits are ``h·Eᵀ`` with the same table
``E``. In Keras that is one layer called twice, ``embed(tokens)`` and ``embed(h, reverse=True)`` (the API of
keras-nlp's ``ReversibleEmbedding``). Factorized, ``E = A·diag(ω)·B`` serves both calls: a lookup is a row of ``A``
times ``diag(ω)·B``, and the tied projection is ``(h·(diag(ω)·B)ᵀ)·Aᵀ``, ``k·(dim + vocabulary)`` multiply-adds per
position instead of ``dim·vocabulary``: the one factor pair is sampled, trained and aggregated once for both uses.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from prism_tf.layers.principal import PrincipalEmbedding


def _is_tokens(inputs: tf.Tensor) -> bool:
    return inputs.dtype.is_integer


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class ReversibleEmbedding(tf.keras.layers.Embedding):
    """An ``Embedding`` whose table is also the output projection: ``layer(tokens)`` looks up,
    ``layer(hidden, reverse=True)`` returns the logits ``hidden·Eᵀ`` (``[..., input_dim]``)."""

    def call(self, inputs: tf.Tensor, reverse: bool = False) -> tf.Tensor:
        if reverse:
            return tf.tensordot(inputs, tf.cast(self.embeddings, inputs.dtype), [[-1], [1]])
        return super().call(inputs)

    def compute_mask(self, inputs: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor | None:
        return super().compute_mask(inputs, mask) if _is_tokens(inputs) else mask


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalReversibleEmbedding(PrincipalEmbedding):
    """`ReversibleEmbedding` with its table as principal kernels, ``E = A·diag(ω)·B`` (docs/algorithm.md §1)."""

    def call(self, inputs: tf.Tensor, reverse: bool = False) -> tf.Tensor:
        if not reverse:
            return super().call(inputs)
        combination = tf.cast(self.kernel_scale, inputs.dtype)[:, tf.newaxis] * tf.cast(self.combination, inputs.dtype)
        responses = tf.tensordot(inputs, combination, [[-1], [1]])  # [..., k]
        return tf.tensordot(responses, tf.cast(self.principal_kernels, inputs.dtype), [[-1], [1]])

    def compute_mask(self, inputs: tf.Tensor, mask: tf.Tensor | None = None) -> Any:
        return super().compute_mask(inputs, mask) if _is_tokens(inputs) else mask
