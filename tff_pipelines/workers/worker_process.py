"""The TFF worker process itself, without TensorFlow: start it confined, wait until it listens, stop it.

`tff_pipelines.workers.runtime` uses these pieces for the local worker behind its TFF context; `serve` runs one worker
in the foreground for ``python -m tff_pipelines worker`` (scale-out, docs/deploy.md). Nothing here imports TensorFlow
or TFF, so a worker command starts in well under a second and has no TensorFlow threads: a plain Python signal
handler in its main thread is enough (the runtime's signal watcher exists for processes full of TF threads).

The worker gets: stdin /dev/null and its output in a log file; `prctl(PR_SET_PDEATHSIG, SIGTERM)` so it dies with
its parent even on SIGKILL; its own process group (a terminal's Ctrl-C reaches only Python); an environment with the
bind shim that confines it to loopback or one chosen address (`tff_pipelines.workers.loopback`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tff_pipelines.workers import loopback

# The binary is ~300 MB; a cold page cache on a loaded 2-core CI machine can take several seconds to map it.
_STARTUP_TIMEOUT_S = 60.0
_TERMINATE_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: str | None
    log_is_temp: bool
    bind: str | None = None  # None: loopback (the shim's default); else the address asked for
    host: str = "localhost"  # where to connect: the address the worker actually bound (`_wait_until_listening`)

    @property
    def target(self) -> str:
        """gRPC target of the worker, e.g. ``127.0.0.1:4321`` or ``[::1]:4321``."""
        return f"{self.host}:{self.port}"


def _worker_binary_path() -> str:
    # Where TFF's `local_cpp_executor_factory` looks: <tensorflow_federated package>/data/worker_binary. Found
    # without importing TFF (and so TensorFlow): a `worker` command starts in well under a second.
    spec = importlib.util.find_spec("tensorflow_federated")
    package_dir = os.path.dirname(spec.origin) if spec is not None and spec.origin else "<tensorflow_federated>"
    path = os.path.join(package_dir, "data", "worker_binary")
    if not os.path.isfile(path):
        raise RuntimeError(f"Expected TFF's worker binary at {path}; is tensorflow-federated installed?")
    return path


def _pdeathsig_setter() -> Callable[[], None] | None:
    """Returns a function for the forked child that asks the kernel to SIGTERM it when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # Resolved here, before fork: the child (which runs between fork and exec while other threads of the
    # parent may have held locks) then only makes one foreign call.
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # If the parent died between fork() and prctl(), the death signal will never come: exit now.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _worker_environment(bind: str | None) -> dict[str, str] | None:
    """The worker's environment: the bind shim confining it to ``bind`` (None: loopback), or None (inherit
    ours unchanged) for a wildcard ``bind`` or with the documented opt-out (`loopback.OPT_OUT_ENV_VAR`)."""
    if (bind is not None and loopback.is_wildcard(bind)) or (bind is None and loopback.opted_out()):
        return None
    return loopback.shim_environment(bind)


def _spawn(binary: str, port: int, max_calls: int, log_path: str | None, env: dict[str, str] | None,
           bind: str | None = None) -> _Worker:
    log_is_temp = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="tff_worker_", suffix=".log")
        os.close(fd)
    args = [binary, f"--port={port}", f"--max_concurrent_computation_calls={max_calls}"]
    preexec = _pdeathsig_setter()

    def popen() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                env=env,
                # Own process group: Ctrl-C in a terminal and Jupyter's "interrupt kernel" signal the whole
                # foreground group with SIGINT, which would kill the worker (it exits on SIGINT) while Python
                # survives the KeyboardInterrupt. Exit is still covered: atexit, signal handlers, PDEATHSIG.
                process_group=0,
                preexec_fn=preexec,
            )

    if threading.current_thread() is threading.main_thread():
        proc = popen()
    else:
        proc = _spawn_from_long_lived_thread(popen)
    return _Worker(proc=proc, port=port, log_path=None if log_path == os.devnull else log_path,
                   log_is_temp=log_is_temp, bind=bind)


