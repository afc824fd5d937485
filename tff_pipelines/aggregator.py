"""Clients → server: per-entry weighted averaging of sub-model tensors (docs/algorithm.md §3).

Each client uploads only its sub-tensors and index vectors. `tff.federated_aggregate` accumulates, per full-model
tensor, the weighted sum of what clients sent and the weight that reached every entry (`prism_tf.slicing`); the
finalizer divides. For a principal layer this is the per-kernel average over the clients that trained each kernel;
for tensors nobody slices it is FedAvg. TFF 0.87 has no per-key aggregator, hence the dense accumulator
(docs/pitfalls.md, per-key aggregation); client messages stay sub-model sized.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import slicing
from tff_pipelines.layout import RoundLayout

WEIGHTINGS = ("examples", "uniform")


def build_aggregator(layout: RoundLayout, client_output_type: tff.Type, weighting: str = "examples"):
    """A function for use inside a federated computation: ``client_outputs@CLIENTS -> <sums, counts>@SERVER``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    travelling = layout.travelling()
    shapes = [layout.tensors[p].shape for p in travelling]

    @tff.tensorflow.computation(client_output_type)
    def upload(output):
        count = output["metrics"]["num_examples"]
        weight = count if weighting == "examples" else tf.cast(count > 0, tf.float32)
        return collections.OrderedDict(uploads=output["uploads"], indices=output["indices"], weight=weight)

    @tff.tensorflow.computation
    def zero():
        return collections.OrderedDict(
            sums=[tf.zeros(s, tf.float32) for s in shapes], counts=[tf.zeros(s, tf.float32) for s in shapes])

    accumulator_type = zero.type_signature.result

    @tff.tensorflow.computation(accumulator_type, upload.type_signature.result)
    def accumulate(acc, value):
        sums, counts = [], []
        for j, position in enumerate(travelling):
            s, c = slicing.weighted_sums(value["uploads"][j], layout.slices(position, list(value["indices"])),
                                         shapes[j], value["weight"])
            sums.append(acc["sums"][j] + s)
            counts.append(acc["counts"][j] + c)
        return collections.OrderedDict(sums=sums, counts=counts)

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge(a, b):
        return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report(acc):
        return acc

    def aggregate(client_outputs):
        return tff.federated_aggregate(tff.federated_map(upload, client_outputs), zero(), accumulate, merge, report)

    return aggregate

