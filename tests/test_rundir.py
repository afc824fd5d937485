"""prism_tf.federated.rundir: every file of a run, read and written through `RunDir` (real files, exact values).

- ``config.json`` carries ``format_version``; a run of another version is refused by every reader and writer;
- checkpoints: written and read with TensorFlow alone, in the format of TFF's ``FileProgramStateManager`` (which
  reads ours, and whose files we read: runs written before this change), the newest three kept, by name
  (`ServerState`);
- device updates, budget, input statistics, data spec, summary and the run id round-trip.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil

import numpy as np
import pytest

from prism_tf.federated.rundir import FORMAT_VERSION, DeviceUpdate, RunDir, RunError, ServerState


def _state(seed: int = 0) -> collections.OrderedDict:
    """A process state's shape: weights (float32), the round counter (int64), an optimizer state."""
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        weights=[rng.normal(size=(3, 3, 2, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)],
        round_num=np.int64(seed), optimizer_state=[np.float32(0.5 + seed), np.arange(3, dtype=np.int64)])


def _same(a, b) -> None:
    """Equal structure (containers of the same type), leaves of the same dtype, shape and values."""
    assert isinstance(a, dict | list) == isinstance(b, dict | list)
    if isinstance(a, dict):
        assert type(a) is type(b)
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (a, b)


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.write_config({"method": "prism", "rounds": 3}, overwrite=False)
    return run


# --------------------------------------------------------------------------------------------- format version


def test_config_is_written_with_the_format_version_and_read_without_it(run):
    stored = json.loads(run.config_path.read_text())
    assert stored == {"format_version": FORMAT_VERSION, "method": "prism", "rounds": 3} and FORMAT_VERSION == 1
    assert run.read_config() == {"method": "prism", "rounds": 3}
    assert run.format_version() == 1
    run.write_config({**run.read_config(), "rounds": 5, "format_version": 99}, overwrite=True)  # ours wins
    assert json.loads(run.config_path.read_text()) == {"format_version": 1, "method": "prism", "rounds": 5}


def test_a_run_without_the_field_is_version_1(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "fedavg"}))
    run = RunDir(tmp_path)
    assert run.format_version() == 1 and run.read_config() == {"method": "fedavg"}
    assert RunDir(tmp_path / "nothing").format_version() is None


@pytest.mark.parametrize("call", [
    lambda r: r.read_config(), lambda r: r.read_metrics(), lambda r: r.read_checkpoint(),
    lambda r: r.load_state([np.zeros(1)]), lambda r: r.read_device_updates(1), lambda r: r.read_budget(),
    lambda r: r.read_input_stats(), lambda r: r.read_data_spec(), lambda r: r.read_run_id(), lambda r: r.run_id(),
    lambda r: r.open_round(), lambda r: r.append_metrics({"round": 1}), lambda r: r.write_budget({}),
    lambda r: r.write_checkpoint([np.zeros(1)], 1), lambda r: r.save_state([np.zeros(1)], 1),
    lambda r: r.write_device_update(1, 0, {"w": np.zeros(1)}, selection={}, weight=1.0, examples=None),
])
def test_another_format_version_is_refused_naming_both_before_anything_is_touched(tmp_path, call):
    (tmp_path / "config.json").write_text(json.dumps({"method": "prism", "format_version": 2}))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RunError) as raised:
        call(RunDir(tmp_path))
    message = str(raised.value)
    assert message == (f"{tmp_path} is a run directory of format version 2, written by a newer prism-tf; this "
                       "prism-tf reads format version 1 only")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("text,words", [
    ('{"format_version": "2"}', ("format_version '2', not an integer",)),
    ('{"format_version": true}', ("format_version True, not an integer",)),
    ("[1, 2]", ("not a JSON object",)),
    ('{"method": ', ("not valid JSON",)),
])
def test_a_malformed_config_is_a_one_line_error(tmp_path, text, words):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RunError) as raised:
        RunDir(tmp_path).read_config()
    assert "\n" not in str(raised.value) and all(w in str(raised.value) for w in words)


def test_no_run_is_named(tmp_path):
    with pytest.raises(RunError, match=f"no run in {tmp_path}: {tmp_path}/config.json is missing"):
        RunDir(tmp_path).read_config()


# --------------------------------------------------------------------------------------------- checkpoints