def _spawn_from_long_lived_thread(popen: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Forks from a daemon thread that never exits, so PDEATHSIG fires only when the whole process dies.

    Forking from a short-lived caller thread would make the kernel SIGTERM the worker as soon as that thread
    ends.
    """
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["proc"] = popen()
        except BaseException as e:  # handed to the caller below
            result["error"] = e
        done.set()
        threading.Event().wait()  # park forever; a daemon thread does not delay interpreter exit

    threading.Thread(target=run, name="tff-worker-parent", daemon=True).start()
    done.wait()
    if "error" in result:
        raise result["error"]
    return result["proc"]


def _wait_until_listening(worker: _Worker) -> str | None:
    """Waits (bounded) until the worker listens and accepts connections; returns an error message, or None.

    The address to connect to is read from the worker's own listening sockets (`loopback.listening_addresses`):
    with the bind shim it is ``127.0.0.1`` (``::1`` on an IPv6-only socket), not whatever ``localhost`` resolves
    to first.

    Raises:
      loopback.WorkerExposureError: the worker listens more widely than asked (never left running).
    """
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            return f"worker exited with code {worker.proc.returncode}; log:\n{_log_tail(worker)}"
        try:
            bound = [a for a in loopback.listening_addresses(worker.proc.pid) if a[1] == worker.port]
        except OSError:
            bound = []
        if bound:
            _check_exposure(worker, bound)
            worker.host = _connect_host(bound[0][0])
            try:
                with socket.create_connection((worker.host.strip("[]"), worker.port), timeout=0.5):
                    return None
            except OSError:
                pass
        time.sleep(0.05)
    return f"worker did not accept connections on port {worker.port} within {_STARTUP_TIMEOUT_S:.0f} s"


def _check_exposure(worker: _Worker, bound: list[tuple[str, int]]) -> None:
    if worker.bind is not None and loopback.is_wildcard(worker.bind):
        return  # every interface was asked for
    if worker.bind is None and loopback.opted_out():
        return
    allowed = {worker.bind} if worker.bind is not None else set()
    wide = [a for a, _ in bound if not loopback.is_loopback(a) and not _same_address(a, allowed)]
    if wide:
        raise loopback.WorkerExposureError(
            f"the TFF worker (pid {worker.proc.pid}) listens on {', '.join(wide)} port {worker.port}, wider than "
            f"{worker.bind or 'loopback'}; it was stopped")


def _same_address(address: str, allowed: set[str]) -> bool:
    return any(_plain(address) == _plain(a) for a in allowed)


def _plain(address: str) -> str:
    """An address with IPv4-mapped IPv6 (``::ffff:a.b.c.d``) written as IPv4, normalized."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _connect_host(bound: str) -> str:
    """Host part of a gRPC target reaching a socket bound to ``bound`` (brackets for IPv6)."""
    if loopback.is_wildcard(bound):
        bound = "::1" if ":" in bound else "127.0.0.1"
    plain = _plain(bound)
    return f"[{plain}]" if ":" in plain else plain


# --------------------------------------------------------------------------------------------- stopping


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=_TERMINATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_TERMINATE_TIMEOUT_S)


def _finish_log(worker: _Worker, died_on_its_own: bool) -> None:
    if worker.log_path is None or not worker.log_is_temp:
        return
    with contextlib.suppress(OSError):
        if died_on_its_own and os.path.getsize(worker.log_path) == 0:
            died_on_its_own = False  # nothing to read: do not leave an empty file behind
    if died_on_its_own:
        # Keep the evidence: a worker that exits by itself is a crash worth reading about.
        with contextlib.suppress(Exception):
            print(f"tff_pipelines.workers.runtime: TFF worker exited unexpectedly (code {worker.proc.returncode}); "
                  f"its log is at {worker.log_path}", file=sys.stderr)
        return
    with contextlib.suppress(OSError):
        os.unlink(worker.log_path)


def _log_tail(worker: _Worker, max_chars: int = 2000) -> str:
    if worker.log_path is None:
        return "(discarded)"
    try:
        with open(worker.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-max_chars:]
    except OSError as e:
        return f"(unreadable: {e})"


# --------------------------------------------------------------------------------------------- foreground worker


