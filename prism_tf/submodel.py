"""Client sub-models: `extract` a genuinely smaller model, `merge` it back, and average many per kernel.

PRISM.md §3 (sub-models) and §4 (aggregation). A sub-model has the full model's graph; each principal layer keeps
only the selected kernels (``A[..., idx]``, ``B[idx]``, ``ω`` from the strategy), so its compute, memory and traffic
shrink with the keep ratio. Non-factorized weights (normalization, biases, first conv, shortcuts, classifier) travel
whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from prism_tf import spectral
from prism_tf.factorize import clone_with_ranks, principal_layers, walk_layers
from prism_tf.layers import is_principal
from prism_tf.sampling import Selection


def extract(model: tf.keras.Model, selection: Selection) -> tf.keras.Model:
    """Build the client's sub-model: a standalone Keras model with only the selected kernels (PRISM.md §3).

    Raises:
      ValueError: the selection does not fit the model (names the layer).
    """
    selection.check_model(model)
    sub = submodel_architecture(model, selection.sizes())
    set_submodel_weights(sub, submodel_weights(model, selection))
    return sub


def submodel_architecture(model: tf.keras.Model, ranks: dict[str, int]) -> tf.keras.Model:
    """The sub-model's architecture (fresh weights) for given per-layer ranks; shared by all clients of a size."""
    return clone_with_ranks(model, ranks)


def submodel_weights(model: tf.keras.Model, selection: Selection) -> list[np.ndarray]:
    """The sub-model's weights in ``sub.weights`` order, sliced from ``model`` by ``selection``."""
    out = []
    for layer in walk_layers(model):
        if is_principal(layer):
            sel = selection.layers[layer.name]
            a, b = spectral.gather_kernels(layer.principal_kernels, layer.combination, sel.indices)
            values = {
                "principal_kernels": a.numpy(),
                "combination": b.numpy(),
                "singular_values": layer.singular_values.numpy()[sel.indices],
                "kernel_scale": sel.scale,
            }
            out.extend(values.get(_short_name(w), w.numpy()) for w in layer.weights)
        else:
            out.extend(w.numpy() for w in layer.weights)
    return out


def set_submodel_weights(sub: tf.keras.Model, weights: Sequence[np.ndarray]) -> None:
    """Assign weights in `walk_layers` order (the order `submodel_weights` produces)."""
    flat = [w for layer in walk_layers(sub) for w in layer.weights]
    if len(flat) != len(weights):
        raise ValueError(f"expected {len(flat)} weight arrays for '{sub.name}', got {len(weights)}")
    for variable, value in zip(flat, weights, strict=True):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"weight '{variable.name}' has shape {tuple(variable.shape)}, got {np.shape(value)}")
        variable.assign(value)


def merge(model: tf.keras.Model, sub: tf.keras.Model, selection: Selection) -> tf.keras.Model:
    """Write a (trained) sub-model back into the full model, in place (PRISM.md §3-§4).

    Principal layers receive only the selected kernels (columns of ``A``, rows of ``B``) and the bias; the
    singular values and ``ω`` of the full model are left as they are (`refactorize` recomputes ``s``). Every other
    weight is copied whole. ``merge(m, extract(m, sel), sel)`` leaves ``m`` bit-identical.

    Raises:
      ValueError: the selection or the sub-model does not fit ``model`` (names the layer).
    """
    aggregate(model, [(sub, selection, 1.0)])
    return model


