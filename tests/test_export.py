"""A round with phones in it, end to end: export, train in LiteRT without TensorFlow, ingest, finish, compare.

Two copies of the same finished 2-round run (`tiny_run`, extended to 3 rounds) play round 3 two ways:
- **devices**: each of the round's clients gets its exported sub-model (`export.client`), trains it in a
  subprocess that imports only numpy and LiteRT (`export.device`) on exactly the batches the simulated client
  would see, and its weights come back through `export.ingest`; `export.ingest.finish_round` ends the round;
- **TFF**: ``resume`` runs round 3 in the TFF process.
The two checkpoints agree to float32 round-off of a few SGD steps. The same exports also check `infer` against
the Keras sub-model and every refusal of `ingest`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import max_weight_difference
from phone_round import copy_run, play_phone_round

import prism_tf
from export import ingest as ingest_lib
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver

ROUND = 3
# About 3 minutes on 2 cores (exports, LiteRT subprocesses, two TFF rounds): `make test-all` runs it, keeping the
# default suite under 15 minutes; tests/test_replay.py keeps the pure path against a TFF round in the default.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_round(tiny_run, tmp_path_factory):
    return play_phone_round(tiny_run, tmp_path_factory.mktemp("export"), ROUND)


def test_phones_train_without_tensorflow_on_the_simulated_batches(device_round):
    """Each phone's first loss is the Keras sub-model's training-mode loss on its first batch at the round's
    weights: the device trained the right model on the right data (the loss falling over many steps is
    tests/test_tflite_train.py's)."""
    import tensorflow as tf

    replay = device_round["replay"]
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for client, report in device_round["reports"].items():
        assert report["tensorflow"] is False
        assert report["steps"] >= 4 and all(np.isfinite(report["losses"]))
        with np.load(device_round["base"] / f"data_{client}.npz") as data:
            x, y = data["x"][0], data["y"][0]
        sub = prism_tf.extract(replay.server_model, replay.selection(client))
        expected = float(loss_fn(y, sub(x, training=True)))
        assert report["losses"][0] == pytest.approx(expected, abs=1e-4)


def test_a_round_with_phones_equals_the_same_round_in_tff(device_round):
    replay = device_round["replay"]
    n = len(replay.plan.tensors)
    phones = RunDir(device_round["device_run"]).read_checkpoint(ROUND)[0][:n]
    tff = RunDir(device_round["tff_run"]).read_checkpoint(ROUND)[0][:n]
    worst = max_weight_difference(replay.plan, phones, tff)
    # Both sides run the same float32 step (same data, order, lr, momentum, decays, clip); they differ in op order
    # (LiteRT's patch-matmul filter gradients against TensorFlow's conv backprop): round-off amplified over a few
    # momentum steps through BatchNorm stays around 1e-5 of weights of magnitude ~1.
    print(f"round with phones vs TFF round: max abs difference {worst:.2e}")
    assert worst < 1e-3, worst
    metrics = RunDir(device_round["device_run"]).read_metrics()
    assert metrics[-1]["round"] == ROUND and metrics[-1]["finished_by"] == "export finish-round"
    assert device_round["finished"].clients == device_round["clients"]


def test_tff_reads_the_checkpoint_of_a_round_finished_by_phones(device_round):
    """TFF's own checkpoint manager loads what `finish_round` wrote, as the latest round, and so does the run's
    `load_state` (what `resume` uses)."""
    import asyncio

    import tensorflow_federated as tff

    run = RunDir(device_round["device_run"])
    flat, _ = run.read_checkpoint(ROUND)
    template = [np.zeros_like(w) for w in flat]
    manager = tff.program.FileProgramStateManager(str(run.checkpoint_dir), keep_total=3, keep_first=False)
    assert asyncio.run(manager.get_versions())[-1] == ROUND
    for loaded in (asyncio.run(manager.load(ROUND, template)), run.load_state(template)[0]):
        for a, b in zip(loaded, flat, strict=True):
            np.testing.assert_array_equal(a, b)


def test_infer_equals_the_keras_submodel(device_round):
    from ai_edge_litert.interpreter import Interpreter

    replay = device_round["replay"]
    client = device_round["clients"][0]
    sub = prism_tf.extract(replay.server_model, replay.selection(client))
    x = np.random.default_rng(0).normal(size=(4, *replay.input_shape)).astype(np.float32)
    interpreter = Interpreter(model_path=str(Path(device_round["exports"][client].directory) / "model.tflite"))
    logits = interpreter.get_signature_runner("infer")(x=x)["logits"]
    np.testing.assert_allclose(logits, sub(x, training=False).numpy(), atol=1e-4)


def test_ingest_refuses_what_does_not_belong_and_changes_nothing(device_round, tmp_path):
    base, device_run = device_round["base"], device_round["device_run"]
    client = device_round["clients"][0]
    export_dir = Path(device_round["exports"][client].directory)
    trained = base / f"trained_{client}.npz"
    stored_before = sorted(p.name for p in (device_run / "device_updates").rglob("*"))

    def expect(match, client_dir=export_dir, weights=trained, run=device_run, examples=8.0):
        with pytest.raises(ingest_lib.IngestError, match=match):
            ingest_lib.ingest(run, client_dir, weights, examples=examples)

    expect("round 3, but the run's open round is 4: that round is finished")  # the round is over

    # A fresh copy whose round 3 is open again: everything else must be refused there too.
    open_run = copy_run(device_round["tff_run"], tmp_path / "open", ROUND)
    shutil.rmtree(open_run / "checkpoints" / f"program_state_{ROUND}")
    (open_run / "run_id").write_text((device_run / "run_id").read_text())

    def tampered(**changes) -> Path:
        directory = tmp_path / f"tampered_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(export_dir, directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest.update(changes)
        (directory / "manifest.json").write_text(json.dumps(manifest))
        return directory

    def weights_with(**changes) -> Path:
        with np.load(trained) as data:
            arrays = {k: data[k] for k in data.files}
        for key, value in changes.items():
            if value is None:
                arrays.pop(key)
            else:
                arrays[key] = value
        path = tmp_path / f"weights_{len(list(tmp_path.iterdir()))}.npz"
        np.savez(path, **arrays)
        return path

    names = [w["name"] for w in json.loads((export_dir / "manifest.json").read_text())["weights"]]
    first = np.load(trained)[names[0]]
    other = next(c for c in range(4) if c != client)
    expect("belongs to run", client_dir=tampered(run_id="0" * 32), run=open_run)
    expect("round 2, but the run's open round is 3", client_dir=tampered(round=2), run=open_run)
    expect(f"not client {other}'s selection", client_dir=tampered(client=other), run=open_run)
    expect("other server weights", client_dir=tampered(server_weights_sha256="f" * 64), run=open_run)
    expect("missing", weights=weights_with(**{names[0]: None}), run=open_run)
    expect("unexpected extra", weights=weights_with(extra=np.zeros(3, np.float32)), run=open_run)
    expect("has shape", weights=weights_with(**{names[0]: first.reshape(-1)}), run=open_run)
    expect("has dtype", weights=weights_with(**{names[0]: first.astype(np.float64)}), run=open_run)
    expect("non-finite", weights=weights_with(**{names[0]: np.full_like(first, np.nan)}), run=open_run)
    expect("--examples", run=open_run, examples=None)
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"not a zip")
    expect("not a readable .npz", weights=bad, run=open_run)
    assert not (open_run / "device_updates").exists()
    assert sorted(p.name for p in (device_run / "device_updates").rglob("*")) == stored_before


