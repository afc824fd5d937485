"""`PrincipalMultiHeadAttention`: attention whose query, key, value and output projections are factor pairs
(docs/algorithm.md §1, "Layers with several kernels").

Each projection of `tf.keras.layers.MultiHeadAttention` is a matrix: query/key ``[dim, heads·key_dim]``, value
``[dim, heads·value_dim]``, output ``[heads·value_dim, out]``; each is its own pair (``query``, ``key``, ``value``,
``output``) with its own sampled rank. Scores, softmax (with ``attention_mask``/``use_causal_mask``), dropout and the
head layout are Keras's, so at full rank this layer computes what the Keras layer computes. The PriSM authors keep
a DeiT's attention whole; `prism_tf.factorize` does the same unless ``attention=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow as tf

from prism_tf.layers.pairs import FactorPairsMixin

QUERY, KEY, VALUE, OUTPUT = "query", "key", "value", "output"


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalMultiHeadAttention(FactorPairsMixin, tf.keras.layers.Layer):
    """``MultiHeadAttention`` (attention over axis 1) with principal-kernel projections (docs/algorithm.md §1).

    Call it as the Keras layer: ``layer(query, value, key=None, attention_mask=None, use_causal_mask=False)``.
    """

    pairs: ClassVar[tuple[str, ...]] = (QUERY, KEY, VALUE, OUTPUT)

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        ranks: Mapping[str, int],
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_heads, self.key_dim = int(num_heads), int(key_dim)
        self.value_dim = int(value_dim) if value_dim else self.key_dim
        self.dropout, self.use_bias = float(dropout), bool(use_bias)
        self.output_dim = None if output_shape is None else int(output_shape)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self._init_ranks(ranks)
        self._softmax = tf.keras.layers.Softmax(axis=-1)
        self._dropout_layer = tf.keras.layers.Dropout(rate=self.dropout)

    def build(self, query_shape: tf.TensorShape, value_shape: tf.TensorShape | None = None,
              key_shape: tf.TensorShape | None = None) -> None:
        query_dim = int(tf.TensorShape(query_shape)[-1])
        value_dim = int(tf.TensorShape(value_shape if value_shape is not None else query_shape)[-1])
        key_dim = int(tf.TensorShape(key_shape)[-1]) if key_shape is not None else value_dim
        self.output_dim = self.output_dim or query_dim
        heads = self.num_heads
        shapes = {QUERY: (query_dim, heads * self.key_dim), KEY: (key_dim, heads * self.key_dim),
                  VALUE: (value_dim, heads * self.value_dim), OUTPUT: (heads * self.value_dim, self.output_dim)}
        self.biases = {}
        for pair, (fan_in, out) in shapes.items():
            self._add_pair(pair, (fan_in,), out, self.kernel_initializer)
            if self.use_bias:
                self.biases[pair] = self.add_weight(name=f"{pair}_bias", shape=(out,),
                                                    initializer=self.bias_initializer, trainable=True)
        self.built = True

    def __call__(self, query: Any, value: Any = None, key: Any = None, **kwargs: Any) -> Any:
        # Keras builds a layer from its first input only; this one needs every input's width.
        if not self.built:
            shape = lambda t: None if t is None else tf.TensorShape(t.shape)  # noqa: E731
            with tf.name_scope(self.name):
                self.build(shape(query), shape(value), shape(key))
        if value is None:
            raise ValueError(f"PrincipalMultiHeadAttention '{self.name}': call it as layer(query, value)")
        return super().__call__(query, value, key=key, **kwargs)

    def _projection(self, x: tf.Tensor, pair: str) -> tf.Tensor:
        y = self.project(x, pair)
        return y + tf.cast(self.biases[pair], y.dtype) if self.use_bias else y

    def call(self, query: tf.Tensor, value: tf.Tensor, key: tf.Tensor | None = None,
             attention_mask: tf.Tensor | None = None, return_attention_scores: bool = False,
             training: bool | None = None, use_causal_mask: bool = False) -> Any:
        key = value if key is None else key
        # Keras autocasts only the first input to the compute dtype (mixed precision, prism_tf.precision)
        value, key = tf.cast(value, query.dtype), tf.cast(key, query.dtype)
        heads = self.num_heads

        def split(x: tf.Tensor, depth: int) -> tf.Tensor:  # [B, T, heads·d] -> [B, T, heads, d]
            return tf.reshape(x, tf.concat([tf.shape(x)[:-1], [heads, depth]], axis=0))

        q = split(self._projection(query, QUERY), self.key_dim) * (1.0 / math.sqrt(float(self.key_dim)))
        k = split(self._projection(key, KEY), self.key_dim)
        v = split(self._projection(value, VALUE), self.value_dim)
        scores = tf.einsum("aecd,abcd->acbe", k, q)  # [B, heads, Tq, Tk], Keras's contraction
        mask = attention_mask
        if use_causal_mask:
            tq, tk = tf.shape(query)[1], tf.shape(key)[1]
            causal = tf.linalg.band_part(tf.ones([1, tq, tk], tf.bool), -1, 0)
            mask = causal if mask is None else tf.logical_and(tf.cast(mask, tf.bool), causal)
        if mask is not None:
            mask = tf.expand_dims(tf.cast(mask, tf.bool), axis=-3)
        probs = self._softmax(scores, mask)
        probs = self._dropout_layer(probs, training=training)
        attended = tf.einsum("acbe,aecd->abcd", tf.cast(probs, v.dtype), v)  # [B, Tq, heads, value_dim]
        merged = tf.reshape(attended, tf.concat([tf.shape(attended)[:-2], [heads * self.value_dim]], axis=0))
        output = self._projection(merged, OUTPUT)
        return (output, probs) if return_attention_scores else output

    def compute_output_shape(self, query_shape: tf.TensorShape, value_shape: Any = None,
                             key_shape: Any = None) -> tf.TensorShape:
        return tf.TensorShape(query_shape)[:-1].concatenate([self.output_dim or tf.TensorShape(query_shape)[-1]])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, key_dim=self.key_dim, value_dim=self.value_dim, dropout=self.dropout,
            use_bias=self.use_bias, output_shape=self.output_dim, ranks=dict(self.ranks),
            kernel_initializer=tf.keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=tf.keras.initializers.serialize(self.bias_initializer),
        )
        return config
