"""The finalizer as a TFF process on a tiny model: per-entry averages by hand, the round counter, re-factorization,
and a server optimizer acting on the rebuilt kernels (docs/algorithm.md §1, §3)."""

import numpy as np
import pytest
import round_models
import tensorflow as tf
import tensorflow_federated as tff

from tff_pipelines.round import finalizer
from tff_pipelines.round.layout import EntrySums


@pytest.fixture(scope="module")
def layout():
    return round_models.dense_layout()


def _weights(layout):
    """Server weights with distinct entries: tensor p holds 100·p + 0, 1, 2, ... (A, B scaled down: SVD-friendly)."""
    weights = [(100 * p + np.arange(int(np.prod(t.shape)))).reshape(t.shape).astype(np.float32)
               for p, t in enumerate(layout.tensors)]
    rng = np.random.default_rng(0)
    weights[0], weights[1] = (rng.normal(size=w.shape).astype(np.float32) for w in weights[:2])
    return weights


def _sums(layout):
    """Kernel 0 trained with weight 2 (sum 14 → 7), kernel 2 with weight 1 (3); kernels 1 and 3 by nobody. The
    hidden bias averages to 2, the head kernel nobody trained, the head bias to 5."""
    a_sums, a_counts = np.array([14.0, 0, 3, 0], np.float32), np.array([2.0, 0, 1, 0], np.float32)
    sums = [np.tile(a_sums, (5, 1)), np.tile(a_sums[:, None], (1, 4)), np.full(4, 8.0, np.float32),
            np.zeros((4, 3), np.float32), np.full(3, 5.0, np.float32)]
    counts = [np.tile(a_counts, (5, 1)), np.tile(a_counts[:, None], (1, 4)), np.full(4, 4.0, np.float32),
              np.zeros((4, 3), np.float32), np.ones(3, np.float32)]
    return EntrySums(sums, counts)


def test_the_type_signature(layout):
    process = finalizer.build_finalizer(layout)
    assert isinstance(process, tff.learning.templates.FinalizerProcess)
    weights = "<float32[5,4],float32[4,4],float32[4],float32[4],float32[4],float32[4,3],float32[3]>"
    travelling = "<float32[5,4],float32[4,4],float32[4],float32[4,3],float32[3]>"
    assert str(process.next.type_signature) == (
        f"(<state=<round_num=int64,optimizer_state=<>>@SERVER,weights={weights}@SERVER,sums=<sums={travelling},"
        f"counts={travelling}>@SERVER> -> <state=<round_num=int64,optimizer_state=<>>@SERVER,"
        f"result={weights}@SERVER,measurements=<kernel_coverage=float32>@SERVER>)")
    assert process.initialize() == finalizer.FinalizerState(0, ())


def test_per_entry_averages_by_hand(layout):
    process = finalizer.build_finalizer(layout, refactorize_every=0)
    weights = _weights(layout)
    out = process.next(finalizer.FinalizerState(np.int64(4), ()), weights, _sums(layout))
    new = out.result
    expected_a = weights[0].copy()
    expected_a[:, 0], expected_a[:, 2] = 7.0, 3.0  # kernels 1 and 3 keep their values
    np.testing.assert_array_equal(new[0], expected_a)
    expected_b = weights[1].copy()
    expected_b[0], expected_b[2] = 7.0, 3.0
    np.testing.assert_array_equal(new[1], expected_b)
    np.testing.assert_array_equal(new[2], np.full(4, 2.0))
    np.testing.assert_array_equal(new[3], weights[3])  # s: the server's, untouched without re-factorization
    np.testing.assert_array_equal(new[4], np.ones(4))  # ω: reset to 1 on the server
    np.testing.assert_array_equal(new[5], weights[5])  # nobody trained the head kernel
    np.testing.assert_array_equal(new[6], np.full(3, 5.0))
    assert float(out.measurements["kernel_coverage"]) == 0.5  # kernels 0 and 2 of 4
    assert int(out.state.round_num) == 5 and out.state.optimizer_state == ()


def test_refactorization_keeps_the_averaged_kernel_and_its_schedule(layout):
    weights, sums = _weights(layout), _sums(layout)
    averaged = finalizer.build_finalizer(layout, refactorize_every=0).next(
        finalizer.FinalizerState(np.int64(0), ()), weights, sums).result
    every_round = finalizer.build_finalizer(layout, refactorize_every=1)
    new = every_round.next(every_round.initialize(), weights, sums).result
    kernel = averaged[0] @ averaged[1]
    np.testing.assert_allclose(new[0] @ new[1], kernel, atol=1e-4)  # the same function, new factors
    s = np.linalg.svd(kernel, compute_uv=False)
    np.testing.assert_allclose(new[3], s, rtol=1e-4)  # current singular values for the next round's sampling
    np.testing.assert_allclose(new[0].T @ new[0], np.diag(s), atol=1e-3)  # A = U·diag(√s): orthogonal columns
    every_other = finalizer.build_finalizer(layout, refactorize_every=2)
    for round_num, due in [(0, False), (1, True)]:  # (round_num + 1) % 2 == 0
        got = every_other.next(finalizer.FinalizerState(np.int64(round_num), ()), weights, sums).result
        if due:
            np.testing.assert_allclose(got[3], s, rtol=1e-4)
        else:
            np.testing.assert_array_equal(got[3], weights[3])
            np.testing.assert_array_equal(got[0], averaged[0])


def test_a_server_optimizer_steps_the_rebuilt_kernels(layout):
    """SGD(0.5) on the server: W_new = W_old + 0.5·(W_avg − W_old) for the rebuilt kernel (then SVD), and the same
    rule entry by entry for the other travelling tensors."""
    weights, sums = _weights(layout), _sums(layout)
    averaged = finalizer.build_finalizer(layout, refactorize_every=0).next(
        finalizer.FinalizerState(np.int64(0), ()), weights, sums).result
    process = finalizer.build_finalizer(layout, server_optimizer=tff.learning.optimizers.build_sgdm(0.5))
    state = process.initialize()
    assert float(state.optimizer_state["learning_rate"]) == 0.5 and int(state.round_num) == 0
    new = process.next(state, weights, sums).result
    w_old, w_avg = weights[0] @ weights[1], averaged[0] @ averaged[1]
    np.testing.assert_allclose(new[0] @ new[1], w_old + 0.5 * (w_avg - w_old), atol=1e-4)
    for p in (2, 5, 6):  # hidden bias, head kernel, head bias: exact in float32
        np.testing.assert_array_equal(new[p], weights[p] + 0.5 * (averaged[p] - weights[p]))
    with pytest.raises(ValueError, match="a server optimizer acts on the rebuilt kernels W and needs "
                                         "refactorize_every=1"):
        finalizer.build_finalizer(layout, refactorize_every=2, server_optimizer=tff.learning.optimizers.build_sgdm(1.0))
    with pytest.raises(ValueError, match=r"refactorize_every must be >= 0 \(0 = never\), got -1"):
        finalizer.build_finalizer(layout, refactorize_every=-1)


def test_server_optimizer_of_a_config():
    from prism_tf.federated.config import TrainConfig

    assert finalizer.server_optimizer_of(TrainConfig()) is None
    optimizer = finalizer.server_optimizer_of(TrainConfig(server_lr=0.5, server_momentum=0.9))
    hparams = optimizer.get_hparams(optimizer.initialize((tf.TensorSpec([1], tf.float32),)))
    assert (float(hparams["learning_rate"]), float(hparams["momentum"])) == pytest.approx((0.5, 0.9))
