"""The registry of layer kinds (docs/design.md, "Layer kinds"): one `LayerKind` per supported Keras layer.

    kind_of(layer)       # the kind whose plain or principal layer this is (exact type), or None
    principal_layers(m)  # every factorized layer of a model
    register(kind)       # add a kind: its module, plus its tests, is all a new kind needs

Lookups keep registration order; `covering_kind` (cost, weight decay) also sees subclasses, as ``isinstance`` does.
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow as tf

from prism_tf.kinds.base import LayerKind, Rules, TFLiteOps, WholeKind
from prism_tf.kinds.conv1d import Conv1DKind
from prism_tf.kinds.conv2d import Conv2DKind
from prism_tf.kinds.dense import DenseKind
from prism_tf.kinds.embedding import EmbeddingKind
from prism_tf.kinds.whole import DepthwiseConv2DKind, MultiHeadAttentionKind, SeparableConv2DKind

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


for _kind in (Conv2DKind(), DenseKind(), Conv1DKind(), EmbeddingKind(), DepthwiseConv2DKind(),
              SeparableConv2DKind(), MultiHeadAttentionKind()):
    register(_kind)


def kind_of(layer: tf.keras.layers.Layer) -> LayerKind | None:
    """The factorizable kind whose plain or principal layer ``layer`` is (exact type), or ``None``."""
    return next((k for k in KINDS if k.holds(layer)), None)


def covering_kind(layer: tf.keras.layers.Layer) -> LayerKind | WholeKind | None:
    """The first kind (factorizable, then whole) that ``layer`` is an instance of: cost and weight decay."""
    return next((k for k in (*KINDS, *WHOLE_KINDS) if k.covers(layer)), None)


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


__all__ = ["CUSTOM_OBJECTS", "KINDS", "WHOLE_KINDS", "LayerKind", "Rules", "TFLiteOps", "WholeKind", "covering_kind",
           "is_principal", "kind_of", "principal_layers", "register", "walk_layers"]
