"""Lifecycle of the local TFF C++ worker process.

Why this module exists: `import tensorflow_federated` installs a synchronous local C++ context whose first
computation call starts `tensorflow_federated/data/worker_binary` with *the caller's* stdout/stderr, and whose
only cleanup is a `__del__` that does not run at interpreter exit. The orphaned worker keeps the stdout pipe
open, so `python script.py | cat` (and any CI that reads a pipe) hangs forever. TFF's worker start also calls
`sys.stdout.fileno()`, which fails when stdout was replaced (pytest's capsys, `contextlib.redirect_stdout`).

Here we start the worker ourselves, before the first computation:

* its stdin is /dev/null and its stdout/stderr go to a log file, never to the caller's streams;
* it listens on loopback only (TFF's binary binds every interface and has no authentication): an `LD_PRELOAD`
  shim rewrites its wildcard bind, and we connect to the address it actually bound after checking that no socket
  of it is wider (`tff_pipelines.loopback`; docs/pitfalls.md, "The TFF worker process");
* it gets `prctl(PR_SET_PDEATHSIG, SIGTERM)`, so the kernel terminates it even if Python is SIGKILLed;
* it runs in its own process group, so a terminal's Ctrl-C or Jupyter's "interrupt kernel" (SIGINT to the
  whole group) does not kill it while Python survives the KeyboardInterrupt;
* `shutdown()` terminates it (SIGTERM, bounded wait, SIGKILL) and runs at `atexit` and on SIGTERM/SIGHUP
  (handlers chained to any previous one, exit status 128+signum; a watcher thread makes them effective even
  when the main thread is blocked in a system call, see `_start_signal_watcher`);
* a computation after the worker is gone raises `RuntimeError` instead of TFF's endless retry;
* a `tff.framework.SyncExecutionContext` talking to it over gRPC (the same pieces TFF's own
  `create_sync_local_cpp_execution_context` uses) is installed as the default context, so TFF never spawns a
  worker of its own.

Threads: TFF's context stack is thread-local. A thread other than the one that imported the package has no
default context ("No default context installed") until it calls `install_in_current_thread()` (or
`install_local_context()`, which does the same once the worker runs).

PDEATHSIG fires when the *thread* that forked the worker exits, not the process. So the worker is forked from
the main thread when possible; when the first install happens on another thread, it is forked from a parked
daemon thread that lives as long as the process (see `_spawn_from_long_lived_thread`).

Environment: the worker inherits `os.environ` as it is when it starts (so e.g. `TF_ENABLE_ONEDNN_OPTS` must be
set before importing `tff_pipelines`). `TFF_PIPELINES_WORKER_LOG=<path>` sets the worker's log file for the
automatic install done by `import tff_pipelines`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
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
from dataclasses import dataclass, field
from typing import Any

import grpc
import portpicker
import tensorflow_federated as tff

from tff_pipelines import loopback

__all__ = [
    "install_in_current_thread",
    "install_local_context",
    "shutdown",
    "worker_log_path",
    "worker_pids",
]

LOG_ENV_VAR = "TFF_PIPELINES_WORKER_LOG"

# The same gRPC limits TFF's own local executor factory uses (2 GB messages: model weights travel in them).
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
]
# The binary is ~300 MB; a cold page cache on a loaded 2-core CI machine can take several seconds to map it.
_STARTUP_TIMEOUT_S = 60.0
_START_ATTEMPTS = 3  # a port picked free can be taken before the worker binds it: retry on a fresh port
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
        """gRPC target of the worker, e.g. ``[::1]:4321``."""
        return f"{self.host}:{self.port}"


@dataclass
class _Runtime:
    worker: _Worker | None = None
    context: Any = None  # tff.framework.SyncExecutionContext
    channel: grpc.Channel | None = None
    owner_pid: int = 0  # a forked child must never terminate its parent's worker
    shutting_down: bool = False
    # TFF's own default contexts seen when we replaced them: shutdown() stops any worker they started.
    replaced_tff_contexts: list[Any] = field(default_factory=list)


_lock = threading.RLock()
_rt = _Runtime()
_hooks_registered = False
_previous_signal_handlers: dict[int, Any] = {}
_last_handled: dict[int, float] = {}  # monotonic time at which _on_signal last ran, per signal
_wakeup_fds: list[int] = []


# --------------------------------------------------------------------------------------------- public API


def install_local_context(*, max_concurrent_computation_calls: int = -1, log_path: str | None = None) -> None:
    """Starts our own TFF worker (once) and makes it the default TFF context of the calling thread.

    Idempotent: later calls only install the existing context in the calling thread (TFF's context stack is
    thread-local); their arguments are ignored while a worker is running.

    Args:
      max_concurrent_computation_calls: passed to `worker_binary`; non-positive means no limit (TFF's
        default).
      log_path: file that receives the worker's stdout and stderr. Default: `$TFF_PIPELINES_WORKER_LOG` if
        set, else a temp file that is deleted at a clean shutdown (kept, and its path printed to stderr, if
        the worker died on its own). `os.devnull` discards the output.

    Raises:
      RuntimeError: the worker binary is missing, or the worker did not accept connections in time.
      loopback.WorkerExposureError: the worker cannot be confined to loopback (no C compiler for the shim).
    """
    with _lock:
        if _rt.context is None or _rt.owner_pid != os.getpid():
            _start(max_concurrent_computation_calls, log_path)
        _set_thread_default_context(_rt.context)


def install_in_current_thread() -> None:
    """Makes the calling thread use our context (starting the worker first if needed).

    Call this at the start of any thread that runs TFF computations: TFF's context stack is thread-local,
    so a new thread otherwise fails with "No default context installed".
    """
    install_local_context()


def shutdown() -> None:
    """Stops our worker: SIGTERM, bounded wait, SIGKILL fallback. Idempotent and safe at interpreter exit.

    Also stops a worker that TFF's own default context may have started (defense in depth; reached through
    TFF private attributes, guarded so that a change in TFF's internals cannot break exit). After this, TFF
    computations fail with a clear error until `install_local_context()` is called again.
    """
    with _lock:
        if _rt.owner_pid != os.getpid():
            return  # nothing started by this process (or we are a forked child): leave the worker alone
        _rt.shutting_down = True
        worker, _rt.worker = _rt.worker, None
        channel, _rt.channel = _rt.channel, None
        _rt.context = None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
        if worker is not None:
            died_on_its_own = worker.proc.poll() is not None
            _terminate(worker.proc)
            _finish_log(worker, died_on_its_own)
        for ctx in _rt.replaced_tff_contexts:
            _stop_tff_managed_worker(ctx)


def worker_pids() -> list[int]:
    """PIDs of live worker_binary processes this process started (ours, and any TFF's own context started)."""
    with _lock:
        pids: list[int] = []
        if _rt.worker is not None and _rt.worker.proc.poll() is None:
            pids.append(_rt.worker.proc.pid)
        for ctx in _rt.replaced_tff_contexts:
            proc = _tff_managed_process(ctx)
            if proc is not None and proc.poll() is None:
                pids.append(proc.pid)
        return pids


def worker_log_path() -> str | None:
    """Path of the running worker's log file (None if no worker runs or its output is discarded)."""
    with _lock:
        return None if _rt.worker is None else _rt.worker.log_path


# --------------------------------------------------------------------------------------------- starting


def _worker_binary_path() -> str:
    # Where TFF's `local_cpp_executor_factory` looks: <tensorflow_federated package>/data/worker_binary.
    path = os.path.join(os.path.dirname(os.path.abspath(tff.__file__)), "data", "worker_binary")
    if not os.path.isfile(path):
        raise RuntimeError(f"Expected TFF's worker binary at {path}; is tensorflow-federated installed?")
    return path


def _start(max_concurrent_computation_calls: int, log_path: str | None) -> None:
    _register_exit_hooks()
    _remember_tff_default_context()
    binary = _worker_binary_path()
    if log_path is None:
        log_path = os.environ.get(LOG_ENV_VAR) or None
    _rt.owner_pid = os.getpid()
    _rt.shutting_down = False
    last_error = ""
    env = _worker_environment(None)  # before any spawn: no compiler means no worker at all (fail closed)
    for _ in range(_START_ATTEMPTS):
        worker = _spawn(binary, portpicker.pick_unused_port(), max_concurrent_computation_calls, log_path, env)
        _rt.worker = worker  # visible to shutdown() at once, should a signal arrive while we wait
        try:
            error = _wait_until_listening(worker)
        except loopback.WorkerExposureError:
            _rt.worker = None
            _terminate(worker.proc)
            _finish_log(worker, died_on_its_own=False)
            raise
        if error is None:
            break
        last_error = error
        _rt.worker = None
        _terminate(worker.proc)
        _finish_log(worker, died_on_its_own=True)
    else:
        raise RuntimeError(f"TFF worker_binary did not start after {_START_ATTEMPTS} attempts: {last_error}")
    _rt.channel = grpc.insecure_channel(worker.target, _GRPC_CHANNEL_OPTIONS)
    _rt.context = _build_context(_WatchedStub(tff.framework.RemoteExecutorGrpcStub(_rt.channel), worker))


def _build_context(stub: tff.framework.RemoteExecutorStub) -> tff.framework.SyncExecutionContext:
    # Mirrors tff.backends.native.create_sync_local_cpp_execution_context (TFF 0.87), with our stub in place
    # of the one TFF's ServiceManager would create after spawning its own worker.
    default_num_clients = 0

    def stack_fn(cardinalities: dict[Any, int]) -> tff.framework.RemoteExecutor:
        if cardinalities.get(tff.CLIENTS) is None:
            cardinalities[tff.CLIENTS] = default_num_clients
        executor = tff.framework.RemoteExecutor(stub, stream_structs=False)
        executor.set_cardinalities(cardinalities)
        return executor

    factory = tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)
    return tff.framework.SyncExecutionContext(
        executor_fn=factory,
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


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
    with the bind shim it is ``::1`` (or ``127.0.0.1`` where the host has no IPv6 loopback), not whatever
    ``localhost`` resolves to first.

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
            print(f"tff_pipelines.runtime: TFF worker exited unexpectedly (code {worker.proc.returncode}); "
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


def _register_exit_hooks() -> None:
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    atexit.register(shutdown)
    # Python only lets the main thread set signal handlers; elsewhere atexit and PDEATHSIG still cover us.
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # e.g. SIGHUP under nohup: the user asked for the signal to be ignored
        _previous_signal_handlers[signum] = previous
        signal.signal(signum, _on_signal)
    if _previous_signal_handlers:
        _start_signal_watcher()


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    """SIGTERM/SIGHUP: stop the worker, run any previous handler, then exit with status 128+signum."""
    _last_handled[signum] = time.monotonic()
    shutdown()
    previous = _previous_signal_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    # SystemExit (not os._exit) so atexit handlers and `finally` blocks of the program still run.
    sys.exit(128 + signum)


def _start_signal_watcher() -> None:
    """Makes SIGTERM/SIGHUP effective even while the main thread blocks in a system call.

    Python runs signal handlers in the main thread, the next time it executes bytecode. The kernel may deliver
    a process-directed signal to any thread (TF, gRPC and TFF have many) and then a main thread blocked in
    `time.sleep`, a lock wait or a socket read is not interrupted: the handler could wait for minutes (seen
    once in this repo's tests: SIGHUP ignored while the main thread slept). Python's C-level handler writes
    the signal number to the wakeup fd whichever thread caught it; a watcher thread reads it and, if the main
    thread has not run the handler shortly after, re-sends the signal to the main thread (EINTR wakes it),
    and as a last resort stops the worker itself.

    Skipped if another library already owns the wakeup fd (there is only one); the handler then works as
    plain Python handlers do.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # required by set_wakeup_fd; a full pipe just drops bytes
    try:
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous_fd = None
    if previous_fd != -1:
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)
        return
    _wakeup_fds[:] = [read_fd, write_fd]  # keep them open for the life of the process
    threading.Thread(target=_watch_signals, args=(read_fd,), name="tff-signal-watcher", daemon=True).start()


def _watch_signals(read_fd: int) -> None:
    echoes: dict[int, int] = {}  # re-sent signals come back through the wakeup fd once more: skip them
    main_ident = threading.main_thread().ident
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum not in _previous_signal_handlers:
                continue
            if echoes.get(signum, 0) > 0:
                echoes[signum] -= 1
                continue
            arrived = time.monotonic()
            if _handled_since(signum, arrived - 0.5, wait_s=0.1):
                continue
            echoes[signum] = echoes.get(signum, 0) + 1
            with contextlib.suppress(Exception):
                if main_ident is not None:
                    signal.pthread_kill(main_ident, signum)
            if not _handled_since(signum, arrived - 0.5, wait_s=1.0):
                shutdown()  # the main thread is stuck in C code: at least the worker must not outlive us


def _handled_since(signum: int, since: float, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if _last_handled.get(signum, float("-inf")) >= since:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------- TFF internals


class _WatchedStub(tff.framework.RemoteExecutorStub):
    """Delegates to the gRPC stub; turns "worker unavailable" into a hard error once our worker is gone.

    TFF retries `UNAVAILABLE` gRPC errors forever (exponential backoff capped at 30 s), so without this a
    computation called after the worker died or after `shutdown()` would hang instead of failing.
    """

    def __init__(self, inner: tff.framework.RemoteExecutorGrpcStub, worker: _Worker):
        self._inner = inner
        self._worker = worker

    def _call(self, name: str, request: Any) -> Any:
        try:
            return getattr(self._inner, name)(request)
        except tff.framework.RetryableError as e:
            if _rt.worker is not self._worker or self._worker.proc.poll() is not None:
                if _rt.shutting_down and _rt.worker is None:
                    reason = "tff_pipelines.runtime.shutdown() was called"
                else:
                    reason = (f"the TFF worker (pid {self._worker.proc.pid}) exited with code "
                              f"{self._worker.proc.returncode}; log: {self._worker.log_path}")
                raise RuntimeError(f"TFF computation failed: {reason}") from e
            raise

    def get_executor(self, request: Any) -> Any:
        return self._call("get_executor", request)

    def create_value(self, request: Any) -> Any:
        return self._call("create_value", request)

    def create_struct(self, request: Any) -> Any:
        return self._call("create_struct", request)

    def create_call(self, request: Any) -> Any:
        return self._call("create_call", request)

    def create_selection(self, request: Any) -> Any:
        return self._call("create_selection", request)

    def compute(self, request: Any) -> Any:
        return self._call("compute", request)

    def dispose(self, request: Any) -> Any:
        return self._call("dispose", request)

    def dispose_executor(self, request: Any) -> Any:
        return self._call("dispose_executor", request)

    @property
    def is_ready(self) -> bool:
        return self._inner.is_ready


def _set_thread_default_context(ctx: Any) -> None:
    # tff.framework.set_default_context acts on the calling thread's (thread-local) context stack.
    tff.framework.set_default_context(ctx)


def _remember_tff_default_context() -> None:
    """Keeps the context TFF installed at import, so shutdown() can stop its worker if it started one."""
    with contextlib.suppress(Exception):
        ctx = tff.framework.get_context_stack().current
        if (ctx is not _rt.context and not isinstance(ctx, _LazyContext) and ctx not in _rt.replaced_tff_contexts
                and _tff_service_manager(ctx)):
            _rt.replaced_tff_contexts.append(ctx)


def _tff_service_manager(ctx: Any) -> Any:
    """The `ServiceManager` in TFF 0.87's `local_cpp_executor_factory` closure, or None (TFF private)."""
    try:
        stack_fn = ctx.executor_factory._executor_stack_fn
        for cell in stack_fn.__closure__ or ():
            obj = cell.cell_contents
            if hasattr(obj, "_process") and hasattr(obj, "get_stub"):
                return obj
    except Exception:
        pass
    return None


def _tff_managed_process(ctx: Any) -> subprocess.Popen[bytes] | None:
    manager = _tff_service_manager(ctx)
    proc = getattr(manager, "_process", None)
    return proc if isinstance(proc, subprocess.Popen) else None


def _stop_tff_managed_worker(ctx: Any) -> None:
    try:
        manager = _tff_service_manager(ctx)
        proc = _tff_managed_process(ctx)
        if proc is None:
            return
        _terminate(proc)
        # Its __del__ would otherwise os.kill() the (reaped, possibly reused) pid later.
        manager._process = None
        manager._stub = None
    except Exception:
        pass


class _LazyContext(tff.framework.SyncContext):
    """The default context until a computation runs: its first ``invoke`` starts our worker (`install_local_context`)
    and hands the call to the real context, which is the thread's default from then on."""

    def invoke(self, comp: Any, arg: Any) -> Any:
        install_local_context(log_path=os.environ.get(LOG_ENV_VAR) or None)
        return _rt.context.invoke(comp, arg)


def install_lazy_context() -> None:
    """Make the calling thread's default TFF context one that starts our worker when a computation first runs.

    Importing this module does this (every module that builds TFF computations imports it, through
    `tff_pipelines.layout`): TFF's stock context never gets to start a worker of its own with our pipes, and a
    program that only builds computations, or never runs one, starts no worker at all.
    """
    with _lock:
        if _rt.context is not None and _rt.owner_pid == os.getpid():
            _set_thread_default_context(_rt.context)
        else:
            _remember_tff_default_context()  # a worker TFF's stock context started is still ours to stop
            if _rt.replaced_tff_contexts:
                _rt.owner_pid = _rt.owner_pid or os.getpid()
                _register_exit_hooks()
            _set_thread_default_context(_LAZY)


_LAZY = _LazyContext()
install_lazy_context()
