"""Rounds spread over several TFF workers: ``python -m tff_pipelines train ... --workers host:port,host:port``.

TFF ships the engine (docs/deploy.md): one ``worker_binary`` per host (``python -m tff_pipelines worker``), one
async execution context per worker, and ``tff.backends.native.create_mergeable_comp_execution_context`` over them.
That context compiles each computation into "up to merge" (everything before the round's aggregation: the
broadcast or ``federated_select`` and the clients' training), "merge" and "after merge" (the server step): the
clients of a round are split into one sub-round per worker, each worker aggregates its own clients, the partial
aggregates are merged with the aggregation's own ``merge`` function, and one worker runs the server step. Its limit
is one aggregation stage per computation (an aggregate that depends on another raises ``ValueError``); a PriSM round
fits: `tff_pipelines.round.process` aggregates the clients' sums/counts and their metrics side by side, once.

We write no scheduler: only the connections, and a clear error instead of TFF's endless retry when a worker is
gone (`WorkerUnavailableError` names it; the driver has not checkpointed the failed round, so `resume` with the
remaining workers continues from the last completed one).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import tensorflow_federated as tff

from tff_pipelines.workers import runtime

__all__ = ["WorkerUnavailableError", "build_context", "install_worker_context", "parse_workers"]

# How long a worker may stay unreachable (gRPC UNAVAILABLE) inside one computation before the round fails with an
# error naming it. TFF would retry forever; a short network hiccup below this is still retried.
UNAVAILABLE_GRACE_S = float(os.environ.get("TFF_PIPELINES_WORKER_GRACE_S", "10"))
_CONNECT_TIMEOUT_S = 30.0


class WorkerUnavailableError(RuntimeError):
    """A remote TFF worker cannot be reached (not started, crashed, or the network is down)."""


def parse_workers(spec: str | Sequence[str]) -> list[str]:
    """``"host:port,host:port"`` (or a list of them) as gRPC targets; IPv6 hosts in brackets (``[::1]:8000``).

    Raises:
      ValueError: an entry without a port, a port outside 1..65535, an empty list, or a worker named twice.
    """
    entries = [e.strip() for e in (spec.split(",") if isinstance(spec, str) else spec)]
    if not entries or any(not e for e in entries):
        raise ValueError(f"--workers: expected host:port,host:port,..., got {spec!r}")
    targets = []
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"--workers: {entry!r} is not host:port (port 1..65535; IPv6 as [addr]:port)")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"--workers: write the IPv6 address of {entry!r} in brackets: [addr]:port")
        if host.startswith("["):
            ipaddress.IPv6Address(host[1:-1])  # ValueError names it
        targets.append(f"{host}:{int(port)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"--workers: a worker is listed twice in {spec!r}")
    return targets


class _RemoteStub(runtime.DelegatingStub):
    """TFF's gRPC stub for one remote worker; raises `WorkerUnavailableError` once it has been unreachable for
    `UNAVAILABLE_GRACE_S` (TFF itself retries UNAVAILABLE forever with backoff up to 30 s)."""

    def __init__(self, target: str, channel: grpc.Channel):
        self.target = target
        self._inner = tff.framework.RemoteExecutorGrpcStub(channel)
        self._unavailable_since: float | None = None
        self._lock = threading.Lock()

    def _call(self, name: str, request: Any) -> Any:
        try:
            result = getattr(self._inner, name)(request)
        except tff.framework.RetryableError as e:
            now = time.monotonic()
            with self._lock:
                since = self._unavailable_since = self._unavailable_since or now
            if now - since >= UNAVAILABLE_GRACE_S:
                raise WorkerUnavailableError(
                    f"TFF worker {self.target} is unreachable (for {now - since:.0f} s: {_grpc_detail(e)}); the "
                    "computation in progress is lost (a training run keeps its finished rounds checkpointed: start "
                    "the worker again, or `resume` with --workers naming the remaining ones)") from e
            raise
        with self._lock:
            self._unavailable_since = None
        return result


def _grpc_detail(error: BaseException) -> str:
    inner = getattr(error, "__cause__", None) or (error.args[0] if getattr(error, "args", None) else error)
    details = getattr(inner, "details", None)
    return details() if callable(details) else str(inner).splitlines()[0][:200]


def _async_context(stub: _RemoteStub) -> tff.framework.AsyncExecutionContext:
    # As tff.backends.native.create_async_local_cpp_execution_context (TFF 0.87), with a remote stub.
    def stack_fn(cardinalities: dict[Any, int]) -> tff.framework.RemoteExecutor:
        cardinalities.setdefault(tff.CLIENTS, 0)
        executor = tff.framework.RemoteExecutor(stub, stream_structs=False)
        executor.set_cardinalities(cardinalities)
        return executor

    return tff.framework.AsyncExecutionContext(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


def _check_reachable(channels: dict[str, grpc.Channel], timeout_s: float) -> None:
    futures = {t: grpc.channel_ready_future(c) for t, c in channels.items()}
    dead = []
    for target, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            dead.append(target)
    if dead:
        for channel in channels.values():
            channel.close()
        raise WorkerUnavailableError(
            f"TFF worker{'s' if len(dead) > 1 else ''} {', '.join(dead)} not reachable within {timeout_s:.0f} s "
            "(start each with `python -m tff_pipelines worker --port P` on its host; docs/deploy.md)")


def build_context(targets: Sequence[str], *, connect_timeout_s: float = _CONNECT_TIMEOUT_S) -> Any:
    """A `MergeableCompExecutionContext` spreading each round's clients over the workers at ``targets``.

    Raises:
      WorkerUnavailableError: a worker does not accept a connection within ``connect_timeout_s``.
    """
    channels = {t: grpc.insecure_channel(t, runtime._GRPC_CHANNEL_OPTIONS) for t in targets}
    _check_reachable(channels, connect_timeout_s)
    contexts = [_async_context(_RemoteStub(t, c)) for t, c in channels.items()]
    return tff.backends.native.create_mergeable_comp_execution_context(contexts)


def install_worker_context(targets: Sequence[str] | str, **kwargs: Any) -> Any:
    """Makes the calling thread's TFF computations run on the workers at ``targets`` (see `build_context`);
    returns the context. No local worker is started. Call it before building the `PrismProcess`' first round."""
    targets = parse_workers(targets) if isinstance(targets, str) else list(targets)
    context = build_context(targets, **kwargs)
    tff.framework.set_default_context(context)
    return context
