"""Magnitude pruning of principal layers with tfmot (`prism_tf.compression`).

tfmot's ``PruneLowMagnitude`` wraps any layer that is a ``PrunableLayer`` or has ``get_prunable_weights()``; the
single-kernel principal layers define that method (their trainable factors: ``A`` and ``B``; ``s`` and ``ω`` are
frozen and the bias is not pruned, as tfmot leaves a Dense bias alone) and are registered here as virtual subclasses
of ``PrunableLayer`` (an ABC), so ``isinstance`` checks in user code see them too. The layers with several kernels
(`PrincipalLSTM`, `PrincipalGRU`, `PrincipalMultiHeadAttention`) prune every pair's ``A`` and ``B``
(`prism_tf.layers.pairs.FactorPairsMixin.get_prunable_weights`).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow_model_optimization.python.core.sparsity.keras.prunable_layer import PrunableLayer

from prism_tf.layers import (
    PrincipalConv1D,
    PrincipalConv2D,
    PrincipalDense,
    PrincipalEmbedding,
    PrincipalGRU,
    PrincipalLSTM,
    PrincipalMultiHeadAttention,
)

PRUNABLE_LAYERS: tuple[type, ...] = (PrincipalConv2D, PrincipalConv1D, PrincipalDense, PrincipalEmbedding,
                                     PrincipalLSTM, PrincipalGRU, PrincipalMultiHeadAttention)

for _layer in PRUNABLE_LAYERS:
    PrunableLayer.register(_layer)  # subclasses (the tied PrincipalReversibleEmbedding) follow


def prunable_weights(layer: tf.keras.layers.Layer) -> list[tf.Variable]:
    """The weights tfmot prunes of ``layer`` (a principal layer's ``A`` and ``B``, every pair's for a layer with
    several kernels); ``[]`` for other layers."""
    return list(layer.get_prunable_weights()) if isinstance(layer, PRUNABLE_LAYERS) else []


__all__ = ["PRUNABLE_LAYERS", "prunable_weights"]
