"""Client work: rebuild the client's sub-model from what it received, train it locally, return its tensors.

Runs inside a `tff.tensorflow.computation` placed at CLIENTS. The Keras sub-model is rebuilt from JSON inside the
computation (TFF traces it once per sub-model shape), its weights are assigned from the received tensors, and it is
trained with ``training=True`` in a `tf.function` loop so that BatchNorm's moving statistics update and travel
back with the other tensors (docs/pitfalls.md: Keras, BatchNorm, optimizers).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf import slicing, spectral
from prism_tf.plan import FROM_SELECTION, SERVER_ONLY
from tff_pipelines import distributor
from tff_pipelines.layout import RoundLayout

LEARNING_RATE_KEY = tff.learning.optimizers.LEARNING_RATE_KEY
DECAYED_LAYERS = (tf.keras.layers.Conv2D, tf.keras.layers.Dense)  # their `kernel` gets weight decay


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """Local training options (README "The federated process"; the authors' recipe, Niu et al. TMLR 2023).

    One step on a batch: ``g = ∇loss + frobenius`` → ``g *= ClipLR factor`` → global-norm clip → ``g += wd·w`` →
    ``optimizer.next`` (the authors add the Frobenius term before ``clip_grad_norm_`` and let ``torch.optim.SGD``
    add weight decay after it). The optimizer state — momentum included — is initialized afresh every round, as in
    TFF's FedAvg and the authors' code (a new optimizer per client per round): momentum does not carry over rounds.

    Attributes:
      optimizer: a `tff.learning.optimizers.Optimizer` (default SGD lr 0.05, momentum 0.9).
      clip_norm: global gradient-norm clip (the authors use 5); ``None`` disables it.
      clip_lr_tau: "ClipLR" of Korzhenkov & Louizos (2024): each kernel's factors learn at ``min(1, τ/ω)`` of the
        learning rate; a no-op where ``ω ≤ τ`` (always for ``prism``/``top``/``uniform``). ``None`` disables it.
      frobenius_decay: λ of the penalty ``λ/2·‖A·diag(ω)·B‖²_F`` on each principal layer's effective kernel, with
        ``A`` the ``[kh·kw·Cin, k]`` matrix and ``B`` ``[k, Cout]``: gradients ``λ·A(B̃B̃ᵀ)`` for ``A`` and
        ``λ·diag(ω)(AᵀA)B̃`` for ``B``, ``B̃ = diag(ω)B`` (`frobenius_terms`). With ω = 1 (the authors' setting, and
        ``prism``/``top``/``uniform``) this is their ``λ·A(BBᵀ)`` / ``λ·(AᵀA)B``; with the NeurIPS'24 ω it is
        the decay of the kernel the sub-model computes. The factors themselves get no weight decay. 0 disables it.
      weight_decay: ``wd·w`` added to the gradients of every other Conv2D/Dense kernel (not biases, not
        normalization, not the factors). 0 disables it.
      round_lr: clients receive the round's learning rate in their input struct (``lr``, `client_input_type`) and
        set it as the optimizer's ``learning_rate`` hparam before training (`tff_pipelines.recipe.Schedule`).
    """

    optimizer: tff.learning.optimizers.Optimizer = dataclasses.field(
        default_factory=lambda: tff.learning.optimizers.build_sgdm(learning_rate=0.05, momentum=0.9))
    clip_norm: float | None = 5.0
    clip_lr_tau: float | None = 10.0
    frobenius_decay: float = 0.0
    weight_decay: float = 0.0
    round_lr: bool = False


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
    variables = prism_tf.flat_weights(model)
    positions = [i for i, t in enumerate(layout.trainable) if t]
    train_vars = [variables[i] for i in positions]
    lr_factors = _clip_lr_factors(layout, positions, scale, training.clip_lr_tau)
    specs = [tf.TensorSpec(v.shape, v.dtype) for v in train_vars]
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Everything stateful runs inside one tf.function: in TFF's graph, assignments outside a function would be
    # dangling ops that never run.
    @tf.function
    def run(opt_state):
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        loss_sum = correct = count = tf.constant(0.0)
        for batch in data:
            with tf.GradientTape() as tape:
                logits = model(batch["x"], training=True)
                loss = loss_fn(batch["y"], logits)
            grads = tape.gradient(loss, train_vars)
            grads = _plus(grads, frobenius_gradients(model, train_vars, training.frobenius_decay))
            grads = [g if f is None else g * f for g, f in zip(grads, lr_factors, strict=True)]
            if training.clip_norm is not None:
                grads, _ = tf.clip_by_global_norm(grads, training.clip_norm)
            grads = _plus(grads, weight_decay_gradients(model, train_vars, training.weight_decay))
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


def frobenius_terms(principal: tf.Tensor, combination: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Gradients of ``½‖A·diag(ω)·B‖²_F`` w.r.t. the factors: ``(A(B̃B̃ᵀ), diag(ω)(AᵀA)B̃)``, ``B̃ = diag(ω)B``.

    ``principal`` is ``A`` in kernel shape ``[kh, kw, Cin, k]`` (or ``[in, k]``); the first term comes back in that
    shape. ω = 1 gives the authors' ``A(BBᵀ)`` and ``(AᵀA)B`` (their ``utils/frob.py``).
    """
    a = spectral.kernel_to_matrix(principal)
    omega = tf.convert_to_tensor(scale, a.dtype)[:, tf.newaxis]
    b = omega * tf.convert_to_tensor(combination, a.dtype)
    grad_a = tf.matmul(a, tf.matmul(b, b, transpose_b=True))
    grad_b = omega * tf.matmul(tf.matmul(a, a, transpose_a=True), b)
    return spectral.matrix_to_kernel(grad_a, principal.shape[:-1]), grad_b


def frobenius_gradients(model: tf.keras.Model, variables: list[tf.Variable], decay: float) -> list[tf.Tensor | None]:
    """Per variable, ``decay`` times `frobenius_terms` for the factors of each principal layer, else ``None``."""
    if not decay:
        return [None] * len(variables)
    terms = {}
    for layer in prism_tf.principal_layers(model):
        grad_a, grad_b = frobenius_terms(layer.principal_kernels, layer.combination, layer.kernel_scale)
        terms[layer.principal_kernels.ref()] = decay * grad_a
        terms[layer.combination.ref()] = decay * grad_b
    return [terms.get(v.ref()) for v in variables]


def weight_decay_gradients(model: tf.keras.Model, variables: list[tf.Variable], decay: float) -> list[tf.Tensor | None]:
    """Per variable, ``decay·w`` for the kernels of Conv2D/Dense layers, else ``None`` (biases, norms, factors)."""
    if not decay:
        return [None] * len(variables)
    kernels = {layer.kernel.ref() for layer in prism_tf.walk_layers(model) if isinstance(layer, DECAYED_LAYERS)}
    return [decay * v if v.ref() in kernels else None for v in variables]


def _plus(grads: list, terms: list) -> list:
    return [g if t is None else g + t for g, t in zip(grads, terms, strict=True)]


def _tuples(structure):
    # tf.data packs Python lists inside a dataset loop's state into one tensor; tuples stay structures.
    if isinstance(structure, list | tuple):
        return tuple(_tuples(x) for x in structure)
    if isinstance(structure, dict):
        return type(structure)((k, _tuples(v)) for k, v in structure.items())
    return structure


def _clip_lr_factors(layout: RoundLayout, positions: list[int], scale: list[tf.Tensor], tau: float | None):
    if tau is None or not layout.scale_layers:
        return [None] * len(positions)
    scales = dict(zip(layout.scale_layers, scale, strict=True))
    factors = []
    for position in positions:
        found = layout.kernel_axis(position)
        if found is None:
            factors.append(None)
            continue
        axis, group = found
        rank = len(layout.tensors[position].shape)
        factor = tf.minimum(1.0, tau / scales[group])
        factors.append(tf.reshape(factor, [-1 if d == axis else 1 for d in range(rank)]))
    return factors


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