def test_state_round_trips_exactly_and_the_newest_three_are_kept(run):
    for version in range(1, 6):
        run.save_state(_state(version), version)
    assert run.checkpoint_versions() == [3, 4, 5]
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == ["program_state_3", "program_state_4",
                                                                   "program_state_5"]
    state, version = run.load_state(_state())
    assert version == 5
    _same(state, _state(5))
    flat, version = run.read_checkpoint(4)
    assert version == 4 and len(flat) == 5
    _same(flat, [np.asarray(x) for x in [*_state(4)["weights"], np.int64(4), *_state(4)["optimizer_state"]]])
    with pytest.raises(RunError, match="has no checkpoint of round 1; it has rounds 3, 4, 5"):
        run.read_checkpoint(1)
    assert run.open_round() == 6 and run.latest_checkpoint() == 5
    run.write_checkpoint(flat, 6)  # a round finished by devices keeps every checkpoint
    run.write_checkpoint(flat, 7)
    assert run.checkpoint_versions() == [3, 4, 5, 6, 7]


def test_a_checkpoint_by_name(run):
    run.save_state(_state(2), 2)
    saved = run.read_server_state(2, num_weights=2)
    _same(saved.weights, _state(2)["weights"])
    assert saved.rounds == 2
    _same(saved.optimizer_state, [np.asarray(x) for x in _state(2)["optimizer_state"]])
    with pytest.raises(RunError, match=f"checkpoint 2 of {run.path} does not match its config"):
        run.read_server_state(2, num_weights=6)
    assert run.read_server_state(2, num_weights=1).rounds is None  # position 1 is a weight of another model
    run.write_server_state(ServerState(saved.weights, rounds=3), 3)
    flat, _ = run.read_checkpoint(3)
    _same(flat, [*saved.weights, np.asarray(3, np.int64)])
    with pytest.raises(ValueError, match="round counter is unknown"):
        ServerState([], None).flat()


def test_the_state_does_not_match_another_model(run):
    run.save_state(_state(1), 1)
    wrong = _state()
    wrong["weights"][1] = np.zeros(5, np.float32)
    with pytest.raises(RunError, match=r"holds array 1 of shape \(4,\), this run's model has \(5,\)"):
        run.load_state(wrong)
    with pytest.raises(RunError, match="holds 5 arrays, this run's model has 4"):
        run.load_state({k: v for k, v in _state().items() if k != "round_num"})


def test_an_unreadable_newest_checkpoint_is_passed_over_with_a_warning(run):
    run.save_state(_state(1), 1)
    run.save_state(_state(2), 2)
    shutil.rmtree(run.checkpoint_path(2))
    run.checkpoint_path(2).mkdir()  # a directory that lost its files still counts (as for TFF's manager)
    warnings = []
    state, version = run.load_state(_state(), warn=warnings.append)
    assert version == 1 and len(warnings) == 1 and str(run.checkpoint_path(2)) in warnings[0]
    _same(state, _state(1))
    run.save_state(state, 2)  # saved again: the bad one is set aside
    assert (run.checkpoint_dir / "program_state_2.corrupt").is_dir() and run.load_state(_state())[1] == 2
    with pytest.raises(RunError, match="exists and is readable: round 2 is finished already"):
        run.save_state(state, 2)
    with pytest.raises(RunError, match="no checkpoint in"):
        RunDir(run.path / "elsewhere").load_state(_state())


def test_tffs_manager_reads_our_checkpoints_and_we_read_its(run, tmp_path):
    """Bit for bit both ways: runs written before the driver saved without TFF resume, and TFF reads ours."""
    import tensorflow_federated as tff

    run.save_state(_state(3), 3)
    template = [np.asarray(x) for x in [*_state()["weights"], np.int64(0), *_state()["optimizer_state"]]]
    manager = tff.program.FileProgramStateManager(str(run.checkpoint_dir), keep_total=3, keep_first=False)
    assert asyncio.run(manager.get_versions()) == [3]
    loaded = asyncio.run(manager.load(3, template))
    _same(list(loaded), [np.asarray(x) for x in [*_state(3)["weights"], np.int64(3), *_state(3)["optimizer_state"]]])

    theirs = RunDir(tmp_path / "theirs")
    theirs.write_config({}, overwrite=False)
    manager = tff.program.FileProgramStateManager(str(theirs.checkpoint_dir), keep_total=3, keep_first=False)
    asyncio.run(manager.save([np.asarray(x) for x in template[:2]] + [np.int64(4)] + template[3:], 4))
    state, version = theirs.load_state(_state())
    assert version == 4 and state["round_num"] == 4
    _same(state["weights"], _state()["weights"])
    assert theirs.read_server_state(4, 2).rounds == 4


