"""Faulty clients in real TFF rounds: a NaN/Inf update or a raising client is dropped, counted, and harmless.

docs/design.md, "Faulty clients": the aggregation zeroes a non-finite client's values, weight and count; a client
whose training raises is found by re-running the round one client at a time; a round with fewer than
``min_clients`` good clients keeps the server state (its round counter advances).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from conftest import max_weight_difference

from prism_tf.federated.methods import Method
from tff_pipelines.round import client_work
from tff_pipelines.round.layout import ClientAssignment, ClientInput
from tff_pipelines.round.process import build_prism_process

BATCH = 4
LR = 0.1


def _tiny_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((5,))
    hidden = tf.keras.layers.Dense(4, name="hidden")(inputs)  # rank 4, factorized: 4 principal kernels
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(hidden))


def _dataset(n: int, seed: int, *, nan_pixel: bool = False) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    if nan_pixel:
        x[n // 2, 3] = np.nan  # one bad value in one example: its batch's loss and gradients turn NaN
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(BATCH, drop_remainder=True)


def _corrupt_images(n: int) -> tf.data.Dataset:
    """A client whose image files are corrupt: decoding raises inside its training (InvalidArgumentError)."""
    blobs = tf.data.Dataset.from_tensor_slices([b"\x89PNG\r\n\x1a\n truncated"] * n)

    def decode(blob):
        image = tf.cast(tf.io.decode_png(blob, channels=1), tf.float32)
        return collections.OrderedDict(x=tf.reshape(image[:1, :5, 0], [5]), y=tf.constant(0, tf.int32))

    return blobs.map(decode).batch(BATCH, drop_remainder=True)


@pytest.fixture(scope="module")
def process():
    """The PriSM process on the tiny model: SGD clients, the round's learning rate in each client's input (so one
    client can get a huge one) and no re-factorization (entries stay comparable one by one)."""
    return build_prism_process(_tiny_model, tff.learning.optimizers.build_sgdm(LR),
                               method=Method("prism", keep_ratio=0.5), batch_size=BATCH,
                               client_training=client_work.ClientTraining(clip_norm=None, frobenius_decay=0.0,
                                                                          weight_decay=0.0),
                               lr_schedule=lambda round_index: LR, factorize_options={"min_rank": 1},
                               refactorize_every=0)


def _input(data, kernels, lr=LR):
    return ClientInput(data, ClientAssignment([np.array(kernels, np.int32)], [np.ones(2, np.float32)], np.float32(lr)))


@pytest.mark.parametrize("fault", ["nan_pixel", "huge_lr"])
def test_a_non_finite_client_contributes_nothing(process, fault):
    """Good client: kernels {0, 1}; faulty client: kernels {1, 2}. The round equals the good client's round alone:
    kernel 1 is its average, kernel 2 (only the faulty client had it) and kernel 3 (nobody) keep their values."""
    state = process.initialize()
    w0 = process.flat_weights(state)
    good = _input(_dataset(12, 0), [0, 1])
    bad = (_input(_dataset(8, 1, nan_pixel=True), [1, 2]) if fault == "nan_pixel"
           else _input(_dataset(8, 1), [1, 2], lr=1e38))  # overflows to Inf, then NaN, within two steps
    alone = process.learning_process.next(state, [good])
    faulty = process.learning_process.next(state, [good, bad])
    w_alone, w_faulty = process.flat_weights(alone.state), process.flat_weights(faulty.state)
    for a, b in zip(w_alone, w_faulty, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        assert np.all(np.isfinite(b))
    names = [(t.layer, t.weight) for t in process.layout.tensors]
    a_pos, b_pos = names.index(("hidden", "principal_kernels")), names.index(("hidden", "combination"))
    np.testing.assert_array_equal(w_faulty[a_pos][:, 2:], w0[a_pos][:, 2:])
    np.testing.assert_array_equal(w_faulty[b_pos][2:], w0[b_pos][2:])
    assert not np.allclose(w_faulty[a_pos][:, :2], w0[a_pos][:, :2])  # the good client did train
    assert faulty.metrics["clients_dropped"] == 1 and faulty.metrics["clients_trained"] == 1
    assert alone.metrics["clients_dropped"] == 0
    assert faulty.metrics["num_examples"] == 12
    assert faulty.metrics["loss"] == pytest.approx(alone.metrics["loss"], rel=1e-6)
    assert faulty.metrics["kernel_coverage"] == pytest.approx(0.5)  # kernels 0 and 1 of 4


def test_a_raising_client_is_dropped_and_the_round_equals_the_round_without_it(process):
    state = process.initialize()
    without, m_without = process.next(state, [_dataset(8, 0), _dataset(8, 2)], [0, 2])
    datasets = [_dataset(8, 0), _corrupt_images(8), _dataset(8, 2)]
    with_fault, metrics = process.next(state, datasets, [0, 1, 2])
    assert max_weight_difference(process.plan, process.flat_weights(with_fault),
                                 process.flat_weights(without)) < 1e-6
    assert metrics["clients_dropped"] == 1 and metrics["failed_clients"] == [1] and not metrics["skipped"]
    assert "png" in metrics["failure"].lower()  # the client's own error, for the console
    assert m_without["clients_dropped"] == 0 and m_without["failed_clients"] == [] and m_without["failure"] is None
    assert metrics["num_examples"] == m_without["num_examples"] == 16
    assert metrics["loss"] == pytest.approx(m_without["loss"], rel=1e-6)
    assert metrics["clients"] == 3  # the faulty client was sampled and sent its sub-model (traffic counts it)
    again, _ = process.next(state, datasets, [0, 1, 2])  # the isolation re-run is deterministic
    for a, b in zip(process.flat_weights(again), process.flat_weights(with_fault), strict=True):
        np.testing.assert_array_equal(a, b)
    assert process.round_index(with_fault) == 1


def test_too_few_good_clients_keep_the_state_bit_identical(process):
    state = process.initialize()
    trained, _ = process.next(state, [_dataset(8, 0)], [0])
    process.min_clients = 3
    try:
        skipped, metrics = process.next(trained, [_dataset(8, 0), _dataset(8, 1, nan_pixel=True), _dataset(8, 2)],
                                        [0, 1, 2])
    finally:
        process.min_clients = 1
    for a, b in zip(process.flat_weights(skipped), process.flat_weights(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    assert process.round_index(skipped) == process.round_index(trained) + 1
    assert metrics["skipped"] and metrics["clients_dropped"] == 1 and metrics["kernel_coverage"] == 0.0
    assert "2 of 3 clients" in metrics["skip_reason"] and "min_clients=3" in metrics["skip_reason"]
    # every client faulty: nothing to average even at the default min_clients=1
    nothing, metrics = process.next(trained, [_dataset(8, 1, nan_pixel=True)], [1])
    assert metrics["skipped"] and metrics["clients_dropped"] == 1 and np.isnan(metrics["loss"])
    for a, b in zip(process.flat_weights(nothing), process.flat_weights(trained), strict=True):
        np.testing.assert_array_equal(a, b)


def test_min_clients_is_checked():
    from prism_tf.federated.config import TrainConfig

    with pytest.raises(ValueError, match=r"--min-clients \(3\) exceeds --clients-per-round \(2\)"):
        TrainConfig(clients=4, clients_per_round=2, min_clients=3).validate()
    with pytest.raises(ValueError, match="--min-clients must be >= 1"):
        TrainConfig(min_clients=0).validate()
    with pytest.raises(ValueError, match="min_clients must be an integer >= 1"):
        build_prism_process(_tiny_model, min_clients=0)


@pytest.mark.slow  # a whole run: tracing small_cnn's client work and two rounds, ~25 s idle (50 s loaded)
def test_a_run_counts_drops_and_skips_in_its_metrics_checkpoints_and_console(shapes_dataset, tmp_path, monkeypatch,
                                                                              capsys):
    """A real 2-round run whose client data is made faulty (the rest is untouched): round 1 has a client whose
    preprocessing raises, round 2 two clients with NaN inputs and --min-clients 2, so round 2 is skipped."""
    from prism_tf.federated.replay import RoundReplay
    from prism_tf.federated.rundir import RunDir
    from tff_pipelines.program import driver

    original = driver.Simulation.client_datasets

    def faulty(self, round_index, clients=None):
        datasets = original(self, round_index, clients)
        if round_index == 0:
            datasets[0] = datasets[0].map(lambda e: collections.OrderedDict(
                x=tf.debugging.check_numerics(e["x"] * np.nan, "client data failed its check"), y=e["y"]))
        else:
            datasets[:2] = [ds.map(lambda e: collections.OrderedDict(x=e["x"] * np.nan, y=e["y"]))
                            for ds in datasets[:2]]
        return datasets

    monkeypatch.setattr(driver.Simulation, "client_datasets", faulty)
    config = driver.TrainConfig(dataset=str(shapes_dataset), model="small_cnn", width=4, clients=4,
                                clients_per_round=3, min_clients=2, rounds=2, batch_size=8, eval_examples=12,
                                eval_every=2, eval_norm="moving", local_epochs=1, distribution="broadcast",
                                augment="none")
    out = tmp_path / "run"
    summary = driver.start(config, str(out))
    run = RunDir(out)
    rows = run.read_metrics()
    first = driver.round_clients(config, 0)[0]
    assert [r["clients_dropped"] for r in rows] == [1, 2]
    assert rows[0]["failed_clients"] == [first] and not rows[0]["skipped"] and rows[0]["skip_reason"] is None
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["kernel_coverage"] > 0
    assert rows[1]["skipped"] and rows[1]["failed_clients"] == []
    assert "1 of 3 clients" in rows[1]["skip_reason"] and "min_clients=2" in rows[1]["skip_reason"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["skipped"] is True
    (after_1, _), (after_2, _) = run.read_checkpoint(1), run.read_checkpoint(2)
    assert len(after_1) == len(after_2)
    for a, b in zip(after_1, after_2, strict=True):  # weights bit-identical; only the round counter moved
        if a.shape == () and a.dtype == np.int64:
            assert (int(a), int(b)) == (1, 2)
        else:
            np.testing.assert_array_equal(a, b)
    assert summary["clients_dropped"] == 3 and summary["rounds_skipped"] == 1
    replay = RoundReplay(out)  # what export and resume start from: round 3, from the unchanged weights
    assert replay.round_num == 3
    for a, b in zip(replay.weights, after_1[:len(replay.weights)], strict=True):
        np.testing.assert_array_equal(a, b)
    printed = capsys.readouterr().out
    assert (f"round 1: client(s) {first} failed in training and were dropped (first error: client data failed its "
            "check") in printed
    assert "round 2: 2 client(s) sent a non-finite (NaN/Inf) update and were dropped" in printed
    assert "round 2: round skipped: 1 of 3 clients delivered a usable update" in printed
