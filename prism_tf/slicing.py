"""Gather a sub-tensor along some axes, and scatter/average it back: the arithmetic of every sub-model.

A sub-model's tensor is the full tensor restricted, along some axes, to index vectors (principal kernels for
PriSM, channels for width-sliced methods and PriSM's memory-efficient variant). Aggregation sums each client's
sub-tensor into the full shape, counts how much weight reached every entry, and averages per entry: for PriSM that
is exactly docs/algorithm.md §3's per-kernel average (``a_i``, ``b_i`` over the clients that trained kernel ``i``);
for a
tensor nobody slices it is FedAvg. Pure TensorFlow ops, eager or in TFF graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

Slices = Sequence[tuple[int, tf.types.experimental.TensorLike]]


def gather_axes(tensor: tf.types.experimental.TensorLike, slices: Slices) -> tf.Tensor:
    """``tensor`` restricted to ``indices`` along each ``(axis, indices)`` of ``slices``."""
    out = tf.convert_to_tensor(tensor)
    for axis, indices in slices:
        out = tf.gather(out, tf.convert_to_tensor(indices, tf.int32), axis=axis)
    return out


def scatter_axes(sub: tf.types.experimental.TensorLike, slices: Slices, full_shape: Sequence[int]) -> tf.Tensor:
    """Place ``sub`` into zeros of ``full_shape`` at the entries `gather_axes` took it from (duplicates add)."""
    out = tf.convert_to_tensor(sub)
    for axis, indices in slices:
        rank = len(full_shape)
        perm = [axis] + [d for d in range(rank) if d != axis]
        moved = tf.transpose(out, perm)
        shape = tf.concat([[full_shape[axis]], tf.shape(moved)[1:]], axis=0)
        scattered = tf.scatter_nd(tf.reshape(tf.convert_to_tensor(indices, tf.int32), [-1, 1]), moved, shape)
        out = tf.transpose(scattered, tf.math.invert_permutation(perm))
    return out


def coverage(slices: Slices, full_shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
    """How many times each entry of ``full_shape`` is included by ``slices`` (1/0 without duplicate indices)."""
    out = tf.ones([], dtype)
    rank = len(full_shape)
    for axis, indices in slices:
        indices = tf.reshape(tf.convert_to_tensor(indices, tf.int32), [-1, 1])
        hits = tf.scatter_nd(indices, tf.ones(tf.shape(indices)[:1], dtype), [full_shape[axis]])
        out = out * tf.reshape(hits, [-1 if d == axis else 1 for d in range(rank)])
    return tf.broadcast_to(out, full_shape)


def weighted_sums(
    sub: tf.types.experimental.TensorLike,
    slices: Slices,
    full_shape: Sequence[int],
    weight: tf.types.experimental.TensorLike,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One client's contribution to per-entry averaging: ``(weight · scatter(sub), weight · coverage)``.

    Contributions of several clients add; `masked_average` turns their totals into the new value.
    """
    sub = tf.convert_to_tensor(sub)
    weight = tf.cast(weight, sub.dtype)
    return weight * scatter_axes(sub, slices, full_shape), weight * coverage(slices, full_shape, sub.dtype)


def masked_average(
    sums: tf.types.experimental.TensorLike,
    counts: tf.types.experimental.TensorLike,
    previous: tf.types.experimental.TensorLike,
) -> tf.Tensor:
    """``sums / counts`` where some client reached the entry, else ``previous`` (docs/algorithm.md §3)."""
    sums = tf.convert_to_tensor(sums)
    counts = tf.cast(counts, sums.dtype)
    safe = tf.where(counts > 0, counts, tf.ones_like(counts))
    return tf.where(counts > 0, sums / safe, tf.cast(previous, sums.dtype))


def to_rows(tensor: tf.types.experimental.TensorLike, axis: int) -> tf.Tensor:
    """``tensor`` as one row per index of ``axis``: ``[n_axis, rest]`` (what `tff.federated_select` sends per key)."""
    tensor = tf.convert_to_tensor(tensor)
    rank = len(tensor.shape)
    perm = [axis] + [d for d in range(rank) if d != axis]
    return tf.reshape(tf.transpose(tensor, perm), [tf.shape(tensor)[axis], -1])


def from_rows(rows: tf.types.experimental.TensorLike, axis: int, shape: Sequence[int]) -> tf.Tensor:
    """Inverse of `to_rows`: ``[k, rest]`` rows back into a tensor of ``shape`` (whose ``axis`` has ``k``)."""
    rank = len(shape)
    perm = [axis] + [d for d in range(rank) if d != axis]
    moved = tf.reshape(rows, [shape[d] for d in perm])
    return tf.transpose(moved, tf.math.invert_permutation(perm))
