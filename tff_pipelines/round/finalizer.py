"""Server update: finish the per-entry averages, apply the server optimizer, re-factorize (docs/algorithm.md §1, §3;
docs/design.md, "The round as TFF templates").

`build_finalizer` returns a `tff.learning.templates.FinalizerProcess` whose state is `FinalizerState` (the round
counter the re-factorization schedule reads, and the server optimizer's state).

Entries no client trained keep their value. Without a server optimizer (the default, plain averaging) the averaged
factors are the new model. With one (e.g. server momentum, `tff.learning.optimizers.build_sgdm`), it acts on the
*rebuilt* update, as docs/algorithm.md §3 asks: for a principal layer the pseudo-gradient is ``W_old − A_avg·B_avg`` in
kernel space (other tensors: ``old − avg``), the optimizer steps ``W``, and the SVD of the new ``W`` gives the
factors — so a server optimizer needs re-factorization every round. On the re-factorization schedule (every round
by default) each principal layer's ``W = A·B`` is rebuilt and its SVD re-run, restoring orthogonal principal
kernels, current singular values for the next round's sampling and ``ω = 1`` on the server.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf import server, spectral
from prism_tf.federated.config import TrainConfig
from tff_pipelines.round.layout import EntrySums, RoundLayout


class FinalizerState(NamedTuple):
    """The finalizer's state: ``round_num`` (int64, the server steps taken so far: the process's round counter,
    which the re-factorization schedule reads) and ``optimizer_state`` (the server optimizer's, ``()`` without one)."""

    round_num: Any
    optimizer_state: Any


def server_optimizer_of(config: TrainConfig) -> tff.learning.optimizers.Optimizer | None:
    """A run's server optimizer: ``None`` (plain per-entry averaging) unless ``server_lr`` is set, then, on the
    rebuilt kernels, SGD at ``server_lr`` with ``server_momentum`` (0: none; FedAvgM otherwise) or, with
    ``server_optimizer`` ``adam``, FedAdam (Reddi et al. 2021: β₁ 0.9, β₂ 0.99, ε 1e-3)."""
    if config.server_lr is None:
        return None
    if config.server_optimizer == "adam":
        return tff.learning.optimizers.build_adam(config.server_lr, beta_1=0.9, beta_2=0.99, epsilon=1e-3)
    return tff.learning.optimizers.build_sgdm(config.server_lr, config.server_momentum or None)


def principal_positions(layout: RoundLayout) -> dict[str, dict[str, int]]:
    """For every principal layer, the flat positions of its factor tensors by weight name."""
    return server.principal_positions(layout.plan)


class DenseView:
    """The model as the server optimizer sees it: ``W = A·B`` per principal layer, other travelling tensors."""

    def __init__(self, layout: RoundLayout) -> None:
        self.layout = layout
        self.factors = principal_positions(layout)
        factor_positions = {p for pos in self.factors.values() for p in (pos["principal_kernels"],
                                                                           pos["combination"])}
        self.plain = [p for p in layout.travelling() if p not in factor_positions]

    def specs(self) -> list[tf.TensorSpec]:
        specs = []
        for pos in self.factors.values():
            a, b = self.layout.tensors[pos["principal_kernels"]].shape, self.layout.tensors[pos["combination"]].shape
            specs.append(tf.TensorSpec([*a[:-1], b[-1]], tf.float32))
        return specs + [tf.TensorSpec(self.layout.tensors[p].shape, tf.float32) for p in self.plain]

    def of(self, weights) -> list[tf.Tensor]:
        dense = [spectral.rebuild_kernel(weights[pos["principal_kernels"]], weights[pos["combination"]])
                 for pos in self.factors.values()]
        return dense + [weights[p] for p in self.plain]

    def write(self, weights: list, dense: list) -> None:
        """Factorize the dense kernels back into ``weights`` (in place)."""
        for pos, kernel in zip(self.factors.values(), dense[:len(self.factors)], strict=True):
            rank = self.layout.tensors[pos["singular_values"]].shape[0]
            a, b, s = spectral.factorize_kernel(kernel)
            weights[pos["principal_kernels"]], weights[pos["combination"]] = a[..., :rank], b[:rank]
            weights[pos["singular_values"]] = s[:rank]
        for p, value in zip(self.plain, dense[len(self.factors):], strict=True):
            weights[p] = value


def build_server_update(
    layout: RoundLayout,
    refactorize_every: int = 1,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
) -> tff.Computation:
    """The server step as a TensorFlow computation::

        (<W, EntrySums, round_num=int64, optimizer_state> -> <weights=W, coverage=float32, optimizer_state>)

    ``W``: the server's flat weights (`RoundLayout.weights_type`); ``coverage``: the share of principal kernels
    some good client trained.
    """
    if int(refactorize_every) < 0:
        raise ValueError(f"refactorize_every must be >= 0 (0 = never), got {refactorize_every}")
    factors = principal_positions(layout)
    if server_optimizer is not None and factors and refactorize_every != 1:
        raise ValueError("a server optimizer acts on the rebuilt kernels W and needs refactorize_every=1")
    view = DenseView(layout)
    optimizer_state_type = optimizer_state_type_of(layout, server_optimizer)

    @tff.tensorflow.computation(layout.weights_type(), layout.entry_sums_type(), np.int64, optimizer_state_type)
    def server_update(weights, acc: EntrySums, round_num, optimizer_state):
        # The pure server step (prism_tf.server); with a server optimizer it only averages (no SVD) and the
        # optimizer's step on the rebuilt kernels is factorized below.
        new, coverage = server.finish_round(layout.plan, list(weights), list(acc.sums), list(acc.counts), round_num,
                                            refactorize_every if server_optimizer is None else 0)
        if server_optimizer is not None:
            old_dense, avg_dense = view.of(weights), view.of(new)
            gradient = [o - a for o, a in zip(old_dense, avg_dense, strict=True)]
            optimizer_state, stepped = server_optimizer.next(optimizer_state, tuple(old_dense), tuple(gradient))
            view.write(new, list(stepped))
        return collections.OrderedDict(weights=new, coverage=coverage, optimizer_state=optimizer_state)

    return server_update


def build_finalizer(
    layout: RoundLayout,
    refactorize_every: int = 1,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
) -> tff.learning.templates.FinalizerProcess:
    """The server step (`build_server_update`) as a `tff.learning.templates.FinalizerProcess`::

        initialize: ( -> FinalizerState@SERVER)        round 0, the server optimizer's initial state
        next: (<FinalizerState@SERVER, W@SERVER, EntrySums@SERVER>
               -> <state=FinalizerState@SERVER, result=W@SERVER, measurements=<kernel_coverage=float32>@SERVER>)

    ``next`` advances ``round_num`` by one. ``refactorize_every``: re-run the SVD every this many rounds (0: never);
    a server optimizer needs 1 (it acts on the rebuilt kernels).
    """
    server_update = build_server_update(layout, refactorize_every, server_optimizer)

    @tff.tensorflow.computation
    def initial_state():
        return FinalizerState(tf.constant(0, tf.int64), initial_optimizer_state(layout, server_optimizer))

    state_type = initial_state.type_signature.result

    @tff.tensorflow.computation(state_type, layout.weights_type(), layout.entry_sums_type())
    def step(state, weights, sums):
        result = server_update(weights, sums, state.round_num, state.optimizer_state)
        return (FinalizerState(state.round_num + 1, result["optimizer_state"]), result["weights"],
                collections.OrderedDict(kernel_coverage=result["coverage"]))

    @tff.federated_computation
    def initialize():
        return tff.federated_eval(initial_state, tff.SERVER)

    @tff.federated_computation(initialize.type_signature.result, tff.FederatedType(layout.weights_type(), tff.SERVER),
                               tff.FederatedType(layout.entry_sums_type(), tff.SERVER))
    def next_fn(state, weights, sums):
        new_state, new_weights, measurements = tff.federated_map(step, tff.federated_zip((state, weights, sums)))
        return tff.templates.MeasuredProcessOutput(new_state, new_weights, measurements)

    return tff.learning.templates.FinalizerProcess(initialize, next_fn)


def initial_optimizer_state(layout: RoundLayout, server_optimizer: tff.learning.optimizers.Optimizer | None):
    """The server optimizer's initial state (an empty tuple without one); call inside a TF computation."""
    if server_optimizer is None:
        return ()
    return server_optimizer.initialize(tuple(DenseView(layout).specs()))


def optimizer_state_type_of(layout: RoundLayout, server_optimizer) -> tff.Type:
    """The TFF type of the server optimizer's state (``<>`` without one)."""

    @tff.tensorflow.computation
    def state():
        return initial_optimizer_state(layout, server_optimizer)

    return state.type_signature.result
