"""Bad input, table-driven: each row gives one clear message naming the problem and changes nothing on disk.

Rows span the training CLI (``python -m tff_pipelines``), the export CLI (``python -m export``), the Python API,
data folders and archives, checkpoints, run directories, exported client manifests and device weight files, and
the disk itself (a read-only and a full tmpfs; skipped with the reason when mounting is not allowed). Every row
builds its bad input in its own directory, hashes that tree, runs, and hashes it again: the two must be equal.
CLI rows run in-process (`main(argv)`; argparse's refusals are its `SystemExit(2)`) and must exit 2 with exactly
one ``error:`` line and no traceback.

Cases covered elsewhere are not repeated: a missing dataset path, an unknown partition, ``resume`` of an empty
directory, ``train`` over an existing run, ``--out`` naming a file and ``resume --rounds 0`` (tests/test_cli.py,
as real subprocesses); decoding details per image format (tests/test_data.py); ``export model``'s own option
checks (tests/test_export_model.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from export import cli as export_cli
from export import ingest as ingest_lib
from export.client import client_round
from prism_tf.federated import data as data_lib
from prism_tf.federated.replay import RoundReplay
from prism_tf.federated.rundir import RunDir, RunError
from tff_pipelines.program import cli as train_cli
from tff_pipelines.program import driver

DATA = "variables/variables.data-00000-of-00001"
OPEN_ROUND = 3  # the manifest rows: round 3 of a copy of `tiny_run` (2 rounds finished), extended to 3


# --------------------------------------------------------------------------------------------- helpers


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by content hash, directories and links by kind."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _images(root: Path, classes: dict[str, int], *, size: tuple[int, int] = (8, 8), splits=("train", "test")) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _train(dataset: Path, out: Path, **flags: Any) -> list[str]:
    options = dict(dataset=dataset, model="small_cnn", width=4, clients=4, clients_per_round=2, rounds=1,
                   batch_size=4)
    options.update(flags)
    argv = ["train", "--out", str(out)]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"\1" * 4096)
            f.flush()


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@dataclasses.dataclass
class Ctx:
    """What the rows build from: the shared datasets and runs (read only: rows copy them), and mounting."""

    shapes: Path
    tiny_run: Path
    open_run: Path  # tiny_run extended to 3 rounds: round 3 is open
    client_dir: Path  # a manifest of round 3 for `client`, as `export client` writes it (without the TFLite file)
    upload: Path  # that client's weights, as a device uploads them (untrained: valid names, shapes and values)
    client: int
    other_client: int
    mount: Callable[[Path, str], None]

    def run_copy(self, sandbox: Path, src: Path | None = None) -> Path:
        return Path(shutil.copytree(src or self.tiny_run, sandbox / "run"))

    def round_copy(self, sandbox: Path) -> tuple[Path, Path, Path]:
        """A copy of the open run, of the client's manifest directory and of its upload."""
        run = self.run_copy(sandbox, self.open_run)
        client_dir = Path(shutil.copytree(self.client_dir, sandbox / "client"))
        upload = Path(shutil.copy(self.upload, sandbox / "upload.npz"))
        return run, client_dir, upload


@pytest.fixture(scope="module")
def shared(tiny_run, shapes_dataset, tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("bad_input")
    open_run = Path(shutil.copytree(tiny_run, base / "open_run"))
    run = RunDir(open_run)
    run.write_config({**run.read_config(), "rounds": OPEN_ROUND}, overwrite=True)
    replay = RoundReplay(open_run, OPEN_ROUND)
    client, other = replay.clients()[0], next(c for c in range(replay.config.clients) if c not in replay.clients())
    exported = client_round(replay, client)
    client_dir = base / "client"
    client_dir.mkdir()
    (client_dir / "manifest.json").write_text(json.dumps(exported.manifest))
    np.savez(base / "upload.npz", **exported.weights)
    return dict(shapes=shapes_dataset, tiny_run=tiny_run, open_run=open_run, client_dir=client_dir,
                upload=base / "upload.npz", client=client, other_client=other)


@pytest.fixture
def ctx(shared, monkeypatch, tmp_path_factory) -> Iterator[Ctx]:
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path_factory.mktemp("cache")))  # decoded-data caches: not the rows'
    mounted: list[Path] = []

    def mount(target: Path, options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root and "
                        "CAP_SYS_ADMIN")
        mounted.append(target)

    yield Ctx(mount=mount, **shared)
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


