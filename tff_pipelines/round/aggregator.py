"""Clients → server: per-entry weighted averaging of sub-model tensors (docs/algorithm.md §3).

Each client uploads only its sub-tensors and index vectors. `tff.federated_aggregate` accumulates, per full-model
tensor, the weighted sum of what clients sent and the weight that reached every entry (`prism_tf.slicing`); the
finalizer divides. For a principal layer this is the per-kernel average over the clients that trained each kernel;
for tensors nobody slices it is FedAvg. TFF 0.87 has no per-key aggregator, hence the dense accumulator
(docs/pitfalls.md, per-key aggregation); client messages stay sub-model sized.

The training metrics travel in the same aggregation, so one rule decides for both: a client whose update or metrics
hold NaN/Inf is dropped — zero values, zero weight, zero count (`prism_tf.server.drop_if_not_finite`) — and counted
in ``clients_dropped`` (docs/design.md, faulty clients).
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import server, slicing
from tff_pipelines.round.layout import RoundLayout

WEIGHTINGS = ("examples", "uniform")
METRICS = ("num_examples", "loss_sum", "correct")  # the client metrics summed over the round's good clients


def build_aggregator(layout: RoundLayout, client_output_type: tff.Type, weighting: str = "examples"):
    """A function for use inside a federated computation: ``client_outputs@CLIENTS -> <sums, counts,
    metrics>@SERVER``; ``metrics`` has the good clients' `METRICS` and ``clients_trained``/``clients_dropped``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    travelling = layout.travelling()
    shapes = [layout.tensors[p].shape for p in travelling]

    @tff.tensorflow.computation(client_output_type)
    def upload(output):
        count = output["metrics"]["num_examples"]
        weight = count if weighting == "examples" else tf.cast(count > 0, tf.float32)
        return collections.OrderedDict(uploads=output["uploads"], indices=output["indices"], weight=weight,
                                       metrics=output["metrics"])

    @tff.tensorflow.computation
    def zero():
        return collections.OrderedDict(
            sums=[tf.zeros(s, tf.float32) for s in shapes], counts=[tf.zeros(s, tf.float32) for s in shapes],
            metrics=collections.OrderedDict((k, tf.constant(0.0)) for k in (*METRICS, "clients_trained",
                                                                             "clients_dropped")))

    accumulator_type = zero.type_signature.result

    @tff.tensorflow.computation(accumulator_type, upload.type_signature.result)
    def accumulate(acc, value):
        # Checked where the server accumulates, not trusted from the client.
        uploads, weight, metrics, ok = server.drop_if_not_finite(
            list(value["uploads"]), value["weight"], [value["metrics"][k] for k in METRICS])
        sums, counts = [], []
        for j, position in enumerate(travelling):
            s, c = slicing.weighted_sums(uploads[j], layout.slices(position, list(value["indices"])), shapes[j],
                                         weight)
            sums.append(acc["sums"][j] + s)
            counts.append(acc["counts"][j] + c)
        good = tf.cast(ok, tf.float32)
        totals = collections.OrderedDict((k, acc["metrics"][k] + m) for k, m in zip(METRICS, metrics, strict=True))
        totals["clients_trained"] = acc["metrics"]["clients_trained"] + good
        totals["clients_dropped"] = acc["metrics"]["clients_dropped"] + (1.0 - good)
        return collections.OrderedDict(sums=sums, counts=counts, metrics=totals)

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge(a, b):
        return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report(acc):
        return acc

    def aggregate(client_outputs):
        return tff.federated_aggregate(tff.federated_map(upload, client_outputs), zero(), accumulate, merge, report)

    aggregate.accumulator_type = accumulator_type  # what `aggregate` returns (at SERVER)
    return aggregate

