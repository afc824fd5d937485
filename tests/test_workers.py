"""Scale-out (issue 18): `python -m tff_pipelines worker` processes, and rounds spread over them with `--workers`.

Every worker here listens on loopback (127.0.0.1 or 127.0.0.2); nothing connects anywhere else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest
import tensorflow_federated as tff
from conftest import max_weight_difference
from test_runtime import _is_live_worker, _listening_sockets, _loopback_only

from tff_pipelines.program import cli
from tff_pipelines.workers import remote as workers
from tff_pipelines.workers import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # importing TF + TFF takes ~8 s here, far more on a loaded 2-core machine
_LISTENING = re.compile(r"listening on (\S+):(\d+) .*; pid (\d+), log (\S+);")


class WorkerCommand:
    """`python -m tff_pipelines worker --port P ...` in a subprocess, stdout/stderr read by threads."""

    def __init__(self, *extra: str) -> None:
        self.port = portpicker.pick_unused_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tff_pipelines", "worker", "--port", str(self.port), *extra],
            cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()
        self.host = self.binary_pid = None

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_listening(self) -> str:
        """Waits for the "listening on HOST:PORT" line; returns the gRPC target."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.out:
                if m := _LISTENING.search(line):
                    self.host, port, pid = m.group(1), int(m.group(2)), int(m.group(3))
                    assert port == self.port
                    self.binary_pid = pid
                    return self.target
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker command did not start: out={self.out} err={self.stderr}")

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)[-3000:]

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
            assert not reader.is_alive(), "a pipe of the worker command stayed open after it exited"
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        if self.binary_pid is not None and _is_live_worker(self.binary_pid):
            os.kill(self.binary_pid, signal.SIGKILL)


