"""``MultiHeadAttention`` ↔ `PrincipalMultiHeadAttention` (docs/algorithm.md §1, "Layers with several kernels"): the
query, key, value and output projections are four factor pairs. Kept whole unless ``factorize(..., attention=True)``
(the PriSM authors factorize a DeiT's MLPs only); its cost is counted either way: the four projections plus the
``T×T`` scores and their weighted sum, per head, for self-attention over the query's ``T`` tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from prism_tf import spectral
from prism_tf.kinds.base import CompiledLayer, LayerKind, Rules, TFLiteOps, pair_product
from prism_tf.layers.attention import KEY, OUTPUT, QUERY, VALUE, PrincipalMultiHeadAttention

_SUBLAYERS = {QUERY: "_query_dense", KEY: "_key_dense", VALUE: "_value_dense", OUTPUT: "_output_dense"}


class MultiHeadAttentionKind(LayerKind):
    name = "multi_head_attention"
    source = tf.keras.layers.MultiHeadAttention
    principal = PrincipalMultiHeadAttention
    width_key = "output_dim"
    pairs = (QUERY, KEY, VALUE, OUTPUT)

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if not rules.attention:
            return "attention (kept whole as in the authors' DeiT runs; factorize(..., attention=True) factorizes it)"
        if tuple(layer._attention_axes) != (1,):
            return f"attention over axes {tuple(layer._attention_axes)} (only axis 1, the tokens, is supported)"
        if layer._output_shape is not None and not isinstance(layer._output_shape, int):
            return f"output_shape {layer._output_shape} (only an int or None is supported)"
        return None

    def kernel_shapes(self, layer: tf.keras.layers.Layer) -> dict[str, tuple[int, ...]]:
        return {pair: _matrix_shape(pair, getattr(layer, sub).kernel.shape) for pair, sub in _SUBLAYERS.items()}

    def to_principal(self, config: dict[str, Any], ranks: Mapping[str, int]) -> tf.keras.layers.Layer:
        return PrincipalMultiHeadAttention(
            config["num_heads"], config["key_dim"], dict(ranks), value_dim=config.get("value_dim"),
            dropout=config.get("dropout", 0.0), use_bias=config.get("use_bias", True),
            output_shape=config.get("output_shape"), name=config["name"], trainable=config.get("trainable", True),
            dtype=config.get("dtype"))

    def to_plain(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        return tf.keras.layers.MultiHeadAttention(
            layer.num_heads, layer.key_dim, value_dim=layer.value_dim, dropout=layer.dropout, use_bias=layer.use_bias,
            output_shape=layer.output_dim, name=layer.name, dtype=layer.dtype)

    def load_factors(self, principal: tf.keras.layers.Layer, plain: tf.keras.layers.Layer) -> None:
        for pair, sub in _SUBLAYERS.items():
            dense = getattr(plain, sub)
            kernel = tf.reshape(dense.kernel, _matrix_shape(pair, dense.kernel.shape))
            a, b, s = spectral.factorize_kernel(kernel)
            principal.set_pair_factors(pair, a, b, s)
            if principal.use_bias:
                principal.biases[pair].assign(tf.reshape(dense.bias, [-1]))

    def plain_weights(self, principal: tf.keras.layers.Layer) -> list:
        heads, key, value = principal.num_heads, principal.key_dim, principal.value_dim
        shapes = {QUERY: (-1, heads, key), KEY: (-1, heads, key), VALUE: (-1, heads, value),
                  OUTPUT: (heads, value, -1)}
        bias_shapes = {QUERY: (heads, key), KEY: (heads, key), VALUE: (heads, value), OUTPUT: (-1,)}
        out = []
        for pair in self.pairs:
            out.append(np.reshape(principal.pair_kernel(pair).numpy(), shapes[pair]))
            if principal.use_bias:
                out.append(np.reshape(principal.biases[pair].numpy(), bias_shapes[pair]))
        return out

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        return False  # heads mix tokens: no channel group is sliced through attention

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        tokens, dim, out_dim = int(in_shape[1]), int(in_shape[-1]), int(out_shape[-1])
        if isinstance(layer, self.principal):
            heads, key, value = layer.num_heads, layer.key_dim, layer.value_dim
            widths = {QUERY: (dim, heads * key), KEY: (dim, heads * key), VALUE: (dim, heads * value),
                      OUTPUT: (heads * value, out_dim)}
            projections = sum(tokens * layer.ranks[p] * (fan_in + out) for p, (fan_in, out) in widths.items())
            extra = tokens * sum(layer.ranks.values())
        else:
            heads, key, value = layer._num_heads, layer._key_dim, layer._value_dim or layer._key_dim
            projections = tokens * dim * heads * (2 * key + value) + tokens * heads * value * out_dim
            extra = 0
        attention = tokens * tokens * heads * (key + value)
        return projections + attention, tokens * tokens * heads + extra

    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        return []  # as before attention was a kind: its projections are not weight-decayed

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """Attention on ``[batch, tokens, dim]`` inputs ``(query, value[, key])`` (docs/export.md, "On-device
        training"): each projection one product on the tokens (kept whole: the EinsumDense kernel reshaped to
        ``[dim, heads·size]``; principal: ``(x·A)·(diag(ω)·B)`` through its pair's factors), plus its bias, then
        `TFLiteOps.attention` (scores, softmax, weighted values, heads merged) and the output projection."""
        if len(shapes) not in (2, 3) or any(len(s) != 3 or None in s[1:] for s in shapes):
            raise ops.unsupported(layer, "attends over the tokens of [batch, tokens, dim] inputs (query, value[, key]) "
                                         "only")
        principal = type(layer) is self.principal
        if principal:
            heads, key_dim, value_dim, dropout = layer.num_heads, layer.key_dim, layer.value_dim, layer.dropout
        else:
            heads, key_dim = int(layer._num_heads), int(layer._key_dim)
            value_dim, dropout = int(layer._value_dim or layer._key_dim), layer._dropout
            if layer._attention_axes not in (None, (1,), [1]):
                raise ops.unsupported(layer, f"attention_axes {layer._attention_axes}")
            if layer._output_shape is not None or len(layer._output_dense.kernel.shape) != 3:
                raise ops.unsupported(layer, "a custom output_shape")
        if float(dropout) != 0.0:
            raise ops.unsupported(layer, f"dropout {dropout} (training-time randomness)")
        sizes = {QUERY: heads * key_dim, KEY: heads * key_dim, VALUE: heads * value_dim}

        def projection(x: tf.Tensor, pair: str) -> tf.Tensor:
            if principal:
                y = pair_product(layer, pair, ops)(x)
                return ops.bias_add(y, tf.convert_to_tensor(layer.biases[pair])) if layer.use_bias else y
            dense = getattr(layer, _SUBLAYERS[pair])
            kernel = tf.convert_to_tensor(dense.kernel)
            rows = int(x.shape[-1])
            width = sizes.get(pair) or int(kernel.shape[-1])
            y = ops.matmul(x, ops.reshape(kernel, [rows, width]))
            if dense.bias is not None:
                y = ops.bias_add(y, ops.reshape(tf.convert_to_tensor(dense.bias), [width]))
            return y

        def attention_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            query_input, value_input = inputs[0], inputs[1]
            key_input = inputs[2] if len(inputs) > 2 else value_input
            context = ops.attention(projection(query_input, QUERY), projection(key_input, KEY),
                                    projection(value_input, VALUE), heads, key_dim, value_dim)
            return projection(context, OUTPUT)

        return attention_layer


def _matrix_shape(pair: str, kernel_shape: Sequence) -> tuple[int, int]:
    """An EinsumDense kernel as a matrix: ``[dim, heads, d] -> [dim, heads·d]``, ``[heads, d, out] -> [heads·d,
    out]``."""
    shape = [int(d) for d in kernel_shape]
    return (shape[0], shape[1] * shape[2]) if pair != OUTPUT else (shape[0] * shape[1], shape[2])
