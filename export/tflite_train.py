"""On-device training: one client's sub-model as a TFLite model that trains on the phone (docs/export.md,
"On-device training").

`build_training_module` wraps a client's Keras sub-model (`prism_tf.extract`) in a `tf.Module` with four
signatures and `convert` turns it into a ``.tflite`` flatbuffer:

- ``train(x float32[None, H, W, C], y int32[None]) -> {"loss"}``: one local step, exactly the federated client's
  (`tff_pipelines.round.client_work.train_submodel`): sparse softmax cross-entropy averaged over the batch, loss
  gradients, `prism_tf.local_step.step_gradients` (Frobenius decay, ClipLR, global-norm clip, weight decay), then
  TFF's SGD with momentum ``a ← μ·a + g, w ← w − lr·a``. BatchNorm moving statistics update as Keras's do in
  training (``m ← μ·m + (1−μ)·batch``, the variance Bessel-corrected).
- ``infer(x) -> {"logits"}``: inference mode (BatchNorm moving statistics).
- ``get_weights() -> {name: tensor}``: every entry of `prism_tf.submodel.flat_weights` (trainable or not, so BatchNorm
  statistics and ω travel), named by `weight_names`.
- ``set_weights(**{name: tensor}) -> {"assigned": int32}``: assigns them all and zeroes the momentum accumulators
  (a fresh round, as TFF initializes the optimizer afresh every round). The output is the number of tensors
  assigned: the converter drops the assignments of a signature without outputs. Shapes are not checked by TFLite
  (a wrongly shaped array of the same size is silently reinterpreted): the app must pass `get_weights`'s shapes.

Two runtimes (`RUNTIMES`):

``"builtins"``
  The training graph uses only TFLite builtin kernels, so it runs in the small interpreters without Flex
  (``ai_edge_litert``, ``tflite_runtime``). The Keras model keeps owning its variables; its functional graph is
  walked layer by layer and each layer is computed by a `tf.custom_gradient` primitive whose forward and backward
  passes avoid the TF kernels TFLite lacks (``Conv2DBackpropFilter``, ``ReluGrad``, ``FusedBatchNorm*``,
  ``SparseSoftmaxCrossEntropyWithLogits``, ``BroadcastGradientArgs``, ``Save``/``Restore``). A conv's filter
  gradient is one matmul of image patches (PAD, k·k STRIDED_SLICEs, CONCATENATION) with the output gradient,
  computed in batch chunks (a WHILE loop) when the patches would exceed ``max_patch_bytes``; its input gradient is
  a TRANSPOSE_CONV. The batch dimension stays dynamic, so a partial last batch trains too.
``"flex"``
  TFLite's standard on-device-training recipe: a plain `tf.GradientTape` over the Keras model, the same step,
  converted with ``[TFLITE_BUILTINS, SELECT_TF_OPS]``. It needs an interpreter linked with the Flex delegate, and
  refuses GroupNormalization (Keras's dynamic-batch GroupNorm graph converts but fails in the interpreter). It
  accepts any other Keras layer.

Supported layers: ``InputLayer``, ``Conv2D`` and `prism_tf.PrincipalConv2D` (``channels_last``, no dilation, one
group, ``same``/``valid``), ``Dense`` and `prism_tf.PrincipalDense`, ``BatchNormalization``,
``GroupNormalization``, ``ReLU``, ``Activation`` and ``activation=`` ``relu``/``linear``, ``Add``,
``GlobalAveragePooling2D``. Anything else raises ``ValueError`` naming the layer. This module needs no TFF.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import tensorflow as tf

import prism_tf
from prism_tf import local_step
from prism_tf.layers import PrincipalConv2D, PrincipalDense

RUNTIMES = ("builtins", "flex")
DEFAULT_MAX_PATCH_BYTES = 64 * 2**20  # a conv's filter-gradient patch buffer above this is built in batch chunks
DEFAULT_BATCH_SIZE = 32  # the batch size the patch budget is sized for (any batch size still works)
SIGNATURES = ("train", "infer", "get_weights", "set_weights")

_Tensor = tf.Tensor
_Updates = list  # (variable, new value) pairs a training forward pass assigns (BatchNorm moving statistics)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The optimizer settings of one round's local step (docs/export.md, "On-device training").

    The same step as the federated client's (`tff_pipelines.round.client_work.ClientTraining`): TFF's
    ``build_sgdm(learning_rate, momentum)`` after `prism_tf.local_step.step_gradients` with ``options``.
    The values are baked into the exported ``train`` signature; export one model per round's learning rate.

    Attributes:
      learning_rate: the round's learning rate (``lr`` of ``w ← w − lr·a``).
      momentum: ``μ`` of ``a ← μ·a + g``; 0 is plain SGD.
      options: the gradient transformations (`prism_tf.local_step.StepOptions`).
    """

    learning_rate: float
    momentum: float = 0.9
    options: local_step.StepOptions = local_step.StepOptions()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"TrainStep: learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"TrainStep: momentum must be >= 0, got {self.momentum!r}")


