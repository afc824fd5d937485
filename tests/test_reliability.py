"""Interrupted runs, checkpoint integrity and determinism (real TFF rounds, real files, a real SIGKILL).

- determinism: two runs with the same config and seed (`_reference_config`: PriSM, a small CNN, 3 of 4 clients per round
  — three, because the sum of two clients' updates is the same in either order, so a 2-client round could not
  show an order-dependent aggregation) give bit-identical checkpoints, metrics and deployed model;
- kill -9: the same run started by the CLI in a subprocess, SIGKILLed during round 2, then resumed, ends with
  bit-identical checkpoints and the same metrics history (no round twice, none missing);
- checkpoint integrity (on copies of `tiny_run`): a truncated or corrupt latest checkpoint is passed over with a
  warning naming it, a resume redoes that round to the same weights, and the temporary directories of interrupted
  saves are removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prism_tf.federated.rundir import RunDir, RunError
from tff_pipelines.program import driver

REPO_ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("round_seconds",)  # wall-clock time: the only metric allowed to differ between equal runs
DATA = "variables/variables.data-00000-of-00001"


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in RunDir(run).read_metrics()]


def _assert_same_checkpoints(ours: Path, reference: Path, rounds: list[int]) -> None:
    for version in rounds:
        a, _ = RunDir(ours).read_checkpoint(version)
        b, _ = RunDir(reference).read_checkpoint(version)
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.dtype == y.dtype and x.shape == y.shape, (version, i)
            assert np.array_equal(x, y), f"checkpoint {version}, array {i}: max |diff| {np.max(np.abs(x - y))}"


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if "temp" in p.name or ".tmp" in p.name)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _plant_interrupted_saves(run: Path, version: int) -> list[str]:
    """What saves killed half-way leave: TFF's temp directory (a partial SavedModel) and ours."""
    names = [f"program_state_{version}_temp4321", f".program_state_{version}.tmpq1w2e3"]
    for name in names:
        target = run / "checkpoints" / name
        shutil.copytree(run / "checkpoints" / "program_state_1", target)
        _truncate(target / DATA)
    return names


# ------------------------------------------------------------------------------------------------- 5. determinism


def _reference_config(dataset: Path) -> driver.TrainConfig:
    return driver.TrainConfig(dataset=str(dataset), model="small_cnn", width=4, clients=4, clients_per_round=3,
                              rounds=2, batch_size=8, eval_examples=12, eval_every=2, calibration_examples=16)


@pytest.fixture(scope="module")
def reference(shapes_dataset, tmp_path_factory) -> Path:
    """A finished `_reference_config` run: what the repeated, and the killed and resumed, runs must equal."""
    out = tmp_path_factory.mktemp("reliability") / "reference"
    driver.start(_reference_config(shapes_dataset), str(out))
    return out


def test_same_seed_gives_bit_identical_weights_and_metrics(reference, shapes_dataset, tmp_path):
    again = tmp_path / "again"
    driver.start(_reference_config(shapes_dataset), str(again))
    _assert_same_checkpoints(again, reference, [1, 2])
    assert _rows(again) == _rows(reference)
    assert [r["round"] for r in _rows(again)] == [1, 2] and all(r["clients"] == 3 for r in _rows(again))
    # The deployed model too (its BatchNorm statistics are recalibrated after the last round).
    import tensorflow as tf

    for a, b in zip(tf.keras.models.load_model(again / "model.keras").get_weights(),
                    tf.keras.models.load_model(reference / "model.keras").get_weights(), strict=True):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------- 4. integrity


@pytest.mark.parametrize("damage", ["truncated data", "flipped byte", "truncated saved_model.pb", "empty directory"])
def test_unreadable_latest_checkpoint_falls_back_with_a_warning_naming_it(tiny_run, tmp_path, capfd, damage):
    run = RunDir(_copy(tiny_run, tmp_path / "run"))
    bad = run.checkpoint_path(2)
    if damage == "truncated data":
        _truncate(bad / DATA)
    elif damage == "flipped byte":  # TensorFlow's per-tensor checksums catch it
        data = bytearray((bad / DATA).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / DATA).write_bytes(bytes(data))
    elif damage == "truncated saved_model.pb":
        _truncate(bad / "saved_model.pb")
    else:  # a directory without its files (a copy or a file system that lost them)
        shutil.rmtree(bad)
        bad.mkdir()
    expected, _ = RunDir(tiny_run).read_checkpoint(1)
    template = [np.zeros_like(x) for x in expected]
    capfd.readouterr()

    # The run's state (what `resume` loads) ...
    state, version = run.load_state(template)
    warning = capfd.readouterr().err
    assert version == 1
    assert all(np.array_equal(a, b) for a, b in zip(state, expected, strict=True))
    assert warning.count("warning: ") == 1 and str(bad) in warning and "round 1" in warning, warning

    if damage not in ("truncated data", "flipped byte"):
        return  # the TF-only reader below parses the same files the same way (checked on two kinds: time)
    # ... and the TF-only reader (export, replay) agrees.
    flat, version = run.read_checkpoint()
    warning = capfd.readouterr().err
    assert version == 1 and all(np.array_equal(a, b) for a, b in zip(flat, expected, strict=True))
    assert warning.count("warning: ") == 1 and str(bad) in warning, warning
    # Asked for by number, the damaged one is an error naming it, not a silent substitute.
    with pytest.raises(RunError, match=f"{bad} cannot be read.*truncated or corrupt"):
        run.read_checkpoint(2)


