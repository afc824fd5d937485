"""Tests of tff_pipelines.workers.runtime: the TFF worker never outlives its Python process, never holds its pipes.

The process-level tests run a real Python subprocess with stdout/stderr on pipes, as CI does (`... | cat`):
the pipes must reach EOF (no orphan holds them), and the worker_binary the child reports must be gone.
The child prints its worker PIDs; we check those PIDs (not "all workers on the machine"), so tests running
in parallel elsewhere on the machine cannot confuse the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_federated as tff

from tff_pipelines.workers import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 180  # importing TF + TFF takes ~8 s here; a loaded 2-core CI machine may need more
GRACE_S = 10.0  # time allowed for a worker to die after its parent is gone

# Defines `add` (TF) and `fed_sum` (federated), prints the worker PIDs before any computation ran as "IDLE [..]"
# and, after running `add` once, as "WORKERS [..]".
# First it resets SIGHUP and SIGINT to their defaults: a child inherits *ignored* dispositions, and test runs are
# often started under `nohup` (SIGHUP ignored) or as a background job of a non-interactive shell (SIGINT ignored).
# The runtime rightly keeps an ignored SIGHUP ignored (nohup's meaning), so the SIGHUP test then waited the full
# 60 s and failed "child did not exit" (measured: a child of a nohup'd parent showed SigIgn bit 1 set and
# signal.getsignal(SIGHUP) == SIG_IGN), while the same test passed when run from a terminal.
CHILD_PRELUDE = """
import signal
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import tensorflow_federated as tff
import tff_pipelines
from tff_pipelines.workers import runtime

@tff.tensorflow.computation(np.int32, np.int32)
def add(a, b):
    return a + b

@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def fed_sum(x):
    return tff.federated_sum(x)

print("IDLE", runtime.worker_pids(), flush=True)  # importing starts nothing: the first computation does
assert add(1, 2) == 3
print("WORKERS", runtime.worker_pids(), flush=True)
"""


# --------------------------------------------------------------------------------------------- helpers


def _is_live_worker(pid: int) -> bool:
    """True if `pid` is a running (not zombie) worker_binary process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and argv0.endswith(b"worker_binary")


def _workers_with_parent(ppid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == ppid and _is_live_worker(int(entry)):
            found.add(int(entry))
    return found


def _wait_gone(pids: set[int], grace_s: float = GRACE_S) -> tuple[set[int], float]:
    """Polls until none of `pids` is a live worker (or the grace period ends): (survivors, seconds waited)."""
    start = time.monotonic()
    while True:
        alive = {p for p in pids if _is_live_worker(p)}
        waited = time.monotonic() - start
        if not alive or waited > grace_s:
            return alive, waited
        time.sleep(0.1)


class Child:
    """A Python child with stdout and stderr on pipes, both read by threads until EOF."""

    def __init__(self, body: str, new_session: bool = False):
        script = CHILD_PRELUDE + textwrap.dedent(body)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=new_session,
        )
        self.out_lines: list[str] = []
        self.err_chunks: list[bytes] = []
        self._marker = threading.Condition()
        self._out_reader = threading.Thread(target=self._read_out, daemon=True)
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._out_reader.start()
        self._err_reader.start()
        self.child_workers_seen: set[int] = set()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            with self._marker:
                self.out_lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._marker.notify_all()

    def _read_err(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):
            self.err_chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self.err_chunks).decode(errors="replace")[-4000:]

    def wait_for_line(self, prefix: str, timeout: float = CHILD_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        with self._marker:
            while True:
                for line in self.out_lines:
                    if line.startswith(prefix):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._out_reader.is_alive()):
                    raise AssertionError(f"no {prefix!r} line; stdout={self.out_lines}\nstderr={self.stderr}")
                self._marker.wait(min(remaining, 0.5))

    def reported_workers(self) -> set[int]:
        """The worker PIDs the child printed, plus any worker_binary that is a direct child of it now."""
        line = self.wait_for_line("WORKERS")
        pids = {int(p) for p in line.removeprefix("WORKERS").strip(" []").split(",") if p.strip()}
        pids |= _workers_with_parent(self.proc.pid)
        self.child_workers_seen |= pids
        return pids

    def wait_pipes_closed(self, timeout: float = CHILD_TIMEOUT_S) -> float:
        """Waits for the child to exit and both pipes to reach EOF; returns seconds since its start."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(f"child did not exit within {timeout} s; stderr=\n{self.stderr}") from None
        self._out_reader.join(timeout=GRACE_S)
        self._err_reader.join(timeout=GRACE_S)
        if self._out_reader.is_alive() or self._err_reader.is_alive():
            self.kill_everything()
            raise AssertionError("child exited but its stdout/stderr pipe stayed open: an orphan holds it")
        return time.monotonic() - self.started

    def kill_everything(self) -> None:
        """Last resort so a failing test never leaves processes behind."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        for pid in self.child_workers_seen | _workers_with_parent(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def child_factory():
    children: list[Child] = []

    def make(body: str, new_session: bool = False) -> Child:
        child = Child(body, new_session)
        children.append(child)
        return child

    yield make
    for child in children:
        if child.proc.poll() is None:
            child.kill_everything()