def weight_names(submodel: tf.keras.Model) -> list[str]:
    """The exchange names of ``submodel``'s weights, one per `prism_tf.submodel.flat_weights` entry and in that order.

    ``w{index:03d}_{layer}_{weight}`` (e.g. ``w004_stage1_block1_1_conv_principal_kernels``), reduced to
    ``[A-Za-z0-9_]``: valid TFLite signature input/output names, stable for a given architecture, and sorting in
    `flat_weights` order. They key the ``get_weights`` outputs and the ``set_weights`` inputs (docs/export.md,
    "On-device training").
    """
    names = []
    for layer in prism_tf.kinds.walk_layers(submodel):
        for weight in layer.weights:
            short = weight.name.split("/")[-1].split(":")[0]
            names.append(re.sub(r"[^A-Za-z0-9_]", "_", f"w{len(names):03d}_{layer.name}_{short}"))
    return names


class TrainingModule(tf.Module):
    """A sub-model with ``train``/``infer``/``get_weights``/``set_weights`` `tf.function`s, ready for `convert`.

    Built by `build_training_module`; the functions read and write the Keras sub-model's own variables (plus one
    momentum accumulator per trainable variable), so calling them in TensorFlow trains the Keras model too.

    Attributes:
      runtime: ``"builtins"`` or ``"flex"``.
      weight_names: `weight_names` of the sub-model (the ``get_weights``/``set_weights`` keys).
      step: the `TrainStep` baked into ``train``.
    """

    def __init__(self, submodel: tf.keras.Model, step: TrainStep, runtime: str, forward: Callable | None) -> None:
        super().__init__(name="prism_training_module")
        self.runtime = runtime
        self.step = step
        self.weight_names = tuple(weight_names(submodel))
        flat = prism_tf.submodel.flat_weights(submodel)
        trainable_ids = {id(v) for v in submodel.trainable_weights}
        train_vars = [v for v in flat if id(v) in trainable_ids]
        self.model_variables = list(flat)
        self.momentum_accumulators = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"momentum_{i}")
            for i, v in enumerate(train_vars)
        ]
        image_shape = tuple(submodel.inputs[0].shape[1:])
        self.input_signature = tf.TensorSpec([None, *image_shape], tf.float32, name="x")
        self.num_classes = int(submodel.outputs[0].shape[-1])
        options = step.options
        lr = tf.constant(step.learning_rate, tf.float32)
        momentum = tf.constant(step.momentum, tf.float32)
        accumulators = self.momentum_accumulators
        names = self.weight_names
        num_classes = self.num_classes

        def apply_step(loss_gradients: Sequence[_Tensor]) -> None:
            grads = local_step.step_gradients(submodel, train_vars, loss_gradients, options)
            for variable, accumulator, grad in zip(train_vars, accumulators, grads, strict=True):
                new_accumulator = momentum * accumulator + grad
                accumulator.assign(new_accumulator)
                variable.assign(variable - lr * new_accumulator)

        if runtime == "builtins":
            def train(x, y):
                with tf.GradientTape() as tape:
                    logits, updates = forward(x, training=True)
                    loss = _cross_entropy(logits, tf.one_hot(y, num_classes, dtype=logits.dtype))
                grads = tape.gradient(loss, train_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                for variable, value in updates:
                    variable.assign(value)
                apply_step(grads)
                return {"loss": loss}

            def infer(x):
                return {"logits": forward(x, training=False)[0]}
        else:
            loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

            def train(x, y):
                with tf.GradientTape() as tape:
                    logits = submodel(x, training=True)
                    loss = loss_fn(y, logits)
                apply_step(tape.gradient(loss, train_vars))
                return {"loss": loss}

            def infer(x):
                return {"logits": submodel(x, training=False)}

        def get_weights():
            return {name: tf.identity(v.read_value()) for name, v in zip(names, flat, strict=True)}

        def set_weights(*values):
            for variable, value in zip(flat, values, strict=True):
                variable.assign(value)
            for accumulator in accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
            # A signature without outputs loses its assignments in conversion: report how many tensors were set.
            return {"assigned": tf.constant(len(flat), tf.int32)}

        self.train = tf.function(
            train, input_signature=[self.input_signature, tf.TensorSpec([None], tf.int32, name="y")])
        self.infer = tf.function(infer, input_signature=[self.input_signature])
        self.get_weights = tf.function(get_weights, input_signature=[])
        self.set_weights = tf.function(
            set_weights,
            input_signature=[tf.TensorSpec(v.shape, v.dtype, name=n) for n, v in zip(names, flat, strict=True)])

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The four concrete functions, keyed by signature name (`SIGNATURES`)."""
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}


def build_training_module(
    submodel: tf.keras.Model,
    step: TrainStep,
    runtime: str = "builtins",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
) -> TrainingModule:
    """Wrap one client's Keras sub-model for on-device training (docs/export.md, "On-device training").

    Args:
      submodel: a functional Keras model made of the supported layers (module docstring), usually
        `prism_tf.extract`'s output; float32, one image input ``[None, H, W, C]``, one logits output.
      step: the round's optimizer settings.
      runtime: ``"builtins"`` (TFLite builtin ops only) or ``"flex"`` (TFLite's standard recipe, needs Flex).
      batch_size: (builtins) the batch size the filter-gradient memory budget is sized for; other batch sizes,
        partial batches included, still train.
      max_patch_bytes: (builtins) above ``batch_size · Ho·Wo·k²·Cin · 4`` bytes a conv's filter gradient is
        accumulated over batch chunks of at most this many bytes of patches.

    Returns:
      A `TrainingModule` whose functions train ``submodel``'s own variables; pass it to `convert`.

    Raises:
      ValueError: unknown runtime, or a layer (named in the message) the runtime cannot train.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if int(batch_size) < 1 or int(max_patch_bytes) < 1:
        raise ValueError("batch_size and max_patch_bytes must be positive")
    if runtime == "flex":
        _check_model(submodel)
        for layer in prism_tf.kinds.walk_layers(submodel):
            if isinstance(layer, tf.keras.layers.GroupNormalization):
                # Measured: Keras GroupNormalization's dynamic-shape graph converts, but its BROADCAST_TO fails to
                # prepare in every interpreter ("Output shape must be broadcastable from input shape").
                raise ValueError(f"runtime='flex' cannot train GroupNormalization layer '{layer.name}' with a dynamic "
                                 "batch (the converted model fails at runtime): use runtime='builtins'")
        return TrainingModule(submodel, step, runtime, None)
    graph = _ModelGraph(submodel, int(batch_size), int(max_patch_bytes))  # validates every layer
    return TrainingModule(submodel, step, runtime, graph.forward)


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


# --------------------------------------------------------------------------------------------------------------
# The builtins runtime: the model's graph as custom-gradient primitives.
# --------------------------------------------------------------------------------------------------------------


class _ModelGraph:
    """``submodel``'s functional graph compiled into per-layer builtin-op functions (validated at construction)."""

    def __init__(self, model: tf.keras.Model, batch_size: int, max_patch_bytes: int) -> None:
        _check_model(model)
        self.input_id = str(id(model.inputs[0]))
        self.output_id = str(id(model.outputs[0]))
        self.steps: list[tuple[Callable, list[str], str]] = []
        # The traversal of Keras's own `Functional._run_internal_graph`: nodes by decreasing depth, tensors by id.
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                layer = node.layer
                if node.call_kwargs and set(node.call_kwargs) - {"training", "mask"}:
                    raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is called with keyword "
                                     f"arguments {sorted(node.call_kwargs)}, which on-device training does not "
                                     "support")
                if len(node.flat_output_ids) != 1:
                    raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) has several outputs")
                shapes = [tuple(t.shape) for t in node.keras_inputs]
                apply = _compile_layer(layer, shapes, batch_size, max_patch_bytes)
                self.steps.append((apply, list(node.flat_input_ids), node.flat_output_ids[0]))

    def forward(self, x: _Tensor, training: bool) -> tuple[_Tensor, _Updates]:
        """Logits of ``x`` and, in training, the BatchNorm statistics updates (variable, new value) to assign."""
        values = {self.input_id: x}
        updates: _Updates = []
        for apply, input_ids, output_id in self.steps:
            values[output_id] = apply([values[i] for i in input_ids], training, updates)
        return values[self.output_id], updates


