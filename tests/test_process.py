"""Real TFF rounds of the PriSM process on tiny models, with numbers checked against hand computation."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from round_models import PlusOne

import prism_tf
from prism_tf.federated.methods import Method
from tff_pipelines.round import client_work, distributor
from tff_pipelines.round.layout import ClientAssignment, ClientInput
from tff_pipelines.round.process import build_prism_process

BATCH = 4


def _tiny_model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((5,))
    hidden = tf.keras.layers.Dense(4, name="hidden")(inputs)  # rank 4, factorized
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(hidden))


def _dataset(n, seed=0, shape=(5,), classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(BATCH, drop_remainder=True)


PLAIN = client_work.ClientTraining(clip_norm=None, frobenius_decay=0.0, weight_decay=0.0)  # no gradient terms


def _tiny_process(**kwargs):
    options = dict(method=Method("prism", keep_ratio=0.5), batch_size=BATCH, client_optimizer=PlusOne(),
                   client_training=PLAIN, lr_schedule=None, factorize_options={"min_rank": 1}, refactorize_every=0)
    options.update(kwargs)
    return build_prism_process(_tiny_model, **options)


@pytest.mark.parametrize("distribution", ["select", "broadcast"])
def test_per_kernel_aggregation_by_hand(distribution):
    """Two clients, overlapping kernels, 12 vs 4 examples: each kernel averaged over the clients that had it."""
    process = _tiny_process(model_distributor=distributor.named(distribution))
    layout = process.layout
    state = process.initialize()
    w0 = process.flat_weights(state)
    names = [(t.layer, t.weight) for t in layout.tensors]
    a_pos, b_pos = names.index(("hidden", "principal_kernels")), names.index(("hidden", "combination"))
    head_pos = names.index(("head", "kernel"))
    # client 1: kernels {0, 1}, 12 examples = 3 batches (+3); client 2: kernels {1, 2}, 4 examples = 1 batch (+1)
    ones = [np.ones(2, np.float32)]
    inputs = [
        ClientInput(_dataset(12), ClientAssignment([np.array([0, 1], np.int32)], ones)),
        ClientInput(_dataset(4, 1), ClientAssignment([np.array([1, 2], np.int32)], ones)),
    ]
    out = process.learning_process.next(state, inputs)
    w1 = process.flat_weights(out.state)
    expected_shift = np.array([3.0, (12 * 3 + 4 * 1) / 16, 1.0, 0.0])  # kernel 3: nobody -> unchanged
    np.testing.assert_allclose(w1[a_pos] - w0[a_pos], np.broadcast_to(expected_shift, (5, 4)), atol=1e-5)
    np.testing.assert_allclose(w1[b_pos] - w0[b_pos], np.broadcast_to(expected_shift[:, None], (4, 4)), atol=1e-5)
    np.testing.assert_allclose(w1[head_pos] - w0[head_pos], np.full((4, 3), 2.5), atol=1e-5)  # FedAvg: 40/16
    metrics = out.metrics
    assert metrics["num_examples"] == 16.0 and metrics["kernel_coverage"] == pytest.approx(0.75)
    # the same through prism_tf.aggregate (the pure function the device-ingest path uses)
    fm = process.assign_to(state, tf.keras.models.clone_model(process.server_model))
    subs = []
    for client, (shift, idx, n) in enumerate([(3.0, [0, 1], 12.0), (1.0, [1, 2], 4.0)]):
        sel = prism_tf.Selection({"hidden": prism_tf.LayerSelection(idx, [1, 1], 4)}, 0.5, "top")
        sub = prism_tf.extract(fm, sel)
        for w in sub.trainable_weights:
            w.assign_add(tf.fill(w.shape, shift))
        subs.append((sub, sel, n))
        del client
    prism_tf.aggregate(fm, subs)
    for got, want in zip(prism_tf.submodel.flat_weights(fm), w1, strict=True):
        if "singular" not in got.name:
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_select_and_broadcast_give_identical_rounds():
    results = []
    for distribution in ("select", "broadcast"):
        tf.keras.utils.set_random_seed(1)
        process = build_prism_process(lambda: prism_tf.models.small_cnn(width=4, input_shape=(8, 8, 1)),
                                      method=Method("prism", keep_ratio=0.5), batch_size=BATCH,
                                      model_distributor=distributor.named(distribution), seed=3)
        state = process.initialize()
        for _ in range(2):
            state, metrics = process.next(state, [_dataset(8, c, (8, 8, 1), 10) for c in range(3)])
        results.append((process.flat_weights(state), metrics))
    (w_sel, m_sel), (w_bc, m_bc) = results
    for a, b in zip(w_sel, w_bc, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert m_sel["loss"] == pytest.approx(m_bc["loss"], rel=1e-5)
    assert m_sel["bytes_down_per_client"] == m_bc["bytes_down_per_client"]


def test_refactorization_keeps_function_and_orthogonality():
    process = _tiny_process(refactorize_every=1, client_optimizer=tff.learning.optimizers.build_sgdm(0.1))
    state = process.initialize()
    state, metrics = process.next(state, [_dataset(8, c) for c in range(2)])
    fm = process.assign_to(state)
    layer = fm.get_layer("hidden")
    a = layer.principal_kernels.numpy()
    gram = a.T @ a
    np.testing.assert_allclose(gram, np.diag(layer.singular_values.numpy()), atol=1e-4)
    assert process.round_index(state) == 1 and np.isfinite(metrics["loss"])


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_fedavg_traffic_is_the_full_model_and_prism_is_smaller():
    shape = (8, 8, 3)
    fedavg = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape),
                                 method=Method("fedavg"), batch_size=BATCH,
                                 model_distributor=distributor.build_broadcast_distributor)
    state = fedavg.initialize()
    state, m = fedavg.next(state, [_dataset(8, c, shape, 10) for c in range(2)])
    assert m["bytes_down_per_client"] == pytest.approx(fedavg.server_model_bytes, rel=0.001)
    assert m["client_flops_per_example"] == fedavg.full_cost["flops"]
    prism = build_prism_process(lambda: prism_tf.models.resnet18(width=4, input_shape=shape),
                                method=Method("prism", keep_ratio=0.25), batch_size=BATCH)
    state = prism.initialize()
    state, m = prism.next(state, [_dataset(8, c, shape, 10) for c in range(2)])
    assert m["bytes_down_per_client"] / fedavg.server_model_bytes < 0.5
    assert m["client_flops_per_example"] / fedavg.full_cost["flops"] < 0.5
    assert 0 < m["kernel_coverage"] <= 1


def test_tier_path_equals_the_learning_process_for_one_size():
    """Heterogeneous rounds run client phases per size + one server step: with one size it is `next_fn` exactly."""
    process = _tiny_process(refactorize_every=1, client_optimizer=tff.learning.optimizers.build_sgdm(0.1))
    state = process.initialize()
    datasets = [_dataset(8, c) for c in range(3)]
    fused, fused_metrics = process.next(state, datasets)
    selections = process.selections(state, 3)
    tiered, tiered_metrics = process._next_in_tiers(state, datasets, selections, {process.layout.sizes_key: [0, 1, 2]})
    for a, b in zip(process.flat_weights(fused), process.flat_weights(tiered), strict=True):
        np.testing.assert_array_equal(a, b)  # the same parts: bit for bit
    assert tiered_metrics["loss"] == fused_metrics["loss"] and tiered_metrics["failed"] == []


def test_heterogeneous_sizes_run_in_tiers():
    shape = (8, 8, 1)
    process = build_prism_process(lambda: prism_tf.models.small_cnn(width=4, input_shape=shape),
                                  method=Method("fjord", keep_ratio=1.0), batch_size=BATCH, seed=0)
    state = process.initialize()
    sizes = {tuple(sorted(s.sizes().items()) + sorted((g, len(c)) for g, c in s.channels.items()))
             for s in process.selections(state, 6)}
    assert len(sizes) > 1  # FjORD draws different widths
    state, m = process.next(state, [_dataset(8, c, shape, 10) for c in range(6)])
    assert m["num_examples"] == 48 and np.isfinite(m["loss"])
    mixed = build_prism_process(lambda: prism_tf.models.small_cnn(width=4, input_shape=shape), batch_size=BATCH,
                                method=Method("prism", keep_mix=((0.25, 0.5), (0.5, 0.5))))
    state = mixed.initialize()
    assert len({s.sizes()["conv2_conv"] for s in mixed.selections(state, 6)}) == 2
    state, m = mixed.next(state, [_dataset(8, c, shape, 10) for c in range(6)])
    assert m["num_examples"] == 48


def test_models_still_run_after_tff_traced_a_keras_submodel():
    """Regression: building Keras models inside TFF's graph swapped Keras classes to v1 for the whole process."""
    model = prism_tf.models.small_cnn(width=4, input_shape=(8, 8, 1))
    x = np.zeros((2, 8, 8, 1), np.float32)
    model(x)
    process = build_prism_process(lambda: prism_tf.models.small_cnn(width=4, input_shape=(8, 8, 1)),
                                  batch_size=BATCH, model_distributor=distributor.build_broadcast_distributor)
    assert model(x).shape == (2, 10)
    assert process.server_model(x).shape == (2, 10)


