"""tensorflow-model-optimization (tfmot) on principal-kernel models: pruning and quantization-aware training
(docs/export.md, "tfmot on factorized models").

Imported on demand (``import prism_tf.compression``): the core modules never import tfmot, so a federated run or an
export without it pays nothing (tfmot adds ~0.3 s to TensorFlow's import, and pulls in its own registries).

- Pruning: the single-kernel principal layers (`PrincipalConv2D`, `PrincipalConv1D`, `PrincipalDense`,
  `PrincipalEmbedding` and the tied embedding) have ``get_prunable_weights()`` (their trainable factors ``A`` and
  ``B``), and importing this package registers them as tfmot ``PrunableLayer``\\ s, so
  ``tfmot.sparsity.keras.prune_low_magnitude(model)`` wraps them like any Keras layer and ``strip_pruning`` gives
  back the same principal layers with sparse factors.
- Quantization: `PrincipalQuantizeConfig` (8-bit fake quantization of ``A`` and ``B``, per output channel, and of
  the layer's output) and `quantize_model` / `quantize_annotate` / `quantize_scope`, the tfmot functions with our
  layers' configs and custom objects.
- Quantization-aware fine-tuning of a trained model: `quantization_aware_finetune` (`prism_tf.compression.qat`):
  `quantize_model`, activation ranges calibrated on the given images (`calibrate_ranges`), then a few steps of
  distillation from the float model; ``python -m export model --int8 --qat STEPS`` runs it before conversion.
"""

from prism_tf.compression.pruning import PRUNABLE_LAYERS, prunable_weights
from prism_tf.compression.qat import FinetuneResult, calibrate_ranges, distillation_loss, quantization_aware_finetune
from prism_tf.compression.quantization import (
    PrincipalQuantizeConfig,
    quantize_annotate,
    quantize_config_for,
    quantize_model,
    quantize_scope,
)

__all__ = ["PRUNABLE_LAYERS", "FinetuneResult", "PrincipalQuantizeConfig", "calibrate_ranges", "distillation_loss",
           "prunable_weights", "quantization_aware_finetune", "quantize_annotate", "quantize_config_for",
           "quantize_model", "quantize_scope"]
