"""``Dense`` ↔ `PrincipalDense` (docs/algorithm.md §1): the ``[in, out]`` kernel itself is the matrix; a principal
kernel is one rank-one term ``a·bᵀ``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from prism_tf.kinds.base import CompiledLayer, LayerKind, Rules, TFLiteOps
from prism_tf.layers import PrincipalDense


class DenseKind(LayerKind):
    name = "dense"
    source = tf.keras.layers.Dense
    principal = PrincipalDense
    width_key = "units"
    is_classifier = True
    plain_keys = ("units",)

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        if layer.name in rules.classifiers:
            return "classifier (produces a model output)"
        return None

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"units": config["units"]}

    def mixes_channels(self, layer: tf.keras.layers.Layer) -> bool:
        return True

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        rows = 1
        for d in in_shape[1:-1]:
            rows *= int(d)
        if isinstance(layer, self.principal):
            return rows * layer.rank * (int(in_shape[-1]) + layer.units), rows * layer.rank
        return rows * int(in_shape[-1]) * layer.units, 0

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        if len(shapes) != 1 or len(shapes[0]) < 2:
            raise ops.unsupported(layer, "expects one input of rank 2 or more")
        act = ops.activation(layer, layer.activation)

        def dense_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            (x,) = inputs
            return self.finish_linear(layer, ops.matmul(x, self.first_factor(layer)), ops, act)

        return dense_layer