def test_odd_batch_sizes_are_refused_while_onednn_is_on(monkeypatch):
    from tff_pipelines.round.process import check_batch_size

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    with pytest.raises(ValueError, match="batch size 25 is odd.*TF_ENABLE_ONEDNN_OPTS=0"):
        check_batch_size(25)
    check_batch_size(24)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    check_batch_size(25)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        check_batch_size(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="distribution must be one of .*'carrier-pigeon'"):
        distributor.named("carrier-pigeon")
    with pytest.raises(TypeError, match="model_distributor must be a function"):
        _tiny_process(model_distributor="select")
    with pytest.raises(TypeError, match="method must be a prism_tf.federated.methods.Method"):
        _tiny_process(method="prism")
    with pytest.raises(TypeError, match="client_weighting must be a tff.learning.ClientWeighting"):
        _tiny_process(client_weighting="uniform")
    with pytest.raises(ValueError, match="unknown method"):
        Method("fedprox")
    with pytest.raises(ValueError, match="keep_ratio"):
        Method("prism", keep_ratio=0)


def test_the_server_optimizer_reaches_the_finalizer():
    """(Its arithmetic, on the rebuilt kernels: tests/test_finalizer.py.)"""
    process = _tiny_process(refactorize_every=1, server_optimizer=tff.learning.optimizers.build_sgdm(0.5))
    state = process.initialize()
    assert float(state["optimizer_state"]["learning_rate"]) == 0.5
    state, _ = process.next(state, [_dataset(8, c) for c in range(2)])
    assert process.round_index(state) == 1 and float(state["optimizer_state"]["learning_rate"]) == 0.5
    with pytest.raises(ValueError, match="refactorize_every=1"):
        _tiny_process(refactorize_every=2, server_optimizer=tff.learning.optimizers.build_sgdm(1.0))