def aggregate(
    model: tf.keras.Model,
    results: Sequence[tuple[tf.keras.Model | Sequence[np.ndarray], Selection, float]],
) -> tf.keras.Model:
    """Per-kernel weighted average of client sub-models into ``model``, in place (PRISM.md §4).

    Each principal kernel ``i`` (``a_i``, ``b_i``) becomes the weighted mean over the clients whose selection
    contains ``i``; a kernel no client trained keeps its value. Every other weight (including biases of principal
    layers and BatchNorm statistics) is the weighted mean over all clients, as in FedAvg.

    Args:
      model: the full factorized model (updated in place and returned).
      results: ``(sub_model_or_its_weights, selection, weight)`` per client; ``weight`` is usually the client's
        example count (use 1.0 for each to weight clients equally, as the authors do).
    """
    if not results:
        raise ValueError("aggregate: no client results")
    for _, selection, _ in results:
        selection.check_model(model)
    client_weights = [_as_weight_list(sub) for sub, _, _ in results]
    total = float(sum(weight for _, _, weight in results))
    if total <= 0:
        raise ValueError("aggregate: client weights must sum to a positive number")
    position = 0
    for layer in walk_layers(model):
        variables = layer.weights
        count = len(variables)
        received = [weights[position:position + count] for weights in client_weights]
        for client, values in enumerate(received):
            if len(values) != count:
                raise ValueError(f"client {client}: sub-model has too few weights for layer '{layer.name}'")
        if is_principal(layer):
            _aggregate_principal(layer, received, [(sel, w) for _, sel, w in results])
            named = {_short_name(v): i for i, v in enumerate(variables)}
            shared = [i for name, i in named.items() if name not in _FACTOR_NAMES]
        else:
            shared = list(range(count))
        for i in shared:
            expected = tuple(variables[i].shape)
            for client, values in enumerate(received):
                if tuple(np.shape(values[i])) != expected:
                    raise ValueError(
                        f"client {client}: weight '{variables[i].name}' of layer '{layer.name}' has shape "
                        f"{tuple(np.shape(values[i]))}, expected {expected}"
                    )
            mean = sum(np.asarray(values[i], np.float64) * w for values, (_, _, w) in zip(received, results,
                                                                                        strict=True))
            variables[i].assign((mean / total).astype(variables[i].dtype.as_numpy_dtype))
        position += count
    for client, weights in enumerate(client_weights):
        if len(weights) != position:
            raise ValueError(f"client {client}: sub-model has {len(weights)} weights, the model {position}")
    return model


_FACTOR_NAMES = ("principal_kernels", "combination", "singular_values", "kernel_scale")


def _aggregate_principal(layer, received, selections) -> None:
    named = {_short_name(v): i for i, v in enumerate(layer.weights)}
    a_pos, b_pos = named["principal_kernels"], named["combination"]
    rows_shape = layer.principal_kernels.shape[:-1]
    sums = counts = None
    for values, (selection, weight) in zip(received, selections, strict=True):
        sel = selection.layers[layer.name]
        a, b = np.asarray(values[a_pos]), np.asarray(values[b_pos])
        if a.shape != (*rows_shape, sel.size) or b.shape != (sel.size, layer.combination.shape[-1]):
            raise ValueError(
                f"layer '{layer.name}': sub-model factors have shapes {a.shape} and {b.shape}, the selection "
                f"expects {(*rows_shape, sel.size)} and {(sel.size, layer.combination.shape[-1])}"
            )
        rows = spectral.kernel_rows(tf.constant(a, tf.float64), tf.constant(b, tf.float64))
        s, c = spectral.per_key_sums(rows, sel.indices, weight, layer.rank)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    previous = spectral.kernel_rows(tf.cast(layer.principal_kernels, tf.float64),
                                    tf.cast(layer.combination, tf.float64))
    merged = spectral.per_key_average(sums, counts, previous)
    a, b = spectral.split_kernel_rows(merged, rows_shape)
    layer.principal_kernels.assign(tf.cast(a, layer.principal_kernels.dtype))
    layer.combination.assign(tf.cast(b, layer.combination.dtype))


def _as_weight_list(sub) -> list[np.ndarray]:
    if isinstance(sub, tf.keras.Model):
        return [w.numpy() for layer in walk_layers(sub) for w in layer.weights]
    return list(sub)


def _short_name(variable: tf.Variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def kernel_coverage(model: tf.keras.Model, selections: Sequence[Selection]) -> float:
    """Fraction of all principal kernels of ``model`` that at least one of ``selections`` contains."""
    total = covered = 0
    for layer in principal_layers(model):
        seen = np.zeros(layer.rank, bool)
        for selection in selections:
            seen[selection.layers[layer.name].indices] = True
        total += layer.rank
        covered += int(seen.sum())
    return covered / total if total else 0.0
