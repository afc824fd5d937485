"""export.ingest: a device's update checked, stored through `RunDir` and aggregated into the round's checkpoint.

The run here is written without TFF or training: its config, data spec and budget, with round 1 open (round 1
starts from the seeded initial model, which round replay rebuilds). Its round is exported (`export.client.
client_round`: manifest and weights, no TFLite), "trained" by changing the weights, ingested and finished; every
file is read back through `RunDir` and compared exactly with the server step run by hand. Refusals change nothing
on disk (tests/test_bad_input.py has the table of every refusal through the CLI).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import prism_tf
from export import ingest as ingest_lib
from export.client import client_round
from prism_tf.federated.config import TrainConfig, client_budget
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir

SHAPE, CLASSES = (8, 8, 1), 3


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A PriSM run of small_cnn whose round 1 is open, with its run id (as `export client` leaves it)."""
    out = tmp_path_factory.mktemp("ingest") / "run"
    config = TrainConfig(model="small_cnn", width=4, clients=4, clients_per_round=2, rounds=2, batch_size=8,
                         keep_ratio=0.5, seed=5)
    run = RunDir(out)
    run.write_config(dataclasses.asdict(config), overwrite=False)
    run.write_data_spec(SHAPE, CLASSES)
    run.write_budget(client_budget(config, SHAPE, CLASSES)[2])
    run.run_id()
    return out


@pytest.fixture
def exported(base_run, tmp_path):
    """A fresh copy of the run; client ``c``'s round-1 manifest, and its "trained" upload (weights + 0.125·k)."""
    import shutil

    run = Path(shutil.copytree(base_run, tmp_path / "run"))
    replay = RoundReplay(run)
    client = replay.clients()[0]
    sent = client_round(replay, client)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "manifest.json").write_text(json.dumps(sent.manifest))
    trained = {name: (value + np.float32(0.125 * k)).astype(value.dtype)
               for k, (name, value) in enumerate(sent.weights.items())}
    upload = tmp_path / "upload.npz"
    np.savez(upload, **trained)
    return dict(run=run, replay=replay, client=client, client_dir=client_dir, upload=upload, trained=trained,
                manifest=sent.manifest)


