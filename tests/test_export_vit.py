"""A ViT round with phones in it equals the TFF round (docs/export.md, "Client sub-models"): the steps of the golden
phone round (tests/golden/runs.py `export_round`) on a ViT run.

A finished 2-round PriSM run of the zoo ViT (`prism_tf.models.zoo.vit`, width 16, LayerNorm, its MLPs factorized;
4 clients, 2 per round) is copied twice and round 3 is played two ways:
- **devices**: each client's sub-model is exported (`export.client`, builtins runtime), trained in a subprocess that
  imports only numpy and LiteRT (`export.device`) on exactly the batches the simulated client would see, ingested
  (`export.ingest`), and `finish_round` ends the round; the round's model is then exported as Keras;
- **TFF**: ``resume`` runs round 3 in the TFF process.
The server weights agree to float32 round-off, as for ResNet-18 (tests/test_export.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import max_weight_difference
from phone_round import play_phone_round

import prism_tf
from export.model import export_model
from export.tflite import model_ops
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver

ROUND = 3
pytestmark = pytest.mark.slow  # a ViT run, two exports and LiteRT subprocesses, two TFF rounds: about 4 minutes


@pytest.fixture(scope="module")
def vit_round(shapes_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("export_vit")
    config = driver.TrainConfig(dataset=str(shapes_dataset), model="vit", norm="layer", width=16, clients=4,
                                clients_per_round=2, rounds=2, batch_size=8, eval_examples=12, eval_every=2,
                                calibration_examples=16, lr_schedule="constant")
    driver.start(config, str(base / "run"))
    played = play_phone_round(base / "run", base, ROUND)
    played["model"] = export_model(played["device_run"], base / "round3.keras", round_num=ROUND, eval_examples=0)
    return played


def test_vit_phones_train_with_litert_builtins_only(vit_round):
    for client, export in vit_round["exports"].items():
        ops = model_ops((Path(export.directory) / "model.tflite").read_bytes())
        assert {"BATCH_MATMUL", "SOFTMAX", "GELU"} <= set(ops), ops
        assert not [op for op in ops if op.startswith("Flex")], ops
        report = vit_round["reports"][client]
        assert report["tensorflow"] is False and report["steps"] >= 4 and all(np.isfinite(report["losses"]))


def test_a_vit_round_with_phones_equals_the_same_round_in_tff(vit_round):
    replay = vit_round["replay"]
    factorized = [layer.name for layer in prism_tf.kinds.principal_layers(replay.server_model)]
    assert factorized and all("mlp" in name for name in factorized), factorized
    n = len(replay.plan.tensors)
    phones = RunDir(vit_round["device_run"]).read_checkpoint(ROUND)[0][:n]
    tff = RunDir(vit_round["tff_run"]).read_checkpoint(ROUND)[0][:n]
    worst = max_weight_difference(replay.plan, phones, tff)
    moved = max_weight_difference(replay.plan, replay.weights, tff)
    print(f"ViT round with phones vs TFF round: max abs difference {worst:.2e} (the round moved weights by up to "
          f"{moved:.2e})")
    assert moved > 1e-3
    assert worst < 1e-3, worst  # tests/test_export.py's tolerance for ResNet-18
    metrics = RunDir(vit_round["device_run"]).read_metrics()
    assert metrics[-1]["round"] == ROUND and metrics[-1]["finished_by"] == "export finish-round"
    assert vit_round["finished"].clients == vit_round["clients"]


def test_the_vit_after_the_phone_round_exports_and_predicts(vit_round):
    import tensorflow as tf

    model = tf.keras.models.load_model(vit_round["model"].path, compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (4, *vit_round["replay"].input_shape)).astype(np.float32)
    logits = model(x, training=False).numpy()
    assert logits.shape == (4, vit_round["replay"].num_classes) and np.all(np.isfinite(logits))
