"""Client training options: per-round learning rate, Frobenius decay and weight decay, against hand computation."""

import collections
import dataclasses

import numpy as np
import pytest
import round_models
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf import local_step
from prism_tf.federated import recipe
from prism_tf.federated.methods import Method
from tff_pipelines.round import client_work
from tff_pipelines.round.layout import ClientAssignment, ClientMetrics, ClientStart, ClientUpdate, Received, RoundLayout
from tff_pipelines.round.process import build_prism_process

BATCH = 4
PLAIN = client_work.ClientTraining(clip_norm=None, frobenius_decay=0.0, weight_decay=0.0)  # plain SGD steps


def _dataset(n, seed=0, shape=(5,), classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(BATCH, drop_remainder=True)


def _one_step(layout, weights, scale, training):
    """Travelling tensors after training on one batch, by (layer, weight) name."""
    data = _dataset(BATCH, 1, (6, 6, 2))
    uploads, _ = client_work.train_submodel(layout, weights, scale, data, training)
    names = [(layout.tensors[p].layer, layout.tensors[p].weight) for p in layout.travelling()]
    return dict(zip(names, [u.numpy() for u in uploads], strict=True))


def test_frobenius_and_weight_decay_are_the_closed_form():
    fm = prism_tf.factorize(round_models.conv_model(), min_rank=1)
    layout = RoundLayout.build(fm, {})  # every kernel: the sub-model is the whole model
    omega = np.array([0.5, 1.0, 2.0, 1.5, 1.0], np.float32)
    indices = [tf.range(layout.sizes[g]) for g in layout.groups]
    full = [tf.constant(w.numpy()) for w in prism_tf.submodel.flat_weights(fm)]
    received = Received([], [full[p] for p in layout.travelling()])
    weights = client_work.materialize(layout, received, indices, [tf.constant(omega)])
    lr, lam, wd = 0.5, 0.01, 0.02
    plain = dataclasses.replace(PLAIN, optimizer=tff.learning.optimizers.build_sgdm(lr), clip_lr_tau=None)
    decayed = dataclasses.replace(plain, frobenius_decay=lam, weight_decay=wd)
    before = {(t.layer, t.weight): w.numpy() for t, w in zip(layout.tensors, weights, strict=True)}
    without = _one_step(layout, weights, [tf.constant(omega)], plain)
    with_decay = _one_step(layout, weights, [tf.constant(omega)], decayed)

    a, b = before[("conv", "principal_kernels")], before[("conv", "combination")]
    a_mat, b_tilde = a.reshape(-1, 5).astype(np.float64), omega[:, None] * b.astype(np.float64)
    grad_a = (a_mat @ b_tilde @ b_tilde.T).reshape(a.shape)  # λ·A(B̃B̃ᵀ), B̃ = diag(ω)B
    grad_b = omega[:, None] * (a_mat.T @ a_mat @ b_tilde)  # λ·diag(ω)(AᵀA)B̃
    for key, want in [(("conv", "principal_kernels"), lr * lam * grad_a), (("conv", "combination"), lr * lam * grad_b),
                      (("stem", "kernel"), lr * wd * before[("stem", "kernel")]),
                      (("head", "kernel"), lr * wd * before[("head", "kernel")])]:
        np.testing.assert_allclose(without[key] - with_decay[key], want, atol=1e-6, err_msg=str(key))
        assert np.abs(want).max() > 1e-3  # the terms are measurable at this tolerance
    for key in without:  # biases, BatchNorm (γ, β and moving statistics) get no decay
        if key[1] not in ("principal_kernels", "combination", "kernel"):
            np.testing.assert_array_equal(without[key], with_decay[key], err_msg=str(key))


def test_frobenius_terms_are_the_gradient_of_the_penalty():
    rng = np.random.default_rng(0)
    a = tf.Variable(rng.normal(size=(3, 3, 2, 4)).astype(np.float32))
    b = tf.Variable(rng.normal(size=(4, 6)).astype(np.float32))
    omega = tf.constant([1.0, 0.5, 3.0, 2.0])
    with tf.GradientTape() as tape:
        kernel = prism_tf.spectral.rebuild_kernel(a, omega[:, None] * b)
        penalty = 0.5 * tf.reduce_sum(tf.square(kernel))
    want_a, want_b = tape.gradient(penalty, [a, b])
    got_a, got_b = local_step.frobenius_terms(a, b, omega)
    np.testing.assert_allclose(got_a.numpy(), want_a.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_b.numpy(), want_b.numpy(), rtol=1e-5, atol=1e-4)
    # ω = 1: the authors' λ·A(BBᵀ) and λ·(AᵀA)B
    got_a, got_b = local_step.frobenius_terms(a, b, tf.ones([4]))
    a_mat = a.numpy().reshape(-1, 4)
    np.testing.assert_allclose(got_a.numpy().reshape(-1, 4), a_mat @ b.numpy() @ b.numpy().T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_b.numpy(), a_mat.T @ a_mat @ b.numpy(), rtol=1e-5, atol=1e-4)


def test_round_learning_rate_reaches_clients_and_is_plain_sgd():
    """Round 0 at lr 0.3 (schedule) although the optimizer says 0.05: FedAvg of one SGD step per client, by hand;
    round 1 at lr 0: nothing moves."""
    schedule = recipe.Schedule("cosine", base=0.3, final=0.0, total_rounds=2)
    process = build_prism_process(round_models.dense_model, tff.learning.optimizers.build_sgdm(0.05),
                                  method=Method("prism", keep_ratio=1.0), batch_size=BATCH, client_training=PLAIN,
                                  factorize_options={"min_rank": 1}, refactorize_every=0, lr_schedule=schedule)
    assert process.training.round_lr and client_work.client_input_type(
        process.layout, process.element_type, process.training).assignment.lr == tff.TensorType(np.float32)
    state = process.initialize()
    datasets = [_dataset(BATCH, c) for c in range(2)]
    inputs = process.client_inputs(process.layout, datasets, process.selections(state, 2), round_index=0)
    assert [float(i.assignment.lr) for i in inputs] == [pytest.approx(0.3)] * 2

    model = process.assign_to(state, tf.keras.models.clone_model(process.server_model))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps = []
    for data in datasets:
        batch = next(iter(data))
        with tf.GradientTape() as tape:
            loss = loss_fn(batch["y"], model(batch["x"], training=True))
        grads = tape.gradient(loss, model.trainable_weights)
        steps.append([w.numpy() - 0.3 * g.numpy() for w, g in zip(model.trainable_weights, grads, strict=True)])
    expected = [(s0 + s1) / 2 for s0, s1 in zip(*steps, strict=True)]  # equal example counts

    state = process.learning_process.next(state, inputs).state
    for got, want in zip(process.get_model_weights(state).trainable, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

    inputs = process.client_inputs(process.layout, datasets, process.selections(state, 2), round_index=1)
    assert float(inputs[0].assignment.lr) == 0.0
    after = process.learning_process.next(state, inputs).state
    for got, want in zip(process.flat_weights(after), process.flat_weights(state), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_lr_zero_freezes_weights_with_batchnorm_and_both_decays_on():
    """small_cnn with BatchNorm, momentum 0.9, clip 5, Frobenius and weight decay: at lr 0 only moving statistics
    move; at lr 0.1 the round trains."""
    shape = (8, 8, 1)
    process = build_prism_process(lambda: prism_tf.models.small_cnn(width=4, input_shape=shape, norm="batch"),
                                  tff.learning.optimizers.build_sgdm(0.1, momentum=0.9),
                                  method=Method("prism", keep_ratio=0.5), batch_size=BATCH, refactorize_every=0,
                                  client_training=client_work.ClientTraining(frobenius_decay=5e-4, weight_decay=5e-4),
                                  lr_schedule=lambda r: 0.1 * r)
    state = process.initialize()
    w0 = process.flat_weights(state)
    datasets = [_dataset(8, c, shape, 10) for c in range(2)]
    state, metrics = process.next(state, datasets)  # round 0: lr 0
    w1 = process.flat_weights(state)
    moving = [i for i, t in enumerate(process.layout.tensors) if t.weight.startswith("moving_")]
    assert moving and np.isfinite(metrics["loss"])
    for i, (a, b) in enumerate(zip(w0, w1, strict=True)):
        if process.layout.trainable[i]:
            np.testing.assert_allclose(b, a, atol=1e-7, err_msg=process.layout.tensors[i].layer)
    assert any(not np.allclose(w0[i], w1[i]) for i in moving)

    inputs = process.client_inputs(process.layout, datasets, process.selections(state, 2), round_index=1)
    out = process.learning_process.next(state, inputs)
    w2 = process.flat_weights(out.state)
    assert np.isfinite(out.metrics["loss"])
    assert any(process.layout.trainable[i] and not np.allclose(w1[i], w2[i]) for i in range(len(w1)))


def test_a_round_learning_rate_needs_an_optimizer_with_one():
    class NoHparams(tff.learning.optimizers.Optimizer):
        def initialize(self, specs):
            return ()

        def next(self, state, weights, gradients):
            return state, weights

    with pytest.raises(ValueError, match="no 'learning_rate' hparam.*lr_schedule=None"):
        client_work.with_learning_rate(NoHparams(), (), tf.constant(0.1))
    sgd = tff.learning.optimizers.build_sgdm(0.05, momentum=0.9)
    state = client_work.with_learning_rate(sgd, sgd.initialize((tf.TensorSpec([2], tf.float32),)), 0.25)
    assert float(state["learning_rate"]) == 0.25 and state["momentum"] == 0.9


class PlusOne(tff.learning.optimizers.Optimizer):
    """A client 'optimizer' that adds 1 to every trainable weight per batch: updates we can compute by hand."""

    def initialize(self, specs):
        return ()

    def next(self, state, weights, gradients):
        return state, tf.nest.map_structure(lambda w: w + 1.0, weights)


@pytest.mark.parametrize("weighting", [tff.learning.ClientWeighting.NUM_EXAMPLES,
                                       tff.learning.ClientWeighting.UNIFORM])
def test_client_work_process_by_hand(weighting):
    """Two clients of a `ClientWorkProcess`: 8 examples (2 batches: every trained entry + 2) and 3 examples (no
    full batch: nothing trained, weight 0 either way)."""
    from tff_pipelines.round.process import batch_spec

    fm = prism_tf.factorize(round_models.dense_model(), min_rank=1)
    layout = RoundLayout.build(fm, {"hidden": 2})
    training = dataclasses.replace(PLAIN, optimizer=PlusOne())
    work = client_work.build_client_work(layout, batch_spec((5,), BATCH), training, client_weighting=weighting)
    assert isinstance(work, tff.learning.templates.ClientWorkProcess)
    assert str(work.next.type_signature) == (
        "(<state=<>@SERVER,start={<received=<rows=<>,whole=<float32[5,4],float32[4,4],float32[4],float32[4,3],"
        "float32[3]>>,assignment=<indices=<int32[2]>,scale=<float32[2]>,lr=<>>>}@CLIENTS,"
        "data={<x=float32[4,5],y=int32[4]>*}@CLIENTS> -> <state=<>@SERVER,result={<update=<uploads=<float32[5,2],"
        "float32[2,4],float32[4],float32[4,3],float32[3]>,indices=<int32[2]>,metrics=<num_examples=float32,"
        "loss_sum=float32,correct=float32>>,update_weight=float32>}@CLIENTS,measurements=<>@SERVER>)")
    server = [w.numpy() for w in prism_tf.submodel.flat_weights(fm)]
    received = Received([], [server[p] for p in layout.travelling()])
    kernels = np.array([3, 1], np.int32)
    start = ClientStart(received, ClientAssignment([kernels], [np.ones(2, np.float32)]))
    out = work.next(work.initialize(), [start, start], [_dataset(8), _dataset(3)])
    assert out.measurements == () and len(out.result) == 2
    trained, idle = out.result
    assert isinstance(trained.update, ClientUpdate) and isinstance(trained.update.metrics, ClientMetrics)
    np.testing.assert_array_equal(trained.update.indices[0], kernels)
    expected = [server[0][:, kernels], server[1][kernels, :], server[2], server[5], server[6]]
    for got, sub in zip(trained.update.uploads, expected, strict=True):
        np.testing.assert_allclose(got, sub + 2.0, rtol=0, atol=1e-6)
    for got, sub in zip(idle.update.uploads, expected, strict=True):
        np.testing.assert_array_equal(got, sub)
    assert float(trained.update.metrics.num_examples) == 8.0 and float(idle.update.metrics.num_examples) == 0.0
    assert 0 <= float(trained.update.metrics.correct) <= 8 and np.isfinite(float(trained.update.metrics.loss_sum))
    uniform = weighting is tff.learning.ClientWeighting.UNIFORM
    assert (float(trained.update_weight), float(idle.update_weight)) == ((1.0, 0.0) if uniform else (8.0, 0.0))


def test_client_training_defaults_are_the_clis_and_refuse_a_string_weighting():
    from prism_tf.federated.config import TrainConfig

    config = TrainConfig()
    default = client_work.ClientTraining()
    assert default.step_options == local_step.StepOptions(clip_norm=config.clip_norm,
                                                          frobenius_decay=config.frobenius_decay,
                                                          weight_decay=config.weight_decay)
    assert client_work.client_weighting_of(config) is tff.learning.ClientWeighting.NUM_EXAMPLES
    assert client_work.client_weighting_of(TrainConfig(weighting="uniform")) is tff.learning.ClientWeighting.UNIFORM
    assert client_work.lr_schedule_of(TrainConfig(lr_schedule="constant")) is None
    tuned = client_work.ClientTraining.of(TrainConfig(client_lr=0.3, clip_norm=None, weight_decay=0.0))
    hparams = tuned.optimizer.get_hparams(tuned.optimizer.initialize((tf.TensorSpec([1], tf.float32),)))
    assert float(hparams["learning_rate"]) == pytest.approx(0.3) and tuned.clip_norm is None
    assert (tuned.weight_decay, tuned.frobenius_decay) == (0.0, config.frobenius_decay)
    layout = RoundLayout.build(round_models.dense_model(), {})
    with pytest.raises(TypeError, match="client_weighting must be a tff.learning.ClientWeighting"):
        client_work.build_client_work(layout, tff.to_type(np.float32), default, client_weighting="examples")
