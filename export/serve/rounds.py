"""The round server's logic, without HTTP: open a round, hand each device its files, take uploads, close the round.

`RoundServer` owns the run's open round. Opening round ``N`` builds every drawn client's files with the exporter
(`export.client.client_round`, `export.client.training_model` once per graph, `export.client.client_files`) and
writes them, content-addressed, through `RunDir.write_serve_round` with the round's record (when it opened, its
deadline, each client's files by SHA-256); a restarted server reads that record back instead of rebuilding, so the
files and the deadline survive a crash. An upload is checked by device ingest's own checks
(`export.ingest.check_update`, against the manifest the server itself issued, never one the device sends) and
stored (`export.ingest.store_update`, atomic and fsynced) before the answer. The round closes when ``min_updates``
updates are in or at its deadline (with at least one update), through `export.ingest.finish_round`: the same server
step and checkpoint as ``python -m export finish-round``. With ``fill="simulated"`` a round with clients that sent no
update is finished by TFF instead, which simulates those clients (`export.serve.fill`: ``python -m tff_pipelines
resume --until-round N`` in a subprocess). Then the next round opens. A round that could not be finished stays open
(its stored updates kept), the reason in the log and in `RoundServer.status`, and closing is tried again later.

Every refusal is a `Refused` (HTTP status and a one-line reason) raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.client import client_files, client_round, graph_key, training_model
from export.ingest import IngestError, check_update, finish_round, read_upload, store_update
from export.serve import one_line
from export.serve.credentials import Device, authenticate
from export.serve.fill import FILLS, FillError, Simulator
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir, RunError

UPLOAD_SLACK = 64 * 1024
"""Bytes an upload may exceed the round's ``weights.npz`` by (zip headers): anything larger is refused (413)."""
FILES = ("manifest.json", "weights.npz", "model.tflite")
RETRY_SECONDS = 5.0
"""After a failed close (a full disk, say), the round is open again and closing is retried this many seconds later."""
FILL_RETRY_SECONDS = (30.0, 600.0)
"""After a failed simulation: the first retry's delay, doubled after each further failure up to the second."""


