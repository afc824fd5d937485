"""Client sub-models: `extract` a genuinely smaller model, `merge` it back, and `aggregate` many per entry.

docs/algorithm.md §2 (sub-models) and §3 (aggregation). A sub-model has the full model's graph; each principal layer
keeps
only the selected kernels (``A[..., idx]``, ``B[idx]``, ``ω`` from the strategy) and, in the memory-efficient
variant or a width-sliced baseline, only the selected channels. Everything is driven by a `SubmodelPlan` (which
group slices which axis of which tensor) and the arithmetic of `prism_tf.slicing`, the same functions the TFF
process and the device-ingest path use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from prism_tf import server, slicing
from prism_tf.factorization import clone_with_ranks
from prism_tf.kinds import kernel_groups, walk_layers
from prism_tf.plan import FROM_SELECTION, SubmodelPlan
from prism_tf.sampling import Selection


def extract(model: tf.keras.Model, selection: Selection) -> tf.keras.Model:
    """Build the client's sub-model: a standalone Keras model with only the selected kernels (docs/algorithm.md §2).

    Raises:
      ValueError: the selection does not fit the model (names the layer).
    """
    plan = SubmodelPlan.of(model)
    selection.check_model(model, plan)
    sub = submodel_architecture(model, plan, plan.sizes(selection.indices()))
    set_flat_weights(sub, submodel_weights(model, selection, plan))
    return sub


def submodel_architecture(model: tf.keras.Model, plan: SubmodelPlan, sizes: Mapping[str, int]) -> tf.keras.Model:
    """The sub-model's architecture (fresh weights) for given group sizes; shared by all clients of that size."""
    ranks = {name: sizes[name] for name in plan.kernel_groups()}
    widths = {}
    for name in plan.free_channel_groups():
        if sizes[name] != plan.groups[name].size:
            widths.update({producer: sizes[name] for producer in plan.groups[name].producers})
    return clone_with_ranks(model, ranks, widths)


def flat_weights(model: tf.keras.Model) -> list[tf.Variable]:
    """All weights in `walk_layers` order: the order of `SubmodelPlan.tensors`."""
    return [w for layer in walk_layers(model) for w in layer.weights]


def submodel_weights(
    model: tf.keras.Model, selection: Selection, plan: SubmodelPlan | None = None
) -> list[np.ndarray]:
    """The sub-model's weights in `flat_weights` order, gathered from ``model`` by ``selection``."""
    plan = plan or SubmodelPlan.of(model)
    indices = selection.indices()
    out = []
    for tensor, variable in zip(plan.tensors, flat_weights(model), strict=True):
        if tensor.role == FROM_SELECTION and tensor.group in selection.layers:
            out.append(selection.layers[tensor.group].scale)
        else:
            out.append(slicing.gather_axes(variable, plan.slices(tensor, indices)).numpy())
    return out


def set_flat_weights(model: tf.keras.Model, weights: Sequence[np.ndarray]) -> None:
    """Assign weights in `flat_weights` order, checking every shape (the error names the weight)."""
    variables = flat_weights(model)
    if len(variables) != len(weights):
        raise ValueError(f"expected {len(variables)} weight arrays for '{model.name}', got {len(weights)}")
    for variable, value in zip(variables, weights, strict=True):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"weight '{variable.name}' has shape {tuple(variable.shape)}, got {np.shape(value)}")
        variable.assign(value)


def merge(model: tf.keras.Model, sub: tf.keras.Model, selection: Selection) -> tf.keras.Model:
    """Write a (trained) sub-model back into the full model, in place (docs/algorithm.md §2-§3).

    Principal layers receive only the selected kernels (columns of ``A``, rows of ``B``); the full model's
    singular values and ``ω`` are left as they are (`refactorize` recomputes ``s``). Every other weight receives
    the entries the sub-model has. ``merge(m, extract(m, sel), sel)`` leaves ``m`` bit-identical.

    Raises:
      ValueError: the selection or the sub-model does not fit ``model`` (names the layer).
    """
    return aggregate(model, [(sub, selection, 1.0)])


def aggregate(
    model: tf.keras.Model,
    results: Sequence[tuple[tf.keras.Model | Sequence[np.ndarray], Selection, float]],
) -> tf.keras.Model:
    """Per-entry weighted average of client sub-models into ``model``, in place (docs/algorithm.md §3).

    Each principal kernel ``i`` (``a_i``, ``b_i``) becomes the weighted mean over the clients whose selection
    contains ``i``; a kernel no client trained keeps its value. Weights that are not sliced (biases of
    unsliced outputs, BatchNorm statistics, the first conv, the classifier) are the weighted mean over all
    clients, as in FedAvg.

    Args:
      model: the full factorized model (updated in place and returned).
      results: ``(sub_model_or_its_flat_weights, selection, weight)`` per client; ``weight`` is usually the
        client's example count (1.0 each weights clients equally, as the authors do).
    """
    if not results:
        raise ValueError("aggregate: no client results")
    plan = SubmodelPlan.of(model)
    accumulator = server.Accumulator(plan)
    for client, (sub, selection, weight) in enumerate(results):
        selection.check_model(model, plan)
        values = [w.numpy() for w in flat_weights(sub)] if isinstance(sub, tf.keras.Model) else list(sub)
        accumulator.add(values, selection, weight, name=f"client {client}")
    variables = flat_weights(model)
    for variable, value in zip(variables, accumulator.average([v.numpy() for v in variables]), strict=True):
        variable.assign(value)
    return model


def kernel_coverage(model: tf.keras.Model, selections: Sequence[Selection]) -> float:
    """Fraction of all principal kernels of ``model`` that at least one of ``selections`` contains."""
    total = covered = 0
    for group, (layer, pair) in kernel_groups(model).items():
        seen = np.zeros(layer.pair_rank(pair), bool)
        for selection in selections:
            seen[selection.layers[group].indices] = True
        total += layer.pair_rank(pair)
        covered += int(seen.sum())
    return covered / total if total else 0.0


__all__ = ["aggregate", "extract", "flat_weights", "kernel_coverage", "merge", "set_flat_weights",
           "submodel_architecture", "submodel_weights"]
