"""On-device training: one client's sub-model as a training module with four signatures (docs/export.md,
"On-device training").

`build_training_module` wraps a client's Keras sub-model (`prism_tf.extract`) in a `tf.Module` with four
signatures and `export.tflite.conversion.convert` turns it into a ``.tflite`` flatbuffer:

- ``train(x float32[None, H, W, C], y int32[None]) -> {"loss"}``: one local step, exactly the federated client's
  (`tff_pipelines.round.client_work.train_submodel`): sparse softmax cross-entropy averaged over the batch (over
  every position for a model with a label per step, ``y int32[None, T]`` and logits ``[None, T, classes]``), loss
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
  walked layer by layer (`export.tflite.compiler`; factorizable layers through their `prism_tf.kinds` kind) and
  each layer is computed by a `tf.custom_gradient` primitive (`export.tflite.ops`) whose forward and backward
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

Supported layers (builtins): ``InputLayer``, ``Conv2D``/``Conv1D`` and their principal forms (``channels_last``, no
dilation, one group), ``Dense`` and `prism_tf.PrincipalDense` (on inputs of any rank >= 2), ``Embedding``,
``ReversibleEmbedding`` and their principal forms (no ``mask_zero``), ``LSTM``/``GRU`` and their principal forms
(tanh/sigmoid, unrolled over the static steps; no mask, ``go_backwards``, ``return_state`` or dropout),
``BatchNormalization``, ``GroupNormalization``, ``LayerNormalization`` (last axis), ``MultiHeadAttention`` and its
principal form (no mask or dropout), the ViT's `prism_tf.models.zoo.PositionEmbedding`, ``Reshape``, ``ReLU``,
``Activation`` and ``activation=`` ``relu``/``gelu``/``tanh``/``sigmoid``/``linear``, ``Add``,
``GlobalAveragePooling1D``/``2D``: the model zoo's ResNet-18, small CNN, ViT (attention whole or factorized), LSTM
and charlstm. Anything else raises ``ValueError`` naming the layer and pointing to ``runtime="flex"``. This
module needs no TFF.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import tensorflow as tf

import prism_tf
from export.tflite.compiler import ModelGraph, check_model
from export.tflite.ops import cross_entropy, reshape
from prism_tf import local_step

RUNTIMES = ("builtins", "flex")
DEFAULT_MAX_PATCH_BYTES = 64 * 2**20  # a conv's filter-gradient patch buffer above this is built in batch chunks
DEFAULT_BATCH_SIZE = 32  # the batch size the patch budget is sized for (any batch size still works)
SIGNATURES = ("train", "infer", "get_weights", "set_weights")

_Tensor = tf.Tensor


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
        input_shape = tuple(submodel.inputs[0].shape[1:])
        self.input_signature = tf.TensorSpec([None, *input_shape], submodel.inputs[0].dtype, name="x")
        self.num_classes = int(submodel.outputs[0].shape[-1])
        # [None] for one label per example, [None, steps] for a label per step (a next-token model's [N, T])
        self.label_signature = tf.TensorSpec([None, *(int(d) for d in submodel.outputs[0].shape[1:-1])], tf.int32,
                                             name="y")
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
                    if logits.shape.rank > 2:  # a label per step: the mean over every position, as Keras's loss
                        logits, y = reshape(logits, [-1, num_classes]), tf.reshape(y, [-1])
                    loss = cross_entropy(logits, tf.one_hot(y, num_classes, dtype=logits.dtype))
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
            train, input_signature=[self.input_signature, self.label_signature])
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
        check_model(submodel)
        for layer in prism_tf.kinds.walk_layers(submodel):
            if isinstance(layer, tf.keras.layers.GroupNormalization):
                # Measured: Keras GroupNormalization's dynamic-shape graph converts, but its BROADCAST_TO fails to
                # prepare in every interpreter ("Output shape must be broadcastable from input shape").
                raise ValueError(f"runtime='flex' cannot train GroupNormalization layer '{layer.name}' with a dynamic "
                                 "batch (the converted model fails at runtime): use runtime='builtins'")
        return TrainingModule(submodel, step, runtime, None)
    graph = ModelGraph(submodel, int(batch_size), int(max_patch_bytes))  # validates every layer
    return TrainingModule(submodel, step, runtime, graph.forward)


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_PATCH_BYTES", "RUNTIMES", "SIGNATURES", "TrainStep", "TrainingModule",
           "build_training_module", "weight_names"]
