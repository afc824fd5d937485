"""``Conv1D`` ↔ `PrincipalConv1D` (docs/algorithm.md §1): the ``[k, Cin, Cout]`` kernel as a ``[k·Cin, Cout]``
matrix; a principal kernel is one ``k×Cin`` filter, combined by a pointwise ``B``. The rules are `Conv2D`'s
(`ConvKind`): the first convolution (it sees the raw features) and pointwise (``k = 1``) ones are kept whole."""

from __future__ import annotations

import tensorflow as tf

from prism_tf.kinds.base import CompiledLayer, ConvKind, TFLiteOps
from prism_tf.layers import PrincipalConv1D


class Conv1DKind(ConvKind):
    name = "conv1d"
    source = tf.keras.layers.Conv1D
    principal = PrincipalConv1D

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """The 1-D convolution as a 2-D one over ``[batch, 1, length, channels]`` (how TensorFlow computes Conv1D);
        ``causal`` padding is a left PAD then ``valid``."""
        if len(shapes) != 1 or len(shapes[0]) != 3 or None in shapes[0][1:]:
            raise ops.unsupported(layer, "expects one [batch, length, channels] input of known size")
        if tuple(layer.dilation_rate) != (1,):
            raise ops.unsupported(layer, f"dilation_rate {tuple(layer.dilation_rate)}")
        if type(layer) is self.source and (layer.groups != 1 or layer.data_format != "channels_last"):
            raise ops.unsupported(layer, "grouped or channels_first convolution")
        (k,), (stride,) = layer.kernel_size, layer.strides
        length, channels = int(shapes[0][1]), int(shapes[0][2])
        left = k - 1 if layer.padding == "causal" else 0
        padding = "valid" if layer.padding == "causal" else layer.padding
        conv = ops.conv((None, 1, length + left, channels), (1, k), (1, stride), padding)
        out_length = (length + left - k) // stride + 1 if padding == "valid" else -(-length // stride)
        act = ops.activation(layer, layer.activation)

        def conv_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            (x,) = inputs
            if left:
                x = ops.pad(x, [(0, 0), (left, 0), (0, 0)])
            kernel = self.first_factor(layer)
            y = conv(ops.reshape(x, [-1, 1, length + left, channels]),
                     ops.reshape(kernel, [1, k, channels, int(kernel.shape[-1])]))
            y = ops.reshape(y, [-1, out_length, int(kernel.shape[-1])])
            return self.finish_linear(layer, y, ops, act)

        return conv_layer
