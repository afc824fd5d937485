"""Filling a served round's missing clients with simulated ones at close (``python -m export serve --fill simulated``).

The `export` package imports no TFF (tests/test_layering.py), so the round is finished in a subprocess by the TFF
driver itself: ``python -m tff_pipelines resume --out RUN --until-round N``. That is ``resume`` exactly (its data,
process, round, evaluation, checkpoint and metrics row), stopped after round ``N`` with ``config.json`` untouched:
the round's clients with a stored device update take it, the others are simulated, and the metrics row names both
(``device_clients``, ``simulated_clients``). Nothing of the round is computed here.

While it runs, ``RUN/serve/round_<N>/simulating.json`` names its process and its output goes to
``RUN/serve/round_<N>/simulate.log``. If it fails, `FillError` carries a one-line reason (the driver's own
``error:`` line when it printed one) and the round is not finished: its stored updates stay where they are. A
server restarted while an earlier server's simulation still runs waits for that one instead of starting another.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.serve import one_line
from prism_tf.federated.rundir import RunDir

FILLS = ("devices", "simulated")
"""``--fill``: ``devices`` finishes a round with the devices' updates only; ``simulated`` has TFF simulate the round's
clients without one."""


class FillError(RuntimeError):
    """The simulation did not finish the round (``reason``: one line). The round is still open; nothing stored was
    changed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _running(pid: int, round_num: int) -> bool:
    """Whether process ``pid`` is alive and is a ``resume --until-round round_num`` (not a reused pid)."""
    proc = Path(f"/proc/{int(pid)}/cmdline")
    if Path("/proc/self").exists():
        try:
            argv = proc.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        return "tff_pipelines" in argv and "--until-round" in argv and str(int(round_num)) in argv
    try:  # no /proc: the pid alone
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


class Simulator:
    """Finishes rounds of ``run`` with TFF simulating their missing clients (see the module docstring).

    Args:
      run: the run directory.
      python: the interpreter the subprocess runs (default: this one, so the same environment).
      log: where one-line events go.
    """

    def __init__(self, run: RunDir, *, python: str = sys.executable, log: Callable[[str], None] = print) -> None:
        self.run, self.python, self.log = run, python, log
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def command(self, round_num: int) -> list[str]:
        """The command that finishes round ``round_num``."""
        return [self.python, "-m", "tff_pipelines", "resume", "--out", str(self.run.path), "--until-round",
                str(int(round_num))]

    def finish(self, round_num: int) -> dict[str, Any]:
        """Finish round ``round_num`` (the run's open round) in TFF; its metrics row.

        Raises:
          FillError: the subprocess failed or was stopped (`terminate`), or wrote no checkpoint of the round.
        """
        if self._wait_for_earlier(round_num):
            return self._row(round_num)
        command = self.command(round_num)
        log_path = self.run.serve_log_path(round_num)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = " ".join(["python", *command[1:]])
        with open(log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown}\n".encode())
            out.flush()
            start = out.tell()
            with self._lock:
                if self._stopping.is_set():
                    raise FillError("the server is stopping")
                self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self.run.write_serve_simulation(round_num, {"pid": self._proc.pid, "command": command,
                                                        "started": time.time()})
            try:
                code = self._proc.wait()
            finally:
                with self._lock:
                    self._proc = None
                self.run.write_serve_simulation(round_num, None)
        if code != 0:
            reason = self._failure(round_num, code, log_path, start)
            if round_num in self.run.checkpoint_versions():  # it failed after the round's checkpoint (the plot, ...)
                self.log(f"round {round_num} is finished (its checkpoint and metrics are written), but {reason}")
                return self._row(round_num)
            raise FillError(reason)
        if round_num not in self.run.checkpoint_versions():
            raise FillError(f"`{shown}` ended without error but wrote no checkpoint of round {round_num} (output: "
                            f"{log_path})")
        return self._row(round_num)

    def terminate(self) -> None:
        """Stop a running simulation (SIGTERM: the driver stops its TFF worker; rounds it finished stay
        checkpointed) and start no other."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _wait_for_earlier(self, round_num: int) -> bool:
        """If a simulation of this round an earlier (killed) server started is still running, wait for it; whether
        it finished the round."""
        record = self.run.read_serve_simulation(round_num)
        if record is None:
            return False
        pid = int(record.get("pid", 0))
        if pid and _running(pid, round_num):
            self.log(f"round {round_num}: the simulation an earlier server started (pid {pid}) is still running; "
                     "waiting for it")
            while _running(pid, round_num):
                if self._stopping.wait(1.0):
                    raise FillError("the server is stopping")
        self.run.write_serve_simulation(round_num, None)
        return round_num in self.run.checkpoint_versions()

    def _row(self, round_num: int) -> dict[str, Any]:
        rows = [r for r in self.run.read_metrics() if r.get("round") == round_num]
        return rows[-1] if rows else {"round": round_num}

    def _failure(self, round_num: int, code: int, log_path: Path, start: int) -> str:
        """One line: how the subprocess ended and its own reason (its last ``error:`` line, else its last line)."""
        try:
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        errors = [line for line in lines if line.startswith("error:")]
        said = errors[-1] if errors else lines[-1] if lines else ""
        try:
            how = f"was stopped by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        except ValueError:
            how = f"was stopped by signal {-code}"
        return one_line(f"simulating round {round_num}'s missing clients (python -m tff_pipelines resume "
                         f"--until-round {round_num}) {how}" + (f": {one_line(said, 250)}" if said else "")
                         + f" (output: {log_path})", 500)


__all__ = ["FILLS", "FillError", "Simulator"]
