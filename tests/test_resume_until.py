"""``resume --until-round K``: finish a run's rounds up to K and stop, each round equal to that round of a resume to the
end (what the round server's ``--fill simulated`` runs at each close, tests/test_serve.py).

A PriSM small-CNN run on the shapes dataset, written without training (config, data spec, budget; no checkpoint,
round 1 open, as a run the round server serves), copied twice:
- A: ``resume(until_round=2)`` trains rounds 1 and 2 and stops: checkpoints 1 and 2, two metrics rows, the summary
  of those two, ``config.json`` byte-identical;
- B: ``resume()`` to the end, 3 rounds under a cosine learning rate over 3 rounds.
Rounds 1 and 2 of A equal B's bit for bit (checkpoints; metrics rows but the wall-clock ``round_seconds``): TFF's
rounds are deterministic (tests/test_reliability.py) and the schedule still spans 3 rounds (``resume --rounds 2``
would train round 2 at the final rate instead). A second ``resume()`` of A then trains round 3 equal to B's. The
run without a checkpoint starts from the seeded initial model `RoundReplay` rebuilds for round 1 (what devices of a
served round 1 train from).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from prism_tf.federated.config import TrainConfig, client_budget
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver

VOLATILE = ("round_seconds",)  # wall-clock time: the only metric allowed to differ between equal rounds


def fresh_run(out: Path, dataset: Path, rounds: int = 3) -> Path:
    """A run with nothing trained yet (round 1 open): config, data spec, budget."""
    config = TrainConfig(dataset=str(dataset), model="small_cnn", width=4, clients=4, clients_per_round=3,
                         rounds=rounds, batch_size=8, eval_examples=12, eval_every=1, calibration_examples=16, seed=5)
    run = RunDir(out)
    run.write_config(dataclasses.asdict(config), overwrite=False)
    shape, classes = (28, 28, 1), 3
    run.write_data_spec(shape, classes)
    run.write_budget(client_budget(config, shape, classes)[2])
    return out


def rows(run: Path) -> dict[int, dict]:
    return {r["round"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in RunDir(run).read_metrics()}


def assert_same_checkpoint(a: Path, b: Path, version: int) -> None:
    x, _ = RunDir(a).read_checkpoint(version)
    y, _ = RunDir(b).read_checkpoint(version)
    assert len(x) == len(y)
    for i, (u, v) in enumerate(zip(x, y, strict=True)):
        assert u.dtype == v.dtype and np.array_equal(u, v), f"checkpoint {version}, array {i}"


@pytest.mark.slow  # three resumes of a small CNN, each tracing the process: ~1 min on 2 idle cores
def test_until_round_trains_exactly_the_rounds_of_a_resume_to_the_end(shapes_dataset, tmp_path):
    base = fresh_run(tmp_path / "base", shapes_dataset)
    a = Path(shutil.copytree(base, tmp_path / "a"))
    b = Path(shutil.copytree(base, tmp_path / "b"))
    config_bytes = (a / "config.json").read_bytes()

    summary = driver.resume(str(a), until_round=2)
    assert RunDir(a).checkpoint_versions() == [1, 2] and sorted(rows(a)) == [1, 2]
    assert (a / "config.json").read_bytes() == config_bytes
    assert summary["rounds"] == 2 and RunDir(a).read_summary()["rounds"] == 2

    driver.resume(str(b))
    assert RunDir(b).checkpoint_versions() == [1, 2, 3]
    for version in (1, 2):
        assert_same_checkpoint(a, b, version)
        assert rows(a)[version] == rows(b)[version]
    assert "device_clients" not in rows(a)[1]  # only rounds with device updates name them

    driver.resume(str(a))  # the rest of the run: round 3, as B trained it
    assert_same_checkpoint(a, b, 3)
    assert rows(a) == rows(b)

    # Round 1 started from the seeded initial model that export and the round server hand devices in round 1.
    simulation = driver.Simulation(driver.stored_config(RunDir(base)), str(base), log=lambda _: None)
    initial = simulation.process.flat_weights(simulation.process.initialize())
    replayed = RoundReplay(base, 1).weights
    assert len(initial) == len(replayed)
    assert all(np.array_equal(x, y) for x, y in zip(initial, replayed, strict=True))
