"""On-device training: one client's sub-model as a TFLite model that trains on the phone (docs/export.md,
"On-device training"). Needs no TFF.

    module = build_training_module(submodel, TrainStep(learning_rate=0.05))   # train/infer/get_weights/set_weights
    flatbuffer = convert(module)                                              # builtin ops only

Modules, by job:

- `export.tflite.module`: `TrainStep`, `weight_names`, `TrainingModule` and `build_training_module` (the four
  signatures, both runtimes);
- `export.tflite.conversion`: `convert`, `strip_tensor_names`, `model_ops` (the flatbuffer);
- `export.tflite.compiler`: the builtins runtime's graph walk; factorizable layers compile through their kind
  (`prism_tf.kinds.LayerKind.tflite_layer`), the others there;
- `export.tflite.ops`: the builtin-gradient primitives and `BuiltinOps` (`prism_tf.kinds.TFLiteOps`).
"""

from export.tflite.conversion import convert, model_ops, strip_tensor_names
from export.tflite.module import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PATCH_BYTES,
    RUNTIMES,
    SIGNATURES,
    TrainingModule,
    TrainStep,
    build_training_module,
    weight_names,
)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_PATCH_BYTES", "RUNTIMES", "SIGNATURES", "TrainStep", "TrainingModule",
           "build_training_module", "convert", "model_ops", "strip_tensor_names", "weight_names"]
