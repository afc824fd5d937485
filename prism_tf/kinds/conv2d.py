"""``Conv2D`` ↔ `PrincipalConv2D` (docs/algorithm.md §1): the ``[kh, kw, Cin, Cout]`` kernel as a
``[kh·kw·Cin, Cout]`` matrix; a principal kernel is one ``kh×kw×Cin`` filter, combined by a 1×1 ``B``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from prism_tf.kinds.base import CompiledLayer, LayerKind, Rules, TFLiteOps, pixels
from prism_tf.layers import PrincipalConv2D


class Conv2DKind(LayerKind):
    name = "conv2d"
    source = tf.keras.layers.Conv2D
    principal = PrincipalConv2D
    width_key = "filters"
    is_conv = True
    plain_keys = ("filters", "kernel_size", "strides", "padding", "dilation_rate")

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if layer.data_format != "channels_last":
            return "channels_first is not supported"
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
        if layer.name == rules.first_conv:
            return "first conv (sees the raw image)"
        if rules.skip_pointwise and tuple(layer.kernel_size) == (1, 1):
            return "1x1 conv"
        return None

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in self.plain_keys}

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        if type(layer) is self.principal:
            return True
        return layer.groups == 1 and layer.data_format == "channels_last"

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        kh, kw = layer.kernel_size
        n = pixels(out_shape)
        if isinstance(layer, self.principal):
            fan_in = kh * kw * int(in_shape[-1])
            return n * layer.rank * (fan_in + layer.filters), n * layer.rank
        return n * kh * kw * int(in_shape[-1]) // layer.groups * layer.filters, 0

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        if len(shapes) != 1 or len(shapes[0]) != 4:
            raise ops.unsupported(layer, "expects one 4-D input")
        if tuple(layer.dilation_rate) != (1, 1):
            raise ops.unsupported(layer, f"dilation_rate {tuple(layer.dilation_rate)}")
        if type(layer) is self.source and (layer.groups != 1 or layer.data_format != "channels_last"):
            raise ops.unsupported(layer, "grouped or channels_first convolution")
        conv = ops.conv(shapes[0], tuple(layer.kernel_size), tuple(layer.strides), layer.padding)
        act = ops.activation(layer, layer.activation)

        def conv_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            (x,) = inputs
            return self.finish_linear(layer, conv(x, self.first_factor(layer)), ops, act)

        return conv_layer
