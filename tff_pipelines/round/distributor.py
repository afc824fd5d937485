"""Server → clients: each client receives only its own sub-model (docs/algorithm.md §2;
docs/pitfalls.md, "federated_select and per-key aggregation").

``select`` (default): for every principal layer the server keeps a table with one row per principal kernel (the
kernel's column of ``A`` and row of ``B``, plus any other tensor that layer's kernel group slices) and
`tff.federated_select` sends each client the rows of its own kernel indices, as a deployment would. Tensors no
kernel group slices (normalization, the first conv, shortcuts, the classifier) are broadcast, and each client
gathers its channels where a width selection applies. ``broadcast`` sends every tensor to every client and lets it
gather: identical results, faster in simulation (TFF serializes a dataset per client for `federated_select`).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import slicing
from tff_pipelines.round.layout import RoundLayout

DISTRIBUTIONS = ("select", "broadcast")


def uses_select(layout: RoundLayout, distribution: str) -> bool:
    """Whether rows go through `tff.federated_select` (with no principal layer there is nothing to key)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution == "select" and bool(layout.scale_layers)


def build_distributor(layout: RoundLayout, distribution: str):
    """A function for use inside a federated computation: ``(weights@SERVER, clients@CLIENTS) -> received@CLIENTS``."""
    weights_type = layout.weights_type()
    travelling = layout.travelling()
    if not uses_select(layout, distribution):

        @tff.tensorflow.computation(weights_type)
        def whole(weights):
            return collections.OrderedDict(whole=[weights[p] for p in travelling])

        def distribute(weights, clients):
            del clients
            return tff.federated_broadcast(tff.federated_map(whole, weights))

        return distribute

    tables = layout.select_tables()
    in_tables = {p for ps in tables.values() for p in ps}

    @tff.tensorflow.computation(weights_type)
    def server_parts(weights):
        rows = []
        for positions in tables.values():
            rows.append(tf.concat([slicing.to_rows(weights[p], layout.kernel_axis(p)[0]) for p in positions], 1))
        return collections.OrderedDict(rows=rows, whole=[weights[p] for p in travelling if p not in in_tables])

    parts_type = server_parts.type_signature.result
    pickers = []
    for j, group in enumerate(tables):
        table_type = parts_type.rows[j]
        group_position = layout.groups.index(group)

        table = _table_picker(parts_type, j)

        @tff.tensorflow.computation(table_type, np.int32)
        def select_row(rows, key):
            return tf.gather(rows, key)

        pickers.append((group, group_position, table, select_row, table_type.shape[0]))

    @tff.tensorflow.computation(parts_type)
    def whole_part(parts):
        return parts["whole"]

    def distribute(weights, clients):
        parts = tff.federated_map(server_parts, weights)
        rows = []
        for _, group_position, table, select_row, rank in pickers:
            keys = tff.federated_map(_indices_picker(clients, group_position), clients)
            max_key = tff.federated_value(np.int32(rank - 1), tff.SERVER)
            rows.append(tff.federated_select(keys, max_key, tff.federated_map(table, parts), select_row))
        whole = tff.federated_broadcast(tff.federated_map(whole_part, parts))
        return tff.federated_zip(collections.OrderedDict(rows=rows, whole=whole))

    return distribute


def _table_picker(parts_type: tff.Type, j: int) -> tff.Computation:
    @tff.tensorflow.computation(parts_type)
    def table(parts):
        return parts["rows"][j]

    return table


def _indices_picker(clients, position: int) -> tff.Computation:
    @tff.tensorflow.computation(clients.type_signature.member)
    def pick(client):
        return client["indices"][position]

    return pick
