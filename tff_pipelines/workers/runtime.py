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
  of it is wider (`tff_pipelines.workers.loopback`; docs/pitfalls.md, "The TFF worker process");
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
import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any

import grpc
import portpicker
import tensorflow_federated as tff

from tff_pipelines.workers import loopback
from tff_pipelines.workers.worker_process import (
    _finish_log,
    _spawn,
    _terminate,
    _wait_until_listening,
    _Worker,
    _worker_binary_path,
    _worker_environment,
)

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
_START_ATTEMPTS = 3  # a port picked free can be taken before the worker binds it: retry on a fresh port


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


class DelegatingStub(tff.framework.RemoteExecutorStub):
    """A gRPC executor stub whose every call goes through ``_call(name, request)`` to ``self._inner``: the one place
    where a subclass decides what a failed call means (the local worker's death, a remote worker's absence)."""

    _inner: Any

    def _call(self, name: str, request: Any) -> Any:
        raise NotImplementedError

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


class _WatchedStub(DelegatingStub):
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
                    reason = "tff_pipelines.workers.runtime.shutdown() was called"
                else:
                    reason = (f"the TFF worker (pid {self._worker.proc.pid}) exited with code "
                              f"{self._worker.proc.returncode}; log: {self._worker.log_path}")
                raise RuntimeError(f"TFF computation failed: {reason}") from e
            raise


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
    `tff_pipelines.round.layout`): TFF's stock context never gets to start a worker of its own with our pipes, and a
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