class Refused(Exception):
    """A request the server refuses: ``status`` (HTTP) and a one-line ``reason``; nothing was written."""

    def __init__(self, status: int, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry_after = status, reason, retry_after


@dataclasses.dataclass
class OpenRound:
    """The round being served: its replay, its record (``round.json``), each client's manifest, the clients whose
    update is stored, and whether it is closing (no more uploads)."""

    number: int
    replay: RoundReplay
    record: dict[str, Any]
    manifests: dict[int, dict[str, Any]]
    stored: set[int]
    closing: bool = False
    simulating: list[int] | None = None  # while TFF simulates these clients to finish the round

    @property
    def deadline(self) -> float | None:
        return self.record.get("deadline")


class RoundServer:
    """Serves the open round of the run in ``run_dir`` (see the module docstring).

    Args:
      run_dir: the run directory (`RunDir`).
      min_updates: close the round once this many updates are stored (default: every client the round draws).
      round_timeout: seconds after a round opens at which it closes with the updates it has (at least one; with
        none, the deadline moves on by another ``round_timeout``). ``None``: no deadline.
      runtime: the exported models' runtime (`export.client.export_client`'s).
      max_rounds: stop opening rounds after closing this many (``None``: until the run's configured rounds end).
      fill: ``"devices"`` (default): a round is finished with the devices' updates only; ``"simulated"``: the
        round's clients without an update are simulated by TFF at close (`export.serve.fill`).
      clock: wall-clock seconds (tests may pass another).
      log: where one-line events go.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, min_updates: int | None = None,
                 round_timeout: float | None = None, runtime: str = "builtins", max_rounds: int | None = None,
                 fill: str = "devices", clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = print) -> None:
        self.run = RunDir(run_dir)
        self.run.read_config()  # a missing or foreign run is refused here, before anything is served
        if min_updates is not None and int(min_updates) < 1:
            raise ValueError(f"--min-updates must be at least 1, got {min_updates}")
        if round_timeout is not None and not float(round_timeout) > 0:
            raise ValueError(f"--round-timeout must be positive, got {round_timeout}")
        if fill not in FILLS:
            raise ValueError(f"--fill must be one of {', '.join(FILLS)}, got {fill!r}")
        self.fill = fill
        self.simulator = Simulator(self.run, log=log) if fill == "simulated" else None
        self.close_error: str | None = None  # why the last attempt to close the open round failed
        self._retry_at: float | None = None  # not before then is closing tried again
        self._failures = 0
        self.min_updates, self.round_timeout = min_updates, round_timeout
        self.runtime, self.max_rounds, self.clock, self.log = runtime, max_rounds, clock, log
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.round: OpenRound | None = None
        self.unavailable = "the server is starting"
        self.closed_rounds = 0
        self._devices: tuple[float, dict[str, Any]] = (-1.0, {})
        self._stop = threading.Event()
        self.finished = threading.Event()  # set once ``max_rounds`` rounds are closed
        self._thread: threading.Thread | None = None

    # --- life -------------------------------------------------------------------------------------------------
    def start(self, *, wait: bool = False) -> None:
        """Open (or, after a restart, take up again) the run's open round in the background, then close rounds as
        they become due. Until the round is open, round requests are answered 503 with ``Retry-After`` (the
        server answers from the start: a long build makes no device time out). ``wait``: return once it is open."""
        self.unavailable = "the open round is being prepared"
        opened = threading.Event()

        def run() -> None:
            try:
                self._open()
            finally:
                opened.set()
            self._closer()

        self._thread = threading.Thread(target=run, name="rounds", daemon=True)
        self._thread.start()
        if wait:
            opened.wait()

    def stop(self) -> None:
        """Stop the background closer (a round being closed by the server step finishes first; a simulation
        finishing it is stopped, and the round stays open)."""
        self._stop.set()
        if self.simulator is not None:
            self.simulator.terminate()
        with self.changed:
            self.changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _open(self) -> None:
        """Open the run's open round: read its record if a previous server wrote one, else build its files."""
        if self.max_rounds is not None and self.closed_rounds >= self.max_rounds:
            with self.lock:
                self.round, self.unavailable = None, f"the server closed its {self.max_rounds} round(s) and stopped"
            self.finished.set()
            return
        try:
            number = self.run.open_round()
            self.run.run_id()  # the identity manifests name (made once)
            replay = RoundReplay(self.run.path, number)
            record = self.run.read_serve_round(number)
            if record is None:
                record = self._build(replay)
                how = "opened"
            else:
                how = "taken up again"
                if record.get("deadline") is None and self.round_timeout is not None:
                    record["deadline"] = self.clock() + float(self.round_timeout)
                    self.run.write_serve_round(number, record, {})
        except Exception as e:  # RunError, a layer the runtime cannot train, a full disk, a converter error, ...
            reason = one_line(f"no round can open: {e if isinstance(e, RunError | ValueError | OSError) else repr(e)}")
            with self.lock:
                self.round, self.unavailable = None, reason
            self.log(reason)
            return
        manifests = {int(c): json.loads(self.run.serve_file(number, files["manifest.json"]).read_bytes())
                     for c, files in record["clients"].items()}
        self.run.remove_serve_rounds(before=number)  # a round finished while no server ran (resume, finish-round)
        stored = {u.client for u in self.run.read_device_updates(number)}
        with self.lock:
            self.round = OpenRound(number, replay, record, manifests, stored)
            self.unavailable = ""
            self.changed.notify_all()
        deadline = record.get("deadline")
        self.log(f"round {number} {how}: {len(manifests)} clients, {len(stored)} update(s) stored, closes at "
                 f"{self._quorum()} update(s)"
                 + (f" or {max(0.0, deadline - self.clock()):.0f} s from now" if deadline else ""))

    def _build(self, replay: RoundReplay) -> dict[str, Any]:
        """Every drawn client's three files for round ``replay.round_num``, written through the run; its record."""
        began = time.perf_counter()
        files: dict[str, bytes] = {}
        models: dict[str, bytes] = {}
        clients: dict[str, dict[str, str]] = {}
        for client in replay.clients():
            sent = client_round(replay, client, self.runtime)
            key = graph_key(sent.manifest)
            if key not in models:  # one TFLite model per graph: its weights are only initial values
                models[key] = training_model(replay, sent, self.runtime)
            named = client_files(sent, models[key])
            clients[str(client)] = {}
            for name in FILES:
                digest = hashlib.sha256(named[name]).hexdigest()
                files[digest] = named[name]
                clients[str(client)][name] = digest
        now = self.clock()
        record = {"round": replay.round_num, "opened": now,
                  "deadline": None if self.round_timeout is None else now + float(self.round_timeout),
                  "clients": clients}
        self.run.write_serve_round(replay.round_num, record, files)
        self.log(f"round {replay.round_num}: built {len(clients)} clients' files ({len(models)} TFLite graph(s)) in "
                 f"{time.perf_counter() - began:.1f} s")
        return record

    @staticmethod
    def _filled(row: dict[str, Any]) -> str:
        """One line on a round TFF finished: which clients were devices and which simulated, its loss and
        coverage."""
        devices, simulated = row.get("device_clients", []), row.get("simulated_clients", [])
        parts = [f"finished round {row.get('round')} in TFF with {len(devices)} device update(s) (clients "
                 f"{', '.join(map(str, devices)) or 'none'}) and {len(simulated)} simulated client(s) (clients "
                 f"{', '.join(map(str, simulated)) or 'none'})"]
        for key, name in (("train_loss", "simulated clients' train loss"), ("kernel_coverage", "kernel coverage"),
                          ("eval_accuracy", "test accuracy")):
            if isinstance(row.get(key), int | float):
                parts.append(f"{name} {row[key]:.3f}")
        return "; ".join(parts)

    def _quorum(self) -> int:
        assert self.round is not None
        total = len(self.round.manifests)
        return total if self.min_updates is None else min(int(self.min_updates), total)

    # --- closing ----------------------------------------------------------------------------------------------
    def _due(self) -> tuple[bool, float | None]:
        """Whether the open round should close now, and else how long to wait at most (under the lock)."""
        current = self.round
        if current is None or current.closing:
            return False, None
        if self._retry_at is not None and self.clock() < self._retry_at:
            return False, self._retry_at - self.clock()
        if len(current.stored) >= self._quorum():
            return True, None
        if current.deadline is None:
            return False, None
        left = current.deadline - self.clock()
        if left > 0:
            return False, left
        if current.stored:
            return True, None
        # Nobody uploaded: the round stays open for another timeout rather than finishing with nothing.
        current.record["deadline"] = self.clock() + float(self.round_timeout or 0)
        self.run.write_serve_round(current.number, current.record, {})
        self.log(f"round {current.number}: deadline passed with no update; open for another {self.round_timeout} s")
        return False, float(self.round_timeout or 0)

    def _closer(self) -> None:
        while not self._stop.is_set():
            with self.changed:
                due, wait = self._due()
                if not due:
                    self.changed.wait(timeout=min(wait, 1.0) if wait is not None else 1.0)
                    continue
                assert self.round is not None
                self.round.closing = True
            try:
                self.close()
            except Exception as e:  # a full disk, a failed simulation: the round stays open, its updates stored
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        """Reopen the round a close failed to finish (its stored updates untouched) and say why, in one line."""
        self._failures += 1
        if isinstance(error, FillError):
            first, most = FILL_RETRY_SECONDS
            delay, reason = min(most, first * 2 ** (self._failures - 1)), error.reason
        else:
            delay, reason = RETRY_SECONDS, (str(error) if isinstance(error, RunError | ValueError | OSError)
                                            else repr(error))
        reason = one_line(reason)
        with self.lock:
            number = self.round.number if self.round else "?"
            if self.round is not None:
                self.round.closing, self.round.simulating = False, None
            self.close_error, self._retry_at = reason, self.clock() + delay
            self.changed.notify_all()
        again = "" if self._stop.is_set() else f"; it stays open, closing is tried again in {delay:.0f} s"
        self.log(f"round {number} could not be finished: {reason}{again}")

    def close(self) -> None:
        """Finish the open round with its stored updates (`export.ingest.finish_round`: checkpoint and metrics
        row), or with ``fill="simulated"`` and clients missing, with TFF simulating them (`export.serve.fill`);
        then open the next one. Uploads are refused from the moment it starts (409).

        Raises:
          FillError: the simulation failed (the round is not finished; the caller reopens it).
        """
        with self.lock:
            current = self.round
            if current is None:
                return
            current.closing = True
            missing = sorted(c for c in current.manifests if c not in current.stored)
            simulate = self.simulator is not None and bool(missing or current.replay.config.server_lr is not None)
            if simulate:
                current.simulating = missing
        began = time.perf_counter()
        if simulate:
            assert self.simulator is not None
            self.log(f"round {current.number}: closing with {len(current.stored)} device update(s); simulating "
                     f"client(s) {', '.join(map(str, missing)) or 'none'} in TFF")
            report = self._filled(self.simulator.finish(current.number))
        else:
            report = finish_round(self.run.path, current.number, min_clients=1, finished_by="export serve").report()
        self.closed_rounds += 1
        self.log(f"round {current.number} closed in {time.perf_counter() - began:.1f} s: {report}")
        with self.lock:
            self.round, self.unavailable = None, f"round {current.number + 1} is being prepared"
            self.close_error, self._retry_at, self._failures = None, None, 0
        self.run.remove_serve_rounds(before=current.number + 1)
        self._open()

    # --- requests ---------------------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Device:
        """The device of bearer credential ``token`` (``devices.json`` is re-read when it changes, so devices
        enrolled while the server runs are known at once).

        Raises:
          Refused: 401 without a credential or with one no device has.
        """
        if not token:
            raise Refused(401, "no credential: send `Authorization: Bearer <credential>` (python -m export enrol)")
        try:
            mtime = self.run.devices_path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        if mtime != self._devices[0]:
            self._devices = (mtime, self.run.read_devices())
        device = authenticate(self._devices[1], token)
        if device is None:
            raise Refused(401, "unknown credential: no enrolled device has it")
        return device

    def _current(self) -> OpenRound:
        current = self.round
        if current is None:
            raise Refused(503, self.unavailable or "no round is open", retry_after=5)
        return current

    def status(self) -> dict[str, Any]:
        """The open round: number, state, deadline, updates stored, the quorum and how missing clients are filled;
        while TFF simulates clients to finish it, ``simulating`` (their ids); after a failed close,
        ``close_error`` (one line) and ``retry_at`` (Unix seconds)."""
        with self.lock:
            current = self.round
            if current is None:
                return {"round": None, "state": "unavailable", "reason": self.unavailable}
            out = {"round": current.number, "state": "closing" if current.closing else "open",
                   "deadline": current.deadline, "clients": len(current.manifests),
                   "updates": len(current.stored), "min_updates": self._quorum(), "fill": self.fill}
            if current.simulating is not None:
                out["simulating"] = current.simulating
            if self.close_error is not None:
                out["close_error"], out["retry_at"] = self.close_error, self._retry_at
            return out

    def assignment(self, device: Device) -> dict[str, Any]:
        """What ``device`` does in the open round: its files (content-addressed URLs, sizes, SHA-256) and where to
        upload, or ``assigned: false`` when the round did not draw its client or is closing."""
        current = self._current()
        files = current.record["clients"].get(str(device.client))
        base = {"round": current.number, "client": device.client, "deadline": current.deadline}
        if files is None or current.closing or device.client in current.stored:
            why = ("the round is closing" if current.closing else
                   "its update is stored" if files is not None else f"round {current.number} did not draw client "
                   f"{device.client}")
            return {**base, "assigned": False, "reason": why, "retry_after": 30}
        manifest = current.manifests[device.client]
        described = {name: {"url": f"/v1/files/{digest}", "sha256": digest,
                            "bytes": self.run.serve_file(current.number, digest).stat().st_size}
                     for name, digest in files.items()}
        return {**base, "assigned": True, "run_id": manifest["run_id"], "size_key": manifest["size_key"],
                "graph_key": graph_key(manifest), "files": described,
                "upload": {"method": "PUT", "url": f"/v1/rounds/{current.number}/clients/{device.client}/update",
                           "max_bytes": self.max_upload_bytes(device)}}

    def file(self, device: Device, digest: str) -> tuple[Path, str]:
        """The path and name of file ``digest`` if it is in ``device``'s own assignment of the open round.

        Raises:
          Refused: 404 for any other file (another client's, an old round's, an unknown digest).
        """
        current = self._current()
        files = current.record["clients"].get(str(device.client), {})
        for name, known in files.items():
            if known == digest:
                return self.run.serve_file(current.number, digest), name
        raise Refused(404, f"no file {digest[:16]}... in client {device.client}'s assignment of round "
                           f"{current.number}")

    def max_upload_bytes(self, device: Device) -> int:
        """The largest upload ``device`` may send: its ``weights.npz`` plus `UPLOAD_SLACK` (0: not assigned)."""
        current = self.round
        manifest = current.manifests.get(device.client) if current else None
        return int(manifest["files"]["weights.npz"]["bytes"]) + UPLOAD_SLACK if manifest else 0

    def check_target(self, device: Device, round_num: int, client: int) -> OpenRound:
        """Refuse an upload to anywhere but ``device``'s own slot of the open round, before its body is read.

        Raises:
          Refused: 403 another client's slot; 409 a closed or future round, or the round is closing; 503 no round.
        """
        if client != device.client:
            raise Refused(403, f"device {device.name} trains client {device.client}, not client {client}")
        current = self._current()
        if round_num < current.number or (round_num == current.number and current.closing):
            raise Refused(409, f"round {round_num} is closed; the open round is "
                               f"{current.number + (1 if current.closing else 0)}")
        if round_num > current.number:
            raise Refused(409, f"round {round_num} has not opened; the open round is {current.number}")
        if client not in current.manifests:
            raise Refused(403, f"round {round_num} did not draw client {client}")
        return current

    def upload(self, device: Device, round_num: int, client: int, body: bytes,
               examples: float | None) -> tuple[int, dict[str, Any]]:
        """Check and store ``device``'s update for its slot; ``(201, answer)`` when stored now, ``(200, answer)``
        for a repeat of the stored update (idempotent: nothing written).

        The update is on disk (atomic, fsynced) before this returns. Checks run outside the lock, concurrently;
        the store runs under it, after checking again that the round is still open.

        Raises:
          Refused: 403/409/503 as `check_target`; 413 too large; 422 an update ingest refuses (named); 409 another
            update for this slot is stored already.
        """
        current = self.check_target(device, round_num, client)
        limit = self.max_upload_bytes(device)
        if len(body) > limit:
            raise Refused(413, f"the upload has {len(body):,} bytes; client {client}'s update is at most {limit:,}")
        manifest = current.manifests[client]
        try:
            checked = check_update(self.run, manifest, lambda: read_upload(body, max_bytes=2 * limit), examples,
                                   replay=current.replay, open_round=current.number)
        except IngestError as e:  # ingest names its CLI flag; here the count is a query parameter
            raise Refused(422, " ".join(str(e).replace("give --examples N", "give ?examples=N").split())) from None
        with self.lock:
            current = self.check_target(device, round_num, client)
            stored = self.run.read_device_update(round_num, client)
            if stored is not None:
                weights, meta = stored
                same = (meta.get("examples") == checked.examples and weights.keys() == checked.weights.keys()
                        and all(np.array_equal(weights[k], v) and weights[k].dtype == v.dtype
                                for k, v in checked.weights.items()))
                if not same:
                    raise Refused(409, f"client {client}'s update for round {round_num} is stored already (another "
                                       "one): a device uploads once per round")
                return 200, {"round": round_num, "client": client, "stored": True, "repeat": True,
                             "weight": meta["weight"]}
            # An .npz without its .json (a kill between the two writes) is not stored: overwrite it.
            store_update(self.run, checked, replace=True)
            current.stored.add(client)
            self.changed.notify_all()
        return 201, {"round": round_num, "client": client, "stored": True, "repeat": False, "weight": checked.weight}


__all__ = ["FILES", "FILL_RETRY_SECONDS", "OpenRound", "RETRY_SECONDS", "Refused", "RoundServer", "UPLOAD_SLACK"]
