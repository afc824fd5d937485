"""Cost of a (sub-)model per example: parameters, multiply-adds and activation memory (docs/algorithm.md §2, §5).

Counted from layer shapes, so the numbers are exact for the layers they cover and cheap to compute. A principal
layer of rank ``k`` costs ``k·(kh·kw·Cin + Cout)`` multiply-adds per output pixel instead of ``kh·kw·Cin·Cout``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from prism_tf import kinds
from prism_tf.kinds import walk_layers


def cost(model: tf.keras.Model, input_shape: Sequence[int] | None = None, *, dtype_bytes: int = 4) -> dict:
    """Per-example cost of ``model``.

    Args:
      model: a built functional or Sequential Keras model (principal layers included).
      input_shape: per-example input shape, e.g. ``(32, 32, 3)``; needed only if the model's is not fully known.
      dtype_bytes: bytes per activation value (4 for float32).

    Returns:
      ``params`` (all weights a client holds, BatchNorm statistics included), ``trainable_params``,
      ``flops`` (multiply-adds per example of convolutions and dense layers), ``activation_bytes`` (outputs of
      every layer plus the rank-wide intermediate map of principal layers: what backprop must keep per example),
      ``bytes`` (size of the weights in float32) and ``layers`` (per-layer flops).
    """
    model = _with_input_shape(model, input_shape)
    flops_by_layer: dict[str, int] = {}
    activations = 0
    for layer in walk_layers(model):
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        kind = kinds.covering_kind(layer)
        flops = 0
        for node in _model_nodes(layer, model):  # a layer called twice (a tied embedding) costs both calls
            activations += sum(int(np.prod(s[1:])) for s in _shapes(node.output_shapes))
            node_flops, extra = (0, 0) if kind is None else kind.node_flops(layer, node)
            flops += node_flops
            activations += extra
        if flops:
            flops_by_layer[layer.name] = flops
    params = int(sum(np.prod(w.shape) for w in model.weights))
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    return {
        "params": params,
        "trainable_params": trainable,
        "bytes": params * 4,
        "flops": int(sum(flops_by_layer.values())),
        "activation_bytes": int(activations * dtype_bytes),
        "layers": flops_by_layer,
    }


def _model_nodes(layer: tf.keras.layers.Layer, model: tf.keras.Model) -> list:
    """The calls of ``layer`` inside ``model``'s graph (a nested model's layers: inside that model's)."""
    nodes = layer._inbound_nodes
    if len(nodes) <= 1:
        return list(nodes)
    owned = [n for n in nodes if id(n) in _graph_nodes(model)]
    return owned or list(nodes[:1])


def _graph_nodes(model: tf.keras.Model) -> set[int]:
    found = {id(n) for nodes in getattr(model, "_nodes_by_depth", {}).values() for n in nodes}
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found |= _graph_nodes(layer)
    return found


def _shapes(shape) -> list[tuple]:
    if isinstance(shape, list):
        return [tuple(s) for s in shape]
    return [tuple(shape)]


def _with_input_shape(model: tf.keras.Model, input_shape: Sequence[int] | None) -> tf.keras.Model:
    known = model.inputs and all(None not in tuple(t.shape)[1:] for t in model.inputs)
    if known:
        if input_shape is not None and tuple(model.inputs[0].shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"cost: model '{model.name}' takes inputs of shape {tuple(model.inputs[0].shape[1:])}, "
                f"not {tuple(input_shape)}"
            )
        return model
    if input_shape is None:
        raise ValueError(f"cost: model '{model.name}' has an unknown input shape; pass input_shape")
    inputs = tf.keras.Input(shape=tuple(input_shape))
    return tf.keras.models.clone_model(model, input_tensors=inputs)
