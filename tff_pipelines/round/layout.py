"""The fixed shapes of one federated round and the structures that travel in it (docs/design.md, "The round as
TFF templates").

A TFF computation is typed: every client of a traced round receives index vectors of the same lengths and trains a
sub-model of the same shape. `RoundLayout` records those choices once (from the server model, the groups a method
slices and their sub-model sizes) so that the distributor, client work, aggregator and finalizer agree on them.

The values that cross from one part of the round to the next are named here, once, as NamedTuples (TFF keeps their
field names and, inside TensorFlow computations, their Python class):

| structure          | from → to                                  | fields                                          |
|--------------------|--------------------------------------------|-------------------------------------------------|
| `ClientAssignment` | server's sampling → distributor, client    | ``indices``, ``scale``, ``lr``                  |
| `ClientInput`      | caller → `learning_process.next` (CLIENTS) | ``data``, ``assignment``                        |
| `Received`         | distributor → client work                  | ``rows``, ``whole``                             |
| `ClientStart`      | (received, assignment) → client work       | ``received``, ``assignment``                    |
| `ClientUpdate`     | client work → aggregator                   | ``uploads``, ``indices``, ``metrics``           |
| `ClientMetrics`    | inside `ClientUpdate`                      | ``num_examples``, ``loss_sum``, ``correct``     |
| `EntrySums`        | aggregator → finalizer                     | ``sums``, ``counts``                            |
| `TrainingTotals`   | aggregator's measurements → round metrics  | `ClientMetrics`' + ``clients_{trained,dropped}`` |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf.plan import KERNELS, SubmodelPlan, TensorSlicing
from tff_pipelines.workers import runtime  # noqa: F401  (our worker context before any computation is built)

NO_LR = ()
"""`ClientAssignment.lr` when clients train at their optimizer's own learning rate (an empty struct, ``<>``)."""


class ClientAssignment(NamedTuple):
    """What the server decided for one client this round (`RoundLayout.assignment`).

    Attributes:
      indices: the client's index vectors, one ``int32[k_g]`` per group of `RoundLayout.groups` (kernel indices
        key `tff.federated_select`; the aggregator scatters the client's upload at them).
      scale: its frozen ω vectors, one ``float32[k_l]`` per layer of `RoundLayout.scale_layers`.
      lr: the round's learning rate (``float32``) that replaces the client optimizer's own, or `NO_LR`.
    """

    indices: Sequence[Any]
    scale: Sequence[Any]
    lr: Any = NO_LR


class ClientInput(NamedTuple):
    """One client's input to a round: the client argument of `PrismProcess.learning_process` ``.next``."""

    data: Any
    """The client's batches (``tf.data.Dataset`` of ``<x, y>``, fixed batch size)."""
    assignment: ClientAssignment


class Received(NamedTuple):
    """What the distributor delivers to a client.

    Attributes:
      rows: one table per kernel group, in `RoundLayout.select_tables` order: the client's rows of it (one per kept
        kernel: that kernel's column of ``A``, row of ``B`` and the other tensors its group slices, flattened and
        concatenated), a sequence of ``k`` rows ``float32[D]`` as `tff.federated_select` delivers it. Empty when the
        distributor broadcasts.
      whole: every other travelling tensor (`RoundLayout.travelling` order, the tables' tensors left out), full
        size; the client gathers its channels from them.
    """

    rows: Sequence[Any]
    whole: Sequence[Any]


class ClientStart(NamedTuple):
    """What a client's training starts from (`tff.learning.templates.ClientWorkProcess`'s second argument)."""

    received: Received
    assignment: ClientAssignment


class ClientMetrics(NamedTuple):
    """A client's training metrics (float32 scalars), summed over its batches."""

    num_examples: Any
    loss_sum: Any
    correct: Any


class ClientUpdate(NamedTuple):
    """A client's update (``ClientResult.update``): what the aggregator sums.

    Attributes:
      uploads: the trained sub-tensors of the travelling tensors, in `RoundLayout.travelling` order.
      indices: the client's index vectors (`ClientAssignment.indices`): where the server scatters ``uploads``.
      metrics: its `ClientMetrics`; they travel with the update so that one rule drops a faulty client from both.
    """

    uploads: Sequence[Any]
    indices: Sequence[Any]
    metrics: ClientMetrics


