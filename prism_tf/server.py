"""The server half of a round, as pure functions: per-entry accumulation and the server step (docs/algorithm.md §3).

A round's server work is the same wherever its clients trained:

1. `Accumulator.add` takes one client's sub-model weights (flat order), its `Selection` and its weight, and adds
   ``weight · scatter(sub)`` and ``weight · coverage`` into dense per-tensor sums (`prism_tf.slicing`);
   accumulators of several sources `merge` by addition;
2. `finish_round` turns the sums into the new server weights: the per-entry average where some client reached an
   entry, the previous value elsewhere; then re-factorizes each principal layer (``W = A·B`` → SVD: orthogonal
   kernels and current singular values for the next round's sampling), resets ``ω`` to ones and reports the
   share of kernels some client trained.

What counts as a usable update is decided once, by `is_finite`: `Accumulator.add` refuses a non-finite update
(device ingest names the bad tensor), the TFF aggregator drops it from the round with `drop_if_not_finite`
(docs/design.md, faulty clients).

`prism_tf.aggregate` (Python), the TFF aggregator and finalizer (`tff_pipelines.round.aggregator`,
`tff_pipelines.round.finalizer`) and device ingest (`export.ingest`) all run these functions, so a phone's update is
aggregated by the same code as a simulated client's. Pure TensorFlow ops on tensors: eager or inside a TFF graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from prism_tf import slicing, spectral
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection

PRINCIPAL, COMBINATION, SINGULAR, SCALE = "principal_kernels", "combination", "singular_values", "kernel_scale"


def travelling(plan: SubmodelPlan) -> list[int]:
    """Flat positions of the tensors clients receive and return (all but ``s`` and ``ω``)."""
    return [i for i, t in enumerate(plan.tensors) if t.travels]


def principal_positions(plan: SubmodelPlan) -> dict[str, dict[str, int]]:
    """For every kernel group (a principal layer's factor pair), the flat positions of its factors by role
    (``principal_kernels``, ``combination``, ``singular_values``, ``kernel_scale``)."""
    out: dict[str, dict[str, int]] = {}
    for position, tensor in enumerate(plan.tensors):
        if tensor.group is not None:
            out.setdefault(tensor.group, {})[tensor.role] = position
    return out


def is_finite(values: Sequence[tf.types.experimental.TensorLike]) -> tf.Tensor:
    """A scalar bool: every entry of every tensor in ``values`` is finite (no NaN, no ±Inf)."""
    checks = [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in values]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def drop_if_not_finite(
    values: Sequence[tf.Tensor], weight: tf.Tensor, metrics: Sequence[tf.Tensor] = ()
) -> tuple[list[tf.Tensor], tf.Tensor, list[tf.Tensor], tf.Tensor]:
    """One client's contribution, made harmless when any of ``values``, ``weight`` or ``metrics`` is not finite.

    Returns ``(values, weight, metrics, ok)``: unchanged when ``ok``, else all zeros — zero *values* as well as zero
    weight, because ``0 · NaN`` is NaN and would poison every entry the client touched. Graph-safe (TFF).
    """
    weight = tf.convert_to_tensor(weight)
    ok = is_finite([*values, weight, *metrics])

    def keep(v):
        v = tf.convert_to_tensor(v)
        return tf.where(ok, v, tf.zeros_like(v))

    return [keep(v) for v in values], keep(weight), [keep(m) for m in metrics], ok


class Accumulator:
    """Per-entry weighted sums and counts of one round's client sub-models (docs/algorithm.md §3).

    Holds, for every travelling tensor of the server model, ``Σ_c w_c · scatter(sub_c)`` and ``Σ_c w_c · 1[entry
    in sub_c]`` in float64. Add clients with `add`, combine partial accumulators with `merge`, then call
    `finish_round` (or `average`).
    """

    def __init__(self, plan: SubmodelPlan) -> None:
        self.plan = plan
        self.positions = travelling(plan)
        self.sums = [np.zeros(plan.tensors[p].shape, np.float64) for p in self.positions]
        self.counts = [np.zeros(plan.tensors[p].shape, np.float64) for p in self.positions]
        self.clients = 0

    def add(self, values: Sequence[np.ndarray], selection: Selection, weight: float, *, name: str = "client") -> None:
        """Add one client's sub-model weights (`prism_tf.submodel.flat_weights` order of its sub-model) trained on
        ``selection``, with aggregation weight ``weight`` (> 0; usually its example count).

        Raises:
          ValueError: wrong number of tensors, a shape the selection does not imply, a non-finite value or a
            non-positive weight (naming ``name`` and the tensor); nothing is added then.
        """
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"{name}: aggregation weight must be a positive finite number, got {weight!r}")
        if len(values) != len(self.plan.tensors):
            raise ValueError(f"{name}: {len(values)} weight tensors, the model has {len(self.plan.tensors)}")
        indices = selection.indices()
        sizes = self.plan.sizes(indices)
        staged = []
        for j, position in enumerate(self.positions):
            tensor = self.plan.tensors[position]
            value = np.asarray(values[position], np.float64)
            expected = tensor.sub_shape(sizes)
            if value.shape != expected:
                raise ValueError(f"{name}: layer '{tensor.layer}' weight '{tensor.weight}' has shape {value.shape}, "
                                 f"the selection expects {expected}")
            if not bool(is_finite([value])):
                raise ValueError(f"{name}: layer '{tensor.layer}' weight '{tensor.weight}' has non-finite values")
            s, c = slicing.weighted_sums(value, self.plan.slices(tensor, indices), tensor.shape, weight)
            staged.append((j, s.numpy(), c.numpy()))
        for j, s, c in staged:  # all or nothing
            self.sums[j] += s
            self.counts[j] += c
        self.clients += 1

    def merge(self, other: Accumulator) -> Accumulator:
        """Add ``other``'s sums and counts into this accumulator (same model) and return it."""
        if other.positions != self.positions or [s.shape for s in other.sums] != [s.shape for s in self.sums]:
            raise ValueError("merge: the accumulators belong to different models")
        for j in range(len(self.sums)):
            self.sums[j] += other.sums[j]
            self.counts[j] += other.counts[j]
        self.clients += other.clients
        return self

    def average(self, previous: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The per-entry averages written into ``previous`` (flat weights): entries no client reached keep their
        value; ``s`` and ``ω`` are left as they are."""
        new = [np.asarray(w) for w in previous]
        for j, position in enumerate(self.positions):
            merged = slicing.masked_average(self.sums[j], self.counts[j], np.asarray(previous[position], np.float64))
            new[position] = merged.numpy().astype(np.asarray(previous[position]).dtype)
        return new


def finish_round(
    plan: SubmodelPlan,
    weights: Sequence[tf.Tensor],
    sums: Sequence[tf.Tensor],
    counts: Sequence[tf.Tensor],
    round_index: tf.Tensor | int,
    refactorize_every: int = 1,
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """The server step (docs/algorithm.md §1, §3): ``(new weights, kernel coverage)``.

    ``weights``: the server's flat weights before the round; ``sums``/``counts``: per travelling tensor (`travelling`
    order), what `Accumulator` or the TFF aggregator summed. Each entry becomes ``sums/counts`` where ``counts > 0``
    and keeps its value elsewhere; then, on the re-factorization schedule (``(round_index + 1) % refactorize_every ==
    0``; 0 = never), every principal layer's ``A·B`` is re-factorized by SVD, and ``ω`` is reset to ones.
    Coverage: the share of all principal kernels that some client trained (``B``'s row reached).
    """
    positions = travelling(plan)
    new = list(weights)
    for j, position in enumerate(positions):
        previous = tf.convert_to_tensor(weights[position])
        new[position] = tf.cast(slicing.masked_average(sums[j], counts[j], previous), previous.dtype)
    factors = principal_positions(plan)
    total = sum(plan.groups[g].size for g in factors)
    covered = tf.constant(0.0)
    round_index = tf.convert_to_tensor(round_index, tf.int64)
    for pos in factors.values():
        b_counts = tf.convert_to_tensor(counts[positions.index(pos[COMBINATION])])
        covered += tf.reduce_sum(tf.cast(tf.reduce_any(b_counts > 0, axis=1), tf.float32))
        if refactorize_every:
            due = tf.equal(tf.math.floormod(round_index + 1, int(refactorize_every)), 0)
            a, b = tf.convert_to_tensor(new[pos[PRINCIPAL]]), tf.convert_to_tensor(new[pos[COMBINATION]])
            s = tf.convert_to_tensor(weights[pos[SINGULAR]])
            a, b, s = tf.cond(due, lambda a=a, b=b: spectral.refactorize(a, b), lambda a=a, b=b, s=s: (a, b, s))
            new[pos[PRINCIPAL]], new[pos[COMBINATION]], new[pos[SINGULAR]] = a, b, s
        new[pos[SCALE]] = tf.ones_like(weights[pos[SCALE]])
    coverage = covered / total if total else tf.constant(1.0)
    return new, coverage


__all__ = ["Accumulator", "drop_if_not_finite", "finish_round", "is_finite", "principal_positions", "travelling"]
