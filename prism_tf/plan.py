"""How a full model's tensors map onto a sub-model's: index groups and per-tensor slicing.

Every sub-model in this project (PriSM's, and the width-sliced baselines') is the full model restricted to index
vectors of a few *groups*:

- a **kernel group** per principal layer: which of its ``r`` principal kernels a client has (columns of ``A``,
  rows of ``B``, entries of ``s`` and ``ω``; docs/algorithm.md §2);
- a **channel group** per set of layer outputs that must agree: a Conv2D/Dense/principal layer's output channels,
  passed through channel-wise layers (normalization, activations, pooling) and united by residual ``Add``s. A group
  is *free* (may be sliced) unless it reaches a model output or a layer that mixes channels in other ways
  (Flatten, Concatenate, depthwise convs, ...).

`SubmodelPlan.of(model)` finds the groups and, for every weight tensor, the axes each group slices. A `Selection`
gives the indices per group; `SubmodelPlan.slices` turns both into the ``(axis, indices)`` lists that
`prism_tf.slicing` gathers and averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from prism_tf import kinds
from prism_tf.kinds import is_principal, walk_layers

KERNELS, CHANNELS = "kernels", "channels"

_CHANNELWISE = (
    tf.keras.layers.BatchNormalization, tf.keras.layers.GroupNormalization, tf.keras.layers.LayerNormalization,
    tf.keras.layers.ReLU, tf.keras.layers.Activation, tf.keras.layers.LeakyReLU, tf.keras.layers.Dropout,
    tf.keras.layers.SpatialDropout2D, tf.keras.layers.MaxPooling2D, tf.keras.layers.AveragePooling2D,
    tf.keras.layers.GlobalAveragePooling2D, tf.keras.layers.GlobalMaxPooling2D, tf.keras.layers.ZeroPadding2D,
    tf.keras.layers.SpatialDropout1D, tf.keras.layers.MaxPooling1D, tf.keras.layers.AveragePooling1D,
    tf.keras.layers.GlobalAveragePooling1D, tf.keras.layers.GlobalMaxPooling1D, tf.keras.layers.ZeroPadding1D,
)
_MERGES = (tf.keras.layers.Add, tf.keras.layers.Subtract, tf.keras.layers.Average, tf.keras.layers.Maximum,
           tf.keras.layers.Minimum, tf.keras.layers.Multiply)
# Weights a client neither receives nor returns: s drives server-side sampling only, ω comes with the selection.
SERVER_ONLY, FROM_SELECTION = "singular_values", "kernel_scale"


@dataclasses.dataclass(frozen=True)
class Group:
    """An index group: its full size, kind (``kernels``/``channels``) and whether it may be sliced."""

    name: str
    kind: str
    size: int
    free: bool
    producers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSlicing:
    """One weight tensor of the full model and the groups that slice its axes."""

    layer: str
    weight: str
    shape: tuple[int, ...]
    axes: tuple[tuple[int, str], ...]
    group: str | None = None  # a factor's kernel group (`prism_tf.kinds.group_name`), else None
    role: str | None = None  # a factor's role: principal_kernels, combination, singular_values or kernel_scale

    @property
    def travels(self) -> bool:
        """Whether clients receive and return this tensor (not ``s``, not ``ω``)."""
        return self.role not in (SERVER_ONLY, FROM_SELECTION)

    def sub_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        shape = list(self.shape)
        for axis, group in self.axes:
            shape[axis] = sizes.get(group, shape[axis])
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class SubmodelPlan:
    """Groups and per-tensor slicing of a model, in ``walk_layers`` weight order."""

    groups: Mapping[str, Group]
    tensors: tuple[TensorSlicing, ...]

    @classmethod
    def of(cls, model: tf.keras.Model) -> SubmodelPlan:
        return _analyze(model)

    def kernel_groups(self) -> list[str]:
        return [g.name for g in self.groups.values() if g.kind == KERNELS]

    def free_channel_groups(self) -> list[str]:
        return [g.name for g in self.groups.values() if g.kind == CHANNELS and g.free]

    def owned_channel_groups(self) -> dict[str, str]:
        """Free channel groups produced by a single principal layer (where PriSM's ``output_keep`` applies)."""
        out = {}
        for g in self.groups.values():
            if (g.kind == CHANNELS and g.free and len(g.producers) == 1 and g.producers[0] in self.groups
                    and self.groups[g.producers[0]].kind == KERNELS):
                out[g.producers[0]] = g.name
        return out

    def sizes(self, indices: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Sub-model size of each group; groups absent from ``indices`` stay full."""
        return self.sizes_with({name: int(np.shape(idx)[0]) for name, idx in indices.items()})

    def sizes_with(self, overrides: Mapping[str, int]) -> dict[str, int]:
        """Size of every group: ``overrides`` where given, else full."""
        return {name: int(overrides.get(name, g.size)) for name, g in self.groups.items()}

    def slices(self, tensor: TensorSlicing, indices: Mapping[str, object]) -> list[tuple[int, object]]:
        """The ``(axis, indices)`` to gather ``tensor`` by, for the groups present in ``indices``."""
        return [(axis, indices[group]) for axis, group in tensor.axes if group in indices]


def channel_group_name(layer_name: str) -> str:
    return f"{layer_name}:out"


def _analyze(model: tf.keras.Model) -> SubmodelPlan:
    parent: dict[str, str] = {}
    fixed: set[str] = set()
    sizes: dict[str, int] = {}
    out_group: dict[str, str | None] = {}
    in_group: dict[str, str | None] = {}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def new_group(layer_name: str, size: int) -> str:
        name = channel_group_name(layer_name)
        parent[name], sizes[name] = name, size
        return name

    top_level = {layer.name for layer in model.layers}
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            out_group[layer.name] = None
            continue
        nodes = layer._inbound_nodes
        inbound = nodes[0].inbound_layers if len(nodes) == 1 else []
        inbound = inbound if isinstance(inbound, list) else [inbound]
        groups = [out_group.get(src.name) for src in inbound]
        first = groups[0] if groups else None
        in_group[layer.name] = first
        if len(nodes) != 1 or isinstance(layer, tf.keras.Model):
            fixed.update(g for g in groups if g)
            out_group[layer.name] = None
        elif _is_mixing(layer):
            out_group[layer.name] = new_group(layer.name, _out_size(layer))
        elif isinstance(layer, _CHANNELWISE) and _channels_last(layer):
            out_group[layer.name] = first
        elif isinstance(layer, _MERGES) and all(groups):
            root = find(groups[0])
            for g in groups[1:]:
                parent[find(g)] = root
            out_group[layer.name] = root
        else:
            fixed.update(g for g in groups if g)
            out_group[layer.name] = None
    for tensor in tf.nest.flatten(model.outputs):
        g = out_group.get(tensor._keras_history.layer.name)
        if g:
            fixed.add(g)
    fixed_roots = {find(g) for g in fixed}
    producers: dict[str, list[str]] = {}
    for name, g in parent.items():
        producers.setdefault(find(g), []).append(name.rsplit(":", 1)[0])

    groups: dict[str, Group] = {}
    for root, members in producers.items():
        groups[root] = Group(root, CHANNELS, sizes[root], root not in fixed_roots, tuple(members))

    def channel(g: str | None) -> str | None:
        if g is None:
            return None
        root = find(g)
        return root if groups[root].free else None

    tensors = []
    for layer in walk_layers(model):
        inside = layer.name in top_level
        src = channel(in_group.get(layer.name)) if inside else None
        dst = channel(out_group.get(layer.name)) if inside else None
        if is_principal(layer):
            for pair in layer.pairs:
                name = kinds.group_name(layer.name, pair)
                groups[name] = Group(name, KERNELS, layer.pair_rank(pair), True, (layer.name,))
        for weight in layer.weights:
            short = weight.name.split("/")[-1].split(":")[0]
            axes = _weight_axes(layer, short, src, dst, len(weight.shape))
            group, role = kinds.factor_role(layer, short) or (None, None)
            tensors.append(TensorSlicing(layer.name, short, tuple(int(d) for d in weight.shape),
                                         tuple((a, g) for a, g in axes if g is not None), group, role))
    return SubmodelPlan(groups, tuple(tensors))


def _weight_axes(layer, weight: str, src: str | None, dst: str | None, rank: int) -> list[tuple[int, str | None]]:
    kind = kinds.kind_of(layer)
    if kind is not None:
        return kind.weight_axes(layer, weight, src, dst, rank)
    if isinstance(layer, _CHANNELWISE) and rank == 1:
        return [(0, src)]
    return []


def _is_mixing(layer) -> bool:
    """Layers whose output channels are a fresh group: the registered kinds (convs with groups=1, dense)."""
    kind = kinds.kind_of(layer)
    return kind is not None and kind.mixes_channels(layer)


def _out_size(layer) -> int:
    return kinds.kind_of(layer).out_size(layer)


def _channels_last(layer) -> bool:
    axis = getattr(layer, "axis", -1)
    if isinstance(axis, list | tuple):
        axis = axis[0] if len(axis) == 1 else None
    if axis is None:
        return False
    return axis in (-1, len(layer.input_shape) - 1) and getattr(layer, "data_format", "channels_last") in (
        "channels_last", None)