def _check_model(model: tf.keras.Model) -> None:
    """One float32 image input ``[None, H, W, C]`` and one logits output ``[None, classes]``, functional graph."""
    if not isinstance(model, tf.keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ValueError("on-device training needs a functional or Sequential Keras model built on an Input")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model '{model.name}' must have one input and one output, "
                         f"got {len(model.inputs)} and {len(model.outputs)}")
    input_shape = model.inputs[0].shape
    if input_shape.rank != 4 or None in input_shape[1:]:
        raise ValueError(f"model '{model.name}': the input must be [batch, H, W, C] with known H, W, C, "
                         f"got {input_shape}")
    if model.outputs[0].shape.rank != 2 or model.outputs[0].shape[-1] is None:
        raise ValueError(f"model '{model.name}': the output must be logits [batch, classes]")
    for weight in prism_tf.submodel.flat_weights(model):
        if weight.dtype != tf.float32:
            raise ValueError(f"weight '{weight.name}' is {weight.dtype.name}: only float32 models are supported")


def _unsupported(layer: tf.keras.layers.Layer, why: str = "") -> ValueError:
    detail = f": {why}" if why else ""
    return ValueError(
        f"on-device training does not support layer '{layer.name}' of type {type(layer).__name__}{detail} "
        "(supported: Conv2D, PrincipalConv2D, Dense, PrincipalDense, BatchNormalization, GroupNormalization, "
        "ReLU, Activation, Add, GlobalAveragePooling2D)"
    )


