"""Server update: finish the per-entry averages, rebuild and re-factorize the kernels (PRISM.md §2, §4).

Entries no client trained keep their value. On the re-factorization schedule (every round by default) each
principal layer's ``W = A·B`` is rebuilt and its SVD re-run (`prism_tf.spectral.refactorize`), restoring
orthogonal principal kernels, current singular values for the next round's sampling and ``ω = 1`` on the server.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import slicing, spectral
from tff_pipelines.layout import RoundLayout


def principal_positions(layout: RoundLayout) -> dict[str, dict[str, int]]:
    """For every principal layer, the flat positions of its factor tensors by weight name."""
    out: dict[str, dict[str, int]] = {}
    for position, tensor in enumerate(layout.tensors):
        if tensor.layer in layout.scale_layers:
            out.setdefault(tensor.layer, {})[tensor.weight] = position
    return out


def build_server_update(layout: RoundLayout, accumulator_type: tff.Type, refactorize_every: int = 1):
    """``<weights, accumulator, round_num> -> <weights, coverage>`` as a TensorFlow computation."""
    if int(refactorize_every) < 0:
        raise ValueError(f"refactorize_every must be >= 0 (0 = never), got {refactorize_every}")
    travelling = layout.travelling()
    factors = principal_positions(layout)
    total_kernels = sum(layout.plan.groups[g].size for g in layout.scale_layers)

    @tff.tensorflow.computation(layout.weights_type(), accumulator_type, np.int64)
    def server_update(weights, acc, round_num):
        new = list(weights)
        for j, position in enumerate(travelling):
            new[position] = slicing.masked_average(acc["sums"][j], acc["counts"][j], weights[position])
        covered = tf.constant(0.0)
        for pos in factors.values():
            b_counts = acc["counts"][travelling.index(pos["combination"])]
            covered += tf.reduce_sum(tf.cast(tf.reduce_any(b_counts > 0, axis=1), tf.float32))
            if refactorize_every:
                due = tf.equal(tf.math.floormod(round_num + 1, refactorize_every), 0)
                a, b = new[pos["principal_kernels"]], new[pos["combination"]]
                s = weights[pos["singular_values"]]
                a, b, s = tf.cond(due, lambda a=a, b=b: spectral.refactorize(a, b), lambda a=a, b=b, s=s: (a, b, s))
                new[pos["principal_kernels"]], new[pos["combination"]], new[pos["singular_values"]] = a, b, s
            new[pos["kernel_scale"]] = tf.ones_like(weights[pos["kernel_scale"]])
        coverage = covered / total_kernels if total_kernels else tf.constant(1.0)
        return collections.OrderedDict(weights=new, coverage=coverage)

    return server_update
