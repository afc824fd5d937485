"""Kinds kept whole whose cost `prism_tf.cost` still counts: depthwise and separable convolutions, attention."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from prism_tf.kinds.base import WholeKind, pixels


class DepthwiseConv2DKind(WholeKind):
    name = "depthwise_conv2d"
    source = tf.keras.layers.DepthwiseConv2D

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        return pixels(out_shape) * kh * kw * int(in_shape[-1]) * layer.depth_multiplier, 0


class SeparableConv2DKind(WholeKind):
    name = "separable_conv2d"
    source = tf.keras.layers.SeparableConv2D

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        n = pixels(out_shape)
        depth = int(in_shape[-1]) * layer.depth_multiplier
        return n * (kh * kw * depth + depth * layer.filters), n * depth


class MultiHeadAttentionKind(WholeKind):
    """Attention kept whole (its projections travel whole; the authors factorize a DeiT's MLPs only), costed as
    self-attention over the query's ``T`` tokens: the q, k, v and output projections and the ``T×T`` scores and
    their weighted sum, per head."""

    name = "multi_head_attention"
    source = tf.keras.layers.MultiHeadAttention

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        tokens, dim, out_dim = int(in_shape[1]), int(in_shape[-1]), int(out_shape[-1])
        heads, key, value = layer._num_heads, layer._key_dim, layer._value_dim or layer._key_dim
        projections = tokens * dim * heads * (2 * key + value) + tokens * heads * value * out_dim
        attention = tokens * tokens * heads * (key + value)
        return projections + attention, tokens * tokens * heads
