"""Clients → server: per-entry weighted averaging of sub-model tensors (docs/algorithm.md §3; docs/design.md, "The
round as TFF templates").

`build_aggregator` returns a weighted `tff.templates.AggregationProcess`. Each client uploads only its sub-tensors
and index vectors (`ClientUpdate`). `tff.federated_aggregate` accumulates, per full-model tensor, the weighted sum
of what clients sent and the weight that reached every entry (`prism_tf.slicing`): `EntrySums`; the finalizer
divides. For a principal layer this is the per-kernel average over the clients that trained each kernel; for
tensors nobody slices it is FedAvg. TFF 0.87 has no per-key aggregator, hence the dense accumulator
(docs/pitfalls.md, per-key aggregation); client messages stay sub-model sized.

The training metrics travel in the same aggregation, so one rule decides for both: a client whose update or metrics
hold NaN/Inf is dropped — zero values, zero weight, zero count (`prism_tf.server.drop_if_not_finite`) — and counted
in ``clients_dropped`` (docs/design.md, faulty clients). The sums of the good clients' metrics are the process's
measurements (`TrainingTotals`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import server, slicing
from tff_pipelines.round.layout import ClientMetrics, ClientUpdate, EntrySums, RoundLayout, TrainingTotals

METRICS = ClientMetrics._fields  # the client metrics summed over the round's good clients


class _Accumulator(NamedTuple):
    """What `tff.federated_aggregate` carries: the entry sums and the metric totals, added client by client."""

    sums: list
    counts: list
    totals: TrainingTotals


class _Weighted(NamedTuple):
    update: ClientUpdate
    weight: Any


def build_aggregator(layout: RoundLayout, update_type: Any) -> tff.templates.AggregationProcess:
    """The clients' updates summed per entry, as a weighted `tff.templates.AggregationProcess`::

        initialize: ( -> <>@SERVER)
        next: (<<>@SERVER, {ClientUpdate}@CLIENTS, {float32}@CLIENTS>
               -> <state=<>@SERVER, result=EntrySums@SERVER, measurements=TrainingTotals@SERVER>)

    ``update_type``: `ClientUpdate` as the client work returns it (its ``ClientResult.update`` type). The third
    argument is each client's weight (``ClientResult.update_weight``).
    """
    travelling = layout.travelling()
    shapes = [layout.tensors[p].shape for p in travelling]

    @tff.tensorflow.computation
    def zero():
        return _Accumulator([tf.zeros(s, tf.float32) for s in shapes], [tf.zeros(s, tf.float32) for s in shapes],
                            TrainingTotals(*(tf.constant(0.0) for _ in TrainingTotals._fields)))

    accumulator_type = zero.type_signature.result
    weighted_type = _Weighted(update_type, tff.TensorType(np.float32))

    @tff.tensorflow.computation(accumulator_type, weighted_type)
    def accumulate(acc, value):
        # Checked where the server accumulates, not trusted from the client.
        update = value.update
        uploads, weight, metrics, ok = server.drop_if_not_finite(
            list(update.uploads), value.weight, [getattr(update.metrics, k) for k in METRICS])
        sums, counts = [], []
        for j, position in enumerate(travelling):
            s, c = slicing.weighted_sums(uploads[j], layout.slices(position, list(update.indices)), shapes[j], weight)
            sums.append(acc.sums[j] + s)
            counts.append(acc.counts[j] + c)
        good = tf.cast(ok, tf.float32)
        totals = [getattr(acc.totals, k) + m for k, m in zip(METRICS, metrics, strict=True)]
        totals = TrainingTotals(*totals, clients_trained=acc.totals.clients_trained + good,
                                clients_dropped=acc.totals.clients_dropped + (1.0 - good))
        return _Accumulator(sums, counts, totals)

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge(a, b):
        return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report(acc):
        return acc

    @tff.tensorflow.computation(accumulator_type)
    def sums_of(acc):
        return EntrySums(acc.sums, acc.counts)

    @tff.tensorflow.computation(accumulator_type)
    def totals_of(acc):
        return acc.totals

    @tff.federated_computation
    def initialize():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(initialize.type_signature.result, tff.FederatedType(update_type, tff.CLIENTS),
                               tff.FederatedType(np.float32, tff.CLIENTS))
    def next_fn(state, updates, weights):
        total = tff.federated_aggregate(tff.federated_zip(_Weighted(updates, weights)), zero(), accumulate, merge,
                                        report)
        return tff.templates.MeasuredProcessOutput(state, tff.federated_map(sums_of, total),
                                                   tff.federated_map(totals_of, total))

    return tff.templates.AggregationProcess(initialize, next_fn)