def test_next_uses_the_learning_rate_of_the_current_round():
    """`next` passes the round number: a cosine schedule to 0 over 2 rounds trains in round 1, freezes in round 2."""
    from prism_tf.federated.recipe import Schedule

    process = build_prism_process(_tiny_model, tff.learning.optimizers.build_sgdm(0.05), method=Method("fedavg"),
                                  batch_size=BATCH, client_training=PLAIN, lr_schedule=Schedule("cosine", 0.3, 0.0, 2))
    state = process.initialize()
    data = [_dataset(8, seed=1), _dataset(8, seed=2)]
    start = process.flat_weights(state)
    state, _ = process.next(state, data)
    after_one = process.flat_weights(state)
    state, _ = process.next(state, data)
    after_two = process.flat_weights(state)
    assert max(float(np.abs(a - b).max()) for a, b in zip(start, after_one, strict=True)) > 1e-3
    for a, b in zip(after_one, after_two, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_model_weights_are_tffs_model_weights_and_flat_weights_the_server_models():
    process = _tiny_process()
    state = process.initialize()
    ours, tffs = process.get_model_weights(state), process.learning_process.get_model_weights(state)
    assert isinstance(ours, tff.learning.models.ModelWeights) and isinstance(tffs, tff.learning.models.ModelWeights)
    for mine, theirs in [(ours.trainable, tffs.trainable), (ours.non_trainable, tffs.non_trainable)]:
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    # ModelWeights fits Keras: assign_weights_to writes exactly what assign_to (flat order) writes
    by_tff = tf.keras.models.clone_model(process.server_model)
    ours.assign_weights_to(by_tff)
    by_flat = process.assign_to(state, tf.keras.models.clone_model(process.server_model))
    for a, b in zip(by_tff.get_weights(), by_flat.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    flat = process.flat_weights(state)
    assert [w.shape for w in flat] == [tuple(t.shape) for t in process.layout.tensors]
    doubled = tff.learning.models.ModelWeights([2 * w for w in ours.trainable], list(ours.non_trainable))
    for new_state in (process.set_model_weights(state, doubled),
                      process.learning_process.set_model_weights(state, doubled)):
        for w, old, trainable in zip(process.flat_weights(new_state), flat, process.layout.trainable, strict=True):
            np.testing.assert_array_equal(w, 2 * old if trainable else old)
        assert process.round_index(new_state) == 0
    with pytest.raises(ValueError, match=r"expected ModelWeights with \d+ trainable and \d+ non-trainable arrays"):
        process.set_model_weights(state, tff.learning.models.ModelWeights(flat, []))
    with pytest.raises(ValueError, match=r"weight 0 \(hidden/principal_kernels\) has shape \(2,\), the server model"):
        process.set_flat_weights(state, [np.zeros(2, np.float32)] + flat[1:])


def test_the_parts_are_tff_templates_that_tffs_composer_cannot_chain():
    """docs/design.md, "The round as TFF templates": the parts are TFF's template processes (the distributor with
    one more argument), and `compose_learning_process` cannot take them, for the two reasons the design names."""
    process = _tiny_process()
    distribute, work, aggregate = process.parts(process.layout.sizes_key)
    assert isinstance(distribute, distributor.SubmodelDistributionProcess)
    assert isinstance(work, tff.learning.templates.ClientWorkProcess)
    assert isinstance(aggregate, tff.templates.AggregationProcess) and aggregate.is_weighted
    assert isinstance(process.finalizer, tff.learning.templates.FinalizerProcess)
    assert len(distribute.next.type_signature.parameter) == 3  # <state, weights@SERVER, assignments@CLIENTS>
    initial = process.initial_model_weights
    # 1. the composer takes a DistributionProcess, whose next has no CLIENTS argument to key federated_select
    with pytest.raises(TypeError, match="DistributionProcess"):
        tff.learning.templates.compose_learning_process(initial, distribute, work, aggregate, process.finalizer)
    # 2. the composer's client data is client work's third argument, which must be sequences only: the process's
    #    client inputs carry index vectors, ω and the learning rate
    client_type = process.learning_process.next.type_signature.parameter[1]

    @tff.federated_computation(work.initialize.type_signature.result, work.next.type_signature.parameter[1],
                               client_type)
    def next_with_client_inputs(state, start, clients):
        return work.next(state, start, clients.data)

    with pytest.raises(TypeError, match="third input argument of `next_fn` must be a sequence"):  # ClientDataTypeError
        tff.learning.templates.ClientWorkProcess(work.initialize, next_with_client_inputs)


def test_defaults_are_the_clis():
    """`build_prism_process`'s and `ClientTraining`'s defaults are `TrainConfig`'s, through the driver's mapping."""
    from prism_tf.federated.config import TrainConfig
    from prism_tf.federated.recipe import Schedule

    config = TrainConfig()
    process = build_prism_process(_tiny_model, factorize_options={"min_rank": 1})
    assert process.lr_schedule == client_work.lr_schedule_of(config) == Schedule("cosine", 0.1, 1e-4, 10)
    expected = client_work.ClientTraining.of(config)
    for training in (process.training, client_work.ClientTraining()):
        assert (training.clip_norm, training.clip_lr_tau, training.frobenius_decay, training.weight_decay) == (
            expected.clip_norm, expected.clip_lr_tau, expected.frobenius_decay, expected.weight_decay) == (
            5.0, 10.0, 2e-4, 5e-4)
        state = training.optimizer.initialize((tf.TensorSpec([1], tf.float32),))
        hparams = training.optimizer.get_hparams(state)
        assert (float(hparams["learning_rate"]), float(hparams["momentum"])) == pytest.approx((0.1, 0.9))
    assert process.training.round_lr
    assert process.model_distributor is distributor.build_select_distributor
    assert process.client_weighting is tff.learning.ClientWeighting.NUM_EXAMPLES
    assert (process.seed, process.min_clients, process.refactorize_every) == (0, 1, 1)
    assert process.method.spectral and process.element_type.x.shape == (32, 5)
