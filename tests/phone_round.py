"""One round played by LiteRT "phones" beside the same round in TFF: the steps every phone-round test takes.

`play_phone_round(run, base, round_num)` copies a trained run twice, has each of the round's clients export its
sub-model (`export client`), train it in a subprocess that imports only numpy and LiteRT (`export.device`) on exactly
the batches the simulated client would see, uploads it (`export ingest`) and finishes the round (`finish-round`);
the other copy plays the same round in TFF (`resume`). The tests compare the two.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from export import client as client_export
from export import ingest as ingest_lib
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver

REPO_ROOT = Path(__file__).resolve().parents[1]


def copy_run(src: Path, dst: Path, rounds: int) -> Path:
    """A copy of run ``src`` configured for ``rounds`` rounds."""
    shutil.copytree(src, dst)
    run = RunDir(dst)
    run.write_config({**run.read_config(), "rounds": rounds}, overwrite=True)
    return dst


def play_phone_round(run: Path, base: Path, round_num: int) -> dict:
    """Round ``round_num`` of ``run`` played by phones (``device_run``) and by TFF (``tff_run``), in ``base``."""
    device_run = copy_run(run, base / "device_run", round_num)
    tff_run = copy_run(run, base / "tff_run", round_num)
    replay = RoundReplay(device_run, round_num)
    clients = replay.clients()
    # Only the data pipeline: the clients' batches exactly as the simulated round would see them (no TFF process).
    simulation = driver.Simulation(driver.stored_config(RunDir(tff_run)), str(tff_run), log=lambda _: None)
    exports, reports = {}, {}
    for client, dataset in zip(clients, simulation.client_datasets(round_num - 1, clients), strict=True):
        exports[client] = client_export.export_client(device_run, client, base / f"client_{client}")
        batches = list(dataset.as_numpy_iterator())
        data = base / f"data_{client}.npz"
        np.savez(data, x=np.stack([b["x"] for b in batches]), y=np.stack([b["y"] for b in batches]))
        trained = base / f"trained_{client}.npz"
        proc = subprocess.run(
            [sys.executable, "-m", "export.device", "--client-dir", exports[client].directory, "--data", str(data),
             "--out", str(trained)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[client] = json.loads(proc.stdout.strip().splitlines()[-1])
        ingest_lib.ingest(device_run, exports[client].directory, trained, examples=reports[client]["examples"])
    finished = ingest_lib.finish_round(device_run)
    driver.resume(str(tff_run), rounds=round_num)
    return dict(device_run=device_run, tff_run=tff_run, exports=exports, reports=reports, finished=finished,
                replay=replay, base=base, clients=clients)
