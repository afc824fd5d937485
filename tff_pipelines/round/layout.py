"""The fixed shapes of one federated round: which tensors travel, how each is sliced, the sub-model's size.

A TFF computation is typed: every client of a traced round receives index vectors of the same lengths and trains a
sub-model of the same shape. `RoundLayout` records those choices once (from the server model, the groups a method
slices and their sub-model sizes) so that the distributor, client work, aggregator and finalizer agree on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf.plan import KERNELS, SubmodelPlan, TensorSlicing
from tff_pipelines.workers import runtime  # noqa: F401  (our worker context before any computation is built)


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
        return self.plan.tensors

    def travelling(self) -> list[int]:
        """Positions (in the full model's flat weights) of the tensors clients receive and return."""
        return prism_tf.server.travelling(self.plan)

    def sub_shape(self, position: int) -> tuple[int, ...]:
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
        return [tff.TensorType(np.float32, t.shape) for t in self.tensors]

    def indices_type(self) -> list[tff.TensorType]:
        return [tff.TensorType(np.int32, [self.sizes[g]]) for g in self.groups]

    def scale_type(self) -> list[tff.TensorType]:
        return [tff.TensorType(np.float32, [self.sizes[g]]) for g in self.scale_layers]

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

    def client_inputs(self, selection: prism_tf.Selection) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A client's index vectors (in `groups` order) and ω vectors (in `scale_layers` order)."""
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
        return out_indices, scales
