"""Kinds kept whole whose cost `prism_tf.cost` still counts: depthwise and separable convolutions."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from prism_tf.kinds.base import WholeKind, pixels


class DepthwiseConv2DKind(WholeKind):
    name = "depthwise_conv2d"
    source = tf.keras.layers.DepthwiseConv2D
    why = "depthwise conv: one k×k filter per channel, no kernel across channels to factorize"

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        return pixels(out_shape) * kh * kw * int(in_shape[-1]) * layer.depth_multiplier, 0


class SeparableConv2DKind(WholeKind):
    name = "separable_conv2d"
    source = tf.keras.layers.SeparableConv2D
    why = ("separable conv: its depthwise part has one filter per channel and its pointwise part is a 1x1 conv; "
           "build it as DepthwiseConv2D + Conv2D(1x1) and pass skip_pointwise=False to factorize the pointwise part")

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        n = pixels(out_shape)
        depth = int(in_shape[-1]) * layer.depth_multiplier
        return n * (kh * kw * depth + depth * layer.filters), n * depth
