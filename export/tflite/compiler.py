"""The builtins runtime's compiler: a functional Keras model's graph walked layer by layer into builtin-gradient
functions (docs/export.md, "On-device training").

Factorizable layers (``Conv2D``/`prism_tf.PrincipalConv2D`, ``Dense``/`prism_tf.PrincipalDense`) compile through
their kind (`prism_tf.kinds.kind_of` → `LayerKind.tflite_layer`) with `export.tflite.ops.BuiltinOps`; the layers kept
whole (``BatchNormalization``, ``GroupNormalization``, ``ReLU``, ``Activation``, ``Add``, ``GlobalAveragePooling2D``)
are compiled here. Anything else raises ``ValueError`` naming the layer.
"""

from __future__ import annotations

import math

import tensorflow as tf

import prism_tf
from export.tflite import ops
from export.tflite.ops import Updates
from prism_tf.kinds.base import CompiledLayer


class ModelGraph:
    """``model``'s functional graph compiled into per-layer builtin-op functions (validated at construction).

    Args:
      model: a functional Keras model (`check_model`).
      batch_size: the batch size a conv's filter-gradient patch budget is sized for.
      max_patch_bytes: the patch budget (`export.tflite.ops.Conv`).
    """

    def __init__(self, model: tf.keras.Model, batch_size: int, max_patch_bytes: int) -> None:
        check_model(model)
        primitives = ops.BuiltinOps(batch_size, max_patch_bytes)
        self.input_id = str(id(model.inputs[0]))
        self.output_id = str(id(model.outputs[0]))
        self.steps: list[tuple[CompiledLayer, list[str], str]] = []
        # The traversal of Keras's own `Functional._run_internal_graph`: nodes by decreasing depth, tensors by id.
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                layer = node.layer
                if node.call_kwargs and set(node.call_kwargs) - {"training", "mask"}:
                    raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is called with keyword "
                                     f"arguments {sorted(node.call_kwargs)}, which on-device training does not "
                                     "support")
                if len(node.flat_output_ids) != 1:
                    raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) has several outputs")
                shapes = [tuple(t.shape) for t in node.keras_inputs]
                apply = compile_layer(layer, shapes, primitives)
                self.steps.append((apply, list(node.flat_input_ids), node.flat_output_ids[0]))

    def forward(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, Updates]:
        """Logits of ``x`` and, in training, the BatchNorm statistics updates (variable, new value) to assign."""
        values = {self.input_id: x}
        updates: Updates = []
        for apply, input_ids, output_id in self.steps:
            values[output_id] = apply([values[i] for i in input_ids], training, updates)
        return values[self.output_id], updates


def check_model(model: tf.keras.Model) -> None:
    """One float32 image input ``[None, H, W, C]`` and one logits output ``[None, classes]``, functional graph.

    Raises:
      ValueError: naming what does not fit.
    """
    if not isinstance(model, tf.keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ValueError("on-device training needs a functional or Sequential Keras model built on an Input")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model '{model.name}' must have one input and one output, "
                         f"got {len(model.inputs)} and {len(model.outputs)}")
    input_shape = model.inputs[0].shape
    if input_shape.rank != 4 or None in input_shape[1:]:
        raise ValueError(f"model '{model.name}': the input must be [batch, H, W, C] with known H, W, C, "
                         f"got {input_shape}")
    if model.outputs[0].shape.rank != 2 or model.outputs[0].shape[-1] is None:
        raise ValueError(f"model '{model.name}': the output must be logits [batch, classes]")
    for weight in prism_tf.submodel.flat_weights(model):
        if weight.dtype != tf.float32:
            raise ValueError(f"weight '{weight.name}' is {weight.dtype.name}: only float32 models are supported")


def compile_layer(layer: tf.keras.layers.Layer, shapes: list[tuple], primitives: ops.BuiltinOps) -> CompiledLayer:
    """A function ``(inputs, training, updates) -> output`` computing ``layer`` with builtin-gradient primitives.

    Args:
      layer: the Keras layer of one graph node.
      shapes: the static shapes of its inputs.
      primitives: the `prism_tf.kinds.TFLiteOps` a factorizable layer's kind compiles with.

    Raises:
      ValueError: the layer (named) is not supported.
    """
    if isinstance(layer, tf.keras.Model):
        raise ops.unsupported_layer(layer, "nested models")
    if getattr(layer, "dtype", "float32") != "float32" or getattr(layer, "compute_dtype", "float32") != "float32":
        raise ops.unsupported_layer(layer, "only float32 layers")
    kind = prism_tf.kinds.kind_of(layer)
    if kind is not None:
        return kind.tflite_layer(layer, shapes, primitives)

    single = len(shapes) == 1
    layer_type = type(layer)

    if layer_type is tf.keras.layers.BatchNormalization:
        rank = len(shapes[0]) if single else 0
        axis = list(layer.axis) if isinstance(layer.axis, list | tuple) else [layer.axis]
        if not single or rank not in (2, 4) or [a % rank for a in axis] != [rank - 1]:
            raise ops.unsupported_layer(layer, "normalizes a 2-D or 4-D input over its last axis only")
        if layer.renorm or layer.virtual_batch_size or layer.adjustment is not None:
            raise ops.unsupported_layer(layer, "renorm, virtual batches and adjustment")
        axes = list(range(rank - 1))
        examples = math.prod(shapes[0][1:-1])  # per example, the batch size multiplies it
        return ops.batch_norm(layer, axes, examples)

    if layer_type is tf.keras.layers.GroupNormalization:
        if not single or len(shapes[0]) != 4 or layer.axis % 4 != 3:
            raise ops.unsupported_layer(layer, "normalizes 4-D inputs over the channel axis only")
        return ops.group_norm(layer, shapes[0])

    if layer_type is tf.keras.layers.ReLU:
        if layer.max_value is not None or float(layer.negative_slope) != 0 or float(layer.threshold) != 0:
            raise ops.unsupported_layer(layer, "only plain ReLU (no max_value, negative_slope or threshold)")
        return lambda inputs, training, updates: ops.relu(inputs[0])

    if layer_type is tf.keras.layers.Activation:
        act = ops.activation_function(layer, layer.activation)
        return lambda inputs, training, updates: act(inputs[0])

    if layer_type is tf.keras.layers.Add:
        if len({s[1:] for s in shapes}) != 1:
            raise ops.unsupported_layer(layer, f"broadcasting inputs {shapes}")
        return lambda inputs, training, updates: ops.add(*inputs)

    if layer_type is tf.keras.layers.GlobalAveragePooling2D:
        if not single or len(shapes[0]) != 4 or layer.data_format != "channels_last" or layer.keepdims:
            raise ops.unsupported_layer(layer, "channels_last without keepdims only")
        _, height, width, _ = shapes[0]
        return lambda inputs, training, updates: ops.global_average_pool(inputs[0], height, width)

    raise ops.unsupported_layer(layer)


__all__ = ["ModelGraph", "check_model", "compile_layer"]
