"""The builtins runtime's compiler: a functional Keras model's graph walked layer by layer into builtin-gradient
functions (docs/export.md, "On-device training").

Layers with a kind (``Conv2D``, ``Conv1D``, ``Dense``, ``Embedding``, ``ReversibleEmbedding``, ``LSTM``, ``GRU``,
``MultiHeadAttention`` and their principal forms) compile through it (`prism_tf.kinds.kind_of` →
`LayerKind.tflite_layer`) with `export.tflite.ops.BuiltinOps`; the other layers (``BatchNormalization``,
``GroupNormalization``, ``LayerNormalization``, the ViT's `prism_tf.models.zoo.PositionEmbedding`, ``Reshape``,
``ReLU``, ``Activation``, ``Add``, ``GlobalAveragePooling1D``/``2D``) are compiled here. Anything else raises
``ValueError`` naming the layer (and ``--runtime flex``, which trains it).
"""

from __future__ import annotations

import math

import tensorflow as tf

import prism_tf
from export.tflite import ops
from export.tflite.ops import FLEX_HINT, Updates
from prism_tf.kinds.base import CompiledLayer
from prism_tf.layers import PrincipalMultiHeadAttention, PrincipalReversibleEmbedding, ReversibleEmbedding
from prism_tf.models.zoo import PositionEmbedding


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
                if len(node.flat_output_ids) != 1:
                    raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) has several outputs, which "
                                     f"on-device training with builtin ops does not support; {FLEX_HINT}")
                inputs = node_inputs(node)
                apply = compile_layer(layer, [tuple(t.shape) for t in inputs], primitives)
                self.steps.append((apply, [str(id(t)) for t in inputs], node.flat_output_ids[0]))

    def forward(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, Updates]:
        """Logits of ``x`` and, in training, the BatchNorm statistics updates (variable, new value) to assign."""
        values = {self.input_id: x}
        updates: Updates = []
        for apply, input_ids, output_id in self.steps:
            values[output_id] = apply([values[i] for i in input_ids], training, updates)
        return values[self.output_id], updates


def node_inputs(node) -> list:
    """The Keras tensors a graph node's layer is called with, in the order its compiled function takes them:
    the positional ones, or for ``MultiHeadAttention`` (and its principal form) ``(query, value[, key])`` however
    they were passed (a cloned model calls it with ``value=`` as a keyword). A tied embedding's ``reverse=True``
    call (`prism_tf.layers.ReversibleEmbedding`) takes float hidden states and its lookup int ids: the compiled layer
    goes by the input's dtype.

    Raises:
      ValueError: keyword arguments other than ``training``/``mask`` (and MHA's ``value``/``key``, a tied
        embedding's ``reverse``), or arguments that are not Keras tensors.
    """
    layer = node.layer
    kwargs = dict(node.call_kwargs or {})
    args = list(node.call_args)
    if type(layer) in (tf.keras.layers.MultiHeadAttention, PrincipalMultiHeadAttention):
        names = ("query", "value", "key")
        for name in names[len(args):]:
            if kwargs.get(name) is not None:
                args.append(kwargs.pop(name))
            else:
                kwargs.pop(name, None)
                break
    if type(layer) in (ReversibleEmbedding, PrincipalReversibleEmbedding):
        # The tied projection (reverse=True) takes float hidden states, the lookup int ids: the compiled layer tells
        # them apart by the input's dtype, as the layer's own compute_mask does; check the call agrees.
        reverse = bool(kwargs.pop("reverse", False))
        first = tf.nest.flatten(args)[:1]
        if first and reverse == first[0].dtype.is_integer:
            raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is called with reverse={reverse} on "
                             f"{first[0].dtype.name} inputs, which on-device training with builtin ops does not "
                             f"support; {FLEX_HINT}")
    if set(kwargs) - {"training", "mask"}:
        raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is called with keyword arguments "
                         f"{sorted(kwargs)}, which on-device training with builtin ops does not support; {FLEX_HINT}")
    flat = tf.nest.flatten(args)
    tensors = {id(t) for t in node.keras_inputs}
    if not flat or not all(id(t) in tensors for t in flat):
        raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is called with arguments that are not "
                         f"layer outputs, which on-device training with builtin ops does not support; {FLEX_HINT}")
    return flat


def check_model(model: tf.keras.Model) -> None:
    """One input ``[None, *dims]`` of known dims (float32: images ``[H, W, C]``, sequences ``[length, channels]``;
    int32: token ids), one logits output ``[None, classes]`` or ``[None, steps, classes]`` (a label per step: next
    tokens), a functional graph, float32 weights.

    Raises:
      ValueError: naming what does not fit.
    """
    if not isinstance(model, tf.keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ValueError("on-device training needs a functional or Sequential Keras model built on an Input")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model '{model.name}' must have one input and one output, "
                         f"got {len(model.inputs)} and {len(model.outputs)}")
    input_shape = model.inputs[0].shape
    if input_shape.rank < 2 or None in input_shape[1:]:
        raise ValueError(f"model '{model.name}': the input must be [batch, ...] with every other dimension known "
                         f"(e.g. [batch, H, W, C]), got {input_shape}")
    if model.inputs[0].dtype not in (tf.float32, tf.int32):
        raise ValueError(f"model '{model.name}': the input must be float32 (or int32 token ids), got "
                         f"{model.inputs[0].dtype.name}")
    output_shape = model.outputs[0].shape
    if output_shape.rank not in (2, 3) or None in output_shape[1:]:
        raise ValueError(f"model '{model.name}': the output must be logits [batch, classes] or [batch, steps, "
                         f"classes] of known size, got {output_shape}")
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

    if layer_type is tf.keras.layers.LayerNormalization:
        rank = len(shapes[0]) if single else 0
        axis = list(layer.axis) if isinstance(layer.axis, list | tuple) else [layer.axis]
        if not single or rank < 2 or [a % rank for a in axis] != [rank - 1]:
            raise ops.unsupported_layer(layer, "normalizes over the last axis only")
        return ops.layer_norm(layer, shapes[0])

    if layer_type is PositionEmbedding:
        if not single or len(shapes[0]) != 3:
            raise ops.unsupported_layer(layer, "adds its table to [batch, tokens, dim] inputs only")
        return lambda inputs, training, updates: ops.add_table(inputs[0], tf.convert_to_tensor(layer.table))

    if layer_type is tf.keras.layers.Reshape:
        if not single or None in shapes[0][1:]:
            raise ops.unsupported_layer(layer, "reshapes one input of known size only")
        target = [int(d) for d in layer.compute_output_shape(shapes[0])[1:]]
        return lambda inputs, training, updates: ops.reshape(inputs[0], [-1, *target])

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

    if layer_type is tf.keras.layers.GlobalAveragePooling1D:
        if not single or len(shapes[0]) != 3 or layer.data_format != "channels_last" or layer.keepdims:
            raise ops.unsupported_layer(layer, "channels_last without keepdims only")
        tokens = int(shapes[0][1])
        return lambda inputs, training, updates: ops.token_average_pool(inputs[0], tokens)

    raise ops.unsupported_layer(layer)


__all__ = ["ModelGraph", "check_model", "compile_layer", "node_inputs"]
