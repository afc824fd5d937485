"""Server → clients: each client receives only its own sub-model (docs/algorithm.md §2; docs/pitfalls.md,
"federated_select and per-key aggregation"; docs/design.md, "The round as TFF templates").

A distributor is a `SubmodelDistributionProcess`: TFF's `tff.learning.templates.DistributionProcess` with one more
argument, the clients' `ClientAssignment`s, because what a client receives depends on its own kernel indices.

- `build_select_distributor` (the default): for every principal layer the server keeps a table with one row per
  principal kernel (the kernel's column of ``A`` and row of ``B``, plus any other tensor that layer's kernel group
  slices) and `tff.federated_select` sends each client the rows of its own kernel indices, as a deployment would.
  Tensors no kernel group slices (normalization, the first conv, shortcuts, the classifier) are broadcast, and each
  client gathers its channels where a width selection applies.
- `build_broadcast_distributor` sends every travelling tensor to every client and lets it gather: identical
  results, faster in simulation (TFF serializes a dataset per client for `federated_select`).

Both are stateless (state ``<>``) and measure nothing (measurements ``<>``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import slicing
from tff_pipelines.round.layout import ClientAssignment, Received, RoundLayout

DISTRIBUTIONS = ("select", "broadcast")
"""The distributors by name (`named`; the CLI's ``--distribution``)."""


class SubmodelDistributionProcess(tff.templates.MeasuredProcess):
    """A stateful process that sends each client its sub-model: TFF's ``DistributionProcess`` plus the clients'
    assignments.

    Type signatures (``W``: the server's flat weights, `RoundLayout.weights_type`)::

        initialize: ( -> S@SERVER)
        next: (<S@SERVER, W@SERVER, {ClientAssignment}@CLIENTS>
               -> <state=S@SERVER, result={Received}@CLIENTS, measurements=M@SERVER>)

    `tff.learning.templates.DistributionProcess.next` is ``<S@SERVER, W@SERVER>``: nothing placed at CLIENTS reaches
    it, so it cannot key `tff.federated_select` by each client's kernel indices (docs/design.md, "The round as TFF
    templates"). The checks are those of TFF's ``DistributionProcess`` for the arguments the two share.
    """

    def __init__(self, initialize_fn: tff.Computation, next_fn: tff.Computation) -> None:
        super().__init__(initialize_fn, next_fn, next_is_multi_arg=True)
        state = initialize_fn.type_signature.result
        if not (isinstance(state, tff.FederatedType) and state.placement == tff.SERVER):
            raise TypeError(f"a distributor's initialize must return a value placed at SERVER, got {state}")
        parameter, result = next_fn.type_signature.parameter, next_fn.type_signature.result
        placed = [(parameter[i] if isinstance(parameter, tff.StructType) and len(parameter) == 3 else None)
                  for i in range(3)]
        if placed[0] is None:
            raise TypeError(f"a distributor's next takes <state@SERVER, weights@SERVER, assignments@CLIENTS>, got "
                            f"{parameter}")
        for what, value_type, placement in (("weights (2nd argument)", placed[1], tff.SERVER),
                                            ("assignments (3rd argument)", placed[2], tff.CLIENTS),
                                            ("result", result.result, tff.CLIENTS),
                                            ("measurements", result.measurements, tff.SERVER)):
            if not (isinstance(value_type, tff.FederatedType) and value_type.placement == placement):
                raise TypeError(f"a distributor's {what} must be placed at {placement}, got {value_type}")


DistributorFn = Callable[[RoundLayout, Any], SubmodelDistributionProcess]
"""What `build_prism_process` takes as ``model_distributor``: ``(layout, assignment_type) -> distributor``, called
once per sub-model size (a traced process has fixed types)."""


def build_broadcast_distributor(layout: RoundLayout, assignment_type: Any = None) -> SubmodelDistributionProcess:
    """Every client receives every travelling tensor whole (``Received(rows=[], whole=...)``) and gathers its own.

    ``assignment_type``: the clients' `ClientAssignment` as TFF types (default `RoundLayout.assignment_type` without
    a round learning rate); ignored, but part of the type of ``next``.
    """
    travelling = layout.travelling()

    @tff.tensorflow.computation(layout.weights_type())
    def whole(weights):
        return Received([], [weights[p] for p in travelling])

    def distribute(weights, assignments):
        del assignments  # everyone receives the same
        return tff.federated_broadcast(tff.federated_map(whole, weights))

    return _stateless(layout, assignment_type, distribute)


class _Tables(NamedTuple):
    """The server side of `build_select_distributor`: one ``[rank, D]`` table per kernel group, the other tensors."""

    tables: list
    whole: list


def build_select_distributor(layout: RoundLayout, assignment_type: Any = None) -> SubmodelDistributionProcess:
    """Each client receives its kernels' rows through `tff.federated_select` and the other tensors whole.

    With no principal layer there is nothing to key: the `build_broadcast_distributor` process is returned.
    ``assignment_type`` as in `build_broadcast_distributor`; the client's kernel indices key the selection (TFF
    does not check keys against ``max_key``: `RoundLayout.assignment` does).
    """
    if not layout.scale_layers:
        return build_broadcast_distributor(layout, assignment_type)
    assignment_type = assignment_type if assignment_type is not None else layout.assignment_type(round_lr=False)
    tables = layout.select_tables()
    in_tables = {p for ps in tables.values() for p in ps}
    travelling = layout.travelling()

    @tff.tensorflow.computation(layout.weights_type())
    def server_tables(weights):
        rows = [tf.concat([slicing.to_rows(weights[p], layout.kernel_axis(p)[0]) for p in positions], 1)
                for positions in tables.values()]
        return _Tables(rows, [weights[p] for p in travelling if p not in in_tables])

    tables_type = server_tables.type_signature.result
    pickers = []
    for j, group in enumerate(tables):
        table_type = tables_type.tables[j]

        @tff.tensorflow.computation(table_type, np.int32)
        def select_row(rows, key):
            return tf.gather(rows, key)

        pickers.append((_table_picker(tables_type, j), _indices_picker(assignment_type, layout.groups.index(group)),
                        select_row, table_type.shape[0]))

    @tff.tensorflow.computation(tables_type)
    def whole_part(parts):
        return parts.whole

    def distribute(weights, assignments):
        parts = tff.federated_map(server_tables, weights)
        rows = []
        for table, keys_of, select_row, rank in pickers:
            keys = tff.federated_map(keys_of, assignments)
            max_key = tff.federated_value(np.int32(rank - 1), tff.SERVER)
            rows.append(tff.federated_select(keys, max_key, tff.federated_map(table, parts), select_row))
        whole = tff.federated_broadcast(tff.federated_map(whole_part, parts))
        return tff.federated_zip(Received(rows, whole))

    return _stateless(layout, assignment_type, distribute)


DISTRIBUTORS: dict[str, DistributorFn] = {"select": build_select_distributor,
                                          "broadcast": build_broadcast_distributor}


def named(distribution: str) -> DistributorFn:
    """The distributor builder called ``distribution`` (`DISTRIBUTIONS`), for configs and the CLI."""
    if distribution not in DISTRIBUTORS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return DISTRIBUTORS[distribution]


def _stateless(layout: RoundLayout, assignment_type: Any, distribute) -> SubmodelDistributionProcess:
    """A `SubmodelDistributionProcess` with state ``<>`` and measurements ``<>`` around ``distribute(weights,
    assignments) -> received@CLIENTS``."""
    assignment_type = assignment_type if assignment_type is not None else layout.assignment_type(round_lr=False)

    @tff.federated_computation
    def initialize():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(initialize.type_signature.result, tff.FederatedType(layout.weights_type(), tff.SERVER),
                               tff.FederatedType(assignment_type, tff.CLIENTS))
    def next_fn(state, weights, assignments):
        received = distribute(weights, assignments)
        return tff.templates.MeasuredProcessOutput(state, received, tff.federated_value((), tff.SERVER))

    return SubmodelDistributionProcess(initialize, next_fn)


def _table_picker(tables_type: tff.Type, j: int) -> tff.Computation:
    @tff.tensorflow.computation(tables_type)
    def table(parts):
        return parts.tables[j]

    return table


def _indices_picker(assignment_type: Any, position: int) -> tff.Computation:
    @tff.tensorflow.computation(assignment_type)
    def pick(assignment: ClientAssignment):
        return assignment.indices[position]

    return pick
