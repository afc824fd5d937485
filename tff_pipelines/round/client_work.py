"""Client work: rebuild the client's sub-model from what it received, train it locally, return its tensors.

Runs inside a `tff.tensorflow.computation` placed at CLIENTS. The Keras sub-model is rebuilt from JSON inside the
computation (TFF traces it once per sub-model shape), its weights are assigned from the received tensors, and it is
trained with ``training=True`` in a `tf.function` loop so that BatchNorm's moving statistics update and travel
back with the other tensors (docs/pitfalls.md, "Keras inside TFF's graph" and
"BatchNorm under sub-models").
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf import local_step, slicing
from prism_tf.plan import FROM_SELECTION, SERVER_ONLY
from tff_pipelines.round import distributor
from tff_pipelines.round.layout import RoundLayout

LEARNING_RATE_KEY = tff.learning.optimizers.LEARNING_RATE_KEY


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """Local training options (README "The federated process"; the authors' recipe, Niu et al. TMLR 2023).

    One step on a batch applies `prism_tf.local_step.step_gradients` (loss gradients + Frobenius decay, × ClipLR,
    global-norm clip, + weight decay; the same code as the exported TFLite step) and then ``optimizer.next``. The
    optimizer state — momentum included — is initialized afresh every round, as in TFF's FedAvg and the authors'
    code (a new optimizer per client per round): momentum does not carry over rounds.

    Attributes:
      optimizer: a `tff.learning.optimizers.Optimizer` (default SGD lr 0.05, momentum 0.9).
      clip_norm, clip_lr_tau, frobenius_decay, weight_decay: see `prism_tf.local_step.StepOptions`.
      round_lr: clients receive the round's learning rate in their input struct (``lr``, `client_input_type`) and
        set it as the optimizer's ``learning_rate`` hparam before training (`prism_tf.federated.recipe.Schedule`).
    """

    optimizer: tff.learning.optimizers.Optimizer = dataclasses.field(
        default_factory=lambda: tff.learning.optimizers.build_sgdm(learning_rate=0.05, momentum=0.9))
    clip_norm: float | None = 5.0
    clip_lr_tau: float | None = 10.0
    frobenius_decay: float = 0.0
    weight_decay: float = 0.0
    round_lr: bool = False

    @property
    def step_options(self) -> local_step.StepOptions:
        """The gradient transformations of a step (`prism_tf.local_step`, shared with the exported TFLite step)."""
        return local_step.StepOptions(clip_norm=self.clip_norm, clip_lr_tau=self.clip_lr_tau,
                                      frobenius_decay=self.frobenius_decay, weight_decay=self.weight_decay)


def materialize(layout: RoundLayout, received: dict, indices: list, scale: list) -> list[tf.Tensor]:
    """The client's sub-model weights (flat order) from what the distributor sent.

    ``received`` has ``rows`` (one ``[k, D]`` tensor per kernel group, `RoundLayout.select_tables` order) and
    ``whole`` (the other travelling tensors, full size) — or only ``whole`` (every travelling tensor) when the
    server broadcast everything.
    """
    tables = layout.select_tables() if "rows" in received else {}
    from_rows: dict[int, tf.Tensor] = {}
    for rows, (group, positions) in zip(received.get("rows", []), tables.items(), strict=True):
        offset = 0
        for position in positions:
            axis, _ = layout.kernel_axis(position)
            shape = list(layout.tensors[position].shape)
            shape[axis] = layout.sizes[group]
            width = int(np.prod(shape)) // shape[axis]
            block = slicing.from_rows(rows[:, offset:offset + width], axis, shape)
            from_rows[position] = slicing.gather_axes(block, layout.slices(position, indices, skip_axis=axis))
            offset += width
    whole = iter(received["whole"])
    scales = dict(zip(layout.scale_layers, scale, strict=True))
    weights = []
    for position, tensor in enumerate(layout.tensors):
        if tensor.weight == FROM_SELECTION and tensor.layer in scales:
            weights.append(scales[tensor.layer])
        elif tensor.weight == SERVER_ONLY:
            weights.append(tf.zeros(layout.sub_shape(position)))  # s is only used by the server's sampler
        elif position in from_rows:
            weights.append(from_rows[position])
        else:
            weights.append(slicing.gather_axes(next(whole), layout.slices(position, indices)))
    return weights


def train_submodel(
    layout: RoundLayout, weights: list[tf.Tensor], scale: list[tf.Tensor], data: tf.data.Dataset,
    training: ClientTraining, lr: tf.Tensor | None = None,
) -> tuple[list[tf.Tensor], collections.OrderedDict]:
    """Train the sub-model on ``data`` (batches of ``x``/``y``); return its travelling tensors and metrics.

    ``lr`` (the round's learning rate, when given) replaces the optimizer's own ``learning_rate`` for this round.
    """
    model = tf.keras.models.model_from_json(layout.submodel_json, custom_objects=prism_tf.CUSTOM_OBJECTS)
    variables = prism_tf.submodel.flat_weights(model)
    positions = [i for i, t in enumerate(layout.trainable) if t]
    train_vars = [variables[i] for i in positions]
    specs = [tf.TensorSpec(v.shape, v.dtype) for v in train_vars]
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Everything stateful runs inside one tf.function: in TFF's graph, assignments outside a function would be
    # dangling ops that never run.
    @tf.function
    def run(opt_state):
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        loss_sum = correct = count = tf.constant(0.0)
        # An iterator, not the dataset: AutoGraph turns `for batch in data` into a ReduceDataset whose body (the
        # whole training step) TensorFlow re-instantiates on every call, per client and round; a while loop over
        # an iterator is instantiated once (docs/pitfalls.md, Keras inside TFF's graph).
        for batch in iter(data):
            with tf.GradientTape() as tape:
                logits = model(batch["x"], training=True)
                loss = loss_fn(batch["y"], logits)
            grads = local_step.step_gradients(model, train_vars, tape.gradient(loss, train_vars),
                                              training.step_options)
            opt_state, updated = training.optimizer.next(
                opt_state, tuple(v.read_value() for v in train_vars), tuple(grads))
            opt_state = _tuples(opt_state)
            for variable, value in zip(train_vars, updated, strict=True):
                variable.assign(value)
            size = tf.cast(tf.shape(batch["y"])[0], tf.float32)
            loss_sum += loss * size
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            correct += tf.reduce_sum(tf.cast(tf.equal(predictions, batch["y"]), tf.float32))
            count += size
        uploads = [variables[i].read_value() for i in layout.travelling()]
        return uploads, loss_sum, correct, count

    opt_state = training.optimizer.initialize(tuple(specs))  # afresh every round: no momentum across rounds
    if lr is not None:
        opt_state = with_learning_rate(training.optimizer, opt_state, lr)
    uploads, loss_sum, correct, count = run(_tuples(opt_state))
    metrics = collections.OrderedDict(num_examples=count, loss_sum=loss_sum, correct=correct)
    return uploads, metrics


def with_learning_rate(optimizer: tff.learning.optimizers.Optimizer, state, lr: tf.Tensor):
    """``state`` with its ``learning_rate`` hparam set to ``lr`` (`tff.learning.optimizers` hparams API)."""
    hparams = collections.OrderedDict(optimizer.get_hparams(state))
    if LEARNING_RATE_KEY not in hparams:
        raise ValueError(f"{type(optimizer).__name__} has no '{LEARNING_RATE_KEY}' hparam: a per-round learning "
                         "rate cannot be applied to it")
    hparams[LEARNING_RATE_KEY] = tf.cast(lr, tf.float32)
    return optimizer.set_hparams(state, hparams)


def _tuples(structure):
    # tf.data packs Python lists inside a dataset loop's state into one tensor; tuples stay structures.
    if isinstance(structure, list | tuple):
        return tuple(_tuples(x) for x in structure)
    if isinstance(structure, dict):
        return type(structure)((k, _tuples(v)) for k, v in structure.items())
    return structure


def build_client_work(
    layout: RoundLayout, element_type: tff.Type, training: ClientTraining, distribution: str
) -> tff.Computation:
    """The client computation: ``<received, client> -> <uploads, metrics>`` for ``distribution``."""
    client_type = client_input_type(layout, element_type, training)
    if distributor.uses_select(layout, distribution):
        tables = layout.select_tables()
        in_tables = {p for ps in tables.values() for p in ps}
        received_type = collections.OrderedDict(
            rows=[tff.SequenceType(tff.TensorType(np.float32, [_row_width(layout, ps)])) for ps in tables.values()],
            whole=[tff.TensorType(np.float32, layout.tensors[p].shape) for p in layout.travelling()
                   if p not in in_tables],
        )
    else:
        received_type = collections.OrderedDict(
            whole=[tff.TensorType(np.float32, layout.tensors[p].shape) for p in layout.travelling()])

    @tff.tensorflow.computation(collections.OrderedDict(received=received_type, client=client_type))
    def client_work(arg):
        received = dict(arg["received"])
        if "rows" in received:
            received["rows"] = [
                ds.batch(layout.sizes[group]).get_single_element()
                for ds, group in zip(received["rows"], layout.select_tables(), strict=True)
            ]
        client = arg["client"]
        indices, scale = list(client["indices"]), list(client["scale"])
        weights = materialize(layout, received, indices, scale)
        lr = client["lr"] if training.round_lr else None
        uploads, metrics = train_submodel(layout, weights, scale, client["data"], training, lr)
        return collections.OrderedDict(uploads=uploads, indices=indices, metrics=metrics)

    restore_keras_classes(layout)
    return client_work


def restore_keras_classes(layout: RoundLayout) -> None:
    """Undo Keras's global v1 class swap after building a Keras model inside TFF's TF1-style graph.

    Keras picks a layer's or model's base classes (v1 or v2) when it is instantiated, by rewriting the class's
    ``__bases__`` for the whole process. Building the sub-model while TFF traces the client computation (a
    ``tf.Graph``) switches `Functional`, `Conv2D`, `PrincipalConv2D`, ... to their v1 bases, after which every
    existing model fails with "Your Layer or Model is in an invalid state". Instantiating the same classes once
    eagerly switches them back.
    """
    with tf.init_scope():
        tf.keras.models.model_from_json(layout.submodel_json, custom_objects=prism_tf.CUSTOM_OBJECTS)


def client_input_type(
    layout: RoundLayout, element_type: tff.Type, training: ClientTraining | None = None
) -> collections.OrderedDict:
    """Each client's input: its batches, its index vectors, its ω vectors and, with ``training.round_lr``, the
    round's learning rate (``lr``, a float32 scalar)."""
    inputs = collections.OrderedDict(
        data=tff.SequenceType(element_type), indices=layout.indices_type(), scale=layout.scale_type())
    if training is not None and training.round_lr:
        inputs["lr"] = tff.TensorType(np.float32)
    return inputs


def _row_width(layout: RoundLayout, positions: list[int]) -> int:
    total = 0
    for position in positions:
        axis, _ = layout.kernel_axis(position)
        shape = layout.tensors[position].shape
        total += int(np.prod(shape)) // shape[axis]
    return total