def serve(port: int, bind: str | None = None, *, log_path: str | None = None,
          max_concurrent_computation_calls: int = -1, announce: Callable[[str], None] | None = None) -> int:
    """Runs one TFF worker in the foreground (``python -m tff_pipelines worker``) until it exits or we are stopped.

    The worker has the local worker's guarantees: its output goes to ``log_path`` (default: a temp file, kept and
    named if it crashes), it dies with this process (PDEATHSIG), and SIGTERM/SIGHUP/Ctrl-C stop it (this process
    then exits with 128+signum; 130 for Ctrl-C). It listens on loopback unless ``bind`` names another address (the
    bind shim confines it to that one; ``0.0.0.0`` or ``::`` means every interface, unconfined). It has no
    authentication: whoever reaches the address can run any TensorFlow graph as this user (docs/deploy.md).

    Returns:
      128+signum when stopped by a signal, 130 after Ctrl-C, 1 if the worker exited on its own.

    Raises:
      ValueError: ``port`` outside 1..65535 or ``bind`` not a numeric IP address.
      RuntimeError: the worker did not start (e.g. the port is taken); the message has its log's tail.
      loopback.WorkerExposureError: it cannot be confined to ``bind`` (no C compiler for the shim).
    """
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if bind is not None:
        try:
            bind = str(ipaddress.ip_address(bind))
        except ValueError:
            raise ValueError(f"--bind must be a numeric IPv4 or IPv6 address of this host, got {bind!r}") from None
    announce = announce or (lambda line: print(line, flush=True))
    env = _worker_environment(bind)
    binary = _worker_binary_path()
    stopped_by: list[int] = []

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stopped_by.append(signum)
        raise KeyboardInterrupt  # unwinds the wait below into the `finally` that stops the worker

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                previous[signum] = signal.signal(signum, on_signal)
    worker = None
    try:
        worker = _spawn(binary, int(port), max_concurrent_computation_calls, log_path, env, bind)
        atexit.register(_terminate, worker.proc)
        error = _wait_until_listening(worker)
        if error is not None:
            raise RuntimeError(f"the TFF worker did not start on port {port}: {error}"
                               + ("" if "log:" in error else f"; log:\n{_log_tail(worker)}"))
        exposure = ("every interface, unauthenticated" if bind is not None and loopback.is_wildcard(bind)
                    else "loopback only" if bind is None else f"{bind} only, unauthenticated")
        announce(f"tff_pipelines worker: listening on {worker.target} ({exposure}); pid {worker.proc.pid}, "
                 f"log {worker.log_path or '(discarded)'}; stop with Ctrl-C or SIGTERM")
        while worker.proc.poll() is None:
            time.sleep(0.2)
        code = worker.proc.returncode
        _finish_log(worker, died_on_its_own=True)
        print(f"tff_pipelines worker: the TFF worker exited by itself with code {code}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 128 + stopped_by[0] if stopped_by else 130
    finally:
        if worker is not None and worker.proc.poll() is None:
            _terminate(worker.proc)
            _finish_log(worker, died_on_its_own=False)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------- command line

DESCRIPTION = ("Start one TFF worker in the foreground for `train --workers`. It has no authentication: anyone who "
               "can reach its address can run any TensorFlow graph as you. It listens on loopback unless --bind says "
               "otherwise; put an SSH tunnel or a TLS proxy in front of a worker on another host (docs/deploy.md). "
               "Stops on Ctrl-C, SIGTERM or SIGHUP; dies with this process.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``worker`` command's flags (shared by `tff_pipelines.program.cli` and `main`)."""
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--bind", default=None, metavar="ADDRESS",
                        help="numeric address to listen on (default: loopback; 0.0.0.0 or :: = every interface)")
    parser.add_argument("--log", default=None, metavar="PATH",
                        help="the worker's log file (default: a temp file, kept only if it crashes)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs `serve` for parsed ``worker`` arguments: exit 2 with one line for a usage error, 1 if it cannot start."""
    try:
        return serve(args.port, args.bind, log_path=args.log)
    except (ValueError, loopback.WorkerExposureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # did not start, e.g. the port is taken
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tff_pipelines worker ...`` without importing TensorFlow (see `tff_pipelines.__main__`)."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m tff_pipelines worker", description=DESCRIPTION))
    return run(parser.parse_args(argv))
