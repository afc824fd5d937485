"""Test-session setup shared by all tests.

The project is installed into the venv (`make install`, editable). Importing `tff_pipelines.workers.runtime` installs
our TFF context (see tff_pipelines/workers/runtime.py); the session fixture below starts the worker explicitly and
stops it when the session ends, so a test run never leaves a worker_binary behind (an orphan would hold CI's stdout pipe
open and hang the job).
"""

from __future__ import annotations

import signal
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _end_session_on_signal(signum: int, frame: types.FrameType | None) -> None:
    # tff_pipelines.workers.runtime's handler stops the worker, then chains to this one. Its own `sys.exit` would be
    # caught by pytest as one failing test and the run would go on (against a stopped worker); `pytest.exit`
    # ends the whole session instead, with the conventional status.
    pytest.exit(f"received signal {signum}", returncode=128 + signum)


# Installed before tff_pipelines is imported, so that the runtime's handler chains to it.
if threading.current_thread() is threading.main_thread():
    for _signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(_signum) == signal.SIG_DFL:
            signal.signal(_signum, _end_session_on_signal)

import numpy as np  # noqa: E402
from shapes import SHAPES_CLASSES, SHAPES_SIDE, SHAPES_TEST_PER_CLASS, SHAPES_TRAIN_PER_CLASS, make_shapes_dataset  # noqa: E402,F401

import tff_pipelines  # noqa: E402,F401
from tff_pipelines.workers import runtime  # noqa: E402  (importing it installs the local TFF context)


@pytest.fixture(scope="session", autouse=True)
def tff_local_runtime() -> Iterator[None]:
    """Our TFF worker for the whole session (pytest runs fixtures and tests in the main thread)."""
    runtime.install_local_context()
    yield
    runtime.shutdown()


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """`make_shapes_dataset` once per session."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="session")
def tiny_run(shapes_dataset, tmp_path_factory) -> Path:
    """A finished 2-round PriSM run (ResNet-18 width 4, 4 clients, 2 per round) on `shapes_dataset`; tests that
    read it must not change it (copy it first)."""
    from tff_pipelines.program import driver

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    config = driver.TrainConfig(dataset=str(shapes_dataset), model="resnet18", width=4, clients=4,
                                clients_per_round=2, rounds=2, batch_size=8, eval_examples=12, eval_every=2,
                                calibration_examples=16)
    driver.start(config, str(out))
    return out


def max_weight_difference(plan, ours, theirs) -> float:
    """Largest absolute difference between two flat server weights of one model: principal layers compared by the
    kernel ``A·B`` each factor pair represents (an SVD's factors are only defined up to signs, and up to a rotation
    where singular values nearly coincide), every other tensor (singular values and ω included) entry by entry."""
    positions = {}
    for i, tensor in enumerate(plan.tensors):
        positions.setdefault(tensor.layer, {})[tensor.weight] = i
    principal, combination = "principal_kernels", "combination"
    worst = 0.0
    for i, tensor in enumerate(plan.tensors):
        layer, weight = positions[tensor.layer], tensor.weight
        if weight.endswith(principal) and weight[:-len(principal)] + combination in layer:
            rank = np.asarray(ours[i]).shape[-1]
            b = layer[weight[:-len(principal)] + combination]
            kernels = [np.reshape(np.asarray(w[i]), (-1, rank)) @ np.asarray(w[b]) for w in (ours, theirs)]
            worst = max(worst, float(np.max(np.abs(kernels[0] - kernels[1]))))
        elif not (weight.endswith(combination) and weight[:-len(combination)] + principal in layer):
            worst = max(worst, float(np.max(np.abs(np.asarray(ours[i]) - np.asarray(theirs[i])))))
    return worst
