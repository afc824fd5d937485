"""The registry of layer kinds (docs/design.md, "Layer kinds"): one `LayerKind` per supported Keras layer.

    kind_of(layer)       # the kind whose plain or principal layer this is (exact type), or None
    principal_layers(m)  # every factorized layer of a model
    register(kind)       # add a kind: its module, plus its tests, is all a new kind needs

Lookups keep registration order; `covering_kind` (cost, weight decay) also sees subclasses, as ``isinstance`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import tensorflow as tf

from prism_tf.kinds.attention import MultiHeadAttentionKind
from prism_tf.kinds.base import LayerKind, Rules, TFLiteOps, WholeKind, group_name
from prism_tf.kinds.conv1d import Conv1DKind
from prism_tf.kinds.conv2d import Conv2DKind
from prism_tf.kinds.dense import DenseKind
from prism_tf.kinds.embedding import EmbeddingKind, ReversibleEmbeddingKind
from prism_tf.kinds.recurrent import GRUKind, LSTMKind
from prism_tf.kinds.whole import DepthwiseConv2DKind, SeparableConv2DKind

KINDS: list[LayerKind] = []
WHOLE_KINDS: list[WholeKind] = []
CUSTOM_OBJECTS: dict[str, type] = {}  # Keras custom objects of every principal layer (loading saved models)


def register(kind: LayerKind | WholeKind) -> LayerKind | WholeKind:
    """Add ``kind`` to the registry (factorizable kinds first, then kinds kept whole); returns it."""
    if isinstance(kind, WholeKind):
        WHOLE_KINDS.append(kind)
    else:
        if any(k.name == kind.name for k in KINDS):
            raise ValueError(f"a layer kind named {kind.name!r} is already registered")
        KINDS.append(kind)
        CUSTOM_OBJECTS[kind.principal.__name__] = kind.principal
    return kind


for _kind in (Conv2DKind(), DenseKind(), Conv1DKind(), EmbeddingKind(), ReversibleEmbeddingKind(), LSTMKind(),
              GRUKind(), MultiHeadAttentionKind(), DepthwiseConv2DKind(), SeparableConv2DKind()):
    register(_kind)


def kind_of(layer: tf.keras.layers.Layer) -> LayerKind | None:
    """The factorizable kind whose plain or principal layer ``layer`` is (exact type), or ``None``."""
    return next((k for k in KINDS if k.holds(layer)), None)


def covering_kind(layer: tf.keras.layers.Layer) -> LayerKind | WholeKind | None:
    """``layer``'s own kind (exact type), else the first kind (factorizable, then whole) that ``layer`` is an instance
    of: cost and weight decay."""
    return kind_of(layer) or next((k for k in (*KINDS, *WHOLE_KINDS) if k.covers(layer)), None)


def is_principal(layer: tf.keras.layers.Layer) -> bool:
    """Whether ``layer`` is a factorized (principal-kernel) layer."""
    return isinstance(layer, tuple(k.principal for k in KINDS))


def walk_layers(model: tf.keras.Model) -> Iterator[tf.keras.layers.Layer]:
    """Every layer of ``model`` in topological order, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            yield from walk_layers(layer)
        else:
            yield layer


def principal_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """The factorized layers of ``model`` in topological order."""
    return [layer for layer in walk_layers(model) if is_principal(layer)]


def kernel_groups(model: tf.keras.Model) -> dict[str, tuple[tf.keras.layers.Layer, str]]:
    """Every kernel group of ``model`` (one per factor pair of each principal layer) -> ``(layer, pair)``, in
    topological order."""
    return {group_name(layer.name, pair): (layer, pair) for layer in principal_layers(model) for pair in layer.pairs}


def pair_ranks(layer_name: str, pairs: tuple[str, ...], ranks: Mapping[str, int]) -> dict[str, int] | None:
    """A layer's ranks by pair from ``ranks`` by kernel group, or ``None`` if ``ranks`` names none of its groups."""
    found = {pair: ranks[group_name(layer_name, pair)] for pair in pairs if group_name(layer_name, pair) in ranks}
    if not found:
        return None
    if len(found) != len(pairs):
        missing = [group_name(layer_name, p) for p in pairs if p not in found]
        raise ValueError(f"ranks for layer '{layer_name}' miss the kernel groups {missing}")
    return found


def factor_role(layer: tf.keras.layers.Layer, weight: str) -> tuple[str, str] | None:
    """``(kernel group, role)`` of a principal layer's weight named ``weight`` (``principal_kernels``,
    ``input_combination``, ...), or ``None`` for its other weights (bias) and for plain layers."""
    found = layer.role_of(weight) if is_principal(layer) else None
    return None if found is None else (group_name(layer.name, found[0]), found[1])


__all__ = ["CUSTOM_OBJECTS", "KINDS", "WHOLE_KINDS", "LayerKind", "Rules", "TFLiteOps", "WholeKind", "covering_kind",
           "factor_role", "group_name", "is_principal", "kernel_groups", "kind_of", "pair_ranks", "principal_layers",
           "register", "walk_layers"]