def _activation(layer: tf.keras.layers.Layer, activation: Callable) -> Callable[[_Tensor], _Tensor]:
    name = getattr(activation, "__name__", repr(activation))
    if name == "linear":
        return lambda x: x
    if name == "relu":
        return _relu
    raise _unsupported(layer, f"activation '{name}' (only relu and linear)")


def _compile_layer(
    layer: tf.keras.layers.Layer, shapes: list[tuple], batch_size: int, max_patch_bytes: int
) -> Callable[[list, bool, _Updates], _Tensor]:
    """A function ``(inputs, training, updates) -> output`` computing ``layer`` with builtin-friendly primitives."""
    if isinstance(layer, tf.keras.Model):
        raise _unsupported(layer, "nested models")
    if getattr(layer, "dtype", "float32") != "float32" or getattr(layer, "compute_dtype", "float32") != "float32":
        raise _unsupported(layer, "only float32 layers")
    single = len(shapes) == 1
    kind = type(layer)

    if kind is PrincipalConv2D or kind is tf.keras.layers.Conv2D:
        if not single or len(shapes[0]) != 4:
            raise _unsupported(layer, "expects one 4-D input")
        if tuple(layer.dilation_rate) != (1, 1):
            raise _unsupported(layer, f"dilation_rate {tuple(layer.dilation_rate)}")
        if kind is tf.keras.layers.Conv2D and (layer.groups != 1 or layer.data_format != "channels_last"):
            raise _unsupported(layer, "grouped or channels_first convolution")
        conv = _Conv(shapes[0], tuple(layer.kernel_size), tuple(layer.strides), layer.padding,
                     batch_size, max_patch_bytes)
        act = _activation(layer, layer.activation)
        principal = kind is PrincipalConv2D

        def conv_layer(inputs, training, updates):
            (x,) = inputs
            return _finish_linear(layer, conv(x, tf.convert_to_tensor(
                layer.principal_kernels if principal else layer.kernel)), principal, act)

        return conv_layer

    if kind is PrincipalDense or kind is tf.keras.layers.Dense:
        if not single or len(shapes[0]) not in (2, 4):
            raise _unsupported(layer, "expects one 2-D or 4-D input")
        act = _activation(layer, layer.activation)
        principal = kind is PrincipalDense

        def dense_layer(inputs, training, updates):
            (x,) = inputs
            return _finish_linear(layer, _matmul(x, tf.convert_to_tensor(
                layer.principal_kernels if principal else layer.kernel)), principal, act)

        return dense_layer

    if kind is tf.keras.layers.BatchNormalization:
        rank = len(shapes[0]) if single else 0
        axis = list(layer.axis) if isinstance(layer.axis, list | tuple) else [layer.axis]
        if not single or rank not in (2, 4) or [a % rank for a in axis] != [rank - 1]:
            raise _unsupported(layer, "normalizes a 2-D or 4-D input over its last axis only")
        if layer.renorm or layer.virtual_batch_size or layer.adjustment is not None:
            raise _unsupported(layer, "renorm, virtual batches and adjustment")
        axes = list(range(rank - 1))
        examples = math.prod(shapes[0][1:-1])  # per example, the batch size multiplies it
        return _batch_norm(layer, axes, examples)

    if kind is tf.keras.layers.GroupNormalization:
        if not single or len(shapes[0]) != 4 or layer.axis % 4 != 3:
            raise _unsupported(layer, "normalizes 4-D inputs over the channel axis only")
        return _group_norm(layer, shapes[0])

    if kind is tf.keras.layers.ReLU:
        if layer.max_value is not None or float(layer.negative_slope) != 0 or float(layer.threshold) != 0:
            raise _unsupported(layer, "only plain ReLU (no max_value, negative_slope or threshold)")
        return lambda inputs, training, updates: _relu(inputs[0])

    if kind is tf.keras.layers.Activation:
        act = _activation(layer, layer.activation)
        return lambda inputs, training, updates: act(inputs[0])

    if kind is tf.keras.layers.Add:
        if len({s[1:] for s in shapes}) != 1:
            raise _unsupported(layer, f"broadcasting inputs {shapes}")
        return lambda inputs, training, updates: _add(*inputs)

    if kind is tf.keras.layers.GlobalAveragePooling2D:
        if not single or len(shapes[0]) != 4 or layer.data_format != "channels_last" or layer.keepdims:
            raise _unsupported(layer, "channels_last without keepdims only")
        _, height, width, _ = shapes[0]
        return lambda inputs, training, updates: _global_average_pool(inputs[0], height, width)

    raise _unsupported(layer)