class EntrySums(NamedTuple):
    """Per travelling tensor (`RoundLayout.travelling` order), full size: ``sums`` = Σ w·scatter(upload) and
    ``counts`` = Σ w·[entry in the client's sub-model] over the round's good clients (docs/algorithm.md §3)."""

    sums: Sequence[Any]
    counts: Sequence[Any]


class TrainingTotals(NamedTuple):
    """The round's client metrics summed over its good clients, and how many clients were good or dropped."""

    num_examples: Any
    loss_sum: Any
    correct: Any
    clients_trained: Any
    clients_dropped: Any


@dataclasses.dataclass(frozen=True)
class RoundLayout:
    """Shapes and slicing shared by all computations of a round.

    Attributes:
      plan: the server model's `SubmodelPlan`.
      groups: the groups clients receive index vectors for, in order (kernel groups, then channel groups).
      sizes: sub-model size of every group (groups not in ``groups`` are whole).
      scale_layers: principal layers whose ω vectors clients receive, in order.
      submodel_json: Keras JSON of the client sub-model (rebuilt inside the client computation).
      trainable: per full-model tensor, whether it is trainable.
    """

    plan: SubmodelPlan
    groups: tuple[str, ...]
    sizes: Mapping[str, int]
    scale_layers: tuple[str, ...]
    submodel_json: str
    trainable: tuple[bool, ...]

    @classmethod
    def build(cls, model: tf.keras.Model, sizes: Mapping[str, int]) -> RoundLayout:
        """Layout for sub-models of ``model`` with the given group sizes (groups absent: whole)."""
        plan = SubmodelPlan.of(model)
        unknown = set(sizes) - set(plan.groups)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)} for model '{model.name}'")
        kernel_groups = plan.kernel_groups()
        channel_groups = [g for g in plan.free_channel_groups() if g in sizes]
        full_sizes = plan.sizes_with(sizes)
        sub = prism_tf.submodel.submodel_architecture(model, plan, full_sizes)
        trainable_ids = {id(v) for v in model.trainable_weights}
        return cls(
            plan=plan,
            groups=tuple(kernel_groups + channel_groups),
            sizes=full_sizes,
            scale_layers=tuple(kernel_groups),
            submodel_json=sub.to_json(),
            trainable=tuple(id(v) in trainable_ids for v in prism_tf.submodel.flat_weights(model)),
        )

    @property
    def sizes_key(self) -> tuple:
        """Hashable sub-model size of the sliced groups (one traced client computation per key)."""
        return tuple(sorted((g, self.sizes[g]) for g in self.groups))

    # --- tensors ---------------------------------------------------------------------------------------------
    @property
    def tensors(self) -> tuple[TensorSlicing, ...]:
        """Every tensor of the server model, in `prism_tf.submodel.flat_weights` order, with its slicing."""
        return self.plan.tensors

    def travelling(self) -> list[int]:
        """Positions (in the full model's flat weights) of the tensors clients receive and return."""
        return prism_tf.server.travelling(self.plan)

    def sub_shape(self, position: int) -> tuple[int, ...]:
        """The shape of the tensor at ``position`` in this round's sub-model."""
        return self.tensors[position].sub_shape(self.sizes)

    def slices(self, position: int, indices: Sequence[tf.Tensor], skip_axis: int | None = None) -> list:
        """``(axis, indices)`` of a tensor, given the client's index vectors in `groups` order."""
        by_group = dict(zip(self.groups, indices, strict=True))
        return [(axis, by_group[g]) for axis, g in self.tensors[position].axes if g in by_group and axis != skip_axis]

    def kernel_axis(self, position: int) -> tuple[int, str] | None:
        """The axis a kernel group slices (the axis `tff.federated_select` keys), if any."""
        for axis, group in self.tensors[position].axes:
            if self.plan.groups[group].kind == KERNELS:
                return axis, group
        return None

    def select_tables(self) -> dict[str, list[int]]:
        """Per kernel group, the travelling tensors sent as its rows (one row per kernel)."""
        tables: dict[str, list[int]] = {g: [] for g in self.scale_layers}
        for position in self.travelling():
            found = self.kernel_axis(position)
            if found:
                tables[found[1]].append(position)
        return tables

    # --- TFF types -------------------------------------------------------------------------------------------
    def weights_type(self) -> list[tff.TensorType]:
        """The server weights (every tensor, flat order) as TFF types."""
        return [tff.TensorType(np.float32, t.shape) for t in self.tensors]

    def indices_type(self) -> list[tff.TensorType]:
        """`ClientAssignment.indices` as TFF types (``int32[k_g]`` per group)."""
        return [tff.TensorType(np.int32, [self.sizes[g]]) for g in self.groups]

    def scale_type(self) -> list[tff.TensorType]:
        """`ClientAssignment.scale` as TFF types (``float32[k_l]`` per principal layer)."""
        return [tff.TensorType(np.float32, [self.sizes[g]]) for g in self.scale_layers]

    def assignment_type(self, round_lr: bool) -> ClientAssignment:
        """`ClientAssignment` as TFF types; ``lr`` is ``float32`` with ``round_lr``, else ``<>``."""
        return ClientAssignment(self.indices_type(), self.scale_type(),
                                tff.TensorType(np.float32) if round_lr else NO_LR)

    def client_input_type(self, element_type: tff.Type, round_lr: bool) -> ClientInput:
        """`ClientInput` as TFF types: ``<data=element_type*, assignment=...>``."""
        return ClientInput(tff.SequenceType(element_type), self.assignment_type(round_lr))

    def row_width(self, group: str) -> int:
        """``D``: the width of one row of ``group``'s table (`Received.rows`)."""
        total = 0
        for position in self.select_tables()[group]:
            axis, _ = self.kernel_axis(position)
            shape = self.tensors[position].shape
            total += int(np.prod(shape)) // shape[axis]
        return total

    def received_type(self, rows: bool) -> Received:
        """`Received` at a client as TFF types: with ``rows`` (`tff.federated_select`), the tables' rows as
        sequences and the other travelling tensors whole; without, every travelling tensor whole."""
        if not rows:
            return Received([], [tff.TensorType(np.float32, self.tensors[p].shape) for p in self.travelling()])
        tables = self.select_tables()
        in_tables = {p for ps in tables.values() for p in ps}
        return Received(
            [tff.SequenceType(tff.TensorType(np.float32, [self.row_width(g)])) for g in tables],
            [tff.TensorType(np.float32, self.tensors[p].shape) for p in self.travelling() if p not in in_tables])

    def entry_sums_type(self) -> EntrySums:
        """`EntrySums` as TFF types (full-size float32 per travelling tensor)."""
        shapes = [tff.TensorType(np.float32, self.tensors[p].shape) for p in self.travelling()]
        return EntrySums(shapes, list(shapes))

    # --- bytes -----------------------------------------------------------------------------------------------
    def bytes_down(self) -> int:
        """Bytes a client receives: its sub-tensors, its index vectors and ω (float32/int32)."""
        tensors = sum(int(np.prod(self.sub_shape(i))) for i in self.travelling())
        vectors = sum(self.sizes[g] for g in self.groups) + sum(self.sizes[g] for g in self.scale_layers)
        return 4 * (tensors + vectors)

    def bytes_up(self) -> int:
        """Bytes a client returns: its trained sub-tensors and three metric scalars."""
        return 4 * (sum(int(np.prod(self.sub_shape(i))) for i in self.travelling()) + 3)

    def full_bytes(self) -> int:
        """Bytes of the whole server model's travelling tensors (what FedAvg sends each way)."""
        return 4 * sum(int(np.prod(self.tensors[i].shape)) for i in self.travelling())

    def assignment(self, selection: prism_tf.Selection, lr: Any = NO_LR) -> ClientAssignment:
        """A client's `ClientAssignment` from its `Selection`: index vectors (`groups` order), ω vectors
        (`scale_layers` order) and ``lr`` (a float32, or `NO_LR`).

        Raises:
          ValueError: the selection lacks a group of this round, has another size, or an index out of range.
        """
        indices = selection.indices()
        missing = [g for g in self.groups if g not in indices]
        if missing:
            raise ValueError(f"selection has no indices for groups {missing}")
        out_indices = []
        for g in self.groups:
            idx = np.asarray(indices[g], np.int32)
            if idx.shape != (self.sizes[g],):
                raise ValueError(f"group '{g}': selection has {idx.shape[0]} indices, this round expects "
                                 f"{self.sizes[g]}")
            if idx.min() < 0 or idx.max() >= self.plan.groups[g].size:  # federated_select does not check keys
                raise ValueError(f"group '{g}': indices outside [0, {self.plan.groups[g].size})")
            out_indices.append(idx)
        scales = [np.asarray(selection.layers[g].scale, np.float32) for g in self.scale_layers]
        return ClientAssignment(out_indices, scales, NO_LR if _no_lr(lr) else np.float32(lr))


def _no_lr(lr: Any) -> bool:
    return isinstance(lr, tuple) and not lr
