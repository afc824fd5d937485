"""The run directory: config, per-round metrics, summary, checkpoints and plots.

    DIR/config.json        every option of the run (what `resume` re-reads)
    DIR/metrics.jsonl      one JSON object per round, appended and flushed as the round ends
    DIR/summary.json       final and best accuracy, cost ratios, time
    DIR/checkpoints/       `tff.program.FileProgramStateManager` versions (atomic renames)
    DIR/accuracy.png       test accuracy and training loss per round
    DIR/budget.json        the client budget: PriSM's cost at the keep ratio, the matched sizes, cost ratios
    DIR/input_stats.json   per-channel mean/std of the inputs (when the run normalizes them)
    DIR/data_spec.json     per-example input shape and number of classes (what replay and export rebuild from)
    DIR/device_updates/    devices' trained weights per round (`python -m export ingest`)
    DIR/model.keras        the final deployed model, plain Keras layers, with the statistics it was evaluated with

Nothing is lost on failure: metrics and a checkpoint are written at the end of every round, and `resume` drops the
metrics of rounds newer than the checkpoint it continues from.

Checkpoints are written to a temporary directory and renamed (a ``program_state_<round>`` that exists is complete).
A latest checkpoint that cannot be read (truncated, corrupt) is passed over with a warning naming it, for the newest
one that reads; saving that round again sets the bad one aside as ``program_state_<round>.corrupt``. Temporary
directories an interrupted save leaves behind (TFF's ``program_state_<round>_temp<n>``, ours
``.program_state_<round>.tmp*``) are removed before the next save.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_CHECKPOINT = re.compile(r"program_state_(\d+)")
# What an interrupted save leaves: TFF's `file_utils.write_saved_model` temp directory, and `write_checkpoint`'s.
_TEMPORARY = re.compile(r"program_state_\d+_temp\d+|\.program_state_\d+\.tmp.*")
_PROBE_BYTES = 64 * 1024  # what `check_writable` writes (and removes) to find a read-only or full file system


def warn_stderr(message: str) -> None:
    """The default warning channel of run-directory readers: one ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _run_sync(coroutine: Any) -> Any:
    """Run one of TFF's program-state coroutines to completion. `asyncio.run` refuses inside a running event loop
    (a Jupyter kernel has one), so there the coroutine runs in a helper thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class RunError(ValueError):
    """A problem with a run directory (missing, incompatible, corrupt)."""


class RunDir:
    """Paths and I/O of one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    plot_path = property(lambda self: self.path / "accuracy.png")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    model_path = property(lambda self: self.path / "model.keras")
    input_stats_path = property(lambda self: self.path / "input_stats.json")
    budget_path = property(lambda self: self.path / "budget.json")
    data_spec_path = property(lambda self: self.path / "data_spec.json")

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

    def write_config(self, config: dict[str, Any], *, overwrite: bool) -> None:
        self.check_writable(overwrite=overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.config_path, json.dumps(config, indent=2, sort_keys=True))

    def clear_results(self) -> None:
        """Remove the metrics, summary, plot and checkpoints of a previous run in this directory."""
        for path in (self.metrics_path, self.summary_path, self.plot_path, self.model_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            raise RunError(f"no run in {self.path}: {self.config_path} is missing")
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.config_path} is not valid JSON: {e}") from None

    # --- metrics ---------------------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
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

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary_path, json.dumps(summary, indent=2, default=_json_default))

    def write_input_stats(self, stats: dict[str, Any] | None) -> None:
        """The per-channel input normalization the run trained with (``None``: pixels / 255 only)."""
        if stats is None:
            self.input_stats_path.unlink(missing_ok=True)
        else:
            _atomic_write(self.input_stats_path, json.dumps(stats, indent=2))

    def write_budget(self, budget: dict[str, Any]) -> None:
        """The client budget of the run (``budget.json``: target, matched sizes, cost ratios)."""
        _atomic_write(self.budget_path, json.dumps(budget, indent=2, default=_json_default))

    def save_model(self, model) -> None:
        """Write the deployed model (``model.keras``) atomically: a file that exists is complete."""
        tmp = self.path / ".model.keras.tmp.keras"
        with _replacing(self.model_path, tmp):
            model.save(tmp)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_manager(self, keep_total: int = 3) -> tff.program.FileProgramStateManager:  # noqa: F821
        import tensorflow_federated as tff

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return tff.program.FileProgramStateManager(str(self.checkpoint_dir), keep_total=keep_total, keep_first=False)

    def save_state(self, manager: tff.program.FileProgramStateManager,  # noqa: F821
                   state: Any, version: int) -> None:
        """Checkpoint ``state`` as round ``version`` (atomic: TFF writes a temporary directory and renames it)."""
        self.remove_temporaries()
        self._set_aside_unreadable(int(version))
        # A flat list of arrays: nested dict/list structures trip SavedModel's tracking wrappers here.
        with self._writing_checkpoint(version):
            _run_sync(manager.save([np.asarray(x) for x in _flatten(state)], version))

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

    def load_state(self, manager: tff.program.FileProgramStateManager,  # noqa: F821
                   structure: Any, *, warn: Callable[[str], None] = warn_stderr) -> tuple[Any, int]:
        """The newest checkpoint that reads, as ``structure``, and its round.

        A newer checkpoint that cannot be read (truncated, corrupt) is passed over and named through ``warn``.

        Raises:
          RunError: no checkpoint, none readable (naming them), or one that does not match ``structure`` (the
            run's config no longer describes the model it trained).
        """
        template = [np.asarray(x) for x in _flatten(structure)]
        versions = _run_sync(manager.get_versions()) or []
        bad: list[str] = []
        for version in reversed(versions):
            try:
                flat = _run_sync(manager.load(int(version), template))
            except Exception as e:  # a truncated or corrupt SavedModel raises many kinds of errors
                bad.append(self._unreadable(version, e))
                continue
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
          RunError: it has checkpoints, but none reads.
        """
        return self.latest_checkpoint(warn=warn) + 1 if self.checkpoint_versions() else 1

    def checkpoint_path(self, version: int) -> Path:
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
        counter, then any server-optimizer state).

        Raises:
          RunError: no such checkpoint (naming the ones there are), or it cannot be read.
        """
        versions = self.checkpoint_versions()
        if version is None:
            bad: list[str] = []
            for latest in reversed(versions):
                try:
                    values = self._read_values(self.checkpoint_path(latest))
                except Exception as e:  # a truncated or corrupt SavedModel raises many kinds of errors
                    bad.append(self._unreadable(latest, e))
                    continue
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

    def write_checkpoint(self, flat: list[np.ndarray], version: int) -> None:
        """Write checkpoint ``version`` without TFF, in the format `tff.program.FileProgramStateManager` reads (a
        SavedModel whose call returns the flat values): a round finished outside TFF (device ingest) continues
        with ``resume``. Atomic: written to a temporary directory, then renamed.

        Raises:
          RunError: a readable checkpoint ``version`` exists already (an unreadable one is set aside).
        """
        import tensorflow as tf

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

    def run_id(self) -> str:
        """This run's identity (``run_id``, a random hex string made once): what exported manifests name."""
        path = self.path / "run_id"
        if not path.exists():
            import secrets

            _atomic_write_if_absent(path, secrets.token_hex(16))
        return path.read_text().strip()

    def device_updates_dir(self, round_num: int) -> Path:
        """Where `export ingest` stores the devices' updates of round ``round_num`` (``device_updates/round_<N>``)."""
        return self.path / "device_updates" / f"round_{int(round_num)}"

    def read_device_updates(self, round_num: int) -> list[tuple[int, list[np.ndarray], dict, float]]:
        """The stored device updates of round ``round_num``: ``(client, values, selection_dict, weight)`` by client
        (values in the sub-model's weight order)."""
        out = []
        directory = self.device_updates_dir(round_num)
        for meta_path in sorted(directory.glob("client_*.json")) if directory.is_dir() else []:
            meta = json.loads(meta_path.read_text())
            with np.load(meta_path.with_suffix(".npz"), allow_pickle=False) as data:
                values = [data[name] for name in data.files]
            out.append((int(meta["client"]), values, meta["selection"], float(meta["weight"])))
        return out

    def write_data_spec(self, input_shape: Any, num_classes: int) -> None:
        """What the model takes (``data_spec.json``): per-example input shape and number of classes."""
        _atomic_write(self.data_spec_path, json.dumps(
            {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}, indent=2))

    def read_data_spec(self) -> dict[str, Any] | None:
        if not self.data_spec_path.exists():
            return None
        return json.loads(self.data_spec_path.read_text())

    # --- plot ------------------------------------------------------------------------------------------------
    def plot(self, rows: Iterable[dict[str, Any]], title: str) -> None:
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