# --------------------------------------------------------------------------------------------- processes


def test_script_exits_and_pipes_close(child_factory):
    child = child_factory('print("RESULT", add(2, 3), fed_sum([1, 2, 3]), flush=True)\n')
    workers = child.reported_workers()
    elapsed = child.wait_pipes_closed()
    assert child.proc.returncode == 0, child.stderr
    assert "RESULT 5 6" in child.out_lines, child.out_lines
    assert child.wait_for_line("IDLE") == "IDLE []"  # importing and tracing started no worker
    assert len(workers) == 1  # ours, started by the first computation; TFF did not start one of its own
    survivors, _ = _wait_gone(workers)
    assert not survivors
    assert elapsed < CHILD_TIMEOUT_S / 2


def test_sigterm_mid_run_stops_worker(child_factory):
    child = child_factory(
        """
        print("RESULT", fed_sum([1, 2, 3]), flush=True)
        print("READY", flush=True)
        while True:  # keep computations in flight when SIGTERM arrives
            fed_sum([1, 2, 3])
        """
    )
    child.wait_for_line("READY")
    workers = child.reported_workers()
    assert len(workers) == 1
    child.proc.send_signal(signal.SIGTERM)
    survivors, _ = _wait_gone(workers, grace_s=30)
    assert not survivors
    child.wait_pipes_closed(timeout=CHILD_TIMEOUT_S)
    assert child.proc.returncode == 128 + signal.SIGTERM, child.stderr