def test_an_update_is_stored_through_the_run_directory_and_finishes_the_round(exported):
    run, client = RunDir(exported["run"]), exported["client"]
    assert run.open_round() == 1 and exported["manifest"]["round"] == 1
    accepted = ingest_lib.ingest(exported["run"], exported["client_dir"], exported["upload"], examples=8)
    assert (accepted.round, accepted.client, accepted.examples) == (1, client, 8.0)
    assert accepted.path == str(run.device_update_path(1, client))
    (stored,) = run.read_device_updates(1)
    assert stored.client == client and stored.weight == 8.0
    assert stored.selection == exported["manifest"]["selection"]
    names = [w["name"] for w in exported["manifest"]["weights"]]
    assert len(stored.values) == len(names)
    for value, name in zip(stored.values, names, strict=True):
        assert value.dtype == exported["trained"][name].dtype
        np.testing.assert_array_equal(value, exported["trained"][name])

    # The server step by hand, on what was stored.
    replay = exported["replay"]
    accumulator = prism_tf.server.Accumulator(replay.plan)
    accumulator.add(stored.values, prism_tf.Selection.from_dict(stored.selection), 8.0)
    expected, coverage = prism_tf.server.finish_round(replay.plan, replay.weights, accumulator.sums,
                                                      accumulator.counts, 0, replay.config.refactorize_every)
    finished = ingest_lib.finish_round(exported["run"])
    assert (finished.round, finished.clients) == (1, [client]) and finished.kernel_coverage == float(coverage)
    saved = run.read_server_state(1, len(replay.plan.tensors))
    assert saved.rounds == 1 and saved.optimizer_state == []
    for got, want in zip(saved.weights, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    assert run.read_metrics() == [{"round": 1, "clients": 1, "device_clients": [client],
                                   "kernel_coverage": float(coverage), "finished_by": "export finish-round"}]
    assert run.open_round() == 2 and RoundReplay(exported["run"]).server_digest != replay.server_digest


def test_a_stored_update_is_replaced_only_when_asked(exported):
    ingest_lib.ingest(exported["run"], exported["client_dir"], exported["upload"], examples=8)
    with pytest.raises(ingest_lib.IngestError, match=f"client {exported['client']}'s update for round 1 is stored "
                                                     "already .*pass --replace"):
        ingest_lib.ingest(exported["run"], exported["client_dir"], exported["upload"], examples=4)
    ingest_lib.ingest(exported["run"], exported["client_dir"], exported["upload"], examples=4, replace=True)
    assert [u.weight for u in RunDir(exported["run"]).read_device_updates(1)] == [4.0]


@pytest.mark.parametrize("damage,words", [
    ("format", ("format version 2", "reads format version 1")),
    ("run_id", ("belongs to run", "(run None)")),
    ("no_run", ("no run in",)),
    ("examples", ("--examples N",)),
    ("nan", ("non-finite",)),
])
def test_refusals_change_nothing(exported, damage, words):
    run = exported["run"]
    examples = 8
    if damage == "format":
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    elif damage == "run_id":
        (run / "run_id").unlink()  # ingest reads the run's id, it never makes one
    elif damage == "no_run":
        (run / "config.json").unlink()
    elif damage == "examples":
        examples = None
    else:
        with np.load(exported["upload"]) as data:
            arrays = {k: data[k] for k in data.files}
        first = next(iter(arrays))
        arrays[first] = np.full_like(arrays[first], np.nan)
        np.savez(exported["upload"], **arrays)
    before = _tree(run)
    with pytest.raises(ingest_lib.IngestError) as raised:
        ingest_lib.ingest(run, exported["client_dir"], exported["upload"], examples=examples)
    assert "\n" not in str(raised.value) and all(w in str(raised.value) for w in words), str(raised.value)
    assert _tree(run) == before


def test_finish_round_needs_enough_updates(exported):
    with pytest.raises(ingest_lib.IngestError, match="round 1 has 0 stored device update"):
        ingest_lib.finish_round(exported["run"])
    with pytest.raises(ingest_lib.IngestError, match=r"round 2 is not the run's open round \(1\)"):
        ingest_lib.finish_round(exported["run"], 2)
    ingest_lib.ingest(exported["run"], exported["client_dir"], exported["upload"], examples=8)
    with pytest.raises(ingest_lib.IngestError, match="has 1 stored device update.*at least 2 needed"):
        ingest_lib.finish_round(exported["run"], min_clients=2)
    assert RunDir(exported["run"]).checkpoint_versions() == []


def test_check_upload_orders_values_and_names_each_problem():
    manifest = {"weights": [{"name": "b", "shape": [2], "dtype": "float32"},
                            {"name": "a", "shape": [1, 2], "dtype": "float32"}]}
    a, b = np.ones((1, 2), np.float32), np.arange(2, dtype=np.float32)
    values = ingest_lib.check_upload(manifest, {"a": a, "b": b})
    assert [v.tolist() for v in values] == [[0.0, 1.0], [[1.0, 1.0]]]
    for arrays, words in (({"a": a}, "missing b"), ({"a": a, "b": b, "c": b}, "unexpected c"),
                          ({"a": a.reshape(2), "b": b}, "weight 'a' has shape (2,), the manifest says (1, 2)"),
                          ({"a": a.astype(np.float64), "b": b}, "weight 'a' has dtype float64"),
                          ({"a": a, "b": np.array([np.inf, 0], np.float32)}, "weight 'b' has non-finite values")):
        with pytest.raises(ingest_lib.IngestError) as raised:
            ingest_lib.check_upload(manifest, arrays)
        assert words in str(raised.value)


def test_read_upload_refuses_what_is_not_an_npz(tmp_path):
    with pytest.raises(ingest_lib.IngestError, match="does not exist"):
        ingest_lib.read_upload(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ingest_lib.IngestError, match="not a readable .npz"):
        ingest_lib.read_upload(tmp_path / "bad.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ingest_lib.IngestError, match="not a readable .npz"):
        ingest_lib.read_upload(tmp_path / "objects.npz")