def test_no_readable_checkpoint_is_an_error_naming_each(tiny_run, tmp_path):
    run = RunDir(_copy(tiny_run, tmp_path / "run"))
    for version in (1, 2):
        _truncate(run.checkpoint_path(version) / DATA)
    template = [np.zeros_like(x) for x in RunDir(tiny_run).read_checkpoint(1)[0]]
    for call in (lambda: run.load_state(template), run.read_checkpoint):
        with pytest.raises(RunError, match="no readable checkpoint") as error:
            call()
        assert str(run.checkpoint_path(1)) in str(error.value) and str(run.checkpoint_path(2)) in str(error.value)


def test_saving_again_sets_the_bad_checkpoint_aside_and_removes_leftover_temporaries(tiny_run, tmp_path):
    run = RunDir(_copy(tiny_run, tmp_path / "run"))
    _truncate(run.checkpoint_path(2) / DATA)
    damaged = (run.checkpoint_path(2) / DATA).read_bytes()
    planted = _plant_interrupted_saves(run.path, 2)
    assert _leftovers(run.path) == sorted(planted)
    # TFF ignores its own leftovers: they are no version, for it and for us.
    import asyncio

    import tensorflow_federated as tff

    manager = tff.program.FileProgramStateManager(str(run.checkpoint_dir), keep_total=3, keep_first=False)
    assert asyncio.run(manager.get_versions()) == [1, 2] and run.checkpoint_versions() == [1, 2]

    state, version = run.load_state([np.zeros_like(x) for x in RunDir(tiny_run).read_checkpoint(1)[0]],
                                    warn=lambda _: None)
    run.save_state(state, version + 1)  # round 2 again (here: round 1's state, saved as round 2)
    assert _leftovers(run.path) == []
    assert (run.checkpoint_dir / "program_state_2.corrupt" / DATA).read_bytes() == damaged
    assert run.checkpoint_versions() == [1, 2]
    flat, _ = run.read_checkpoint(2)
    assert all(np.array_equal(a, b) for a, b in zip(flat, state, strict=True))

    # A readable checkpoint is never overwritten.
    with pytest.raises(RunError, match="exists and is readable"):
        run.save_state(state, 2)


def test_every_reader_agrees_on_the_open_round_when_the_latest_checkpoint_is_damaged(tiny_run, tmp_path):
    """`resume` would redo round 2: so do round replay (export client) and ingest, and a round 2 finished by devices
    (`write_checkpoint`) replaces the damaged checkpoint."""
    from prism_tf.federated.replay import RoundReplay

    run = RunDir(_copy(tiny_run, tmp_path / "run"))
    _truncate(run.checkpoint_path(2) / DATA)
    assert run.open_round(warn=None) == 2
    assert RoundReplay(run.path).round_num == 2
    flat, _ = RunDir(tiny_run).read_checkpoint(2)
    run.write_checkpoint(flat, 2)
    assert (run.checkpoint_dir / "program_state_2.corrupt").is_dir() and run.open_round() == 3
    assert all(np.array_equal(a, b) for a, b in zip(run.read_checkpoint(2)[0], flat, strict=True))


def test_interrupted_write_checkpoint_leaves_no_version_and_no_temporary(tiny_run, tmp_path, monkeypatch):
    """`write_checkpoint` (device rounds) writes a temporary directory and renames it: interrupted just before the
    rename (the last moment a kill could strike), round 3 does not exist, and nothing is left behind."""
    run = RunDir(_copy(tiny_run, tmp_path / "run"))
    flat, _ = run.read_checkpoint(2)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run.write_checkpoint(flat, 3)
    assert run.checkpoint_versions() == [1, 2] and _leftovers(run.path) == []
    run.write_checkpoint(flat, 3)
    assert run.checkpoint_versions() == [1, 2, 3]
    assert all(np.array_equal(a, b) for a, b in zip(run.read_checkpoint(3)[0], flat, strict=True))