# --------------------------------------------------------------------------------------------- the rows
# Each row: (what it feeds, where) -> a call; and the words its one message must contain. A call returns
# ("cli", exit code, stderr, stdout) or ("api", exception).

ROWS: dict[str, tuple[Callable[[Ctx, Path], Callable[[], tuple]], tuple[str, ...]]] = {}


def row(name: str, *words: str):
    def register(build):
        ROWS[name] = (build, words)
        return build

    return register


def _cli(main: Callable[[list[str]], int], argv: list[str]) -> Callable[[], tuple]:
    def call() -> tuple:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's refusals
            code = e.code
        return ("cli", code)

    return call


def _api(fn: Callable[[], Any], error: type[BaseException]) -> Callable[[], tuple]:
    def call() -> tuple:
        with pytest.raises(error) as caught:
            fn()
        return ("api", caught.value)

    return call


# --- the training CLI: options
@row("keep ratio 0", "--keep-ratio", "0")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", keep_ratio=0))


@row("keep ratio 1.5", "--keep-ratio", "1.5")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", keep_ratio=1.5))


@row("keep ratio NaN", "--keep-ratio", "nan")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", keep_ratio="nan"))


@row("unknown method", "--method", "invalid choice", "fedprox")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", method="fedprox"))


@row("unknown strategy", "--strategy", "invalid choice", "greedy")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", strategy="greedy"))


@row("more clients per round than clients", "--clients-per-round", "6", "--clients", "4")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", clients=4, clients_per_round=6))


@row("examples per client below the batch size", "--examples-per-client", "2", "--batch-size")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", examples_per_client=2))


@row("odd batch size", "batch size 5 is odd", "TF_ENABLE_ONEDNN_OPTS")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", batch_size=5))


@row("client learning rate NaN", "--client-lr", "finite")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", client_lr="nan"))


@row("malformed keep mix", "--keep-mix", "0.2-0.6")
def _(ctx, box):
    return _cli(train_cli.main, _train(ctx.shapes, box / "out", keep_mix="0.2-0.6"))


@row("more clients than training examples", "too many clients", "20 clients", "8 training examples")
def _(ctx, box):
    data = _images(box / "data", {"a": 4, "b": 4})
    return _cli(train_cli.main, _train(data, box / "out", clients=20))


# --- the training CLI: data folders and archives
@row("empty data folder", "no train/ or test/ folder", "data")
def _(ctx, box):
    (box / "data").mkdir()
    return _cli(train_cli.main, _train(box / "data", box / "out"))


@row("data folder without test/", "no test/ folder")
def _(ctx, box):
    return _cli(train_cli.main, _train(_images(box / "data", {"a": 2, "b": 2}, splits=("train",)), box / "out"))


