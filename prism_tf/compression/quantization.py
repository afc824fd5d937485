"""Quantization-aware training of principal-kernel models with tfmot (`prism_tf.compression`).

tfmot's default 8-bit scheme knows built-in Keras layers only; a custom layer is quantized through a
``QuantizeConfig`` passed to ``quantize_annotate_layer`` and deserialized inside ``quantize_scope``. Here:

- `PrincipalQuantizeConfig`: fake-quantizes the factors ``A`` (``principal_kernels``) and ``B`` (``combination``)
  to 8 bits, symmetric, and the layer's output after its activation (asymmetric, moving-average ranges), as tfmot
  does for ``Conv2D``/``Dense``: a convolution's ``A`` per output channel (its ``r`` filters, as tfmot's
  ``Conv2D`` kernel), every factor that enters a matrix product (``B``, a Dense's or an embedding's ``A``) per
  tensor, as tfmot's ``Dense`` kernel (the converter transposes a product's weights, and LiteRT's
  FULLY_CONNECTED takes per-tensor weights there: a per-axis ``B`` fails to convert). The rank-wide responses
  between ``A`` and ``B`` are not fake-quantized: a full-integer conversion calibrates them on representative
  inputs.
- A ``BatchNormalization`` after a principal layer: tfmot only supports BatchNorm folded into a preceding
  ``Conv2D``/``Dense``; after a principal layer it is kept as a layer whose output is quantized.
- `quantize_annotate` annotates a model so, `quantize_model` applies it (``quantize_apply`` in our scope), and
  `quantize_scope` is tfmot's with the principal layers and this config as custom objects (for loading a
  quantized model, or calling tfmot's own ``quantize_model``/``quantize_apply`` on an annotated model).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantizers
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_configs,
    default_8bit_quantize_registry,
)

from prism_tf import kinds
from prism_tf.kinds import walk_layers
from prism_tf.layers import PrincipalConv1D, PrincipalConv2D, PrincipalDense, PrincipalEmbedding

QUANTIZABLE_LAYERS: tuple[type, ...] = (PrincipalConv2D, PrincipalConv1D, PrincipalDense, PrincipalEmbedding)


@tf.keras.utils.register_keras_serializable(package="prism_tf")
class PrincipalQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """8-bit fake quantization of a single-kernel principal layer: ``A`` per output channel when
    ``per_axis_principal`` (convolutions) else per tensor, ``B`` per tensor, the output after the activation."""

    def __init__(self, per_axis_principal: bool = True) -> None:
        self.per_axis_principal = bool(per_axis_principal)

    def _weight_quantizer(self, per_axis: bool) -> quantizers.Quantizer:
        return quantizers.LastValueQuantizer(num_bits=8, per_axis=per_axis, symmetric=True, narrow_range=True)

    def get_weights_and_quantizers(self, layer: tf.keras.layers.Layer) -> list[tuple[Any, quantizers.Quantizer]]:
        return [(layer.principal_kernels, self._weight_quantizer(self.per_axis_principal)),
                (layer.combination, self._weight_quantizer(False))]

    def get_activations_and_quantizers(self, layer: tf.keras.layers.Layer) -> list[tuple[Any, quantizers.Quantizer]]:
        return [(layer.activation, quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                                     narrow_range=False))]

    def set_quantize_weights(self, layer: tf.keras.layers.Layer, quantize_weights: list[tf.Tensor]) -> None:
        layer.principal_kernels, layer.combination = quantize_weights

    def set_quantize_activations(self, layer: tf.keras.layers.Layer, quantize_activations: list[Any]) -> None:
        (layer.activation,) = quantize_activations

    def get_output_quantizers(self, layer: tf.keras.layers.Layer) -> list[quantizers.Quantizer]:
        return []

    def get_config(self) -> dict[str, Any]:
        return {"per_axis_principal": self.per_axis_principal}


def quantize_config_for(layer: tf.keras.layers.Layer) -> tfmot.quantization.keras.QuantizeConfig | None:
    """Our config for ``layer``: `PrincipalQuantizeConfig` for a single-kernel principal layer (``A`` per channel
    for a convolution), ``None`` for every other layer (tfmot's default registry decides)."""
    if isinstance(layer, QUANTIZABLE_LAYERS):
        return PrincipalQuantizeConfig(per_axis_principal=isinstance(layer, PrincipalConv2D | PrincipalConv1D))
    return None


@contextlib.contextmanager
def quantize_scope(*extra: dict[str, Any]) -> Iterator[None]:
    """tfmot's ``quantize_scope`` with every principal layer and `PrincipalQuantizeConfig` as custom objects."""
    objects = {**kinds.CUSTOM_OBJECTS, "PrincipalQuantizeConfig": PrincipalQuantizeConfig}
    with tfmot.quantization.keras.quantize_scope(objects, *extra):
        yield


def quantize_annotate(model: tf.keras.Model) -> tf.keras.Model:
    """``model`` annotated for quantization: principal layers with `PrincipalQuantizeConfig`, a BatchNorm that
    follows one with an output-only config, every other layer left to tfmot's default registry.

    Raises:
      ValueError: a principal layer with several kernels (LSTM, GRU, attention): no config yet; a model nested as
        a layer (tfmot quantizes the layers of one model); a model that is neither functional nor Sequential.
    """
    if not isinstance(model, tf.keras.Sequential) and not getattr(model, "_is_graph_network", False):
        raise ValueError(f"quantize: tfmot quantizes functional and Sequential models only, got the subclassed "
                         f"model '{model.name}' ({type(model).__name__})")
    nested = [layer for layer in model.layers if isinstance(layer, tf.keras.Model)]
    if nested:
        raise ValueError(f"quantize: tfmot cannot quantize a model nested in a model: layer '{nested[0].name}' "
                         f"({type(nested[0]).__name__}); quantize the inner model")
    several = [layer.name for layer in kinds.principal_layers(model) if not isinstance(layer, QUANTIZABLE_LAYERS)]
    if several:
        raise ValueError(f"quantize: principal layers with several kernels are not supported yet: {several}")
    after_principal = _batch_norms_after_principal(model)
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def annotate(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        clone = layer.__class__.from_config(layer.get_config())
        config = quantize_config_for(layer)
        if config is None and layer.name in after_principal and not registry.supports(layer):
            config = default_8bit_quantize_configs.Default8BitOutputQuantizeConfig()
        if config is None:
            return clone
        return tfmot.quantization.keras.quantize_annotate_layer(clone, quantize_config=config)

    with quantize_scope():
        annotated = tf.keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    return tfmot.quantization.keras.quantize_annotate_model(annotated)


def quantize_model(model: tf.keras.Model) -> tf.keras.Model:
    """``tfmot.quantization.keras.quantize_model`` for a model with principal layers: `quantize_annotate`, then
    ``quantize_apply`` in `quantize_scope`. The result trains (quantization-aware) and converts with the TFLite
    converter; ``model`` is not changed.

    Raises:
      ValueError: what `quantize_annotate` refuses, or a layer tfmot has no config for (named: a
        ``GroupNormalization``, say, or a ``BatchNormalization`` that follows neither a ``Conv2D``/``Dense`` nor a
        principal layer).
    """
    annotated = quantize_annotate(model)
    with quantize_scope():
        try:
            return tfmot.quantization.keras.quantize_apply(annotated)
        except RuntimeError as e:  # tfmot: "Layer NAME:<class 'module.Type'> is not supported. You can ..."
            found = re.match(r"Layer (.+?):<class '(?:.*\.)?(\w+)'> is not supported", str(e))
            if found is None:
                raise
            raise ValueError(f"quantize: tfmot cannot quantize layer '{found[1]}' ({found[2]}): neither tfmot's "
                             "8-bit registry nor prism_tf.compression has a QuantizeConfig for it") from None


def _batch_norms_after_principal(model: tf.keras.Model) -> set[str]:
    found = set()
    for layer in walk_layers(model):
        if not isinstance(layer, tf.keras.layers.BatchNormalization):
            continue
        for node in layer._inbound_nodes:
            inbound = node.inbound_layers
            for source in inbound if isinstance(inbound, list) else [inbound]:
                if kinds.is_principal(source):
                    found.add(layer.name)
    return found


__all__ = ["QUANTIZABLE_LAYERS", "PrincipalQuantizeConfig", "quantize_annotate", "quantize_config_for",
           "quantize_model", "quantize_scope"]
