"""Round replay without TFF, and the pure server path against a real TFF round.

A tiny real run (ResNet-18 width 4, 4 clients, 2 per round, 2 rounds) is trained through the driver. Then:
- `RoundReplay` in a subprocess that never imports TFF rebuilds round 2's clients and selections exactly as the
  process drew them;
- the same clients trained eagerly (the client computation's own training function, outside TFF), accumulated by
  `prism_tf.server.Accumulator` and finished by `prism_tf.server.finish_round`, give the weights the TFF round
  wrote to checkpoint 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import max_weight_difference

import prism_tf
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir
from tff_pipelines.program import driver
from tff_pipelines.round import client_work

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    """The run rebuilt with its TFF process (traced once for this module)."""
    return driver.load_run(str(tiny_run))[0]


def test_replay_needs_no_tff_and_draws_the_process_selections(tiny_run, loaded):
    script = textwrap.dedent(f"""
        import json, sys
        from prism_tf.federated.replay import RoundReplay
        replay = RoundReplay({str(tiny_run)!r}, 2)
        out = {{"clients": replay.clients(), "lr": replay.learning_rate(), "digest": replay.server_digest,
               "selections": {{str(c): s.to_dict() for c, s in replay.selections().items()}},
               "tff": "tensorflow_federated" in sys.modules}}
        print("REPLAY" + json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPLAY"))[6:])
    assert got["tff"] is False

    simulation = loaded
    flat, _ = RunDir(tiny_run).read_checkpoint(1)
    process = simulation.process
    state = process.set_flat_weights(process.initialize(), flat[:len(process.layout.tensors)])
    state["round_num"] = np.int64(1)
    clients = simulation.round_clients(1)  # round 2: index 1
    assert got["clients"] == clients
    expected = simulation.process.selections(state, clients)
    for c, selection in zip(clients, expected, strict=True):
        replayed = prism_tf.Selection.from_dict(got["selections"][str(c)])
        assert replayed.keep_ratio == selection.keep_ratio and replayed.strategy == selection.strategy
        for name, layer in selection.layers.items():
            np.testing.assert_array_equal(replayed.layers[name].indices, layer.indices)
            np.testing.assert_array_equal(replayed.layers[name].scale, layer.scale)
    assert got["lr"] == pytest.approx(simulation.process.lr_schedule(1))


def test_pure_server_path_equals_the_tff_round(tiny_run, loaded):
    simulation = loaded
    process = simulation.process
    replay = RoundReplay(tiny_run, 2)
    accumulator = prism_tf.server.Accumulator(replay.plan)
    clients = replay.clients()
    datasets = simulation.client_datasets(replay.round_index, clients)
    for client, dataset in zip(clients, datasets, strict=True):
        selection = replay.selection(client)
        sub = prism_tf.extract(replay.server_model, selection)
        layout = process._layout(tuple(sorted((g, s) for g, s in replay.plan.sizes(selection.indices()).items()
                                              if g in process.layout.groups)))
        weights = [w.numpy() for w in prism_tf.submodel.flat_weights(sub)]
        scale = [selection.layers[name].scale for name in layout.scale_layers]
        uploads, metrics = client_work.train_submodel(layout, weights, scale, dataset, process.training,
                                                      lr=np.float32(replay.learning_rate()))
        values = list(weights)
        for position, upload in zip(layout.travelling(), uploads, strict=True):
            values[position] = upload.numpy()
        accumulator.add(values, selection, float(metrics.num_examples))
    new, coverage = prism_tf.server.finish_round(replay.plan, replay.weights, accumulator.sums, accumulator.counts,
                                                 replay.round_index, process.refactorize_every)
    tff_round = RunDir(tiny_run).read_checkpoint(2)[0][:len(replay.plan.tensors)]
    assert 0 < float(coverage) <= 1
    worst = max_weight_difference(replay.plan, new, tff_round)
    # float32 training in a TFF graph against the same ops run eagerly, sums in float32 (TFF) against float64:
    # differences of a few float32 ulps of the weights (|w| < 10).
    print(f"pure server path vs TFF round: max abs difference {worst:.2e}")
    assert worst < 2e-5, worst
