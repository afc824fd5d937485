"""A training module as a ``.tflite`` flatbuffer, and tools that read and trim flatbuffers (docs/export.md,
"On-device training" and "Sizes")."""

from __future__ import annotations

import tempfile
from pathlib import Path

import tensorflow as tf

from export.tflite.module import RUNTIMES, SIGNATURES, TrainingModule


def convert(module: TrainingModule, runtime: str = "builtins") -> bytes:
    """Convert a `build_training_module` result into a ``.tflite`` flatbuffer with its four signatures.

    ``runtime="builtins"`` allows ``TFLITE_BUILTINS`` only (the conversion fails rather than emit a Flex op);
    ``"flex"`` allows ``[TFLITE_BUILTINS, SELECT_TF_OPS]``. A builtins module may be converted either way; a flex
    module needs ``"flex"``. The variables' current values become the model's initial weights (docs/export.md,
    "On-device training").
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if module.runtime == "flex" and runtime != "flex":
        raise ValueError("a runtime='flex' training module needs SELECT_TF_OPS: convert it with runtime='flex'")
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if runtime == "flex":
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    with tempfile.TemporaryDirectory(prefix="prism_tflite_") as directory:
        path = str(Path(directory) / "saved_model")
        # The train signature already holds its backward pass: saving the custom gradients' functions is not needed
        # (and takes longer than the conversion).
        tf.saved_model.save(module, path, signatures=module.signatures(),
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = ops
        converter.experimental_enable_resource_variables = True
        return strip_tensor_names(bytes(converter.convert()))


def strip_tensor_names(flatbuffer: bytes) -> bytes:
    """The flatbuffer without its tensors' debug names (about 8% of a ResNet-18 training model at width 16).

    Unlike TFLite's own ``flatbuffer_utils.strip_strings``, this keeps the signature defs: a signature maps its own
    input/output names to tensor indices, so `Interpreter.get_signature_runner` and Android's ``runSignature`` work
    unchanged (docs/export.md, "Sizes").
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.name = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def model_ops(flatbuffer: bytes) -> list[str]:
    """The sorted operator names a ``.tflite`` model uses, in all subgraphs (custom and Flex ops by their code)."""
    from tensorflow.lite.python import schema_py_generated as schema

    builtin_names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    used = set()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            code = model.OperatorCodes(subgraph.Operators(o).OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == schema.BuiltinOperator.CUSTOM:
                used.add(code.CustomCode().decode())
            else:
                used.add(builtin_names.get(builtin, str(builtin)))
    return sorted(used)


__all__ = ["convert", "model_ops", "strip_tensor_names"]
