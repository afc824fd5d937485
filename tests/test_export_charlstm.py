"""A charlstm round with phones in it equals the TFF round (docs/export.md, "Client sub-models"): the steps of
tests/test_export_vit.py on a next-character LSTM run (labels ``[N, T]``, the loss averaged over every position).

A finished 2-round PriSM run of the zoo charlstm (`prism_tf.models.zoo.charlstm`, width 8, both LSTMs and the
embedding factorized) on ``python_source`` (3 stdlib modules, one client each; windows of 16 characters) is copied
twice and round 3 is played two ways: each client's sub-model exported (builtins runtime: the LSTMs unrolled over
the 16 steps), trained in a numpy + LiteRT subprocess (`export.device`) on the batches the simulated client would
see, ingested and finished; and ``resume`` in TFF. The server weights agree to float32 round-off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import max_weight_difference
from phone_round import play_phone_round
from test_export_vit import ROUND

import prism_tf
from export.tflite import model_ops
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver

STEPS = 16
pytestmark = pytest.mark.slow  # a charlstm run, two exports and LiteRT subprocesses, two TFF rounds


@pytest.fixture(scope="module")
def charlstm_round(tmp_path_factory):
    base = tmp_path_factory.mktemp("export_charlstm")
    config = driver.TrainConfig(dataset="python_source", model="charlstm", partition="natural", width=8, clients=3,
                                clients_per_round=2, rounds=2, batch_size=8, eval_examples=24,
                                examples_per_client=24, sequence_length=STEPS, calibration_examples=16,
                                lr_schedule="constant")
    driver.start(config, str(base / "run"))
    return play_phone_round(base / "run", base, ROUND)


def test_charlstm_phones_train_with_litert_builtins_only(charlstm_round):
    for client, export in charlstm_round["exports"].items():
        ops = model_ops((Path(export.directory) / "model.tflite").read_bytes())
        assert {"UNPACK", "PACK", "LOGISTIC", "TANH", "GATHER"} <= set(ops), ops
        assert not [op for op in ops if op.startswith("Flex")], ops
        assert export.manifest["label"]["shape"] == [STEPS]
        report = charlstm_round["reports"][client]
        assert report["tensorflow"] is False and report["steps"] >= 2 and all(np.isfinite(report["losses"]))
        assert report["examples"] == report["steps"] * 8  # a window of 16 characters is one example


def test_a_charlstm_round_with_phones_equals_the_same_round_in_tff(charlstm_round):
    replay = charlstm_round["replay"]
    factorized = {type(layer).__name__ for layer in prism_tf.kinds.principal_layers(replay.server_model)}
    assert "PrincipalLSTM" in factorized, factorized
    n = len(replay.plan.tensors)
    phones = RunDir(charlstm_round["device_run"]).read_checkpoint(ROUND)[0][:n]
    tff = RunDir(charlstm_round["tff_run"]).read_checkpoint(ROUND)[0][:n]
    worst = max_weight_difference(replay.plan, phones, tff)
    moved = max_weight_difference(replay.plan, replay.weights, tff)
    print(f"charlstm round with phones vs TFF round: max abs difference {worst:.2e} (the round moved weights by up "
          f"to {moved:.2e})")
    assert moved > 1e-3
    assert worst < 1e-5, worst  # measured 1.2e-7
    metrics = RunDir(charlstm_round["device_run"]).read_metrics()
    assert metrics[-1]["round"] == ROUND and metrics[-1]["finished_by"] == "export finish-round"
    assert charlstm_round["finished"].clients == charlstm_round["clients"]
