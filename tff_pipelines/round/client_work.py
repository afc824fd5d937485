"""Client work: rebuild the client's sub-model from what it received, train it locally, return its tensors
(docs/design.md, "The round as TFF templates").

`build_client_work` returns a `tff.learning.templates.ClientWorkProcess`. Its TensorFlow computation runs at each
client: the Keras sub-model is rebuilt from JSON inside the computation (TFF traces it once per sub-model shape),
its weights are assigned from the received tensors, and it is trained with ``training=True`` in a `tf.function`
loop so that BatchNorm's moving statistics update and travel back with the other tensors (docs/pitfalls.md, "Keras
inside TFF's graph" and "BatchNorm under sub-models").

Defaults: `ClientTraining`'s are the CLI's, read from `prism_tf.federated.config.TrainConfig` (its field defaults,
the one definition of a run's defaults); `training_of` maps a whole config.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf import local_step, slicing
from prism_tf.federated import recipe
from prism_tf.federated.config import TrainConfig
from prism_tf.plan import FROM_SELECTION, SERVER_ONLY
from tff_pipelines.round.layout import ClientMetrics, ClientStart, ClientUpdate, Received, RoundLayout

LEARNING_RATE_KEY = tff.learning.optimizers.LEARNING_RATE_KEY
ClientWeighting = tff.learning.ClientWeighting
WEIGHTINGS = {"examples": ClientWeighting.NUM_EXAMPLES, "uniform": ClientWeighting.UNIFORM}
"""`TrainConfig.weighting` (the CLI's ``--weighting``) → `tff.learning.ClientWeighting`."""


def client_optimizer_of(config: TrainConfig) -> tff.learning.optimizers.Optimizer:
    """The clients' optimizer of a run: SGD at ``client_lr`` with ``client_momentum`` (docs/algorithm.md §7)."""
    return tff.learning.optimizers.build_sgdm(config.client_lr, config.client_momentum)


def lr_schedule_of(config: TrainConfig) -> recipe.Schedule | None:
    """The clients' learning rate per round of a run (``None`` for ``--lr-schedule constant``: the optimizer's own
    rate, `client_optimizer_of`)."""
    if config.lr_schedule == "constant":
        return None
    return recipe.Schedule(config.lr_schedule, config.client_lr, config.final_lr, config.rounds)


def client_weighting_of(config: TrainConfig) -> ClientWeighting:
    """How a run weights its clients (``--weighting``, `WEIGHTINGS`)."""
    if config.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {tuple(WEIGHTINGS)}, got {config.weighting!r}")
    return WEIGHTINGS[config.weighting]


DEFAULTS = TrainConfig()
"""The CLI's defaults (`TrainConfig`'s field defaults): the Python API's defaults read them from here."""


def _default_optimizer() -> tff.learning.optimizers.Optimizer:
    return client_optimizer_of(DEFAULTS)


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """Local training options (docs/algorithm.md §7; the authors' recipe, Niu et al. TMLR 2023).

    One step on a batch applies `prism_tf.local_step.step_gradients` (loss gradients + Frobenius decay, × ClipLR,
    global-norm clip, + weight decay; the same code as the exported TFLite step) and then ``optimizer.next``. The
    optimizer state — momentum included — is initialized afresh every round, as in TFF's FedAvg and the authors'
    code (a new optimizer per client per round): momentum does not carry over rounds.

    Defaults are the CLI's: `TrainConfig`'s field defaults (SGD lr 0.1 momentum 0.9, clip 5, Frobenius decay 2e-4,
    weight decay 5e-4); ``clip_lr_tau`` is `prism_tf.local_step.StepOptions`' (10), which the CLI does not set.

    Attributes:
      optimizer: a `tff.learning.optimizers.Optimizer` (default `client_optimizer_of` ``TrainConfig()``).
      clip_norm, clip_lr_tau, frobenius_decay, weight_decay: see `prism_tf.local_step.StepOptions`.
      round_lr: clients receive the round's learning rate in their assignment (`ClientAssignment.lr`) and set it as
        the optimizer's ``learning_rate`` hparam before training (`prism_tf.federated.recipe.Schedule`).
      kernel_lr_cap: balanced kernel learning rates (`prism_tf.local_step.kernel_lr_factors`); ``None``: off.
      precision: ``float32`` or ``mixed_bfloat16`` (``auto`` resolves to one; `prism_tf.precision`): the sub-model
        computes at it, its variables, the optimizer and everything that travels stay float32.
    """

    optimizer: tff.learning.optimizers.Optimizer = dataclasses.field(default_factory=_default_optimizer)
    clip_norm: float | None = DEFAULTS.clip_norm
    clip_lr_tau: float | None = local_step.StepOptions.clip_lr_tau
    frobenius_decay: float = DEFAULTS.frobenius_decay
    weight_decay: float = DEFAULTS.weight_decay
    round_lr: bool = False
    precision: str = DEFAULTS.precision
    kernel_lr_cap: float | None = DEFAULTS.kernel_lr_balance

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", prism_tf.precision.resolve(self.precision))  # "auto" -> what it means

    @classmethod
    def of(cls, config: TrainConfig) -> ClientTraining:
        """A run's local training (``round_lr`` is set by the process from its schedule, `lr_schedule_of`)."""
        options = config.step_options()
        return cls(optimizer=client_optimizer_of(config), clip_norm=options.clip_norm,
                   frobenius_decay=options.frobenius_decay, weight_decay=options.weight_decay,
                   precision=config.precision, kernel_lr_cap=options.kernel_lr_cap)

    @property
    def step_options(self) -> local_step.StepOptions:
        """The gradient transformations of a step (`prism_tf.local_step`, shared with the exported TFLite step)."""
        return local_step.StepOptions(clip_norm=self.clip_norm, clip_lr_tau=self.clip_lr_tau,
                                      frobenius_decay=self.frobenius_decay, weight_decay=self.weight_decay,
                                      kernel_lr_cap=self.kernel_lr_cap)


def materialize(layout: RoundLayout, received: Received, indices: list, scale: list) -> list[tf.Tensor]:
    """The client's sub-model weights (flat order) from what the distributor sent (`Received`).

    ``received.rows`` are tensors here, one ``[k, D]`` per kernel group (`RoundLayout.select_tables` order), or
    empty when the server broadcast every travelling tensor in ``received.whole``.
    """
    tables = layout.select_tables() if len(received.rows) else {}
    from_rows: dict[int, tf.Tensor] = {}
    for rows, (group, positions) in zip(received.rows, tables.items(), strict=True):
        offset = 0
        for position in positions:
            axis, _ = layout.kernel_axis(position)
            shape = list(layout.tensors[position].shape)
            shape[axis] = layout.sizes[group]
            width = int(np.prod(shape)) // shape[axis]
            block = slicing.from_rows(rows[:, offset:offset + width], axis, shape)
            from_rows[position] = slicing.gather_axes(block, layout.slices(position, indices, skip_axis=axis))
            offset += width
    whole = iter(received.whole)
    scales = dict(zip(layout.scale_layers, scale, strict=True))
    weights = []
    for position, tensor in enumerate(layout.tensors):
        if tensor.role == FROM_SELECTION and tensor.group in scales:
            weights.append(scales[tensor.group])
        elif tensor.role == SERVER_ONLY:
            weights.append(tf.zeros(layout.sub_shape(position)))  # s is only used by the server's sampler
        elif position in from_rows:
            weights.append(from_rows[position])
        else:
            weights.append(slicing.gather_axes(next(whole), layout.slices(position, indices)))
    return weights


def train_submodel(
    layout: RoundLayout, weights: list[tf.Tensor], scale: list[tf.Tensor], data: tf.data.Dataset,
    training: ClientTraining, lr: tf.Tensor | None = None,
) -> tuple[list[tf.Tensor], ClientMetrics]:
    """Train the sub-model on ``data`` (batches of ``x``/``y``); return its travelling tensors and metrics.

    ``lr`` (the round's learning rate, when given) replaces the optimizer's own ``learning_rate`` for this round.
    """
    model = tf.keras.models.model_from_json(prism_tf.precision.with_policy(layout.submodel_json, training.precision),
                                            custom_objects=prism_tf.CUSTOM_OBJECTS)
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
                logits = prism_tf.precision.float32_logits(model(batch["x"], training=True))
                loss = loss_fn(batch["y"], logits)
            grads = local_step.step_gradients(model, train_vars, tape.gradient(loss, train_vars),
                                              training.step_options)
            opt_state, updated = training.optimizer.next(
                opt_state, tuple(v.read_value() for v in train_vars), tuple(grads))
            opt_state = _tuples(opt_state)
            for variable, value in zip(train_vars, updated, strict=True):
                variable.assign(value)
            size = tf.cast(tf.shape(batch["y"])[0], tf.float32)
            loss_sum += loss * size  # the mean over the batch's labels (every step's, [B, T] next tokens)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            hits = tf.cast(tf.equal(predictions, batch["y"]), tf.float32)
            correct += tf.reduce_sum(hits) * size / tf.cast(tf.size(hits), tf.float32)  # per-label accuracy × size
            count += size
        uploads = [variables[i].read_value() for i in layout.travelling()]
        return uploads, loss_sum, correct, count

    opt_state = training.optimizer.initialize(tuple(specs))  # afresh every round: no momentum across rounds
    if lr is not None:
        opt_state = with_learning_rate(training.optimizer, opt_state, lr)
    uploads, loss_sum, correct, count = run(_tuples(opt_state))
    return uploads, ClientMetrics(num_examples=count, loss_sum=loss_sum, correct=correct)


def with_learning_rate(optimizer: tff.learning.optimizers.Optimizer, state, lr: tf.Tensor):
    """``state`` with its ``learning_rate`` hparam set to ``lr`` (`tff.learning.optimizers` hparams API)."""
    hparams = collections.OrderedDict(optimizer.get_hparams(state))
    if LEARNING_RATE_KEY not in hparams:
        raise ValueError(f"{type(optimizer).__name__} has no '{LEARNING_RATE_KEY}' hparam: a per-round learning "
                         "rate cannot be applied to it (build the process with lr_schedule=None)")
    hparams[LEARNING_RATE_KEY] = tf.cast(lr, tf.float32)
    return optimizer.set_hparams(state, hparams)


def _tuples(structure):
    # tf.data packs Python lists inside a dataset loop's state into one tensor; tuples stay structures.
    if isinstance(structure, list | tuple):
        return tuple(_tuples(x) for x in structure)
    if isinstance(structure, dict):
        return type(structure)((k, _tuples(v)) for k, v in structure.items())
    return structure


def update_weight(num_examples: tf.Tensor, client_weighting: ClientWeighting) -> tf.Tensor:
    """A client's aggregation weight: its examples (``NUM_EXAMPLES``) or 1 if it trained on any (``UNIFORM``; a
    client with no examples has nothing to average in)."""
    if client_weighting is ClientWeighting.NUM_EXAMPLES:
        return num_examples
    return tf.cast(num_examples > 0, tf.float32)


def build_client_training(
    layout: RoundLayout,
    element_type: tff.Type,
    training: ClientTraining,
    received_type: Any = None,
    client_weighting: ClientWeighting = WEIGHTINGS[DEFAULTS.weighting],
) -> tff.Computation:
    """One client's training as a TensorFlow computation (what `build_client_work` maps over the clients)::

        (<start=ClientStart, data=element_type*> -> ClientResult(update=ClientUpdate, update_weight=float32))

    ``received_type``: `Received` as the distributor delivers it (its ``next``'s result member; default
    `RoundLayout.received_type` of a broadcast). ``training.round_lr`` decides ``ClientStart.assignment.lr``'s type
    (``float32`` or ``<>``). ``client_weighting``: the update's weight, `update_weight`.
    """
    if not isinstance(client_weighting, ClientWeighting):
        raise TypeError(f"client_weighting must be a tff.learning.ClientWeighting (NUM_EXAMPLES or UNIFORM), got "
                        f"{client_weighting!r}")
    received_type = received_type if received_type is not None else layout.received_type(rows=False)
    start_type = ClientStart(received_type, layout.assignment_type(training.round_lr))
    table_groups = list(layout.select_tables()) if len(received_type.rows) else []

    @tff.tensorflow.computation(start_type, tff.SequenceType(element_type))
    def train(start: ClientStart, data):
        received = start.received
        rows = [ds.batch(layout.sizes[group]).get_single_element()
                for ds, group in zip(received.rows, table_groups, strict=True)]
        indices, scale = list(start.assignment.indices), list(start.assignment.scale)
        weights = materialize(layout, Received(rows, list(received.whole)), indices, scale)
        lr = start.assignment.lr if training.round_lr else None
        uploads, metrics = train_submodel(layout, weights, scale, data, training, lr)
        return tff.learning.templates.ClientResult(
            update=ClientUpdate(uploads, indices, metrics),
            update_weight=update_weight(metrics.num_examples, client_weighting))

    restore_keras_classes(layout)
    return train


def build_client_work(
    layout: RoundLayout,
    element_type: tff.Type,
    training: ClientTraining,
    received_type: Any = None,
    client_weighting: ClientWeighting = WEIGHTINGS[DEFAULTS.weighting],
) -> tff.learning.templates.ClientWorkProcess:
    """The clients' training as a `tff.learning.templates.ClientWorkProcess`::

        initialize: ( -> <>@SERVER)
        next: (<<>@SERVER, {ClientStart}@CLIENTS, {element_type*}@CLIENTS>
               -> <state=<>@SERVER,
                   result={ClientResult(update=ClientUpdate, update_weight=float32)}@CLIENTS,
                   measurements=<>@SERVER>)

    Arguments as `build_client_training`. The client metrics travel inside the update, not as measurements: the
    aggregator drops a faulty client from the update and its metrics by one rule (docs/design.md, faulty clients).
    """
    train = build_client_training(layout, element_type, training, received_type, client_weighting)
    start_type, data_type = train.type_signature.parameter

    @tff.federated_computation
    def initialize():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(initialize.type_signature.result, tff.FederatedType(start_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state, start, data):
        result = tff.federated_map(train, tff.federated_zip((start, data)))
        return tff.templates.MeasuredProcessOutput(state, result, tff.federated_value((), tff.SERVER))

    return tff.learning.templates.ClientWorkProcess(initialize, next_fn)


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


def client_input_type(layout: RoundLayout, element_type: tff.Type, training: ClientTraining | None = None):
    """Each client's input (`ClientInput`) as TFF types; its assignment carries ``lr`` (float32) when
    ``training.round_lr``."""
    return layout.client_input_type(element_type, bool(training is not None and training.round_lr))
