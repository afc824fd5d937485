"""``Conv2D`` ↔ `PrincipalConv2D` (docs/algorithm.md §1): the ``[kh, kw, Cin, Cout]`` kernel as a
``[kh·kw·Cin, Cout]`` matrix; a principal kernel is one ``kh×kw×Cin`` filter, combined by a 1×1 ``B``."""

from __future__ import annotations

import tensorflow as tf

from prism_tf.kinds.base import CompiledLayer, ConvKind, TFLiteOps
from prism_tf.layers import PrincipalConv2D


class Conv2DKind(ConvKind):
    name = "conv2d"
    source = tf.keras.layers.Conv2D
    principal = PrincipalConv2D

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
