"""A device's trained weights back into the round: validate, store, and finish the round on the server.

docs/export.md, "The way back". `ingest` checks an upload against the manifest it was exported with and against
the run as it is now (run, round, client, server weights, names, shapes, dtypes, finite values), adds it to the
round's accumulator by the same pure path a simulated client's update takes (`prism_tf.server.Accumulator`) as a
dry run, and only then stores it in the run directory (`prism_tf.federated.rundir.RunDir.write_device_update`);
anything that fails is refused with one message and changes nothing. `finish_round` aggregates the stored uploads
(`prism_tf.server.finish_round`) and writes the round's checkpoint and metrics row through the same `RunDir`, so
``python -m tff_pipelines resume`` continues after it. Rounds are numbered from 1, as users see them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import prism_tf
from export.client import read_manifest
from prism_tf.federated.config import stored_config
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir, RunError, ServerState

# numpy parses .npy headers with `ast.literal_eval`, and CPython 3.11 before 3.11.8 compiles ASTs thread-unsafely
# ("SystemError: AST constructor recursion depth mismatch", cpython gh-106905): the round server reads uploads in
# several threads, so reading is one at a time (milliseconds; the checks after it run side by side).
_NPY_HEADERS = threading.Lock()


class IngestError(ValueError):
    """An upload that cannot be aggregated (the message names the reason); nothing was changed."""


def read_upload(source: str | os.PathLike[str] | bytes, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of a device's ``.npz`` upload, a file or its bytes (no pickles: object arrays are refused).

    ``max_bytes``: refuse an upload whose arrays would take more (the zip's declared sizes, and each array's header
    against its member's size, are checked before any array is read, so a small upload cannot make the reader
    allocate a huge one).
    """
    if isinstance(source, bytes):
        name, opened = "the upload", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise IngestError(f"{path} does not exist")
        name, opened = str(path), path
    try:
        with _NPY_HEADERS:
            if max_bytes is not None:
                _check_sizes(opened, int(max_bytes))
            data = np.load(opened, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz of named weights")
            with data:
                return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise IngestError(f"{name} is not a readable .npz weights file ({type(e).__name__}: {e})") from None


def _check_sizes(opened: io.BytesIO | Path, max_bytes: int) -> None:
    """Raise `ValueError` if the ``.npz``'s members declare more than ``max_bytes`` in all, or an array header
    claims more data than its member holds."""
    with zipfile.ZipFile(opened) as archive:
        members = archive.infolist()
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise ValueError(f"its arrays take {total:,} bytes, more than the {max_bytes:,} this update can have")
        for member in members:
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                header = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if header is None:
                    raise ValueError(f"{member.filename} is .npy format version {version}; 1.0 and 2.0 are read")
                shape, _, dtype = header(f)  # the header only: no data is read
                if dtype.hasobject:
                    raise ValueError(f"{member.filename} holds Python objects")
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > member.file_size:
                    raise ValueError(f"{member.filename} claims shape {shape}, more than its {member.file_size:,} "
                                     "bytes")
    if isinstance(opened, io.BytesIO):
        opened.seek(0)


def check_upload(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The upload's arrays in the sub-model's weight order, after checking names, shapes, dtypes and values.

    Raises:
      IngestError: a missing or unexpected name, a wrong shape or dtype, or a non-finite value (named).
    """
    expected = {w["name"]: w for w in manifest["weights"]}
    missing = [n for n in expected if n not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise IngestError("the upload's weights do not match the manifest: "
                          + "; ".join(filter(None, [f"missing {', '.join(missing[:5])}" if missing else "",
                                                    f"unexpected {', '.join(extra[:5])}" if extra else ""])))
    values = []
    for name, spec in expected.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(spec["shape"]):
            raise IngestError(f"weight '{name}' has shape {tuple(value.shape)}, the manifest says "
                              f"{tuple(spec['shape'])}")
        if str(value.dtype) != spec["dtype"]:
            raise IngestError(f"weight '{name}' has dtype {value.dtype}, the manifest says {spec['dtype']}")
        if not np.all(np.isfinite(value)):
            raise IngestError(f"weight '{name}' has non-finite values (NaN or Inf): the device's training diverged")
        values.append(value)
    return values


@dataclasses.dataclass
class Ingested:
    """One accepted upload."""

    path: str
    round: int
    client: int
    examples: float

    def report(self) -> str:
        """One line for the user."""
        return (f"accepted client {self.client}'s update for round {self.round} (weight {self.examples:g}): "
                f"{self.path}")


def ingest(
    run_dir: str | os.PathLike[str],
    client_dir: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    *,
    examples: float | None = None,
    replace: bool = False,
) -> Ingested:
    """Validate a device's trained weights (``weights``, a ``.npz`` of ``get_weights`` outputs) against the
    manifest in ``client_dir`` and the run, then store them for `finish_round`.

    ``examples``: how many examples the device trained on (its aggregation weight under the run's default
    ``--weighting examples``); required then, ignored under ``uniform``.

    Raises:
      IngestError: anything that does not match (named); nothing is stored then.
    """
    run = RunDir(run_dir)
    try:
        manifest = read_manifest(client_dir)
    except ValueError as e:
        raise IngestError(str(e)) from None
    checked = check_update(run, manifest, lambda: read_upload(weights), examples)
    return store_update(run, checked, replace=replace)


@dataclasses.dataclass
class CheckedUpdate:
    """An upload `check_update` accepted, not stored yet: its round, client, values in the sub-model's weight
    order (by the manifest's names), selection, aggregation weight and example count."""

    round: int
    client: int
    weights: dict[str, np.ndarray]
    selection: dict[str, Any]
    weight: float
    examples: float | None


def check_update(
    run: RunDir,
    manifest: dict[str, Any],
    arrays: Callable[[], dict[str, np.ndarray]],
    examples: float | None,
    *,
    replay: RoundReplay | None = None,
    open_round: int | None = None,
) -> CheckedUpdate:
    """Every check `ingest` makes, writing nothing: ``manifest`` (what the device was sent) against the run as it
    is now, the upload (``arrays()``, read only once the manifest passed) against the manifest, and a dry run of
    the round's accumulator (`prism_tf.server.Accumulator`) on it.

    ``replay``, ``open_round``: the open round's `RoundReplay` and number if the caller keeps them (the round
    server, the only writer of the run's checkpoints while it serves), else they are read from the run.

    Raises:
      IngestError: anything that does not match (named).
    """
    if not run.config_path.exists():
        raise IngestError(f"no run in {run.path}")
    try:
        run.check_format()
    except RunError as e:
        raise IngestError(str(e)) from None
    run_id = run.read_run_id()
    if manifest["run_id"] != run_id:
        raise IngestError(f"the manifest belongs to run {manifest['run_id']}, not to {run.path} (run {run_id})")
    round_num, client = int(manifest["round"]), int(manifest["client"])
    pending = run.open_round() if open_round is None else int(open_round)
    if round_num != pending:
        raise IngestError(f"the manifest is for round {round_num}, but the run's open round is {pending}: "
                          + ("that round is finished" if round_num < pending else "that round has not started"))
    # The upload against its manifest first: a broken file is refused before the round's model is rebuilt.
    values = check_upload(manifest, arrays())
    weighting = stored_config(run).weighting
    if weighting == "examples" and (examples is None or not (np.isfinite(examples) and examples > 0)):
        raise IngestError("this run weights clients by examples: give --examples N (N > 0), the number of "
                          "examples the device trained on")
    if replay is None or replay.round_num != round_num:
        try:
            replay = RoundReplay(run.path, round_num)
        except RunError as e:
            raise IngestError(str(e)) from None
    if manifest["server_weights_sha256"] != replay.server_digest:
        raise IngestError(f"the manifest was exported from other server weights than round {round_num} starts from")
    selection = prism_tf.Selection.from_dict(manifest["selection"])
    if selection.to_dict() != replay.selection(client).to_dict():
        raise IngestError(f"the manifest's selection is not client {client}'s selection of round {round_num}")
    if weighting == "examples":
        weight = float(examples)
    else:
        weight = 1.0
    try:  # the same arithmetic `finish_round` will run, so a stored upload always aggregates
        prism_tf.server.Accumulator(replay.plan).add(values, selection, weight, name=f"client {client}")
    except ValueError as e:
        raise IngestError(str(e)) from None
    names = [w["name"] for w in manifest["weights"]]
    return CheckedUpdate(round_num, client, dict(zip(names, values, strict=True)), dict(manifest["selection"]),
                         weight, examples)


def store_update(run: RunDir, checked: CheckedUpdate, *, replace: bool = False) -> Ingested:
    """Store an update `check_update` accepted (`RunDir.write_device_update`).

    Raises:
      IngestError: the client's update for the round is stored already and not ``replace``.
    """
    try:
        path = run.write_device_update(checked.round, checked.client, checked.weights, selection=checked.selection,
                                       weight=checked.weight, examples=checked.examples, replace=replace)
    except RunError as e:  # stored already
        raise IngestError(str(e)) from None
    return Ingested(str(path), checked.round, checked.client, checked.weight)


def stored_updates(run: RunDir, round_num: int) -> list[tuple[int, list[np.ndarray], prism_tf.Selection, float]]:
    """The uploads `ingest` stored for round ``round_num`` (1-based): ``(client, values, selection, weight)``, by
    client (`RunDir.read_device_updates`, the selection parsed)."""
    return [(c, values, prism_tf.Selection.from_dict(selection), weight)
            for c, values, selection, weight in run.read_device_updates(round_num)]


@dataclasses.dataclass
class FinishedRound:
    """A round `finish_round` aggregated from device updates."""

    round: int
    clients: list[int]
    kernel_coverage: float

    def report(self) -> str:
        """One line for the user."""
        return (f"finished round {self.round} with {len(self.clients)} device update(s) (clients "
                f"{', '.join(map(str, self.clients))}); kernel coverage {self.kernel_coverage:.3f}. Continue with "
                "`python -m tff_pipelines resume --out RUN`")


def finish_round(
    run_dir: str | os.PathLike[str], round_num: int | None = None, *, min_clients: int = 1,
    finished_by: str = "export finish-round",
) -> FinishedRound:
    """Aggregate the stored device updates of the open round and write its checkpoint and metrics row.

    The server step is `prism_tf.server.finish_round` (per-entry averages, re-factorization, ω reset), the one the
    TFF round runs. Raises `IngestError` if fewer than ``min_clients`` updates are stored (nothing changes).
    ``finished_by``: what the metrics row names as having finished the round.
    """
    run = RunDir(run_dir)
    pending = run.open_round()
    round_num = pending if round_num is None else int(round_num)
    if round_num != pending:
        raise IngestError(f"round {round_num} is not the run's open round ({pending})")
    replay = RoundReplay(run.path, round_num)
    if replay.config.server_lr is not None:
        raise IngestError("this run uses a server optimizer; finishing its rounds outside TFF is not supported")
    updates = stored_updates(run, round_num)
    if len(updates) < max(1, int(min_clients)):
        raise IngestError(f"round {round_num} has {len(updates)} stored device update(s); at least "
                          f"{max(1, int(min_clients))} needed")
    accumulator = prism_tf.server.Accumulator(replay.plan)
    for client, values, selection, weight in updates:
        accumulator.add(values, selection, weight, name=f"client {client}")
    refactorize_every = replay.config.refactorize_every if replay.method.spectral else 0
    new, coverage = prism_tf.server.finish_round(replay.plan, replay.weights, accumulator.sums, accumulator.counts,
                                                 replay.round_index, refactorize_every)
    run.write_server_state(ServerState(list(new), rounds=round_num), round_num)
    # No training loss or timing: a device reports only its weights (the table and plot skip what a row lacks).
    run.append_metrics({"round": round_num, "clients": len(updates), "device_clients": [u[0] for u in updates],
                        "kernel_coverage": float(coverage), "finished_by": finished_by})
    return FinishedRound(round_num, [u[0] for u in updates], float(coverage))


__all__ = ["CheckedUpdate", "FinishedRound", "IngestError", "Ingested", "check_update", "check_upload",
           "finish_round", "ingest", "read_upload", "store_update", "stored_updates"]