# ---- primitives: forward and backward with builtin-kernel ops only -------------------------------------------


def _finish_linear(layer: tf.keras.layers.Layer, y: _Tensor, principal: bool, act: Callable) -> _Tensor:
    """After a conv's or dense layer's first product: a principal layer's ``·diag(ω) ⊛₁ₓ₁ B``, the bias, the
    activation (the forward of `prism_tf.layers` with builtin-gradient primitives)."""
    if principal:
        y = _scale(y, tf.convert_to_tensor(layer.kernel_scale))
        y = _matmul(y, tf.convert_to_tensor(layer.combination))
    if layer.use_bias:
        y = _bias_add(y, tf.convert_to_tensor(layer.bias))
    return act(y)


@tf.custom_gradient
def _relu(x):
    y = tf.nn.relu(x)

    def grad(dy):
        return dy * tf.cast(y > 0, dy.dtype)  # GREATER, CAST, MUL instead of ReluGrad

    return y, grad


@tf.custom_gradient
def _add(*xs):
    y = xs[0]
    for x in xs[1:]:
        y = y + x  # Keras's Add sums in input order

    def grad(dy):
        return [dy for _ in xs]  # equal shapes: no BroadcastGradientArgs

    return y, grad


@tf.custom_gradient
def _bias_add(x, b):
    y = tf.nn.bias_add(x, b)

    def grad(dy):
        return dy, tf.reduce_sum(dy, axis=list(range(len(x.shape) - 1)))

    return y, grad


@tf.custom_gradient
def _scale(x, omega):
    """``x·diag(ω)`` along the last axis; ω is frozen (no gradient)."""
    y = x * omega

    def grad(dy):
        return dy * omega, tf.zeros_like(omega)

    return y, grad


@tf.custom_gradient
def _matmul(x, w):
    """``x @ w`` over the last axis of a 2-D or 4-D ``x`` (Dense, and the 1×1 combination of a principal conv)."""
    shape = x.shape
    x2 = x if shape.rank == 2 else tf.reshape(x, [-1, shape[-1]])
    y2 = tf.matmul(x2, w)
    y = y2 if shape.rank == 2 else tf.reshape(y2, [-1, *shape[1:-1], w.shape[-1]])

    def grad(dy):
        dy2 = dy if shape.rank == 2 else tf.reshape(dy, [-1, w.shape[-1]])
        dx2 = tf.matmul(dy2, w, transpose_b=True)
        dx = dx2 if shape.rank == 2 else tf.reshape(dx2, [-1, *shape[1:]])
        return dx, tf.matmul(x2, dy2, transpose_a=True)

    return y, grad