@pytest.mark.slow  # a resume traces the process and trains a round: ~25 s
def test_resume_redoes_a_round_whose_checkpoint_is_corrupt(tiny_run, tmp_path, capfd):
    run = _copy(tiny_run, tmp_path / "run")
    bad = RunDir(run).checkpoint_path(2)
    _truncate(bad / DATA)
    _plant_interrupted_saves(run, 2)
    capfd.readouterr()
    driver.resume(str(run))
    out, err = capfd.readouterr()
    assert f"resuming {run} after round 1 of 2" in out
    assert [line for line in err.splitlines() if line.startswith("warning: ")] == [
        line for line in err.splitlines() if str(bad) in line and line.startswith("warning: ")]
    assert str(bad) in err
    _assert_same_checkpoints(run, tiny_run, [1, 2])
    assert _rows(run) == _rows(tiny_run)
    assert _leftovers(run) == [] and (run / "checkpoints" / "program_state_2.corrupt").is_dir()


# ------------------------------------------------------------------------------------------------- 3. kill -9


def _train_argv(config: driver.TrainConfig, out: Path) -> list[str]:
    """The CLI invocation of ``config`` (flags for the options that differ from the defaults)."""
    argv = [sys.executable, "-m", "tff_pipelines", "train", "--out", str(out)]
    defaults = driver.TrainConfig()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            value = 0 if field.name == "clip_norm" and value is None else value
            argv += ["--" + field.name.replace("_", "-"), str(value)]
    return argv


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _worker_of(pid: int) -> int | None:
    """The TFF worker the trainer ``pid`` started (its child ``worker_binary``)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and comm.startswith("worker_bin"):
                return int(entry.name)
    return None


def _wait_until_round_2_computes(pid: int, timeout_s: float = 120) -> None:
    """Returns once the worker uses CPU after round 1's checkpoint: round 2's clients are training (between
    rounds the worker idles while the trainer prepares the next round's data)."""
    worker = _worker_of(pid)
    assert worker is not None, "no worker_binary child of the trainer"
    start, deadline = _cpu_ticks(worker), time.monotonic() + timeout_s
    while _cpu_ticks(worker) < start + 3 and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.slow  # a CLI subprocess (TensorFlow import, tracing, one round) and an in-process resume: ~50 s
def test_kill_9_mid_round_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    config = driver.stored_config(RunDir(reference))
    out = tmp_path / "killed"
    env = {**os.environ, "PRISM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(_train_argv(config, out), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    first = out / "checkpoints" / "program_state_1"
    try:
        deadline = time.monotonic() + 400
        while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.is_dir(), f"round 1 never finished (exit {proc.poll()}): {proc.stderr.read()[-3000:]!r}"
        _wait_until_round_2_computes(proc.pid)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and everything in its session, no cleanup
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    run = RunDir(out)
    assert run.checkpoint_versions() == [1], "killed after round 2 finished, not in the middle of it"
    assert [r["round"] for r in run.read_metrics()] == [1]

    driver.resume(str(out))
    assert [r["round"] for r in _rows(out)] == [1, 2]  # no round twice, none missing
    assert _rows(out) == _rows(reference)
    _assert_same_checkpoints(out, reference, [1, 2])
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------------------------- a full disk


def _pages(paths) -> int:
    """Bytes a tmpfs needs for these files (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in paths if p.is_file())


@pytest.mark.slow  # a training run until its second checkpoint, then a resume: ~40 s (more under load)
def test_disk_full_at_a_checkpoint_is_a_clean_error_and_resume_after_making_room_equals_the_reference(
        reference, tmp_path, capsys):
    """The run directory is a tmpfs with room for one checkpoint but not two: round 2's save fails. The CLI says so
    in one line (exit 2), leaves no partial checkpoint or temporary directory, and after the disk is grown
    `resume` ends exactly where the uninterrupted run did."""
    from tff_pipelines.program import cli

    checkpoint = _pages((reference / "checkpoints" / "program_state_1").rglob("*"))
    small = _pages(reference / name for name in ("config.json", "budget.json", "data_spec.json", "input_stats.json",
                                                   "metrics.jsonl", "run_id"))
    size = small + checkpoint + checkpoint // 2  # one checkpoint fits with room to spare, two do not
    assert size > 64 * 1024 + small  # `train`'s probe write (64 KiB) must pass: the disk fills during the run
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root and CAP_SYS_ADMIN")
    try:
        out = disk / "run"
        argv = _train_argv(driver.stored_config(RunDir(reference)), out)[3:]  # after `python -m tff_pipelines`
        capsys.readouterr()
        code = cli.main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and "Traceback" not in err, err
        assert len(errors) == 1 and "program_state_2 cannot be written: No space left on device" in errors[0], err
        run = RunDir(out)
        assert run.checkpoint_versions() == [1] and _leftovers(out) == []

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        driver.resume(str(out))
        assert [r["round"] for r in _rows(out)] == [1, 2]
        assert _rows(out) == _rows(reference)
        _assert_same_checkpoints(out, reference, [1, 2])
    finally:
        subprocess.run(["umount", str(disk)], check=False)
