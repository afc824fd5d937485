"""A process traces its client and server computations once, not once per round (bench/speed.py relies on it).

TFF turns a computation's Python into a graph once, when the computation is built; a round then only executes that
graph. So the Python bodies — the client's sub-model training and the server step — run exactly when something is
(re)traced, and counting their calls over real rounds counts traces.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

import prism_tf
from prism_tf.federated.methods import Method
from tff_pipelines.round import client_work, process

BATCH = 4


def _tiny_model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((6, 6, 1))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)  # the first conv stays whole
    x = tf.keras.layers.Conv2D(4, 3, name="conv")(x)  # factorized: a principal conv of rank 4
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = tf.keras.layers.Flatten()(tf.keras.layers.ReLU()(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(x))


def _client_data(seed):
    rng = np.random.default_rng(seed)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.normal(size=(8, 6, 6, 1)).astype(np.float32), y=rng.integers(0, 3, 8).astype(np.int32),
    )).batch(BATCH, drop_remainder=True)


def test_three_rounds_trace_client_and_server_once(monkeypatch):
    calls = collections.Counter()

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    # Module attributes: the client computation and the finalizer look them up when they trace.
    monkeypatch.setattr(client_work, "train_submodel", counting("client", client_work.train_submodel))
    monkeypatch.setattr(prism_tf.server, "finish_round", counting("server", prism_tf.server.finish_round))
    proc = process.build_prism_process(_tiny_model, method=Method("prism", keep_ratio=0.5), batch_size=BATCH,
                                       factorize_options={"min_rank": 1})
    built = dict(calls)
    state = proc.initialize()
    per_round, rounds_seen = [], []
    for round_num in range(3):
        # New datasets and new selections every round: the same types, so the same traced computations.
        state, metrics = proc.next(state, [_client_data(10 * round_num + c) for c in range(2)], [0, round_num + 1])
        per_round.append(dict(calls))
        rounds_seen.append(proc.round_index(state))

    assert rounds_seen == [1, 2, 3] and metrics["num_examples"] == 16
    assert built == {"client": 1, "server": 1}  # traced when the process was built ...
    assert per_round == [built] * 3  # ... and never again


def test_evaluating_one_model_every_round_traces_each_mode_once():
    """A driver evaluates the same server model every round: each BatchNorm mode is traced once, not per call."""
    model = _tiny_model()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 12).astype(np.int32)
    calibration = [x[:4], x[4:8]]
    results = {norm: [prism_tf.evaluation.evaluate(model, x, y, batch_size=4, norm=norm, calibration=calibration)
                      for _ in range(6)] for norm in prism_tf.evaluation.EVAL_NORMS}
    for norm, scores in results.items():
        assert all(s == scores[0] for s in scores), norm  # the weights are restored after every evaluation
    compiled = prism_tf.evaluation._COMPILED[model]
    assert sorted(compiled) == ["batch", "calibrate", "inference"]
    assert {mode: fn.experimental_get_tracing_count() for mode, fn in compiled.items()} == {
        "batch": 1, "calibrate": 1, "inference": 1}