def _global_average_pool(x: _Tensor, height: int, width: int) -> _Tensor:
    @tf.custom_gradient
    def pool(x):
        def grad(dy):
            return tf.tile(dy[:, tf.newaxis, tf.newaxis, :], [1, height, width, 1]) / float(height * width)

        return tf.reduce_mean(x, axis=[1, 2]), grad

    return pool(x)


def _cross_entropy(logits: _Tensor, onehot: _Tensor) -> _Tensor:
    """Mean sparse softmax cross-entropy, ``−Σ onehot·log_softmax / N``, with gradient ``(softmax − onehot)/N``."""

    @tf.custom_gradient
    def loss(logits):
        count = tf.cast(tf.shape(logits)[0], logits.dtype)
        log_probs = tf.nn.log_softmax(logits)
        value = -tf.reduce_sum(onehot * log_probs) / count

        def grad(dl):
            return dl * (tf.exp(log_probs) - onehot) / count

        return value, grad

    return loss(logits)


class _Conv:
    """2-D convolution (NHWC, no dilation) with a builtin-only backward pass (docs/export.md, "On-device training").

    Input gradient: ``conv2d_transpose`` (TRANSPOSE_CONV; a MatMul for stride-1 1×1). Filter gradient: the
    ``[N·Ho·Wo, k·k·Cin]`` patch matrix times the output gradient — one PAD, k·k strided slices (stride handled by
    the slice step) and a CONCATENATION, or just a strided slice for 1×1 — in one MatMul; when the patches of
    ``batch_size`` examples exceed ``max_patch_bytes``, summed over batch chunks in a WHILE loop.
    """

    def __init__(self, input_shape: tuple, kernel: tuple[int, int], strides: tuple[int, int], padding: str,
                 batch_size: int, max_patch_bytes: int) -> None:
        _, self.height, self.width, self.channels = (int(d) if d is not None else None for d in input_shape)
        self.kernel, self.strides, self.padding = kernel, strides, padding.upper()
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"unsupported padding {padding!r}")
        out, pads = [], []
        for size, k, s in ((self.height, kernel[0], strides[0]), (self.width, kernel[1], strides[1])):
            if self.padding == "SAME":
                o = -(-size // s)
                total = max((o - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            else:
                o = (size - k) // s + 1
                pads.append((0, 0))
            out.append(o)
        self.out_height, self.out_width = out
        self.pads = pads
        self.pointwise = kernel == (1, 1)
        patch_bytes = self.out_height * self.out_width * kernel[0] * kernel[1] * self.channels * 4
        self.chunk = None  # examples per chunk, None for one shot
        if not self.pointwise and patch_bytes * batch_size > max_patch_bytes:
            self.chunk = max(1, max_patch_bytes // patch_bytes)

    def __call__(self, x: _Tensor, w: _Tensor) -> _Tensor:
        @tf.custom_gradient
        def conv(x, w):
            y = tf.nn.conv2d(x, w, strides=[1, *self.strides, 1], padding=self.padding)

            def grad(dy):
                return self.input_gradient(x, w, dy), self.filter_gradient(x, dy, w.shape)

            return y, grad

        return conv(x, w)

    def input_gradient(self, x: _Tensor, w: _Tensor, dy: _Tensor) -> _Tensor:
        if self.pointwise and self.strides == (1, 1):
            cout = w.shape[-1]
            dx = tf.matmul(tf.reshape(dy, [-1, cout]), tf.reshape(w, [self.channels, cout]), transpose_b=True)
            return tf.reshape(dx, [-1, self.height, self.width, self.channels])
        return tf.nn.conv2d_transpose(dy, w, tf.shape(x), strides=[1, *self.strides, 1], padding=self.padding)

    def _patches(self, x: _Tensor) -> _Tensor:
        """``[n, Ho, Wo, k·k·Cin]``: the (padded) input window of each output position, in kernel order."""
        (top, bottom), (left, right) = self.pads
        if top or bottom or left or right:
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        sh, sw = self.strides
        span_h, span_w = (self.out_height - 1) * sh + 1, (self.out_width - 1) * sw + 1
        columns = [x[:, i:i + span_h:sh, j:j + span_w:sw, :]
                   for i in range(self.kernel[0]) for j in range(self.kernel[1])]
        return columns[0] if len(columns) == 1 else tf.concat(columns, axis=-1)

    def filter_gradient(self, x: _Tensor, dy: _Tensor, kernel_shape: tf.TensorShape) -> _Tensor:
        rows = self.kernel[0] * self.kernel[1] * self.channels
        cout = int(kernel_shape[-1])

        def chunk_gradient(xs, dys):
            patches = tf.reshape(self._patches(xs), [-1, rows])
            return tf.matmul(patches, tf.reshape(dys, [-1, cout]), transpose_a=True)

        if self.chunk is None:
            grad = chunk_gradient(x, dy)
        else:
            size = self.chunk
            count = (tf.shape(x)[0] + size - 1) // size

            def body(i, total):
                start = i * size
                return i + 1, total + chunk_gradient(x[start:start + size], dy[start:start + size])

            _, grad = tf.while_loop(lambda i, total: i < count, body,
                                    [tf.constant(0), tf.zeros([rows, cout], dy.dtype)])
        return tf.reshape(grad, kernel_shape)


def _batch_norm(layer: tf.keras.layers.BatchNormalization, axes: list[int], examples: int) -> Callable:
    """Keras BatchNormalization: batch statistics and a moving-average update in training, moving ones otherwise."""
    momentum, epsilon = float(layer.momentum), float(layer.epsilon)

    def params(channels: int) -> tuple[_Tensor, _Tensor]:
        gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
        return gamma, beta

    def apply(inputs, training, updates):
        (x,) = inputs
        gamma, beta = params(x.shape[-1])
        if not training:
            inv = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + epsilon) * gamma
            return x * inv + (beta - tf.convert_to_tensor(layer.moving_mean) * inv)
        mean = tf.stop_gradient(tf.reduce_mean(x, axes))
        variance = tf.stop_gradient(tf.reduce_mean(tf.math.squared_difference(x, mean), axes))

        @tf.custom_gradient
        def normalize(x, gamma, beta):
            rstd = tf.math.rsqrt(variance + epsilon)
            xhat = (x - mean) * rstd
            y = xhat * gamma + beta

            def grad(dy):
                dxhat = dy * gamma
                dx = (dxhat - tf.reduce_mean(dxhat, axes) - xhat * tf.reduce_mean(dxhat * xhat, axes)) * rstd
                return dx, tf.reduce_sum(dy * xhat, axes), tf.reduce_sum(dy, axes)

            return y, grad

        y = normalize(x, gamma, beta)
        # Keras's fused BN: the moving variance takes the Bessel-corrected batch variance n/(n-1).
        n = tf.cast(tf.shape(x)[0], tf.float32) * float(examples)
        unbiased = variance * (n / tf.maximum(n - 1.0, 1.0))
        updates.append((layer.moving_mean, layer.moving_mean * momentum + mean * (1.0 - momentum)))
        updates.append((layer.moving_variance, layer.moving_variance * momentum + unbiased * (1.0 - momentum)))
        return y

    return apply


def _group_norm(layer: tf.keras.layers.GroupNormalization, shape: tuple) -> Callable:
    """Keras GroupNormalization over ``[N, H·W, G, C/G]`` (4-D throughout), training and inference alike."""
    _, height, width, channels = shape
    groups, epsilon = int(layer.groups), float(layer.epsilon)
    grouped = [-1, height * width, groups, channels // groups]
    axes = [1, 3]

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        xg = tf.reshape(x, grouped)
        mean = tf.reduce_mean(xg, axes, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(xg, mean), axes, keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        xhat = tf.reshape((xg - mean) * rstd, [-1, height, width, channels])
        y = xhat * gamma + beta

        def grad(dy):
            dxhat = tf.reshape(dy * gamma, grouped)
            xhat_g = tf.reshape(xhat, grouped)
            dx = (dxhat - tf.reduce_mean(dxhat, axes, keepdims=True)
                  - xhat_g * tf.reduce_mean(dxhat * xhat_g, axes, keepdims=True)) * rstd
            return (tf.reshape(dx, [-1, height, width, channels]), tf.reduce_sum(dy * xhat, [0, 1, 2]),
                    tf.reduce_sum(dy, [0, 1, 2]))

        return y, grad

    def apply(inputs, training, updates):
        gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
        beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
        return normalize(inputs[0], gamma, beta)

    return apply


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_PATCH_BYTES", "RUNTIMES", "SIGNATURES", "TrainStep", "TrainingModule",
           "build_training_module", "convert", "model_ops", "weight_names"]
