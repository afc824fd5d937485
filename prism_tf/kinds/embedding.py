"""``Embedding`` ↔ `PrincipalEmbedding` (docs/algorithm.md §1): the ``[vocabulary, dim]`` table is the matrix; a
principal kernel is one column of ``A`` (a value per token) with its row of ``B`` (a direction in embedding space).

A client downloads ``vocabulary × k + k × dim`` numbers instead of ``vocabulary × dim``; the lookup itself was free,
so the sub-model's embedding costs ``k × dim`` multiply-adds per token that the full model's did not (counted by
`prism_tf.cost`). Embeddings are not weight-decayed (as before the registry)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from prism_tf import spectral
from prism_tf.kinds.base import CompiledLayer, LayerKind, Rules, TFLiteOps, node_shapes
from prism_tf.layers import PrincipalEmbedding, PrincipalReversibleEmbedding, ReversibleEmbedding


class EmbeddingKind(LayerKind):
    name = "embedding"
    source = tf.keras.layers.Embedding
    principal = PrincipalEmbedding
    width_key = "output_dim"

    def ineligibility(self, layer: tf.keras.layers.Layer, rules: Rules) -> str | None:
        return None

    def kernel_shape(self, layer: tf.keras.layers.Layer) -> tuple[int, ...]:
        return (int(layer.input_dim), int(layer.output_dim))

    def to_principal(self, config: dict[str, Any], ranks: Mapping[str, int]) -> tf.keras.layers.Layer:
        return self.principal(config["input_dim"], config["output_dim"], ranks[""], mask_zero=config["mask_zero"],
                                  name=config["name"], trainable=config.get("trainable", True),
                                  dtype=config.get("dtype"))

    def shape_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"input_dim": config["input_dim"], "output_dim": config["output_dim"]}

    def to_plain(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        return self.source(layer.input_dim, layer.output_dim, mask_zero=layer.mask_zero,
                                         name=layer.name, dtype=layer.dtype)

    def load_factors(self, principal: tf.keras.layers.Layer, plain: tf.keras.layers.Layer) -> None:
        a, b, s = spectral.factorize_kernel(plain.embeddings)
        principal.set_factors(a, b, s)

    def plain_weights(self, principal: tf.keras.layers.Layer) -> list:
        return [principal.dense_kernel().numpy()]

    def flops(self, layer: tf.keras.layers.Layer, in_shape: Sequence, out_shape: Sequence) -> tuple[int, int]:
        tokens = 1
        for d in in_shape[1:]:
            tokens *= int(d)
        if isinstance(layer, self.principal):
            return tokens * layer.rank * layer.output_dim, tokens * layer.rank
        return 0, 0

    def decayed(self, layer: tf.keras.layers.Layer) -> list[tf.Variable]:
        return []

    def first_factor(self, layer: tf.keras.layers.Layer) -> tf.Tensor:
        return tf.convert_to_tensor(layer.principal_kernels if type(layer) is self.principal else layer.embeddings)

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """A GATHER of the table's rows (a principal layer's rows of ``A``, then ``diag(ω)·B``)."""
        if len(shapes) != 1:
            raise ops.unsupported(layer, "expects one input of token ids")
        if layer.mask_zero:
            raise ops.unsupported(layer, "mask_zero (its mask travels to the layers after it)")
        principal = type(layer) is self.principal

        def embedding_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            rows = ops.gather(self.first_factor(layer), inputs[0])
            return self.finish_linear(layer, rows, ops, lambda y: y) if principal else rows

        return embedding_layer


class ReversibleEmbeddingKind(EmbeddingKind):
    """`ReversibleEmbedding` ↔ `PrincipalReversibleEmbedding`: one table for the lookup and the tied output
    projection (`prism_tf.layers.tied`); a reverse call costs ``k·(dim + vocabulary)`` per position factorized,
    ``dim·vocabulary`` whole."""

    name = "reversible_embedding"
    source = ReversibleEmbedding
    principal = PrincipalReversibleEmbedding

    def tflite_layer(self, layer: tf.keras.layers.Layer, shapes: list[tuple], ops: TFLiteOps) -> CompiledLayer:
        """The lookup (int ids: `EmbeddingKind.tflite_layer`'s GATHER) or the tied projection (float hidden states,
        a ``reverse=True`` call): ``h·Eᵀ``, a principal layer's ``(h·(diag(ω)·B)ᵀ)·Aᵀ``, FULLY_CONNECTED with
        TRANSPOSEd factors. The two calls share the table, so their gradients add up."""
        lookup = super().tflite_layer(layer, shapes, ops)
        principal = type(layer) is self.principal

        def tied_layer(inputs: list, training: bool, updates: list) -> tf.Tensor:
            (x,) = inputs
            if x.dtype.is_integer:
                return lookup(inputs, training, updates)
            if principal:
                combination = ops.scale_rows(tf.convert_to_tensor(layer.kernel_scale),
                                             tf.convert_to_tensor(layer.combination))
                responses = ops.matmul(x, ops.transpose(combination, [1, 0]))
                return ops.matmul(responses, ops.transpose(tf.convert_to_tensor(layer.principal_kernels), [1, 0]))
            return ops.matmul(x, ops.transpose(tf.convert_to_tensor(layer.embeddings), [1, 0]))

        return tied_layer

    def node_flops(self, layer: tf.keras.layers.Layer, node: Any) -> tuple[int, int]:
        in_shape, out_shape = node_shapes(node)
        if not node.call_kwargs.get("reverse", False):
            return self.flops(layer, in_shape, out_shape)
        positions = 1
        for d in in_shape[1:-1]:
            positions *= int(d)
        if isinstance(layer, self.principal):
            return positions * layer.rank * (layer.output_dim + layer.input_dim), positions * layer.rank
        return positions * layer.output_dim * layer.input_dim, 0