@pytest.fixture
def worker_commands():
    started: list[WorkerCommand] = []

    def start(*extra: str) -> WorkerCommand:
        command = WorkerCommand(*extra)
        started.append(command)
        return command

    yield start
    for command in started:
        command.kill()


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def _fed_sum(x):
    return tff.federated_sum(x)


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _is_live_worker(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------------------------- cheap


@pytest.mark.parametrize("spec, problem", [
    ("", "expected host:port"),
    ("localhost", "not host:port"),
    ("localhost:0", "not host:port"),
    ("localhost:70000", "not host:port"),
    ("::1:8000", "in brackets"),
    ("[::zz]:8000", "::zz"),
    ("127.0.0.1:8000,,127.0.0.1:8001", "expected host:port"),
    ("127.0.0.1:8000,127.0.0.1:8000", "listed twice"),
])
def test_bad_worker_lists_are_refused(spec, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        workers.parse_workers(spec)


def test_worker_lists_parse():
    assert workers.parse_workers("127.0.0.1:8000, [::1]:8001,host-b:9") == [
        "127.0.0.1:8000", "[::1]:8001", "host-b:9"]


@pytest.mark.parametrize("argv, problem", [
    (["worker", "--port", "0"], "--port must be in 1..65535"),
    (["worker", "--port", "8000", "--bind", "example.org"], "--bind must be a numeric"),
])
def test_worker_command_usage_errors(argv, problem, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and "Traceback" not in err


def test_unreachable_worker_is_named_before_any_round():
    port = portpicker.pick_unused_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(workers.WorkerUnavailableError, match=f"127.0.0.1:{port} not reachable"):
        workers.build_context([f"127.0.0.1:{port}"], connect_timeout_s=1.0)
    assert time.monotonic() - started < 10


def test_two_worker_commands_share_a_round_then_one_dies_and_is_named(worker_commands, monkeypatch):
    """Two `worker` commands (loopback default, and --bind 127.0.0.2) run one federated sum split over both; a
    SIGKILLed worker gives an error naming it; SIGTERM stops a command and its worker (status 143)."""
    a, b = worker_commands(), worker_commands("--bind", "127.0.0.2")
    target_a, target_b = a.wait_listening(), b.wait_listening()
    assert target_a == f"127.0.0.1:{a.port}" and target_b == f"127.0.0.2:{b.port}"
    for command, expected in ((a, "127.0.0.1"), (b, "127.0.0.2")):
        bound = _listening_sockets(command.binary_pid)
        assert bound and all(_loopback_only(x) for x in bound), bound
        assert {_as_ipv4(x) for x in bound} == {expected}, bound

    context = workers.build_context([target_a, target_b])
    before = [_cpu_ticks(a.binary_pid), _cpu_ticks(b.binary_pid)]
    with tff.framework.get_context_stack().install(context):
        assert _fed_sum(list(range(1, 11))) == 55
        after = [_cpu_ticks(a.binary_pid), _cpu_ticks(b.binary_pid)]
        monkeypatch.setattr(workers, "UNAVAILABLE_GRACE_S", 2.0)
        os.kill(b.binary_pid, signal.SIGKILL)
        assert _wait_dead(b.binary_pid)
        started = time.monotonic()
        with pytest.raises(workers.WorkerUnavailableError, match=re.escape(f"TFF worker {target_b} is unreachable")):
            _fed_sum(list(range(1, 11)))
        assert time.monotonic() - started < 30  # not TFF's endless retry
    assert all(y > x for x, y in zip(before, after, strict=True)), (before, after)  # both workers computed

    assert b.wait_exit() == 1  # its worker died on its own: the command says so and fails
    assert "exited by itself" in b.stderr
    a.proc.send_signal(signal.SIGTERM)
    assert a.wait_exit() == 128 + signal.SIGTERM, a.stderr
    assert _wait_dead(a.binary_pid)


def _as_ipv4(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# --------------------------------------------------------------------------------------------- slow


def _train_argv(dataset: Path, out: Path, rounds: int = 3) -> list[str]:
    return ["train", "--dataset", str(dataset), "--model", "resnet18", "--width", "4", "--clients", "4",
            "--clients-per-round", "2", "--rounds", str(rounds), "--batch-size", "8", "--eval-examples", "12",
            "--eval-every", "3", "--calibration-examples", "16", "--out", str(out)]


def _final_weights(out: Path):
    from tff_pipelines.program import driver

    simulation, state, round_num = driver.load_run(str(out))
    return simulation.process, simulation.process.flat_weights(state), round_num


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rounds_on_two_workers_equal_the_local_run_and_resume_after_a_worker_dies(
        shapes_dataset, tmp_path, worker_commands):
    """3 rounds spread over two loopback workers equal the local run; a worker SIGKILLed mid-run fails the CLI with
    its name (exit 1) and leaves the finished rounds checkpointed; `resume` on the remaining worker finishes the
    run, again equal to the local one."""
    local = tmp_path / "local"
    assert cli.main(_train_argv(shapes_dataset, local)) == 0  # the session's local worker
    a, b = worker_commands(), worker_commands()
    spread = f"{a.wait_listening()},{b.wait_listening()}"

    remote = tmp_path / "remote"
    try:
        assert cli.main([*_train_argv(shapes_dataset, remote), "--workers", spread]) == 0
    finally:
        runtime.install_in_current_thread()  # --workers replaced this thread's context: back to the local worker
    process, local_weights, _ = _final_weights(local)
    _, remote_weights, rounds = _final_weights(remote)
    assert rounds == 3
    assert max_weight_difference(process.plan, local_weights, remote_weights) < 1e-5
    for x, y in zip(_metrics(local), _metrics(remote), strict=True):
        assert x["round"] == y["round"] and abs(x["train_loss"] - y["train_loss"]) < 1e-5

    # A worker dies mid-run: the trainer (a subprocess, as a user runs it) names it and stops.
    broken = tmp_path / "broken"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tff_pipelines", *_train_argv(shapes_dataset, broken), "--workers", spread],
        cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TFF_PIPELINES_WORKER_GRACE_S": "3"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (broken / "metrics.jsonl").exists() or not (broken / "metrics.jsonl").read_text().strip():
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()
            time.sleep(0.05)
        os.kill(b.binary_pid, signal.SIGKILL)  # round 1 is checkpointed; round 2 (or 3) now loses a worker
        out, err = trainer.communicate(timeout=600)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 1, (out, err)
    assert f"TFF worker {b.target} is unreachable" in err and "Traceback" not in err, err
    before = _metrics(broken)
    done = [row["round"] for row in before]
    assert done == list(range(1, len(done) + 1)) and 1 <= len(done) < 3

    try:
        assert cli.main(["resume", "--out", str(broken), "--workers", a.target]) == 0
    finally:
        runtime.install_in_current_thread()
    _, resumed_weights, rounds = _final_weights(broken)
    after = _metrics(broken)
    assert rounds == 3 and [row["round"] for row in after] == [1, 2, 3]
    # Rounds checkpointed before the failure are kept as they were (a round whose checkpoint was still being
    # written when the worker died is re-run and so may be rewritten, identically up to float rounding).
    assert after[0]["train_loss"] == pytest.approx(before[0]["train_loss"], abs=1e-5)
    assert all(np.isfinite(w).all() for w in resumed_weights) and after[-1].get("eval_accuracy") is not None
    assert max_weight_difference(process.plan, local_weights, resumed_weights) < 1e-5