@row("corrupt image", "cannot decode image", "broken.png")
def _(ctx, box):
    data = _images(box / "data", {"a": 2, "b": 2})
    (data / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return _cli(train_cli.main, _train(data, box / "out"))


@row("mixed image sizes", "big.png", "all images of a dataset must share one size")
def _(ctx, box):
    data = _images(box / "data", {"a": 2, "b": 2})
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(data / "test" / "b" / "big.png")
    return _cli(train_cli.main, _train(data, box / "out"))


@row("single-class data", "only one class folder", "a", "at least 2")
def _(ctx, box):
    return _cli(train_cli.main, _train(_images(box / "data", {"a": 4}), box / "out"))


@row("corrupt archive", "cannot read archive", "data.tar.gz")
def _(ctx, box):
    (box / "data.tar.gz").write_bytes(b"\x1f\x8b\x08 this is no gzip stream")
    return _cli(train_cli.main, _train(box / "data.tar.gz", box / "out"))


@row("truncated archive", "cannot read archive", "cut.tar.gz")
def _(ctx, box):
    source = _images(box / "src", {"a": 6, "b": 6}, size=(16, 16))
    with tarfile.open(box / "cut.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="data")
    shutil.rmtree(source)
    _truncate(box / "cut.tar.gz")
    return _cli(train_cli.main, _train(box / "cut.tar.gz", box / "out"))


# --- the training CLI: where the run goes
@row("--out under a file", "is a file", "not a directory")
def _(ctx, box):
    (box / "a_file").write_text("not a directory\n")
    return _cli(train_cli.main, _train(ctx.shapes, box / "a_file" / "run"))


@row("unwritable --out (read-only file system)", "cannot be written", "Read-only file system")
def _(ctx, box):
    ctx.mount(box / "ro", "size=256k")
    (box / "ro" / "kept.txt").write_text("was here before\n")
    subprocess.run(["mount", "-o", "remount,ro", str(box / "ro")], check=True)
    return _cli(train_cli.main, _train(ctx.shapes, box / "ro" / "run"))


@row("full disk", "cannot be written", "No space left on device")
def _(ctx, box):
    ctx.mount(box / "full", "size=64k")
    _fill(box / "full" / "filler")
    return _cli(train_cli.main, _train(ctx.shapes, box / "full" / "run"))


@row("export model to a full disk", "cannot write", "m.keras", "No space left on device")
def _(ctx, box):
    ctx.mount(box / "full", "size=64k")
    _fill(box / "full" / "filler")
    return _cli(export_cli.main, ["model", "--run", str(ctx.tiny_run), "--out", str(box / "full" / "m.keras"),
                                  "--eval-examples", "0"])


# --- resume: run directories and checkpoints
@row("resume a run on a read-only file system", "cannot be written", "Read-only file system")
def _(ctx, box):
    ctx.mount(box / "ro", "size=8m")
    run = ctx.run_copy(box / "ro")
    subprocess.run(["mount", "-o", "remount,ro", str(box / "ro")], check=True)
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("run directory from another version (unknown option)", "config.json", "unknown options", "lr_decay")
def _(ctx, box):
    run = ctx.run_copy(box)
    _edit_json(run / "config.json", lr_decay=0.5)
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("run directory whose config names a method this version lacks", "--method", "fedprox")
def _(ctx, box):
    run = ctx.run_copy(box)
    _edit_json(run / "config.json", method="fedprox")
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("config.json not JSON", "config.json", "not valid JSON")
def _(ctx, box):
    run = ctx.run_copy(box)
    _truncate(run / "config.json")
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("config no longer describes the checkpointed model", "checkpoint 2", "does not match the model",
     "config.json")
def _(ctx, box):
    run = ctx.run_copy(box)
    _edit_json(run / "config.json", width=8)
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("every checkpoint truncated", "no readable checkpoint", "program_state_1", "program_state_2")
def _(ctx, box):
    run = ctx.run_copy(box)
    for version in (1, 2):
        _truncate(run / "checkpoints" / f"program_state_{version}" / DATA)
    return _cli(train_cli.main, ["resume", "--out", str(run)])


@row("resume --rounds below the finished rounds", "--rounds 1", "below the 2 rounds")
def _(ctx, box):
    return _cli(train_cli.main, ["resume", "--out", str(ctx.run_copy(box)), "--rounds", "1"])


@row("resume --until-round of a finished round", "--until-round 2", "finished already", "open round is 3")
def _(ctx, box):
    return _cli(train_cli.main, ["resume", "--out", str(ctx.run_copy(box)), "--until-round", "2"])


@row("resume --until-round past the run's last round", "--until-round 3", "last round, 2", "--rounds")
def _(ctx, box):
    return _cli(train_cli.main, ["resume", "--out", str(ctx.run_copy(box)), "--until-round", "3"])


@row("resume --until-round 0", "--until-round must be at least 1")
def _(ctx, box):
    return _cli(train_cli.main, ["resume", "--out", str(ctx.run_copy(box)), "--until-round", "0"])


# --- export: checkpoints
@row("export model from a truncated checkpoint", "program_state_2", "cannot be read", "truncated or corrupt")
def _(ctx, box):
    run = ctx.run_copy(box)
    _truncate(run / "checkpoints" / "program_state_2" / DATA)
    return _cli(export_cli.main, ["model", "--run", str(run), "--round", "2", "--out", str(box / "m.keras"),
                                  "--eval-examples", "0"])


@row("export client past the configured rounds (cosine schedule)", "round 3 is past the 2 rounds", "cosine",
     "--rounds 3")
def _(ctx, box):
    # The open round of a finished 2-round run: its cosine rate is not defined until the run is extended.
    return _cli(export_cli.main, ["client", "--run", str(ctx.run_copy(box)), "--client", "0", "--out",
                                  str(box / "client_out")])


@row("export client of a finished round", "round 2 of", "is finished (its open round is 3)", "omit --round")
def _(ctx, box):
    # A device would train it for nothing: `ingest` refuses updates of finished rounds.
    return _cli(export_cli.main, ["client", "--run", str(ctx.run_copy(box, ctx.open_run)), "--client", "0",
                                  "--round", "2", "--out", str(box / "client_out")])


# --- export ingest: manifests and device weight files
def _ingest(run: Path, client_dir: Path, upload: Path, *extra: str) -> Callable[[], tuple]:
    return _cli(export_cli.main, ["ingest", "--run", str(run), "--client-dir", str(client_dir), "--weights",
                                  str(upload), *extra])


def _ingest_row(manifest: dict | None = None, weights: Callable[[dict], dict] | None = None,
                examples: str = "8"):
    def build(ctx: Ctx, box: Path):
        run, client_dir, upload = ctx.round_copy(box)
        if manifest:
            _edit_json(client_dir / "manifest.json", **{k: v(ctx) if callable(v) else v for k, v in manifest.items()})
        if weights:
            with np.load(upload) as data:
                arrays = weights({k: data[k] for k in data.files})
            np.savez(upload, **arrays)
        return _ingest(run, client_dir, upload, "--examples", examples)

    return build


def _one_inf(value: np.ndarray) -> np.ndarray:
    value = value.copy()
    value.flat[0] = np.inf
    return value


def _first(arrays: dict, fn: Callable[[np.ndarray], np.ndarray | None]) -> dict:
    name = next(iter(arrays))
    value = fn(arrays[name])
    return {**{k: v for k, v in arrays.items() if k != name}, **({} if value is None else {name: value})}


ROWS["manifest from another run"] = (_ingest_row(manifest={"run_id": "0" * 32}), ("belongs to run", "0" * 32))
ROWS["manifest from another round"] = (_ingest_row(manifest={"round": 2}),
                                       ("round 2", "open round is 3", "finished"))
ROWS["manifest from another client"] = (_ingest_row(manifest={"client": lambda ctx: ctx.other_client}),
                                        ("not client", "selection of round 3"))
ROWS["manifest from other server weights"] = (_ingest_row(manifest={"server_weights_sha256": "f" * 64}),
                                              ("other server weights", "round 3"))
ROWS["manifest of another format"] = (_ingest_row(manifest={"format": "tflite-only"}),
                                      ("manifest.json", "not a prism-tf client manifest"))
ROWS["device weights with NaN"] = (_ingest_row(weights=lambda a: _first(a, lambda v: np.full_like(v, np.nan))),
                                   ("non-finite", "NaN or Inf"))
ROWS["device weights with Inf"] = (_ingest_row(weights=lambda a: _first(a, _one_inf)), ("non-finite", "NaN or Inf"))
ROWS["device weights of the wrong shape"] = (_ingest_row(weights=lambda a: _first(a, lambda v: v.reshape(-1))),
                                             ("has shape", "the manifest says"))
ROWS["device weights missing a tensor"] = (_ingest_row(weights=lambda a: _first(a, lambda v: None)),
                                           ("do not match the manifest", "missing"))
ROWS["no --examples for an examples-weighted run"] = (_ingest_row(examples="0"), ("--examples N", "N > 0"))


@row("device weights file not an .npz", "upload.npz", "not a readable .npz")
def _(ctx, box):
    run, client_dir, upload = ctx.round_copy(box)
    upload.write_bytes(b"PK\x03\x04 truncated zip")
    return _ingest(run, client_dir, upload, "--examples", "8")


@row("manifest not JSON", "manifest.json", "not valid JSON")
def _(ctx, box):
    run, client_dir, upload = ctx.round_copy(box)
    _truncate(client_dir / "manifest.json")
    return _ingest(run, client_dir, upload, "--examples", "8")


# --- the Python API
@row("API: load_dataset of single-class data", "only one class folder")
def _(ctx, box):
    data = _images(box / "data", {"only": 3})
    return _api(lambda: data_lib.load_dataset(str(data), cache_dir=box / "cache"), data_lib.DataError)


@row("API: start with more clients per round than clients", "--clients-per-round (9) exceeds --clients (4)")
def _(ctx, box):
    config = driver.TrainConfig(dataset=str(ctx.shapes), clients=4, clients_per_round=9)
    return _api(lambda: driver.start(config, str(box / "out")), ValueError)


@row("API: read_checkpoint of a truncated checkpoint", "program_state_1", "cannot be read")
def _(ctx, box):
    run = ctx.run_copy(box)
    _truncate(run / "checkpoints" / "program_state_1" / "saved_model.pb")
    return _api(lambda: RunDir(run).read_checkpoint(1), RunError)


@row("API: check_upload with float64 weights", "has dtype float64", "float32")
def _(ctx, box):
    manifest = json.loads((ctx.client_dir / "manifest.json").read_text())
    with np.load(ctx.upload) as data:
        arrays = {k: data[k].astype(np.float64) for k in data.files}
    return _api(lambda: ingest_lib.check_upload(manifest, arrays), ingest_lib.IngestError)


# --------------------------------------------------------------------------------------------- the tests


def test_the_table_is_large_enough():
    assert len(ROWS) >= 30, len(ROWS)


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_gets_one_clear_message_and_changes_nothing(name, ctx, tmp_path, capsys):
    build, words = ROWS[name]
    box = tmp_path / "box"
    box.mkdir()
    call = build(ctx, box)
    before = _tree(box)
    capsys.readouterr()
    result = call()
    out, err = capsys.readouterr()
    if result[0] == "cli":
        code = result[1]
        assert code == 2, f"exit {code}\n--- stderr\n{err}\n--- stdout\n{out}"
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, err
        message = errors[0]
        assert "results:" not in out
    else:
        message = str(result[1])
        assert "\n" not in message.strip(), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _tree(box) == before, "the failed call changed files that were there before"


def test_the_untampered_upload_is_accepted(ctx, tmp_path, capsys):
    """The manifest rows fail for their one change: the same upload and manifest, untouched, are accepted."""
    run, client_dir, upload = ctx.round_copy(tmp_path)
    assert _ingest(run, client_dir, upload, "--examples", "8")() == ("cli", 0), capsys.readouterr().err
    stored = RunDir(run).read_device_updates(OPEN_ROUND)
    assert [client for client, *_ in stored] == [ctx.client]
