"""The run directory: every file of a run is read and written here, and only here (docs/design.md).

    DIR/config.json        every option of the run (what `resume` re-reads) and the run's ``format_version``
    DIR/metrics.jsonl      one JSON object per round, appended and flushed as the round ends
    DIR/summary.json       final and best accuracy, cost ratios, time
    DIR/checkpoints/       one SavedModel per round, ``program_state_<round>`` (atomic renames), in the format of
                           `tff.program.FileProgramStateManager`, written and read with TensorFlow alone
    DIR/accuracy.png       test accuracy and training loss per round
    DIR/budget.json        the client budget: PriSM's cost at the keep ratio, the matched sizes, cost ratios
    DIR/input_stats.json   per-channel mean/std of the inputs (when the run normalizes them)
    DIR/data_spec.json     per-example input shape and number of classes (what replay and export rebuild from)
    DIR/run_id             the run's identity, made once (what exported client manifests name)
    DIR/device_updates/    devices' trained weights per round (`python -m export ingest`):
                           ``round_<N>/client_<c>.npz`` (the weights by exchange name) and ``client_<c>.json``
    DIR/devices.json       devices enrolled for `python -m export serve`: name -> client id and the SHA-256 of the
                           device's credential (never the credential itself)
    DIR/serve/round_<N>/   the round server's open round: ``round.json`` (when it opened, its deadline, each
                           client's files by SHA-256) and ``files/<sha256>``, the files devices download; with
                           ``--fill simulated``, ``simulating.json`` (the simulation finishing the round, while it
                           runs) and ``simulate.log`` (its output)
    DIR/model.keras        the final deployed model, plain Keras layers, with the statistics it was evaluated with

Format versions: ``config.json`` records ``format_version`` (`FORMAT_VERSION`; a run written before the field
existed is version 1). A run directory of another version is refused with a `RunError` naming both versions, before
anything else of it is read or written.

A checkpoint holds the flattened process state (`ServerState`): the server weights, then the round counter (the
rounds finished, int64), then any server-optimizer state.

Nothing is lost on failure: metrics and a checkpoint are written at the end of every round, and `resume` drops the
metrics of rounds newer than the checkpoint it continues from.

Checkpoints are written to a temporary directory and renamed (a ``program_state_<round>`` that exists is complete).
A latest checkpoint that cannot be read (truncated, corrupt) is passed over with a warning naming it, for the newest
one that reads; saving that round again sets the bad one aside as ``program_state_<round>.corrupt``. Temporary
directories an interrupted save leaves behind (TFF's ``program_state_<round>_temp<n>``, ours
``.program_state_<round>.tmp*``) are removed before the next save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 1
"""The run-directory format this version writes and reads (``config.json``'s ``format_version``)."""
KEEP_CHECKPOINTS = 3
"""Checkpoints a training run keeps (`RunDir.save_state`): the newest ones."""

_CHECKPOINT = re.compile(r"program_state_(\d+)")
# What an interrupted save leaves: TFF's `file_utils.write_saved_model` temp directory, and `write_checkpoint`'s.
_TEMPORARY = re.compile(r"program_state_\d+_temp\d+|\.program_state_\d+\.tmp.*")
_PROBE_BYTES = 64 * 1024  # what `check_writable` writes (and removes) to find a read-only or full file system


def warn_stderr(message: str) -> None:
    """The default warning channel of run-directory readers: one ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RunError(ValueError):
    """A problem with a run directory (missing, incompatible, corrupt)."""


@dataclasses.dataclass
class ServerState:
    """What a checkpoint holds, by name (docs/design.md, "Interrupted runs"): the flat server weights (in
    `prism_tf.plan.SubmodelPlan.tensors` order), the round counter (rounds finished; ``None`` if that position is
    no integer scalar, a checkpoint of another model) and the server optimizer's state (empty without one)."""

    weights: list[np.ndarray]
    rounds: int | None
    optimizer_state: list[np.ndarray] = dataclasses.field(default_factory=list)

    @classmethod
    def from_flat(cls, flat: Sequence[np.ndarray], num_weights: int) -> ServerState:
        """Split a checkpoint's flat arrays; ``num_weights``: the model's number of weight tensors.

        Raises:
          RunError: fewer arrays than the weights and the round counter.
        """
        if len(flat) < num_weights + 1:
            raise RunError(f"the checkpoint holds {len(flat)} arrays, fewer than the model's {num_weights} weights "
                           "and the round counter")
        counter = np.asarray(flat[num_weights])
        rounds = int(counter) if counter.ndim == 0 and np.issubdtype(counter.dtype, np.integer) else None
        return cls(list(flat[:num_weights]), rounds, list(flat[num_weights + 1:]))

    def flat(self) -> list[np.ndarray]:
        """The checkpoint's arrays: weights (float32), the round counter (int64), optimizer state."""
        if self.rounds is None:
            raise ValueError("ServerState.flat: the round counter is unknown")
        return ([np.asarray(w, np.float32) for w in self.weights] + [np.asarray(self.rounds, np.int64)]
                + [np.asarray(v) for v in self.optimizer_state])


class DeviceUpdate(NamedTuple):
    """A device's stored update for a round (`RunDir.write_device_update`): its client, the values in the
    sub-model's weight order, its `prism_tf.Selection` as a dict, and its aggregation weight."""

    client: int
    values: list[np.ndarray]
    selection: dict
    weight: float


class RunDir:
    """Paths and I/O of one run directory: the only code that reads or writes its files (see the module docstring).

    Every read and write checks the run's format version once (`check_format`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._format_checked = False

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    plot_path = property(lambda self: self.path / "accuracy.png")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    model_path = property(lambda self: self.path / "model.keras")
    input_stats_path = property(lambda self: self.path / "input_stats.json")
    budget_path = property(lambda self: self.path / "budget.json")
    data_spec_path = property(lambda self: self.path / "data_spec.json")

    # --- format --------------------------------------------------------------------------------------------------
    def format_version(self) -> int | None:
        """The run's ``format_version`` (1 for a run written before the field existed), ``None`` without a run.

        Raises:
          RunError: ``config.json`` is not valid JSON, or its version is no integer.
        """
        if not self.config_path.exists():
            return None
        version = self._read_config_file().get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise RunError(f"{self.config_path} has format_version {version!r}, not an integer")
        return version

    def check_format(self) -> None:
        """Raise `RunError` if this run was written in another format than `FORMAT_VERSION` (naming both). A
        directory without ``config.json`` passes (there is nothing to check yet)."""
        if self._format_checked:
            return
        version = self.format_version()
        if version is None:
            return
        if version != FORMAT_VERSION:
            newer = "a newer" if version > FORMAT_VERSION else "an older"
            raise RunError(f"{self.path} is a run directory of format version {version}, written by {newer} "
                           f"prism-tf; this prism-tf reads format version {FORMAT_VERSION} only")
        self._format_checked = True

    # --- config ----------------------------------------------------------------------------------------------
    def check_writable(self, *, overwrite: bool) -> None:
        """Raise `RunError` if a new run cannot start here (a file, or an existing run without ``overwrite``)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory")
        if self.config_path.exists() and not overwrite:
            raise RunError(f"{self.path} already holds a run; use `resume --out {self.path}`, --overwrite or "
                           "another --out")
        self.check_can_write()

    def check_can_write(self) -> None:
        """Raise `RunError` if this directory (or where it would be made) cannot be written: read-only, full."""
        _probe_writable(self.path)

    def write_config(self, config: Mapping[str, Any], *, overwrite: bool) -> None:
        """Write the run's options (``config.json``) with this version's ``format_version``.

        Raises:
          RunError: a run is here already and not ``overwrite``; the directory cannot be written.
        """
        self.check_writable(overwrite=overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        stored = {k: v for k, v in config.items() if k != "format_version"}
        _atomic_write(self.config_path, json.dumps({**stored, "format_version": FORMAT_VERSION}, indent=2,
                                                   sort_keys=True))
        self._format_checked = True

    def clear_results(self) -> None:
        """Remove the metrics, summary, plot and checkpoints of a previous run in this directory."""
        for path in (self.metrics_path, self.summary_path, self.plot_path, self.model_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def read_config(self) -> dict[str, Any]:
        """The run's options as stored (``config.json`` without its ``format_version``).

        Raises:
          RunError: no run here, not valid JSON, or another format version.
        """
        if not self.config_path.exists():
            raise RunError(f"no run in {self.path}: {self.config_path} is missing")
        self.check_format()
        return {k: v for k, v in self._read_config_file().items() if k != "format_version"}

    def _read_config_file(self) -> dict[str, Any]:
        try:
            stored = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{self.config_path} is not valid JSON: {e}") from None
        if not isinstance(stored, dict):
            raise RunError(f"{self.config_path} is not a JSON object of options")
        return stored

    # --- metrics ---------------------------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's row to ``metrics.jsonl``, flushed and fsynced (it survives a kill)."""
        self.check_format()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
        self.check_format()
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
        return rows

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep the rows of rounds ``<= last_round`` (the checkpoint a resume continues from)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(self.metrics_path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
        return rows

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's summary (``summary.json``)."""
        self.check_format()
        _atomic_write(self.summary_path, json.dumps(summary, indent=2, default=_json_default))

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json`` (``None``: the run has not finished)."""
        return self._read_json(self.summary_path)

    def write_input_stats(self, stats: Mapping[str, Any] | None) -> None:
        """The per-channel input normalization the run trained with (``None``: pixels / 255 only)."""
        self.check_format()
        if stats is None:
            self.input_stats_path.unlink(missing_ok=True)
        else:
            _atomic_write(self.input_stats_path, json.dumps(stats, indent=2))

    def read_input_stats(self) -> dict[str, Any] | None:
        """``input_stats.json``: ``mean``, ``std`` (per channel) and ``scale`` (``None``: pixels / 255 only)."""
        return self._read_json(self.input_stats_path)

    def write_budget(self, budget: Mapping[str, Any]) -> None:
        """The client budget of the run (``budget.json``: target, matched sizes, cost ratios)."""
        self.check_format()
        _atomic_write(self.budget_path, json.dumps(budget, indent=2, default=_json_default))

    def read_budget(self) -> dict[str, Any] | None:
        """``budget.json`` (`prism_tf.federated.methods.equal_cost_method`'s record; ``None``: a run from before
        it existed)."""
        return self._read_json(self.budget_path)

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        self.check_format()
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path} is not valid JSON: {e}") from None

    def save_model(self, model: Any) -> None:
        """Write the deployed model (``model.keras``) atomically: a file that exists is complete."""
        self.check_format()
        tmp = self.path / ".model.keras.tmp.keras"
        with _replacing(self.model_path, tmp):
            model.save(tmp)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def save_state(self, state: Any, version: int, *, keep: int | None = KEEP_CHECKPOINTS) -> None:
        """Checkpoint the process state ``state`` (any nest of dicts, lists and arrays) as round ``version``, then
        keep only the newest ``keep`` checkpoints (``None``: all), as TFF's ``FileProgramStateManager(keep_total=3,
        keep_first=False)`` did; its files are what that manager reads (`write_checkpoint`).

        Raises:
          RunError: a readable checkpoint ``version`` exists already.
          OSError: it cannot be written (a full or read-only disk; named).
        """
        # A flat list of arrays: nested dict/list structures trip SavedModel's tracking wrappers here.
        self.write_checkpoint([np.asarray(x) for x in _flatten(state)], version, keep=keep)

    @contextlib.contextmanager
    def _writing_checkpoint(self, version: int) -> Iterator[None]:
        """A checkpoint write that fails (a full or read-only disk) raises `OSError` naming the checkpoint, after
        removing its partial temporary directory (giving the space back); TensorFlow raises its own error types."""
        import tensorflow as tf

        try:
            yield
        except (OSError, tf.errors.OpError) as e:
            self.remove_temporaries()
            if isinstance(e, OSError) and e.strerror:
                cause = e.strerror
            else:  # TensorFlow's: "<temporary file>; No space left on device [Op:SaveV2]"
                cause = re.sub(r"\s*\[Op:\w+\]$", "", " ".join(str(e).split()).rsplit(";", 1)[-1].strip())[:200]
            raise OSError(f"checkpoint {self.checkpoint_path(version)} cannot be written: {cause}. The rounds "
                          "before it are checkpointed: make room and `resume`") from None

    def load_state(self, structure: Any, *, warn: Callable[[str], None] | None = warn_stderr) -> tuple[Any, int]:
        """The newest checkpoint that reads, as ``structure`` (the process's initial state), and its round.

        Every ``program_state_<round>`` entry counts, as for TFF's manager (a directory that lost its files too); a
        newer one that cannot be read (truncated, corrupt) is passed over and named through ``warn``.

        Raises:
          RunError: no checkpoint, none readable (naming them), or one that does not match ``structure`` (the
            run's config no longer describes the model it trained).
        """
        self.check_format()
        template = [np.asarray(x) for x in _flatten(structure)]
        bad: list[str] = []
        for flat, version in self._newest_readable(self._state_versions(), bad):
            self._check_matches(flat, template, version)
            self._report_fallback(bad, version, warn)
            return _unflatten(structure, iter(flat)), int(version)
        raise self._none_readable(bad)

    def latest_checkpoint(self, *, warn: Callable[[str], None] | None = warn_stderr) -> int:
        """The round of the newest checkpoint that reads with plain TensorFlow (no TFF); unreadable newer ones are
        named through ``warn``.

        Raises:
          RunError: no checkpoint, or none readable.
        """
        return self.read_checkpoint(warn=warn)[1]

    def open_round(self, *, warn: Callable[[str], None] | None = warn_stderr) -> int:
        """The round this run trains next: one after its newest readable checkpoint (what `resume` continues
        from), 1 when it has none.

        Raises:
          RunError: it has checkpoints, but none reads; another format version.
        """
        self.check_format()
        return self.latest_checkpoint(warn=warn) + 1 if self.checkpoint_versions() else 1

    def has_checkpoints(self) -> bool:
        """Whether the run has any ``program_state_<round>`` entry, readable or not (``False``: no round finished,
        so round 1 starts from the seeded initial model)."""
        return bool(self._state_versions())

    def checkpoint_path(self, version: int) -> Path:
        """Where checkpoint ``version`` (the state after round ``version``) is: ``checkpoints/program_state_<N>``."""
        return self.checkpoint_dir / f"program_state_{int(version)}"

    def remove_temporaries(self) -> list[str]:
        """Remove what interrupted checkpoint saves left behind (TFF ignores its temporary directories but never
        removes them); returns their names. Call only where no save is running (the run's own process)."""
        removed = []
        if self.checkpoint_dir.is_dir():
            for entry in self.checkpoint_dir.iterdir():
                if _TEMPORARY.fullmatch(entry.name):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry.name)
        return sorted(removed)

    def _set_aside_unreadable(self, version: int) -> None:
        """Round ``version`` is about to be saved again: its old checkpoint was passed over because it could not
        be read. Keep it for inspection under another name (TFF would refuse to save over it)."""
        path = self.checkpoint_path(version)
        if not path.exists():
            return
        try:
            self._read_values(path)
        except Exception:  # unreadable: the reason `load_state` fell back past it
            aside = path.with_name(path.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            return
        raise RunError(f"{path} exists and is readable: round {version} is finished already")

    def _newest_readable(self, versions: list[int], bad: list[str]) -> Iterator[tuple[list[np.ndarray], int]]:
        """``(values, version)`` of each checkpoint of ``versions`` that reads, newest first; each unreadable one
        is named in ``bad`` as it is passed over."""
        for version in reversed(versions):
            try:
                values = self._read_values(self.checkpoint_path(version))
            except Exception as e:  # a truncated or corrupt SavedModel raises many kinds of errors
                bad.append(self._unreadable(version, e))
                continue
            yield values, version

    def _unreadable(self, version: int, error: Exception) -> str:
        # TensorFlow prefixes kernel errors with the graph function's name: not the user's concern.
        detail = " ".join(re.sub(r"\{\{function_node [^}]*\}\}", "", str(error)).split())[:200]
        return f"{self.checkpoint_path(version)} cannot be read ({type(error).__name__}: {detail})"

    def _report_fallback(self, bad: list[str], version: int, warn: Callable[[str], None] | None) -> None:
        if bad and warn is not None:
            warn(f"checkpoint {'; '.join(bad)}: truncated or corrupt, passed over; continuing from the previous "
                 f"one, round {version} ({self.checkpoint_path(version)})")

    def _none_readable(self, bad: list[str]) -> RunError:
        if bad:
            return RunError(f"no readable checkpoint in {self.checkpoint_dir}: {'; '.join(bad)}")
        return RunError(f"no checkpoint in {self.checkpoint_dir}")

    def _check_matches(self, flat: list, template: list[np.ndarray], version: int) -> None:
        path = self.checkpoint_path(version)
        if len(flat) != len(template):
            raise RunError(f"checkpoint {path} holds {len(flat)} arrays, this run's model has {len(template)}: "
                           f"{self.config_path} no longer describes the model it trained")
        for i, (value, expected) in enumerate(zip(flat, template, strict=True)):
            if np.shape(value) != expected.shape:
                raise RunError(f"checkpoint {path} holds array {i} of shape {np.shape(value)}, this run's model "
                               f"has {expected.shape}: {self.config_path} no longer describes the model it trained")

    def _state_versions(self) -> list[int]:
        """Every ``program_state_<round>`` entry, complete or not, oldest first (what TFF's manager lists)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for entry in self.checkpoint_dir.iterdir()
                      if (m := _CHECKPOINT.fullmatch(entry.name)))

    def _keep_newest(self, keep: int) -> None:
        """Remove all but the newest ``keep`` checkpoints (TFF's retention with ``keep_first=False``)."""
        for version in self._state_versions()[:-keep]:
            path = self.checkpoint_path(version)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def checkpoint_versions(self) -> list[int]:
        """The rounds with a complete checkpoint, oldest first (``program_state_<round>``; TFF's temporary
        ``..._temp<n>`` directories of an interrupted save are not versions)."""
        if not self.checkpoint_dir.is_dir():
            return []
        versions = []
        for entry in self.checkpoint_dir.iterdir():
            match = _CHECKPOINT.fullmatch(entry.name)
            if match and (entry / "saved_model.pb").exists():
                versions.append(int(match.group(1)))
        return sorted(versions)

    def read_checkpoint(self, version: int | None = None, *,
                        warn: Callable[[str], None] | None = warn_stderr) -> tuple[list[np.ndarray], int]:
        """The flat arrays of checkpoint ``version`` (default: the newest that reads; unreadable newer ones are
        named through ``warn``), read with plain TensorFlow: no TFF.

        A checkpoint is what `save_state` wrote: the flattened process state (server weights, then the round
        counter, then any server-optimizer state; `read_server_state` names them).

        Raises:
          RunError: no such checkpoint (naming the ones there are), or it cannot be read.
        """
        self.check_format()
        versions = self.checkpoint_versions()
        if version is None:
            bad: list[str] = []
            for values, latest in self._newest_readable(versions, bad):
                self._report_fallback(bad, latest, warn)
                return values, latest
            raise self._none_readable(bad)
        version = int(version)
        if version not in versions:
            if not versions:
                raise RunError(f"no checkpoint in {self.checkpoint_dir}")
            raise RunError(f"{self.path} has no checkpoint of round {version}; it has rounds "
                           f"{', '.join(map(str, versions))} (a run keeps its last few)")
        path = self.checkpoint_path(version)
        try:
            return self._read_values(path), version
        except Exception as e:  # a truncated or corrupt SavedModel raises many kinds of errors
            raise RunError(f"checkpoint {self._unreadable(version, e)}: truncated or corrupt") from None

    @staticmethod
    def _read_values(path: Path) -> list[np.ndarray]:
        import tensorflow as tf

        values = tf.saved_model.load(str(path))()
        return [np.asarray(v.read_value() if isinstance(v, tf.Variable) else v) for v in values]

    def read_server_state(self, version: int, num_weights: int) -> ServerState:
        """Checkpoint ``version`` by name (`ServerState`), for a model of ``num_weights`` weight tensors.

        Raises:
          RunError: no such checkpoint, unreadable, or too few arrays for the model.
        """
        flat, _ = self.read_checkpoint(version)
        try:
            return ServerState.from_flat(flat, num_weights)
        except RunError:
            raise RunError(f"checkpoint {int(version)} of {self.path} does not match its config") from None

    def write_server_state(self, state: ServerState, version: int) -> None:
        """Write ``state`` as checkpoint ``version`` (`write_checkpoint`): a round finished outside TFF."""
        self.write_checkpoint(state.flat(), version)

    def write_checkpoint(self, flat: Sequence[np.ndarray], version: int, *, keep: int | None = None) -> None:
        """Write checkpoint ``version`` with TensorFlow alone, in the format `tff.program.FileProgramStateManager`
        writes and reads (a SavedModel whose call returns the flat values, each a variable), then keep only the
        newest ``keep`` checkpoints (``None``: all). Atomic: written to a temporary directory, then renamed; what
        interrupted saves left is removed first.

        Raises:
          RunError: a readable checkpoint ``version`` exists already (an unreadable one is set aside).
          OSError: it cannot be written (a full or read-only disk; named).
        """
        import tensorflow as tf

        self.check_format()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries()
        self._set_aside_unreadable(int(version))
        path = self.checkpoint_path(version)
        module = _ValueModule([tf.Variable(np.asarray(v)) for v in flat])
        with self._writing_checkpoint(version):
            tmp = Path(tempfile.mkdtemp(dir=self.checkpoint_dir, prefix=f".program_state_{int(version)}.tmp"))
            try:
                tf.saved_model.save(module, str(tmp / "state"), signatures={})
                os.replace(tmp / "state", path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if keep is not None:
            self._keep_newest(int(keep))

    # --- identity, device updates, data spec -------------------------------------------------------------------
    run_id_path = property(lambda self: self.path / "run_id")

    def run_id(self) -> str:
        """This run's identity (``run_id``, a random hex string made once, here if not yet): what exported
        manifests name."""
        self.check_format()
        if not self.run_id_path.exists():
            import secrets

            _atomic_write_if_absent(self.run_id_path, secrets.token_hex(16))
        return self.run_id_path.read_text().strip()

    def read_run_id(self) -> str | None:
        """This run's identity if it has one (``None``: nothing was exported from it yet); never makes one."""
        self.check_format()
        return self.run_id_path.read_text().strip() if self.run_id_path.exists() else None

    def device_updates_dir(self, round_num: int) -> Path:
        """Where `export ingest` stores the devices' updates of round ``round_num`` (1-based;
        ``device_updates/round_<N>``)."""
        return self.path / "device_updates" / f"round_{int(round_num)}"

    def device_update_path(self, round_num: int, client: int) -> Path:
        """The weights file of client ``client``'s stored update for round ``round_num`` (its ``.json`` beside)."""
        return self.device_updates_dir(round_num) / f"client_{int(client)}.npz"

    def write_device_update(self, round_num: int, client: int, weights: Mapping[str, np.ndarray], *,
                            selection: Mapping[str, Any], weight: float, examples: float | None,
                            replace: bool = False) -> Path:
        """Store a device's checked update for round ``round_num`` (1-based): ``weights`` by exchange name in the
        sub-model's weight order (``client_<c>.npz``), then what aggregates it (``client_<c>.json``: client,
        round, examples, weight and the `prism_tf.Selection` as a dict). Each file is written atomically.

        Raises:
          RunError: the client's update for that round is stored already and not ``replace``.
        """
        self.check_format()
        path = self.device_update_path(round_num, client)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not replace:
            raise RunError(f"client {int(client)}'s update for round {int(round_num)} is stored already ({path}); "
                           "pass --replace to overwrite it")
        buffer = io.BytesIO()
        np.savez(buffer, **weights)  # uncompressed: a phone's .npy reader reads it too
        write_atomic(path, buffer.getvalue())
        write_atomic(path.with_suffix(".json"), json.dumps(
            {"client": int(client), "round": int(round_num), "examples": examples, "weight": float(weight),
             "selection": dict(selection)}).encode())
        return path

    def read_device_update(self, round_num: int, client: int) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Client ``client``'s stored update for round ``round_num``: its weights by name and its ``.json`` record
        (``None``: not stored; an ``.npz`` whose ``.json`` was never written, by a kill between the two, is not
        stored either)."""
        self.check_format()
        path = self.device_update_path(round_num, client)
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            weights = {name: data[name] for name in data.files}
        return weights, json.loads(meta_path.read_text())

    def read_device_updates(self, round_num: int) -> list[DeviceUpdate]:
        """The stored device updates of round ``round_num`` (1-based), by client (values in the sub-model's weight
        order)."""
        self.check_format()
        out = []
        directory = self.device_updates_dir(round_num)
        for meta_path in sorted(directory.glob("client_*.json")) if directory.is_dir() else []:
            meta = json.loads(meta_path.read_text())
            with np.load(meta_path.with_suffix(".npz"), allow_pickle=False) as data:
                values = [data[name] for name in data.files]
            out.append(DeviceUpdate(int(meta["client"]), values, meta["selection"], float(meta["weight"])))
        return out

    # --- the round server (`python -m export serve`) -----------------------------------------------------------
    devices_path = property(lambda self: self.path / "devices.json")

    def read_devices(self) -> dict[str, dict[str, Any]]:
        """The enrolled devices (``devices.json``): name -> ``{"client", "token_sha256", "enrolled"}`` (empty when
        none is)."""
        return self._read_json(self.devices_path) or {}

    def write_devices(self, devices: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace ``devices.json`` (atomically) with ``devices``."""
        self.check_format()
        _atomic_write(self.devices_path, json.dumps(devices, indent=2, sort_keys=True))

    def serve_round_dir(self, round_num: int) -> Path:
        """The round server's directory of round ``round_num``: ``serve/round_<N>``."""
        return self.path / "serve" / f"round_{int(round_num)}"

    def read_serve_round(self, round_num: int) -> dict[str, Any] | None:
        """``serve/round_<N>/round.json`` (``None``: the server has not opened that round)."""
        return self._read_json(self.serve_round_dir(round_num) / "round.json")

    def write_serve_round(self, round_num: int, record: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
        """Open round ``round_num`` on the round server: its ``files`` (by SHA-256, each written once) first, then
        ``round.json`` (``record``), so a ``round.json`` that exists names only complete files."""
        self.check_format()
        directory = self.serve_round_dir(round_num) / "files"
        directory.mkdir(parents=True, exist_ok=True)
        for digest, data in files.items():
            if not (directory / digest).exists():
                write_atomic(directory / digest, data)
        _atomic_write(self.serve_round_dir(round_num) / "round.json", json.dumps(record, indent=2))

    def serve_file(self, round_num: int, digest: str) -> Path:
        """The file of SHA-256 ``digest`` the round server hands out in round ``round_num``."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RunError(f"{digest!r} is not a SHA-256 hex digest")
        return self.serve_round_dir(round_num) / "files" / digest

    def serve_log_path(self, round_num: int) -> Path:
        """Where the round server keeps the output of the simulation that fills round ``round_num``
        (``serve/round_<N>/simulate.log``; removed with the round's directory once the round is finished)."""
        return self.serve_round_dir(round_num) / "simulate.log"

    def read_serve_simulation(self, round_num: int) -> dict[str, Any] | None:
        """``serve/round_<N>/simulating.json``: the simulation a round server started to fill round ``round_num``
        (``pid``, ``command``, ``started``), or ``None``: none is (or was, when its server was killed) running."""
        return self._read_json(self.serve_round_dir(round_num) / "simulating.json")

    def write_serve_simulation(self, round_num: int, record: Mapping[str, Any] | None) -> None:
        """Record (atomically) the simulation filling round ``round_num``, or remove the record (``None``)."""
        self.check_format()
        path = self.serve_round_dir(round_num) / "simulating.json"
        if record is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(dict(record), indent=2))

    def remove_serve_rounds(self, before: int) -> None:
        """Remove the round server's directories of rounds before ``before`` (finished: nobody downloads them)."""
        base = self.path / "serve"
        for entry in base.iterdir() if base.is_dir() else []:
            match = re.fullmatch(r"round_(\d+)", entry.name)
            if match and int(match.group(1)) < before:
                shutil.rmtree(entry, ignore_errors=True)

    def write_data_spec(self, input_shape: Sequence[int], num_classes: int, vocabulary_size: int | None = None) -> None:
        """What the model takes (``data_spec.json``): per-example input shape and number of classes, and the token
        vocabulary's size for a token model."""
        self.check_format()
        spec: dict[str, Any] = {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
        if vocabulary_size:
            spec["vocabulary_size"] = int(vocabulary_size)
        _atomic_write(self.data_spec_path, json.dumps(spec, indent=2))

    def read_data_spec(self) -> dict[str, Any] | None:
        """``data_spec.json``: ``input_shape``, ``num_classes`` and, for token models, ``vocabulary_size``
        (``None``: a run from before it existed)."""
        return self._read_json(self.data_spec_path)

    # --- plot ------------------------------------------------------------------------------------------------
    def plot(self, rows: Iterable[dict[str, Any]], title: str) -> None:
        """Draw test accuracy and training loss per round (``accuracy.png``, written atomically)."""
        self.check_format()
        # A bare Figure, not pyplot: switching pyplot's backend here would stop a notebook's later plots showing.
        from matplotlib.figure import Figure

        rows = list(rows)
        fig = Figure(figsize=(10, 3.8))
        ax_acc, ax_loss = fig.subplots(1, 2)
        evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
        ax_acc.plot([r["round"] for r in evaluated], [r["eval_accuracy"] for r in evaluated], "o-", label="test")
        trained = [r for r in rows if r.get("train_loss") is not None]  # rows finished from device uploads have none
        ax_acc.plot([r["round"] for r in trained], [r["train_accuracy"] for r in trained], alpha=0.6,
                    label="train (clients)")
        ax_acc.set(xlabel="round", ylabel="accuracy", title=title)
        ax_acc.grid(alpha=0.3)
        ax_acc.legend()
        ax_loss.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], label="train loss")
        if evaluated:
            ax_loss.plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-", label="test loss")
        ax_loss.set(xlabel="round", ylabel="loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        with _replacing(self.plot_path, tmp):
            fig.savefig(tmp, dpi=110)


def _flatten(structure: Any) -> list[Any]:
    if isinstance(structure, dict):
        return [x for v in structure.values() for x in _flatten(v)]
    if isinstance(structure, list | tuple):
        return [x for v in structure for x in _flatten(v)]
    return [structure]


def _unflatten(structure: Any, flat) -> Any:
    if isinstance(structure, dict):
        return type(structure)((k, _unflatten(v, flat)) for k, v in structure.items())
    if isinstance(structure, list | tuple):
        return type(structure)(_unflatten(v, flat) for v in structure)
    value = next(flat)
    return np.asarray(value, dtype=np.asarray(structure).dtype)


class _ValueModule:  # built lazily: tf.Module needs TensorFlow
    def __new__(cls, value: list):
        import tensorflow as tf

        class ValueModule(tf.Module):
            def __init__(self, value: list) -> None:
                super().__init__()
                self._value = value

            @tf.function(input_signature=())
            def __call__(self) -> list:
                return self._value

        return ValueModule(value)


@contextlib.contextmanager
def _replacing(path: Path, tmp: Path) -> Iterator[None]:
    """Write ``tmp`` (the body), then rename it to ``path``. A failed write (a full disk) removes ``tmp`` and raises
    `OSError` naming ``path``: Keras' and matplotlib's writers name neither the file nor the run."""
    try:
        yield
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path} cannot be written: {e.strerror or e}. Every finished round is checkpointed: make "
                      "room and `resume` writes it") from None


def _probe_writable(path: Path) -> None:
    """Write (and remove) a small file where ``path`` is or will be made: a read-only, unwritable or full file
    system is refused before a run spends minutes on data and tracing. Root ignores permission bits, so only a
    real write tells."""
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise RunError(f"--out {path}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".prism-write-probe.")
    except OSError as e:
        raise RunError(f"--out {path} cannot be written: {e.strerror} ({base})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunError(f"--out {path} cannot be written: {e.strerror} ({base})") from None
    finally:
        os.unlink(probe)


def _atomic_write_if_absent(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)  # fails if another process made it first: both then read the same id
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsynced, and a rename (a file
    that exists is complete, even after a crash); the temporary file is removed if the write fails. Every file of
    a run and every export is written this way."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it (a crash leaves old or new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
