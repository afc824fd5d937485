"""``Conv1D`` ↔ `PrincipalConv1D` (docs/algorithm.md §1): the ``[k, Cin, Cout]`` kernel as a ``[k·Cin, Cout]``
matrix; a principal kernel is one ``k×Cin`` filter, combined by a pointwise ``B``. The rules are `Conv2D`'s: the
first convolution (it sees the raw features) and pointwise (``k = 1``) convolutions are kept whole by default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from prism_tf.kinds.base import LayerKind, Rules, pixels
from prism_tf.layers import PrincipalConv1D


class Conv1DKind(LayerKind):
    name = "conv1d"
    source = tf.keras.layers.Conv1D
    principal = PrincipalConv1D
    width_key = "filters"
    is_conv = True
    plain_keys = ("filters", "kernel_size", "strides", "padding", "dilation_rate")

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if layer.data_format != "channels_last":
            return "channels_first is not supported"
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
        if layer.name == rules.first_conv:
            return "first conv (sees the raw input)"
        if rules.skip_pointwise and tuple(layer.kernel_size) == (1,):
            return "1x1 conv"
        return None

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in self.plain_keys}

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        if type(layer) is self.principal:
            return True
        return layer.groups == 1 and layer.data_format == "channels_last"

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        (k,) = layer.kernel_size
        n = pixels(out_shape)
        if isinstance(layer, self.principal):
            return n * layer.rank * (k * int(in_shape[-1]) + layer.filters), n * layer.rank
        return n * k * int(in_shape[-1]) // layer.groups * layer.filters, 0