def test_an_update_changes_only_the_entries_its_selection_holds(device_round):
    replay = device_round["replay"]
    client = device_round["clients"][0]
    updates = ingest_lib.stored_updates(RunDir(device_round["device_run"]), ROUND)
    values, selection = next((v, s) for c, v, s, _ in updates if c == client)
    accumulator = prism_tf.server.Accumulator(replay.plan)
    accumulator.add(values, selection, 1.0)
    averaged = accumulator.average(replay.weights)
    indices = selection.indices()
    for position, tensor in enumerate(replay.plan.tensors):
        if not tensor.travels:
            continue
        covered = prism_tf.slicing.coverage(replay.plan.slices(tensor, indices), tensor.shape).numpy() > 0
        changed = averaged[position] != replay.weights[position]
        assert not np.any(changed & ~covered), (tensor.layer, tensor.weight)


def test_a_round_mixing_phones_and_simulated_clients_equals_the_tff_round(device_round, tmp_path):
    """`resume` finishes an open round whose first client trained on a phone and whose others TFF simulates."""
    mixed = copy_run(device_round["tff_run"], tmp_path / "mixed", ROUND)
    shutil.rmtree(mixed / "checkpoints" / f"program_state_{ROUND}")
    RunDir(mixed).truncate_metrics(ROUND - 1)
    (mixed / "run_id").write_text((device_round["device_run"] / "run_id").read_text())
    phone = device_round["clients"][0]
    ingest_lib.ingest(mixed, device_round["exports"][phone].directory, device_round["base"] / f"trained_{phone}.npz",
                      examples=device_round["reports"][phone]["examples"])
    driver.resume(str(mixed), rounds=ROUND)
    replay = device_round["replay"]
    n = len(replay.plan.tensors)
    ours = RunDir(mixed).read_checkpoint(ROUND)[0][:n]
    tff = RunDir(device_round["tff_run"]).read_checkpoint(ROUND)[0][:n]
    worst = max_weight_difference(replay.plan, ours, tff)
    print(f"mixed round vs TFF round: max abs difference {worst:.2e}")
    assert worst < 1e-4, worst
    row = RunDir(mixed).read_metrics()[-1]
    assert row["round"] == ROUND and row["clients"] == len(device_round["clients"])