def _signal_non_main_thread(pid: int, signum: int) -> int:
    """Sends `signum` to a thread of `pid` other than its main thread (one not blocking it); returns its tid."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        if tid == pid:
            continue
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            blocked = int(re.search(r"SigBlk:\s*([0-9a-f]+)", f.read()).group(1), 16)
        if blocked & (1 << (signum - 1)):
            continue
        if libc.tgkill(pid, tid, signum) == 0:
            return tid
    raise AssertionError(f"no thread of {pid} accepts signal {signum}")


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_sighup_to_other_thread_while_main_sleeps(child_factory):
    """The kernel may hand a process signal to any thread; a sleeping main thread must still act on it."""
    child = child_factory('print("READY", flush=True)\nimport time\ntime.sleep(600)\n')
    child.wait_for_line("READY")
    workers = child.reported_workers()
    with open(f"/proc/{child.proc.pid}/status") as f:
        ignored = int(re.search(r"SigIgn:\s*([0-9a-f]+)", f.read()).group(1), 16)
    assert not ignored & (1 << (signal.SIGHUP - 1)), "the child ignores SIGHUP (see CHILD_PRELUDE)"
    _signal_non_main_thread(child.proc.pid, signal.SIGHUP)
    # What must be prompt is acting on the signal (the worker stopped); the interpreter's own exit after that
    # (TF and gRPC teardown) can take long on a loaded machine, so it gets the generous child timeout.
    survivors, waited = _wait_gone(workers, grace_s=30)
    assert not survivors, f"SIGHUP not acted on: worker(s) {survivors} alive {waited:.0f} s later; {child.stderr}"
    child.wait_pipes_closed(timeout=CHILD_TIMEOUT_S)
    assert child.proc.returncode == 128 + signal.SIGHUP, child.stderr


@pytest.mark.slow  # ~10 s each; the default suite keeps the SIGTERM and pipe tests (make test-all)
def test_sigkill_worker_dies_by_pdeathsig(child_factory):
    child = child_factory(
        """
        print("RESULT", fed_sum([1, 2, 3]), flush=True)
        print("READY", flush=True)
        while True:
            fed_sum([1, 2, 3])
        """
    )
    child.wait_for_line("READY")
    workers = child.reported_workers()
    assert len(workers) == 1
    child.proc.kill()  # no atexit, no signal handler: only the kernel's parent-death signal can help
    child.wait_pipes_closed(timeout=60)
    assert child.proc.returncode == -signal.SIGKILL
    survivors, waited = _wait_gone(workers)
    assert not survivors, f"worker(s) {survivors} survived SIGKILL of their parent"
    assert waited < GRACE_S


@pytest.mark.slow  # ~10 s each; the default suite keeps the SIGTERM and pipe tests (make test-all)
def test_ctrl_c_to_process_group_spares_worker(child_factory):
    """Ctrl-C (or Jupyter's interrupt) signals the whole group: the worker must survive a caught interrupt."""
    child = child_factory(
        """
        import time
        try:  # READY inside the try: the interrupt may arrive as soon as the line is written
            print("READY", flush=True)
            time.sleep(120)
        except KeyboardInterrupt:
            print("RESULT", add(1, 2), fed_sum([1, 2, 3]), flush=True)
        """,
        new_session=True,
    )
    child.wait_for_line("READY")
    workers = child.reported_workers()
    os.killpg(child.proc.pid, signal.SIGINT)
    assert child.wait_for_line("RESULT") == "RESULT 3 6"
    child.wait_pipes_closed()
    assert child.proc.returncode == 0, child.stderr
    assert not _wait_gone(workers)[0]


@pytest.mark.slow  # ~10 s each; the default suite keeps the SIGTERM and pipe tests (make test-all)
def test_tff_own_worker_is_stopped_too():
    """Defense in depth: a worker started by TFF's stock context (before our import) is stopped at exit."""
    body = """
        import numpy as np
        import tensorflow_federated as tff
        # TFF's stock context: spawns its own worker on the first call, with our stdout/stderr pipes.
        print("TFF", tff.tensorflow.computation(lambda: np.int32(7))(), flush=True)
        import tff_pipelines
        from tff_pipelines.workers import runtime
        print("TFF", tff.tensorflow.computation(lambda: np.int32(8))(), flush=True)  # our worker starts here
        print("ALL", runtime.worker_pids(), flush=True)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)  # returns only at EOF: nobody holds the pipe
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in _workers_with_parent(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise
    lines = out.decode().splitlines()
    assert "TFF 7" in lines and "TFF 8" in lines, (lines, err.decode()[-3000:])
    pids = {int(p) for p in next(x for x in lines if x.startswith("ALL")).strip("AL []").split(",")}
    assert len(pids) == 2  # TFF's worker and ours
    assert proc.returncode == 0
    assert not _wait_gone(pids)[0]


@pytest.mark.slow  # 15-30 s: `make test-all` (the default suite stays under 15 minutes)
def test_worker_started_from_short_lived_thread_survives_it(child_factory):
    """A first install on a non-main thread forks from a parked thread: the worker outlives the caller."""
    child = child_factory(
        """
        import threading
        runtime.shutdown()
        t = threading.Thread(target=runtime.install_local_context)
        t.start()
        t.join()  # the installing thread is gone: a worker forked by it would now get PDEATHSIG
        import time
        time.sleep(1.0)
        runtime.install_in_current_thread()
        print("RESULT", add(4, 5), runtime.worker_pids(), flush=True)
        """
    )
    line = child.wait_for_line("RESULT")
    assert line.startswith("RESULT 9 ["), line
    child.wait_pipes_closed()
    assert child.proc.returncode == 0, child.stderr
    pids = {int(p) for p in line.split("[", 1)[1].strip("]").split(",")}
    assert not _wait_gone(pids)[0]


@pytest.mark.slow  # ~10 s each; the default suite keeps the SIGTERM and pipe tests (make test-all)
def test_dead_worker_fails_fast_instead_of_retrying_forever(child_factory):
    """TFF retries UNAVAILABLE forever; once our worker is gone a computation must raise instead."""
    child = child_factory(
        """
        import os, signal, time
        pid = runtime.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            add(1, 2)
        except RuntimeError as e:
            print("RAISED", round(time.monotonic() - t0, 2), "exited" in str(e), flush=True)
        """
    )
    line = child.wait_for_line("RAISED", timeout=CHILD_TIMEOUT_S)
    child.wait_pipes_closed()
    _, seconds, mentions_exit = line.split()
    assert mentions_exit == "True"
    assert float(seconds) < 30


# --------------------------------------------------------------------------------------------- in process


@tff.tensorflow.computation(np.int32, np.int32)
def _add(a, b):
    return a + b


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def _fed_sum(x):
    return tff.federated_sum(x)


def test_session_uses_our_worker():
    pids = runtime.worker_pids()
    assert len(pids) == 1 and _is_live_worker(pids[0])
    assert _fed_sum([1, 2, 3]) == 6
    assert runtime.worker_pids() == pids


def test_redirected_stdout_has_no_fileno_and_still_works():
    before = runtime.worker_pids()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        with pytest.raises(io.UnsupportedOperation):
            sys.stdout.fileno()
        result = _add(2, 3), _fed_sum([1, 2, 3])
        print("inside")
    assert result == (5, 6)
    assert buf.getvalue() == "inside\n"
    assert runtime.worker_pids() == before


def test_capsys_computation(capsys):
    print(_add(20, 22))
    assert capsys.readouterr().out == "42\n"


def test_new_thread_needs_install_then_works():
    results: dict[str, object] = {}

    def without_install() -> None:
        try:
            _add(1, 1)
        except Exception as e:  # TFF's context stack is thread-local: nothing is installed here
            results["error"] = e

    def with_install() -> None:
        runtime.install_in_current_thread()
        results["sum"] = _fed_sum([1, 2, 3])
        results["add"] = _add(2, 2)

    for target in (without_install, with_install):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert "No default context" in str(results.get("error")), results
    assert results["sum"] == 6 and results["add"] == 4
    assert len(runtime.worker_pids()) == 1  # the thread reused the session's worker


# --------------------------------------------------------------------------------------------- reachable from here only


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def _listening_sockets(pid: int) -> list[str]:
    """Local addresses (hex as in /proc, decoded) of `pid`'s LISTEN-state TCP sockets: our own reading of the
    kernel's socket table, independent of tff_pipelines.workers.loopback."""
    import ipaddress

    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        for row in rows:
            if row[3] != "0A" or row[9] not in inodes:
                continue
            host_hex = row[1].split(":")[0]
            raw = bytes.fromhex(host_hex)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
            found.append(str(ipaddress.ip_address(raw)))
    return found


def _loopback_only(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_worker_listens_on_loopback_only_during_a_computation():
    """Issue 16: no socket of the worker may be bound to a wildcard or non-loopback address (read, not probed)."""
    (pid,) = runtime.worker_pids()
    stop = threading.Event()
    done: list[int] = []

    def compute() -> None:
        runtime.install_in_current_thread()
        while not stop.is_set():
            done.append(_fed_sum([1, 2, 3]))

    thread = threading.Thread(target=compute)
    thread.start()
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (len(done) < 3 or not seen):
            seen += _listening_sockets(pid)
            time.sleep(0.05)
        ss = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout if os.path.exists(
            "/usr/bin/ss") else ""
    finally:
        stop.set()
        thread.join(timeout=60)
    assert done and set(done) == {6}, done  # computations really ran while we looked
    assert seen, "the worker has no listening socket?"
    assert all(_loopback_only(a) for a in seen), f"worker {pid} listens on {sorted(set(seen))}"
    for line in ss.splitlines():  # cross-check with ss where it exists: no wildcard for our pid
        if f"pid={pid}," in line:
            local = line.split()[3]
            assert not local.startswith(("*:", "0.0.0.0:", "[::]:")), line


_BIND_PROBE = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: binding an address this host lacks succeeds (no traffic is sent)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
try:
    s.bind((sys.argv[1], 0))
    print("BOUND", s.getsockname()[0])
except OSError as e:
    print("REFUSED", e.errno)
"""


def _bind_probe(address: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", _BIND_PROBE, address], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_bind_shim_rewrites_wildcards_and_refuses_other_addresses():
    import errno

    from tff_pipelines.workers import loopback

    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    confined = loopback.shim_environment()
    # Without the shim the probe binds what it asks for (so the refusals below are the shim's doing).
    assert _bind_probe("0.0.0.0", plain) == "BOUND 0.0.0.0"
    assert _bind_probe("192.0.2.7", plain) == "BOUND 192.0.2.7"
    assert _bind_probe("0.0.0.0", confined) == "BOUND 127.0.0.1"
    assert _bind_probe("::", confined) == "BOUND ::ffff:127.0.0.1"  # dual-stack socket: IPv4 loopback only
    assert _bind_probe("::1", confined) == "BOUND ::1"
    assert _bind_probe("127.0.0.5", confined) == "BOUND 127.0.0.5"
    assert _bind_probe("192.0.2.7", confined) == f"REFUSED {errno.EADDRNOTAVAIL}"
    assert _bind_probe("2001:db8::7", confined) == f"REFUSED {errno.EADDRNOTAVAIL}"
    chosen = loopback.shim_environment("192.0.2.7")  # `worker --bind`: wildcards become the chosen address
    assert _bind_probe("::", chosen) == "BOUND ::ffff:192.0.2.7"
    assert _bind_probe("0.0.0.0", chosen) == "BOUND 192.0.2.7"
    assert _bind_probe("192.0.2.8", chosen) == f"REFUSED {errno.EADDRNOTAVAIL}"
    garbled = {**confined, loopback.BIND_ENV_VAR: "not-an-address"}  # never widen on a bad target
    assert _bind_probe("0.0.0.0", garbled) == f"REFUSED {errno.EADDRNOTAVAIL}"


def test_no_compiler_fails_closed(tmp_path, monkeypatch):
    from tff_pipelines.workers import loopback

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.delenv(loopback.OPT_OUT_ENV_VAR, raising=False)
    with pytest.raises(loopback.WorkerExposureError, match="no C compiler") as err:
        runtime._worker_environment(None)
    assert loopback.OPT_OUT_ENV_VAR in str(err.value)  # the message names the documented opt-out
    monkeypatch.setenv(loopback.OPT_OUT_ENV_VAR, "1")
    assert runtime._worker_environment(None) is None  # opted out: the worker inherits our environment as is
    assert list((tmp_path / "prism-tf").iterdir()) == []  # no half-built library left


def test_shim_is_built_once_per_source_and_atomically(tmp_path, monkeypatch):
    from tff_pipelines.workers import loopback

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = loopback.shim_library()
    mtime = first.stat().st_mtime_ns
    assert loopback.shim_library() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left
    assert (first.parent.stat().st_mode & 0o022) == 0