# --------------------------------------------------------------------------------------------- other files


def test_device_updates_round_trip(run):
    selection = {"keep_ratio": 0.5, "strategy": "prism", "layers": {}, "channels": {"g:out": [0, 2]}}
    first = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}  # the sub-model's order
    path = run.write_device_update(3, 7, first, selection=selection, weight=24.0, examples=24.0)
    assert path == run.path / "device_updates" / "round_3" / "client_7.npz" == run.device_update_path(3, 7)
    assert json.loads(path.with_suffix(".json").read_text()) == {
        "client": 7, "round": 3, "examples": 24.0, "weight": 24.0, "selection": selection}
    with np.load(path) as data:
        assert data.files == ["b", "a"]
    run.write_device_update(3, 2, {"w": np.zeros(1, np.float32)}, selection=selection, weight=1.0, examples=None)
    updates = run.read_device_updates(3)
    assert [u.client for u in updates] == [2, 7] and all(isinstance(u, DeviceUpdate) for u in updates)
    client, values, stored, weight = updates[1]
    assert (client, stored, weight) == (7, selection, 24.0)
    _same(values, [first["b"], first["a"]])
    with pytest.raises(RunError, match="client 7's update for round 3 is stored already .*--replace"):
        run.write_device_update(3, 7, first, selection=selection, weight=1.0, examples=1.0)
    run.write_device_update(3, 7, {"w": np.ones(1, np.float32)}, selection=selection, weight=2.0, examples=2.0,
                            replace=True)
    assert run.read_device_updates(3)[1].weight == 2.0 and run.read_device_updates(4) == []
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_the_round_servers_simulation_record_and_has_checkpoints(run):
    assert run.read_serve_simulation(4) is None and not run.has_checkpoints()
    run.write_serve_simulation(4, {"pid": 12, "command": ["python", "-m", "tff_pipelines"], "started": 1.5})
    assert run.read_serve_simulation(4) == {"pid": 12, "command": ["python", "-m", "tff_pipelines"], "started": 1.5}
    assert run.serve_log_path(4) == run.path / "serve" / "round_4" / "simulate.log"
    run.write_serve_simulation(4, None)
    assert run.read_serve_simulation(4) is None and run.serve_round_dir(4).is_dir()
    run.write_serve_simulation(4, None)  # removing what is not there is fine
    run.checkpoint_path(2).mkdir(parents=True)  # an entry that cannot be read still counts (as for load_state)
    assert run.has_checkpoints() and run.checkpoint_versions() == []


def test_budget_stats_spec_summary_and_id(run):
    assert (run.read_budget(), run.read_input_stats(), run.read_data_spec(), run.read_summary()) == (None,) * 4
    run.write_budget({"metric": "flops", "width_fraction": np.float64(0.5), "small_width": np.int64(7)})
    assert run.read_budget() == {"metric": "flops", "width_fraction": 0.5, "small_width": 7}
    run.write_input_stats({"mean": [0.5, 0.25], "std": [0.2, 0.1], "scale": "pixels / 255"})
    assert run.read_input_stats() == {"mean": [0.5, 0.25], "std": [0.2, 0.1], "scale": "pixels / 255"}
    run.write_input_stats(None)
    assert run.read_input_stats() is None and not run.input_stats_path.exists()
    run.write_data_spec((28, 28, np.int64(1)), 3)
    assert run.read_data_spec() == {"input_shape": [28, 28, 1], "num_classes": 3}
    run.write_summary({"rounds": 2, "final_accuracy": np.float32(0.5)})
    assert run.read_summary() == {"rounds": 2, "final_accuracy": 0.5}
    run.append_metrics({"round": 1, "loss": 1.5})
    run.append_metrics({"round": 2, "loss": 1.25})
    with open(run.metrics_path, "a") as f:
        f.write('{"round": 3, "lo')  # a torn last line from a killed run
    assert run.read_metrics() == [{"round": 1, "loss": 1.5}, {"round": 2, "loss": 1.25}]
    assert run.truncate_metrics(1) == [{"round": 1, "loss": 1.5}] == run.read_metrics()
    assert run.read_run_id() is None and not run.run_id_path.exists()  # reading never makes one
    made = run.run_id()
    assert len(made) == 32 and int(made, 16) >= 0 and run.read_run_id() == made == run.run_id()
    run.budget_path.write_text("{")
    with pytest.raises(RunError, match="budget.json is not valid JSON"):
        run.read_budget()
